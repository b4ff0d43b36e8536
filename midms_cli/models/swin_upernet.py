"""Swin-S backbone + UperNet head: the ADE20K-150 segmenter behind LSUN-Churches conditions.

Module and parameter names follow the published mmsegmentation checkpoint
`upernet_swin_small_patch4_window7_512x512_160k_ade20k_...-ee2fff1c.pth` (`backbone.stages.N.blocks.M.
attn.w_msa.qkv`, `ffn.layers.0.0`, `decode_head.psp_modules.K.1.conv`, `auxiliary_head.convs.0.conv`,
...), so its state dict loads strictly. Swin: Liu et al., ICCV 2021; UperNet: Xiao et al., ECCV 2018.
The auxiliary FCN head exists only so the checkpoint loads strictly; inference never runs it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# mmseg's ADE20K preprocessing (img_norm_cfg, to_rgb=True), on RGB values in 0..255.
ADE20K_MEAN = (123.675, 116.28, 103.53)
ADE20K_STD = (58.395, 57.12, 57.375)
ADE20K_CLASSES = 150
ATTENTION_MASK_VALUE = -100.0  # the value Swin puts on attention across shifted-window borders


@dataclass(frozen=True)
class SwinUperNetConfig:
    """Swin-S UperNet of mmseg's `upernet_swin_small_patch4_window7_512x512_160k_ade20k` config."""

    embed_dims: int = 96
    depths: tuple[int, ...] = (2, 2, 18, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: int = 7
    patch_size: int = 4
    mlp_ratio: int = 4
    channels: int = 512  # UperNet width
    pool_scales: tuple[int, ...] = (1, 2, 3, 6)
    num_classes: int = ADE20K_CLASSES
    aux_channels: int = 256
    aux_in_index: int = 2  # the FCN auxiliary head reads stage 3 (384 channels)

    @property
    def stage_dims(self) -> tuple[int, ...]:
        return tuple(self.embed_dims * 2**i for i in range(len(self.depths)))


# --- Swin backbone ----------------------------------------------------------------------------------------


def relative_position_index(window: int) -> torch.Tensor:
    """(w*w, w*w) index into the (2w-1)^2 bias table: (dy + w - 1) * (2w - 1) + (dx + w - 1)."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    delta = coords[:, :, None] - coords[:, None, :] + window - 1  # (2, w*w, w*w)
    return delta[0] * (2 * window - 1) + delta[1]


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * nW, window*window, C); H and W are multiples of `window`."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window * window, c)


def window_merge(windows: torch.Tensor, window: int, h: int, w: int) -> torch.Tensor:
    """Inverse of `window_partition`: (B * nW, window*window, C) -> (B, H, W, C)."""
    c = windows.shape[-1]
    x = windows.view(-1, h // window, w // window, window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, h, w, c)


def shifted_window_mask(h: int, w: int, window: int, shift: int, device) -> torch.Tensor:
    """(nW, window*window, window*window) additive mask: -100 between tokens that were not neighbours
    before the cyclic shift (they come from different regions of the padded map)."""
    region = torch.zeros(1, h, w, 1, device=device)
    bands = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    label = 0
    for rows in bands:
        for cols in bands:
            region[:, rows, cols, :] = label
            label += 1
    ids = window_partition(region, window).squeeze(-1)  # (nW, w*w)
    different = ids[:, None, :] != ids[:, :, None]
    return torch.zeros(different.shape, device=device).masked_fill(different, ATTENTION_MASK_VALUE)


class WindowMSA(nn.Module):
    """Multi-head self-attention inside a window with a learnt relative position bias."""

    def __init__(self, dims: int, heads: int, window: int) -> None:
        super().__init__()
        self.heads, self.scale = heads, (dims // heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        self.register_buffer("relative_position_index", relative_position_index(window))
        self.qkv = nn.Linear(dims, 3 * dims)
        self.proj = nn.Linear(dims, dims)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, n, c = x.shape  # (B * nW, w*w, C)
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q * self.scale) @ k.transpose(-2, -1)  # (B * nW, heads, n, n)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        attn = attn + bias.view(n, n, -1).permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            windows = mask.shape[0]
            attn = attn.view(b // windows, windows, self.heads, n, n) + mask[None, :, None]
            attn = attn.view(b, self.heads, n, n)
        x = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj(x)


class ShiftWindowMSA(nn.Module):
    """(Shifted) window attention on a token map: pad to whole windows, roll, attend, unroll, crop."""

    def __init__(self, dims: int, heads: int, window: int, shift: int) -> None:
        super().__init__()
        self.window, self.shift = window, shift
        self.w_msa = WindowMSA(dims, heads, window)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, _, c = x.shape
        x = x.view(b, h, w, c)
        pad_h, pad_w = (-h) % self.window, (-w) % self.window
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        hp, wp = h + pad_h, w + pad_w
        mask = None
        if self.shift:
            x = torch.roll(x, shifts=(-self.shift, -self.shift), dims=(1, 2))
            mask = shifted_window_mask(hp, wp, self.window, self.shift, x.device)
        windows = self.w_msa(window_partition(x, self.window), mask)
        x = window_merge(windows, self.window, hp, wp)
        if self.shift:
            x = torch.roll(x, shifts=(self.shift, self.shift), dims=(1, 2))
        return x[:, :h, :w, :].reshape(b, h * w, c)


class FFN(nn.Module):
    """Linear -> GELU -> Linear, named as mmcv's FFN (`layers.0.0`, `layers.1`)."""

    def __init__(self, dims: int, hidden: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Sequential(nn.Linear(dims, hidden), nn.GELU()), nn.Linear(hidden, dims)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class SwinBlock(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)); x + ffn(norm2(x)). Odd blocks shift windows."""

    def __init__(self, dims: int, heads: int, window: int, shift: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dims)
        self.attn = ShiftWindowMSA(dims, heads, window, shift)
        self.norm2 = nn.LayerNorm(dims)
        self.ffn = FFN(dims, mlp_ratio * dims)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), h, w)
        return x + self.ffn(self.norm2(x))


class PatchMerging(nn.Module):
    """2x2 neighbourhood -> one token of twice the width.

    Channel order is mmseg's nn.Unfold order, c * 4 + (2 * dy + dx), which is what the published
    checkpoint's `downsample.reduction` / `downsample.norm` were trained with.
    """

    def __init__(self, dims: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dims)
        self.reduction = nn.Linear(4 * dims, 2 * dims, bias=False)

    def forward(self, x: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, int, int]:
        b, _, c = x.shape
        x = x.view(b, h, w, c)
        x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))  # pad right/bottom to even, as mmseg's "corner" padding
        h2, w2 = (h + 1) // 2, (w + 1) // 2
        x = x.view(b, h2, 2, w2, 2, c).permute(0, 1, 3, 5, 2, 4).reshape(b, h2 * w2, 4 * c)
        return self.reduction(self.norm(x)), h2, w2


class SwinStage(nn.Module):
    def __init__(self, dims: int, depth: int, heads: int, window: int, mlp_ratio: int, downsample: bool):
        super().__init__()
        self.blocks = nn.ModuleList(
            SwinBlock(dims, heads, window, 0 if j % 2 == 0 else window // 2, mlp_ratio) for j in range(depth)
        )
        self.downsample = PatchMerging(dims) if downsample else None

    def forward(self, x: torch.Tensor, h: int, w: int):
        for block in self.blocks:
            x = block(x, h, w)
        return x, h, w


class PatchEmbed(nn.Module):
    """Non-overlapping patch convolution, then LayerNorm (image padded right/bottom to whole patches)."""

    def __init__(self, dims: int, patch: int) -> None:
        super().__init__()
        self.patch = patch
        self.projection = nn.Conv2d(3, dims, patch, stride=patch)
        self.norm = nn.LayerNorm(dims)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        image = F.pad(image, (0, (-image.shape[-1]) % self.patch, 0, (-image.shape[-2]) % self.patch))
        x = self.projection(image)
        h, w = x.shape[-2:]
        return self.norm(x.flatten(2).transpose(1, 2)), h, w


class SwinTransformer(nn.Module):
    """Hierarchical Swin backbone -> four maps (B, C_i, H/4/2^i, W/4/2^i), each after its out-norm."""

    def __init__(self, cfg: SwinUperNetConfig) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(cfg.embed_dims, cfg.patch_size)
        dims = cfg.stage_dims
        last = len(cfg.depths) - 1
        self.stages = nn.ModuleList(
            SwinStage(dims[i], cfg.depths[i], cfg.num_heads[i], cfg.window_size, cfg.mlp_ratio, i < last)
            for i in range(len(cfg.depths))
        )
        for i, d in enumerate(dims):
            self.add_module(f"norm{i}", nn.LayerNorm(d))

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        x, h, w = self.patch_embed(image)
        outputs = []
        for i, stage in enumerate(self.stages):
            x, h, w = stage(x, h, w)
            out = getattr(self, f"norm{i}")(x)
            outputs.append(out.view(x.shape[0], h, w, -1).permute(0, 3, 1, 2).contiguous())
            if stage.downsample is not None:
                x, h, w = stage.downsample(x, h, w)
        return outputs


# --- UperNet head -----------------------------------------------------------------------------------------


class ConvModule(nn.Module):
    """conv (no bias) -> BatchNorm -> ReLU, named as mmcv's ConvModule (`conv`, `bn`)."""

    def __init__(self, cin: int, cout: int, kernel: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x)))


