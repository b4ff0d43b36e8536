"""The latent diffusion UNet ε_θ(z_t, t): the subset of latent-diffusion's openaimodel.UNetModel used
by the celeba256 and lsun-churches LDMs.

Parameter names and shapes match the original (`input_blocks.1.0.in_layers.0.weight`,
`middle_block.1.qkv.weight`, `out.2.weight`, ...), so its `model.diffusion_model.*` weights load
directly. Unconditional only: no cross-attention, no class labels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from midms_cli.config import UNetConfig


def timestep_embedding(timesteps: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding [cos(t·ω_k), sin(t·ω_k)], ω_k = max_period^(−k/half) (openaimodel's formula).

    timesteps (B,) -> (B, dim) float32; an odd dim gets a trailing zero column.
    """
    half = dim // 2
    k = torch.arange(half, dtype=torch.float32, device=timesteps.device)
    freqs = torch.exp(-math.log(max_period) * k / half)
    args = timesteps[:, None].float() * freqs[None, :]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class GroupNorm32(nn.GroupNorm):
    """GroupNorm(32) evaluated in float32 whatever the input dtype, as the original's GroupNorm32."""

    def __init__(self, channels: int):
        super().__init__(32, channels)

    def forward(self, x: Tensor) -> Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        if x.dtype == torch.bfloat16 and x.device.type == "cpu":
            # The CPU kernel takes bfloat16 input with float32 parameters and accumulates in float32:
            # the same arithmetic without two full-size dtype copies of the activation.
            return F.group_norm(x, self.num_groups, weight, bias, self.eps)
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).type(x.dtype)


class TimestepBlock(nn.Module):
    """Marker base: a module whose forward(x, emb) also takes the timestep embedding."""


