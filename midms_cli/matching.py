"""Matching mathematics of MIDMs: correlation (Eq. 5), soft warp (Eq. 6), back-warp, soft-argmax
flows and the confidence mask (Eq. 10), as pure functions of feature maps.

Feature maps are (B, C, H, W). The correlation C(i, j) = max(0, cos(f_x(i), f_y(j))) has one row
per query (condition) position i and one column per exemplar position j. The warp is attention:
queries and keys are the normalised features, values the exemplar latent, scale 1/τ. It is NOT
plain `scaled_dot_product_attention`: the ReLU clamp turns every negative similarity into a logit
of exactly 0, which no additive mask independent of the scores reproduces (SDPA agrees only when
all similarities of a row are ≥ 0). So the exact softmax(relu(QKᵀ)/τ)·V is computed in chunks of
query rows: memory grows linearly with the number of positions (chunk × HW, never HW × HW), and
under autograd each chunk is recomputed in the backward pass instead of being stored.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

CORRELATION_EPS = 1e-5  # official base/correlation.py: f / (‖f‖ + 1e-5)
DEFAULT_CHUNK = 1024  # query rows per chunk: 1024 x 4096 floats = 16 MB at a 64x64 latent
MASK_VARIANTS = ("official", "cycle")


def _positions(features: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, HW, C), positions in row-major order."""
    return features.flatten(2).transpose(1, 2)


def l2_normalize(features: Tensor, eps: float = CORRELATION_EPS) -> Tensor:
    """Per-position L2 normalisation over channels, f / (‖f‖ + ε), as the official correlation."""
    return features / (features.norm(dim=1, keepdim=True) + eps)


def correlation(f_x: Tensor, f_y: Tensor, eps: float = CORRELATION_EPS) -> Tensor:
    """Eq. 5: C(i, j) = max(0, ⟨n(f_x(i)), n(f_y(j))⟩), shape (B, H_x·W_x, H_y·W_y).

    Materialises the whole matrix: for tests, small maps and inspection; warps and flows use the
    chunked `attention_warp` instead.
    """
    q, k = _positions(l2_normalize(f_x, eps)), _positions(l2_normalize(f_y, eps))
    return torch.bmm(q, k.transpose(1, 2)).clamp_min(0)


def _clamped_attention(queries: Tensor, keys: Tensor, values: Tensor, tau: float) -> Tensor:
    """softmax(relu(QKᵀ)/τ)·V for one chunk of query rows; the softmax runs in float32."""
    logits = torch.bmm(queries, keys.transpose(1, 2))  # (B, chunk, N_keys)
    # In place when no graph is recorded: one chunk-sized temporary fewer.
    logits = logits.relu() / tau if torch.is_grad_enabled() else logits.relu_().div_(tau)
    weights = torch.softmax(logits.float(), dim=-1).to(values.dtype)
    return torch.bmm(weights, values)


def attention_warp(
    queries: Tensor, keys: Tensor, values: Tensor, tau: float, chunk_size: int = DEFAULT_CHUNK
) -> Tensor:
    """Exact softmax_j(relu(q_i·k_j)/τ)·v_j for every query, chunked over query rows.

    queries (B, Nq, C), keys (B, Nk, C), values (B, Nk, Cv) -> (B, Nq, Cv). Peak memory is
    O(chunk_size · Nk) rather than O(Nq · Nk). With gradients, chunks are checkpointed so the
    backward pass also never holds the full attention matrix.
    """
    if queries.shape[1] <= chunk_size:
        return _clamped_attention(queries, keys, values, tau)
    needs_graph = torch.is_grad_enabled() and any(t.requires_grad for t in (queries, keys, values))
    outputs = []
    for start in range(0, queries.shape[1], chunk_size):
        chunk = queries[:, start : start + chunk_size]
        if needs_graph:
            outputs.append(checkpoint(_clamped_attention, chunk, keys, values, tau, use_reentrant=False))
        else:
            outputs.append(_clamped_attention(chunk, keys, values, tau))
    return torch.cat(outputs, dim=1)


def soft_warp(
    value: Tensor, f_x: Tensor, f_y: Tensor, tau: float = 0.005, chunk_size: int = DEFAULT_CHUNK
) -> Tensor:
    """Eq. 6: R(i) = Σ_j softmax_j(C(i, j)/τ)·value(j), τ = 0.005 (official code; the paper omits it).

    value (B, Cv, H_y, W_y) lives on the exemplar grid of f_y; the result lives on the query grid
    of f_x: (B, Cv, H_x, W_x). Features are L2-normalised here (ε = 1e-5) as in the release.
    """
    q, k = _positions(l2_normalize(f_x)), _positions(l2_normalize(f_y))
    warped = attention_warp(q, k, _positions(value), tau, chunk_size)
    return warped.transpose(1, 2).reshape(value.shape[0], value.shape[1], *f_x.shape[-2:])