def resize(x: torch.Tensor, size) -> torch.Tensor:
    """Bilinear, align_corners=False: mmseg's `resize` as UperNet uses it."""
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class UPerHead(nn.Module):
    """Pyramid pooling on the last stage + FPN top-down fusion of all four -> class logits at stride 4."""

    def __init__(self, cfg: SwinUperNetConfig) -> None:
        super().__init__()
        dims, channels = cfg.stage_dims, cfg.channels
        self.psp_modules = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(scale), ConvModule(dims[-1], channels, 1))
            for scale in cfg.pool_scales
        )
        self.bottleneck = ConvModule(dims[-1] + len(cfg.pool_scales) * channels, channels, 3)
        self.lateral_convs = nn.ModuleList(ConvModule(d, channels, 1) for d in dims[:-1])
        self.fpn_convs = nn.ModuleList(ConvModule(channels, channels, 3) for _ in dims[:-1])
        self.fpn_bottleneck = ConvModule(len(dims) * channels, channels, 3)
        self.conv_seg = nn.Conv2d(channels, cfg.num_classes, 1)

    def pyramid_pooling(self, x: torch.Tensor) -> torch.Tensor:
        pooled = [resize(module(x), x.shape[2:]) for module in self.psp_modules]
        return self.bottleneck(torch.cat([x, *pooled], dim=1))

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, features, strict=False)]
        laterals.append(self.pyramid_pooling(features[-1]))
        for i in range(len(laterals) - 1, 0, -1):  # top-down: add the coarser level, upsampled
            laterals[i - 1] = laterals[i - 1] + resize(laterals[i], laterals[i - 1].shape[2:])
        outs = [conv(lat) for conv, lat in zip(self.fpn_convs, laterals, strict=False)] + [laterals[-1]]
        outs = [outs[0]] + [resize(out, outs[0].shape[2:]) for out in outs[1:]]
        return self.conv_seg(self.fpn_bottleneck(torch.cat(outs, dim=1)))