class TimestepEmbedSequential(nn.Sequential):
    """Sequential that passes the timestep embedding to the children that take it."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class Downsample(nn.Module):
    """Halve H and W: stride-2 3x3 conv `op` (conv_resample) or 2x2 average pooling."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        out_channels = out_channels or channels
        if use_conv:
            self.op = nn.Conv2d(channels, out_channels, 3, stride=2, padding=1)
        else:
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Double H and W with nearest-neighbour interpolation, then an optional 3x3 conv `conv`."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        if use_conv:
            self.conv = nn.Conv2d(channels, out_channels or channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if hasattr(self, "conv") else x


class ResBlock(TimestepBlock):
    """Residual block conditioned on the timestep embedding; optional up/down sampling inside.

    With use_scale_shift_norm the embedding modulates the second norm as norm(h)·(1+scale)+shift,
    otherwise it is added before it.
    """

    def __init__(self, channels: int, emb_channels: int, dropout: float, out_channels: int,
                 use_scale_shift_norm: bool = False, up: bool = False, down: bool = False):
        super().__init__()
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(
            GroupNorm32(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels)
        )
        self.out_layers = nn.Sequential(
            GroupNorm32(out_channels), nn.SiLU(), nn.Dropout(dropout),
            zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        same = out_channels == channels
        self.skip_connection = nn.Identity() if same else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        if self.updown:
            # Resample between the norm/activation and the conv, on both paths, as the original.
            h = self.in_layers[:-1](x)
            h, x = self.h_upd(h), self.x_upd(x)
            h = self.in_layers[-1](h)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


def legacy_qkv_attention(qkv: Tensor, num_heads: int) -> Tensor:
    """Multi-head self-attention on a fused (B, 3·C, T) tensor in the legacy channel order.

    Legacy order (openaimodel's QKVAttentionLegacy, LDM's use_new_attention_order=False): the
    channels are split into heads first, each head holding its [q, k, v] blocks of C/heads
    channels. Returns (B, C, T) = softmax(qᵀk / √d)·v per head.
    """
    batch, width, length = qkv.shape
    head_dim = width // (3 * num_heads)
    # One transposing copy to (B, h, T, 3d) makes q, k, v views with unit stride in the feature
    # dimension, which the fused (flash) CPU kernel requires; strided views fall back to the
    # unfused math path (several full T x T temporaries per head).
    tokens = qkv.reshape(batch, num_heads, 3 * head_dim, length).transpose(-1, -2).contiguous()
    q, k, v = tokens.split(head_dim, dim=-1)  # (B, h, T, d) each
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(-1, -2).reshape(batch, num_heads * head_dim, length)


class AttentionBlock(nn.Module):
    """Spatial self-attention: GroupNorm, 1x1 `qkv` conv1d, legacy-order attention, zero-init `proj_out`."""

    def __init__(self, channels: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.norm = GroupNorm32(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        h = legacy_qkv_attention(self.qkv(self.norm(x)), self.num_heads)
        return (x + self.proj_out(h)).reshape(b, c, *spatial)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a module's parameters (the original's initialisation of residual output layers)."""
    for p in module.parameters():
        p.detach().zero_()
    return module


def attention_heads(channels: int, cfg: UNetConfig) -> int:
    """Heads at a width: channels / num_head_channels when that is set, else num_heads (openaimodel)."""
    if cfg.num_head_channels > 0:
        return channels // cfg.num_head_channels
    return cfg.num_heads


class UNetModel(nn.Module):
    """ε_θ(z_t, t): (B, in_channels, H, W), timesteps (B,) -> ε prediction (B, out_channels, H, W)."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.config = cfg
        self.activation_checkpointing = False  # set by training (TrainingConfig.activation_checkpointing)
        mc = cfg.model_channels
        emb_dim = 4 * mc
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        def res(ch_in: int, ch_out: int, **updown: bool) -> ResBlock:
            return ResBlock(ch_in, emb_dim, cfg.dropout, ch_out, cfg.use_scale_shift_norm, **updown)

        # Encoder half: widths of every block's output are remembered for the skip connections.
        stem = nn.Conv2d(cfg.in_channels, mc, 3, padding=1)
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(stem)])
        skip_channels = [mc]
        ch, ds = mc, 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [res(ch, mult * mc)]
                ch = mult * mc
                if ds in cfg.attention_resolutions:
                    layers.append(AttentionBlock(ch, attention_heads(ch, cfg)))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(cfg.channel_mult) - 1:
                down = res(ch, ch, down=True) if cfg.resblock_updown else Downsample(ch, True)
                self.input_blocks.append(TimestepEmbedSequential(down))
                skip_channels.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(
            res(ch, ch), AttentionBlock(ch, attention_heads(ch, cfg)), res(ch, ch)
        )

        # Decoder half: one more block per level than the encoder, each eating one skip.
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [res(ch + skip_channels.pop(), mc * mult)]
                ch = mc * mult
                if ds in cfg.attention_resolutions:
                    layers.append(AttentionBlock(ch, attention_heads(ch, cfg)))
                if level and i == cfg.num_res_blocks:
                    layers.append(res(ch, ch, up=True) if cfg.resblock_updown else Upsample(ch, True))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            GroupNorm32(ch), nn.SiLU(), zero_module(nn.Conv2d(mc, cfg.out_channels, 3, padding=1))
        )

    def forward(self, x: Tensor, timesteps: Tensor | int) -> Tensor:
        """ε prediction; `timesteps` is (B,) or one timestep for the whole batch.

        The network runs in its parameters' dtype (a bfloat16 copy made with `.to(torch.bfloat16)`
        is a drop-in replacement) and ε is returned in x's dtype, so samplers keep float32 latents.
        """
        dtype = self.time_embed[0].weight.dtype
        timesteps = torch.as_tensor(timesteps, device=x.device).reshape(-1).expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(timesteps, self.config.model_channels).to(dtype))
        skips = []
        h = x.to(dtype)
        for block in self.input_blocks:
            h = self._run(block, h, emb)
            skips.append(h)
        h = self._run(self.middle_block, h, emb)
        for block in self.output_blocks:
            h = self._run(block, torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h).to(x.dtype)

    def _run(self, block: nn.Module, h: Tensor, emb: Tensor) -> Tensor:
        # Activation checkpointing trades a second forward pass for not storing each block's activations.
        if self.activation_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, h, emb, use_reentrant=False)
        return block(h, emb)
