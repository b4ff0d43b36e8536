"""The frozen first stage: latent-diffusion's VQ (VQ-f4) and KL (KL-f8) autoencoders.

Parameter names and shapes follow latent-diffusion's `Encoder`/`Decoder`, `VQModel` and
`AutoencoderKL` one to one, so an original state dict (minus its `loss.*` entries) loads directly.
MIDMs encodes to the continuous pre-quantisation latent and quantises only when decoding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from midms_cli.config import AutoencoderConfig
from midms_cli.models import strips

# The legacy VectorQuantizer2 of taming-transformers, used by every LDM VQ model, weighs the
# codebook term by beta and leaves the commitment term unweighted (the reverse of VQ-VAE's paper).
VQ_BETA = 0.25
# Entries of the attention weights formed at once by AttnBlock (8 MB of float32).
ATTENTION_ELEMENTS = 2**21
# Entries of the pixel-to-code distance table formed at once by nearest_codes (4 MB of float32).
CODE_SEARCH_ELEMENTS = 2**20

# Bytes of one strip of input at inference (models/strips.py): small against a 256 px activation
# (32-64 MB), large enough that a strip is several rows and the per-call overhead stays small.
STRIP_BYTES = 2**20


def swish(x: Tensor) -> Tensor:
    """x·σ(x), the first stage's nonlinearity (one fused kernel: at 256 px every activation
    tensor is tens of MB, so a two-op version doubles the memory traffic)."""
    return F.silu(x)


def fresh_swish(x: Tensor) -> Tensor:
    """swish of a tensor nobody else holds (a norm's output): in place when no gradient will be
    taken through it, so a 256 px decode keeps one full-size activation less alive (same values)."""
    return F.silu(x, inplace=not (torch.is_grad_enabled() and x.requires_grad))


def param_dtype(module: nn.Module) -> torch.dtype:
    """The dtype a module computes in: that of its parameters (float32 unless converted)."""
    return next(module.parameters()).dtype


def in_strips(module: nn.Module) -> bool:
    """Whether a first-stage network runs its large layers in strips now: at inference (eval mode,
    no gradient) with a strip size set; the values are those of the whole-tensor path."""
    return module.strip_bytes is not None and not module.training and not torch.is_grad_enabled()


def group_norm(channels: int) -> nn.GroupNorm:
    """The first stage's normalisation: 32 groups, eps 1e-6, affine."""
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """Two GroupNorm-swish-conv units with a residual path (1x1 `nin_shortcut` when widths differ)."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(fresh_swish(self.norm1(x)))
        h = self.conv2(self.dropout(fresh_swish(self.norm2(h))))
        shortcut = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        if torch.is_grad_enabled() and (h.requires_grad or shortcut.requires_grad):
            return shortcut + h
        return h.add_(shortcut)  # h is this block's own conv output: reuse its memory


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1 q/k/v/proj_out convolutions."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        normed = self.norm(x)
        # (B, 1, HW, C): one head attending over all pixels, softmax(q·k / √C)·v.
        q, k, v = (conv(normed).reshape(b, 1, c, h * w).transpose(-1, -2)
                   for conv in (self.q, self.k, self.v))
        # A few query rows at a time: at 64x64 the (HW, HW) weights are 64 MB and torch's kernel for
        # these strided views holds two such tables. Every row's weights are the same in any chunk.
        rows = max(1, ATTENTION_ELEMENTS // (h * w))
        out = torch.cat([F.scaled_dot_product_attention(part, k, v) for part in q.split(rows, dim=2)], dim=2)
        return x + self.proj_out(out.transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    """Stride-2 3x3 convolution after an asymmetric (right/bottom) zero pad, as the original."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: `block` and `attn` lists plus an optional resampler (original layout)."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()


class _Middle(nn.Module):
    """ResNet, attention, ResNet at the lowest resolution (`mid.block_1`, `mid.attn_1`, `mid.block_2`)."""

    def __init__(self, channels: int, dropout: float):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels, dropout)

    def forward(self, h: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    """Image (B, in_channels, H, W) -> (B, z_channels or 2·z_channels, H/f, W/f)."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        resolution = cfg.resolution
        in_mult = (1, *cfg.ch_mult)
        self.down = nn.ModuleList()
        for level, mult in enumerate(cfg.ch_mult):
            stage = _Level()
            block_in, block_out = cfg.ch * in_mult[level], cfg.ch * mult
            for _ in range(cfg.num_res_blocks):
                stage.block.append(ResnetBlock(block_in, block_out, cfg.dropout))
                block_in = block_out
                if resolution in cfg.attn_resolutions:
                    stage.attn.append(AttnBlock(block_in))
            if level != len(cfg.ch_mult) - 1:
                stage.downsample = Downsample(block_in)
                resolution //= 2
            self.down.append(stage)
        self.mid = _Middle(block_in, cfg.dropout)
        self.norm_out = group_norm(block_in)
        z_out = 2 * cfg.z_channels if cfg.double_z else cfg.z_channels  # double_z: mean and log-variance
        self.conv_out = nn.Conv2d(block_in, z_out, 3, padding=1)
        self.strip_bytes: int | None = STRIP_BYTES  # None: whole tensors at inference too

    def forward(self, x: Tensor) -> Tensor:
        if in_strips(self):
            return strips.encoder(self, x, self.strip_bytes)
        h = self.conv_in(x)
        for stage in self.down:
            for i, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn) > 0:
                    h = stage.attn[i](h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        h = self.mid(h)
        return self.conv_out(fresh_swish(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent (B, z_channels, h, w) -> image (B, out_ch, h·f, w·f); `up[i]` is level i, run deepest first."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        levels = len(cfg.ch_mult)
        block_in = cfg.ch * cfg.ch_mult[-1]
        resolution = cfg.resolution // 2 ** (levels - 1)
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, padding=1)
        self.mid = _Middle(block_in, cfg.dropout)
        up: list[_Level] = []
        for level in reversed(range(levels)):
            stage = _Level()
            block_out = cfg.ch * cfg.ch_mult[level]
            for _ in range(cfg.num_res_blocks + 1):
                stage.block.append(ResnetBlock(block_in, block_out, cfg.dropout))
                block_in = block_out
                if resolution in cfg.attn_resolutions:
                    stage.attn.append(AttnBlock(block_in))
            if level != 0:
                stage.upsample = Upsample(block_in)
                resolution *= 2
            up.insert(0, stage)
        self.up = nn.ModuleList(up)
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.out_ch, 3, padding=1)
        # Set by end-to-end training: MIDMs back-propagates through the frozen decoder at full image
        # size, where each stored activation is tens of MB; recomputing them per block in the
        # backward pass gives the same gradients.
        self.activation_checkpointing = False
        self.strip_bytes: int | None = STRIP_BYTES  # None: whole tensors at inference too

    def _run(self, module: nn.Module, h: Tensor) -> Tensor:
        if self.activation_checkpointing and torch.is_grad_enabled() and h.requires_grad:
            return checkpoint(module, h, use_reentrant=False)
        return module(h)

    def forward(self, z: Tensor) -> Tensor:
        if in_strips(self):
            return strips.decoder(self, z, self.strip_bytes)
        h = self._run(self.mid, self.conv_in(z))
        for stage in reversed(self.up):
            for i, block in enumerate(stage.block):
                h = self._run(block, h)
                if len(stage.attn) > 0:
                    h = self._run(stage.attn[i], h)
            if hasattr(stage, "upsample"):
                h = self._run(stage.upsample, h)
        return self.conv_out(fresh_swish(self.norm_out(h)))


def nearest_codes(z: Tensor, codebook: Tensor) -> Tensor:
    """Index of the nearest codebook vector (squared Euclidean) for every pixel of z (B, C, H, W).

    The distances are formed for CODE_SEARCH_ELEMENTS at a time: the whole (BHW, n_embed) table
    of a 256 px VQ-f4 image is 128 MB, and the sum formula holds three such tables at once.
    Each pixel's row is the same whichever chunk it falls in, and so is its argmin.
    """
    flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])  # (BHW, C)
    codebook_norms = codebook.pow(2).sum(1)[None, :]
    pixels = max(1, CODE_SEARCH_ELEMENTS // codebook.shape[0])
    codes = []
    for part in flat.split(pixels):
        distances = part.pow(2).sum(1, keepdim=True) + codebook_norms - 2.0 * part @ codebook.t()
        codes.append(distances.argmin(dim=1))
    return torch.cat(codes)


def vector_quantize(z: Tensor, codebook: Tensor, beta: float = VQ_BETA) -> tuple[Tensor, Tensor]:
    """Legacy VectorQuantizer2: (straight-through z_q, codebook+commitment loss).

    The forward value is the nearest code; the backward pass copies the gradient of z_q onto z
    unchanged (straight-through estimator), which MIDMs relies on to train through the decoder.
    Loss (legacy weighting): ‖sg[z_q] − z‖² + β‖z_q − sg[z]‖².
    """
    b, c, h, w = z.shape
    codes = nearest_codes(z, codebook)
    z_q = codebook[codes].reshape(b, h, w, c).permute(0, 3, 1, 2)
    loss = torch.mean((z_q.detach() - z) ** 2) + beta * torch.mean((z_q - z.detach()) ** 2)
    return z + (z_q - z).detach(), loss


class VectorQuantizer(nn.Module):
    """The codebook (`quantize.embedding.weight`, n_embed × embed_dim)."""

    def __init__(self, n_embed: int, embed_dim: int, beta: float = VQ_BETA):
        super().__init__()
        self.beta = beta
        self.embedding = nn.Embedding(n_embed, embed_dim)
        # taming's initialisation, uniform in ±1/n_embed; pretrained codebooks overwrite it.
        self.embedding.weight.data.uniform_(-1.0 / n_embed, 1.0 / n_embed)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        return vector_quantize(z, self.embedding.weight, self.beta)


class VQAutoencoder(nn.Module):
    """latent-diffusion's VQModel: encode stops before quantisation; decode quantises first."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = VectorQuantizer(cfg.n_embed, cfg.embed_dim)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    def encode(self, x: Tensor) -> Tensor:
        """Image in [-1, 1] -> continuous latent (VQModelInterface.encode), times scale_factor.

        Runs in the parameters' dtype; the latent is returned in x's dtype.
        """
        z = self.quant_conv(self.encoder(x.to(param_dtype(self))))
        return z.to(x.dtype) * self.config.scale_factor

    def quantize_latent(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """(straight-through quantised latent, VQ loss) of a latent in encode()'s scale.

        The nearest-code search runs in float32 whatever the model's dtype: rounding the latent
        or the codebook to bfloat16 would change which code is picked.
        """
        z = z.float() / self.config.scale_factor
        return vector_quantize(z, self.quantize.embedding.weight.float(), self.quantize.beta)

    def decode_without_quantizing(self, h: Tensor) -> Tensor:
        """post_quant_conv + decoder on a latent as given: no quantisation and no scale factor.

        latent-diffusion's VQModel.decode(h, force_not_quantize=True); `decode` quantises first.
        """
        return self.decoder(self.post_quant_conv(h.to(param_dtype(self))))

    def decode(self, z: Tensor) -> Tensor:
        """Latent -> image: quantise (straight-through), post_quant_conv, decoder.

        Runs in the parameters' dtype; the image is returned in z's dtype.
        """
        z_q, _ = self.quantize_latent(z)
        return self.decode_without_quantizing(z_q).to(z.dtype)

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Reconstruction and the VQ loss, for pretraining the first stage."""
        z_q, vq_loss = self.quantize_latent(self.encode(x))
        return self.decode_without_quantizing(z_q), {"vq": vq_loss}


def gaussian_kl(mean: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mean, exp(logvar)) ‖ N(0, I)) summed over C, H, W and averaged over the batch (LDM's kl_loss)."""
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)
    return kl.sum(dim=(1, 2, 3)).mean()


class KLAutoencoder(nn.Module):
    """latent-diffusion's AutoencoderKL: a diagonal Gaussian posterior over the latent."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    def posterior(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(mean, log-variance) of q(z|x); log-variance clamped to [-30, 20] as the original."""
        moments = self.quant_conv(self.encoder(x.to(param_dtype(self)))).to(x.dtype)
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def encode(self, x: Tensor) -> Tensor:
        """Image -> posterior mode or sample (cfg.posterior; official MIDMs: sample), times scale_factor."""
        mean, logvar = self.posterior(x)
        z = mean
        if self.config.posterior == "sample":
            z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
        return z * self.config.scale_factor

    def decode(self, z: Tensor) -> Tensor:
        """Latent -> image in the parameters' dtype, returned in z's dtype."""
        image = self.decoder(self.post_quant_conv((z / self.config.scale_factor).to(param_dtype(self))))
        return image.to(z.dtype)

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Reconstruction from a posterior sample and the KL term, for pretraining."""
        mean, logvar = self.posterior(x)
        z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
        return self.decoder(self.post_quant_conv(z)), {"kl": gaussian_kl(mean, logvar)}


def build_autoencoder(cfg: AutoencoderConfig) -> VQAutoencoder | KLAutoencoder:
    """The first stage named by cfg.kind ("vq" or "kl")."""
    if cfg.kind == "vq":
        return VQAutoencoder(cfg)
    if cfg.kind == "kl":
        return KLAutoencoder(cfg)
    raise ValueError(f"unknown autoencoder kind {cfg.kind!r}")