class FCNHead(nn.Module):
    """The training-time auxiliary head (one 3x3 ConvModule + classifier); kept for strict loading only."""

    def __init__(self, cfg: SwinUperNetConfig) -> None:
        super().__init__()
        self.convs = nn.Sequential(ConvModule(cfg.stage_dims[cfg.aux_in_index], cfg.aux_channels, 3))
        self.conv_seg = nn.Conv2d(cfg.aux_channels, cfg.num_classes, 1)
        self.in_index = cfg.aux_in_index

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        return self.conv_seg(self.convs(features[self.in_index]))


class SwinUperNet(nn.Module):
    """Normalised image (B, 3, H, W) -> class logits (B, 150, H/4, W/4); frozen, eval mode."""

    def __init__(self, cfg: SwinUperNetConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg or SwinUperNetConfig()
        self.backbone = SwinTransformer(self.cfg)
        self.decode_head = UPerHead(self.cfg)
        self.auxiliary_head = FCNHead(self.cfg)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> SwinUperNet:
        return super().train(False)  # BatchNorm must keep its running statistics

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.decode_head(self.backbone(image))


def derived_keys(model: nn.Module) -> set[str]:
    """State-dict keys that are constants computed from the config, not learnt (relative position index)."""
    return {key for key in model.state_dict() if key.endswith("relative_position_index")}
