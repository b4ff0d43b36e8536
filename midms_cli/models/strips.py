"""The first stage's large-resolution layers evaluated in horizontal strips, for inference.

At 256 px every activation of the outer levels is 32-64 MB, and a whole-tensor
GroupNorm-swish-conv unit holds its input, the normalised copy, the convolution's output and
oneDNN's re-laid-out copies of both at once. Here each unit writes its output strip by strip: the
GroupNorm statistics are taken over the whole input first (the numbers nn.GroupNorm computes),
then each strip and its one-row halo is normalised, passed through swish and convolved, so the
convolutions see exactly the rows they would see on the whole tensor. Only a unit's input and
output are ever whole. The values are those of the whole-tensor path up to float32 rounding: the
normalisation is bit for bit (torch's GroupNorm kernel fuses multiply-add, as here), and so is a
convolution wherever oneDNN picks the same algorithm for a strip as for the whole tensor.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Groups the statistics pass takes at once: that many groups' worth of a normalised copy is
# the only temporary of the statistics pass.
GROUPS_PER_SLICE = 4

# Torch convolves one float32 image of at most 20480 input elements with its own im2col kernel
# instead of oneDNN, and the two round their sums differently: strips stay above that size, and a
# tensor that fits in one strip is computed whole, so both paths use the same algorithm.
MIN_STRIP_ELEMENTS = 32768

# A strip's source: rows [lo, hi) of a convolution's (normalised, activated) input.
Source = Callable[[int, int], Tensor]


def layout(x: Tensor) -> torch.memory_format:
    """The memory format a tensor is stored in (channels-last or plain), kept by its strips' outputs."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def group_norm_affine(x: Tensor, norm: nn.GroupNorm) -> tuple[Tensor, Tensor]:
    """(scale, shift), each (N, C, 1, 1), with norm(x) = x·scale + shift (fused multiply-add).

    The group means and reciprocal standard deviations come from torch's own GroupNorm kernel run
    over a few groups at a time (identical statistics without a whole normalised copy);
    scale = γ·rstd and shift = β − scale·mean, as that kernel forms them.
    """
    n, channels = x.shape[:2]
    per_group = channels // norm.num_groups
    step = GROUPS_PER_SLICE * per_group
    means, rstds = [], []
    for start in range(0, channels, step):
        part = x[:, start:start + step].contiguous(memory_format=layout(x))
        groups = part.shape[1] // per_group
        _, mean, rstd = torch.native_group_norm(part, None, None, n, part.shape[1],
                                                part.shape[2] * part.shape[3], groups, norm.eps)
        means.append(mean)
        rstds.append(rstd)
    mean = torch.cat(means, 1).repeat_interleave(per_group, 1)  # (N, C)
    rstd = torch.cat(rstds, 1).repeat_interleave(per_group, 1)
    scale = rstd * norm.weight
    shift = fused_multiply_add(-scale, mean, norm.bias)
    return scale[:, :, None, None], shift[:, :, None, None]