def back_warp(
    warped: Tensor, f_x: Tensor, f_y: Tensor, tau: float = 0.005, chunk_size: int = DEFAULT_CHUNK
) -> Tensor:
    """Warp a query-frame map back to the exemplar frame with the transposed correlation Cᵀ.

    The cycle loss of Eq. 13 compares back_warp(soft_warp(z_y)) with z_y.
    """
    return soft_warp(warped, f_y, f_x, tau, chunk_size)


def coordinate_grid(height: int, width: int, like: Tensor) -> Tensor:
    """(1, 2, H, W) normalised coordinates, channel 0 = x, 1 = y, each linspace(−1, 1) (align corners)."""
    ys = torch.linspace(-1, 1, height, device=like.device, dtype=like.dtype)
    xs = torch.linspace(-1, 1, width, device=like.device, dtype=like.dtype)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x, grid_y]).unsqueeze(0)


def soft_argmax_flow(
    f_x: Tensor, f_y: Tensor, temperature: float = 0.005, chunk_size: int = DEFAULT_CHUNK
) -> tuple[Tensor, Tensor]:
    """Soft-argmax mapping and flow of the correlation (official `get_flow`, temperature 0.005).

    map(p) = Σ_j softmax_j(C(p, j)/T)·coord(j): the expected exemplar coordinate of query p, which
    is the soft warp of the exemplar's coordinate grid. flow(p) = map(p) − coord(p). Both
    (B, 2, H_x, W_x) in [−1, 1] units, channel 0 = x.
    """
    batch = f_x.shape[0]
    exemplar_grid = coordinate_grid(*f_y.shape[-2:], f_y).expand(batch, -1, -1, -1)
    mapping = soft_warp(exemplar_grid, f_x, f_y, temperature, chunk_size)
    return mapping, mapping - coordinate_grid(*f_x.shape[-2:], f_x)


def sample_field(field: Tensor, locations: Tensor) -> Tensor:
    """S(field, loc): bilinear grid-sample of a (B, 2, H, W) field at (B, 2, h, w) [−1, 1] locations.

    align_corners=True and zero padding, as the official `fbcheck`.
    """
    return F.grid_sample(
        field, locations.permute(0, 2, 3, 1), mode="bilinear", padding_mode="zeros", align_corners=True
    )


def consistency_error(flow_fwd: Tensor, map_fwd: Tensor, flow_bwd: Tensor | None = None) -> Tensor:
    """The error e(p) of Eq. 10, shape (B, 1, H, W).

    Without `flow_bwd` (the official code's `fbcheck`): e = ‖flow_fwd(p) + S(flow_fwd, map_fwd(p))‖,
    the forward flow sampled again at the forward-mapped point. With `flow_bwd` (the cycle check
    the paper describes): e = ‖flow_fwd(p) + S(flow_bwd, map_fwd(p))‖.
    """
    returned = sample_field(flow_fwd if flow_bwd is None else flow_bwd, map_fwd)
    return (flow_fwd + returned).norm(dim=1, keepdim=True)


def majority_smooth(mask: Tensor) -> Tensor:
    """2x2 majority: avg-pool 2 → nearest upsampling → > 0.5, so a block survives with ≥ 3 of 4 pixels."""
    pooled = F.avg_pool2d(mask, 2)
    return (F.interpolate(pooled, size=mask.shape[-2:], mode="nearest") > 0.5).to(mask.dtype)


@torch.no_grad()
def confidence_mask(
    f_x: Tensor,
    f_y: Tensor,
    variant: str = "official",
    threshold: float = 0.5,
    temperature: float = 0.005,
    chunk_size: int = DEFAULT_CHUNK,
) -> Tensor:
    """Eq. 10: M(p) = 1[e(p) < γ], γ = 0.5 in [−1, 1] units, then 2x2 majority smoothing.

    variant "official" uses the release's forward-only check, "cycle" the forward-backward check.
    Returns a detached (B, 1, H_x, W_x) float mask of 0s and 1s (no gradient flows through it, as officially).
    """
    if variant not in MASK_VARIANTS:
        raise ValueError(f"mask variant must be one of {MASK_VARIANTS}, got {variant!r}")
    map_fwd, flow_fwd = soft_argmax_flow(f_x, f_y, temperature, chunk_size)
    flow_bwd = soft_argmax_flow(f_y, f_x, temperature, chunk_size)[1] if variant == "cycle" else None
    error = consistency_error(flow_fwd, map_fwd, flow_bwd)
    return majority_smooth((error < threshold).to(f_x.dtype))