def fused_multiply_add(x: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """x·a + b rounded once to x's dtype (the product of two float32 is exact in float64)."""
    return torch.addcmul(b.double(), x.double(), a.double()).to(x.dtype)


def norm_swish(norm: nn.GroupNorm) -> Callable[[Tensor], Callable[[Tensor], Tensor]]:
    """For a whole input x: the function mapping rows of x to swish(norm(x)) at those rows."""

    def bind(x: Tensor) -> Callable[[Tensor], Tensor]:
        scale, shift = group_norm_affine(x, norm)
        return lambda rows: F.silu(fused_multiply_add(rows, scale, shift), inplace=True)

    return bind


def strip_rows(x: Tensor, channels: int, width: int, budget_bytes: int) -> int:
    """Rows per strip when a row of the widest tensor involved is (N, channels, width), in x's
    dtype: about `budget_bytes` per strip, never below MIN_STRIP_ELEMENTS."""
    row = x.shape[0] * channels * width
    return max(budget_bytes // (row * x.element_size()), -(-MIN_STRIP_ELEMENTS // row))


def conv3x3_in_strips(
    conv: nn.Conv2d,
    source: Source,
    like: Tensor,
    height: int,
    width: int,
    rows: int,
    residual: Callable[[int, int], Tensor] | None = None,
) -> Tensor:
    """conv (3x3, stride 1, padding 1) of the input that `source` yields, `rows` output rows at a
    time, plus `residual(start, stop)` when given; (N, C_out, height, width), in like's layout."""
    out = like.new_empty((like.shape[0], conv.out_channels, height, width)).contiguous(
        memory_format=layout(like))
    for start in range(0, height, rows):
        stop = min(start + rows, height)
        lo, hi = max(start - 1, 0), min(stop + 1, height)
        strip = F.pad(source(lo, hi), (0, 0, 1 - (start - lo), 1 - (hi - stop)))  # image border rows
        result = F.conv2d(strip, conv.weight, conv.bias, padding=(0, 1))
        if residual is not None:
            result = result.add_(residual(start, stop))
        out[:, :, start:stop] = result
        del strip, result
    return out


def resnet_block(block: nn.Module, x: Tensor, budget_bytes: int) -> Tensor:
    """A first-stage ResnetBlock (eval mode) on x in strips; equals block(x) to float32 rounding."""
    _, _, height, width = x.shape
    rows = strip_rows(x, max(x.shape[1], block.conv1.out_channels), width, budget_bytes)
    if rows >= height:
        return block(x)
    activated = norm_swish(block.norm1)(x)
    h = conv3x3_in_strips(block.conv1, lambda lo, hi: activated(x[:, :, lo:hi]), x, height, width, rows)
    activated = norm_swish(block.norm2)(h)
    if hasattr(block, "nin_shortcut"):
        def shortcut(start: int, stop: int) -> Tensor:
            return block.nin_shortcut(x[:, :, start:stop])
    else:
        def shortcut(start: int, stop: int) -> Tensor:
            return x[:, :, start:stop]
    return conv3x3_in_strips(block.conv2, lambda lo, hi: activated(h[:, :, lo:hi]), h, height, width,
                             rows, residual=shortcut)


def upsample(module: nn.Module, x: Tensor, budget_bytes: int) -> Tensor:
    """Nearest 2x upsampling then a 3x3 conv, in strips: the whole upsampled tensor is never built."""
    height, width = 2 * x.shape[2], 2 * x.shape[3]

    def upsampled(lo: int, hi: int) -> Tensor:
        first = lo // 2
        doubled = F.interpolate(x[:, :, first:(hi + 1) // 2], scale_factor=2.0, mode="nearest")
        return doubled[:, :, lo - 2 * first:hi - 2 * first]

    rows = strip_rows(x, x.shape[1], width, budget_bytes)
    if rows >= height:
        return module(x)
    return conv3x3_in_strips(module.conv, upsampled, x, height, width, rows)


def downsample(module: nn.Module, x: Tensor, budget_bytes: int) -> Tensor:
    """The stride-2 3x3 conv after a right/bottom zero pad, in strips of output rows."""
    conv = module.conv
    height, width = x.shape[2], x.shape[3]
    out_height, out_width = height // 2, width // 2  # (H + 1 − 3) // 2 + 1 with the pad of one
    out = x.new_empty((x.shape[0], conv.out_channels, out_height, out_width)).contiguous(
        memory_format=layout(x))
    rows = -(-strip_rows(x, x.shape[1], width, budget_bytes) // 2)  # output rows: two input rows each
    if rows >= out_height:
        return module(x)
    for start in range(0, out_height, rows):
        stop = min(start + rows, out_height)
        lo, hi = 2 * start, min(2 * stop + 1, height)
        strip = F.pad(x[:, :, lo:hi], (0, 1, 0, 2 * stop + 1 - hi))
        out[:, :, start:stop] = F.conv2d(strip, conv.weight, conv.bias, stride=2)
    return out


def output_head(norm: nn.GroupNorm, conv: nn.Conv2d, x: Tensor, budget_bytes: int) -> Tensor:
    """conv(swish(norm(x))), the last unit of the encoder and of the decoder, in strips."""
    rows = strip_rows(x, max(x.shape[1], conv.out_channels), x.shape[3], budget_bytes)
    if rows >= x.shape[2]:
        return conv(F.silu(norm(x), inplace=True))
    activated = norm_swish(norm)(x)
    return conv3x3_in_strips(conv, lambda lo, hi: activated(x[:, :, lo:hi]), x, x.shape[2], x.shape[3], rows)


def input_conv(conv: nn.Conv2d, x: Tensor, budget_bytes: int) -> Tensor:
    """The encoder's conv_in (3x3) on the image, in strips (its output is the large tensor)."""
    rows = strip_rows(x, max(x.shape[1], conv.out_channels), x.shape[3], budget_bytes)
    if rows >= x.shape[2]:
        return conv(x)
    return conv3x3_in_strips(conv, lambda lo, hi: x[:, :, lo:hi], x, x.shape[2], x.shape[3], rows)


def _level_blocks(stage: nn.Module, h: Tensor, budget_bytes: int) -> Tensor:
    """One resolution level's ResNet blocks in strips, each followed by its attention when it has one."""
    for i, block in enumerate(stage.block):
        h = resnet_block(block, h, budget_bytes)
        if len(stage.attn) > 0:
            h = stage.attn[i](h)
    return h


def encoder(net: nn.Module, x: Tensor, budget_bytes: int) -> Tensor:
    """An Encoder's forward (eval mode) with every convolution outside attention in strips."""
    h = input_conv(net.conv_in, x, budget_bytes)
    for stage in net.down:
        h = _level_blocks(stage, h, budget_bytes)
        if hasattr(stage, "downsample"):
            h = downsample(stage.downsample, h, budget_bytes)
    h = resnet_block(net.mid.block_1, h, budget_bytes)
    h = resnet_block(net.mid.block_2, net.mid.attn_1(h), budget_bytes)
    return output_head(net.norm_out, net.conv_out, h, budget_bytes)


def decoder(net: nn.Module, z: Tensor, budget_bytes: int) -> Tensor:
    """A Decoder's forward (eval mode) with every convolution outside attention in strips."""
    h = resnet_block(net.mid.block_1, net.conv_in(z), budget_bytes)
    h = resnet_block(net.mid.block_2, net.mid.attn_1(h), budget_bytes)
    for stage in reversed(net.up):
        h = _level_blocks(stage, h, budget_bytes)
        if hasattr(stage, "upsample"):
            h = upsample(stage.upsample, h, budget_bytes)
    return output_head(net.norm_out, net.conv_out, h, budget_bytes)
