"""The MIDMs training losses as the official code computes them (Eq. 12-17 and the LSUN
segmentation term).

Each loss is a small pure function on tensors named after its equation; which features they see
(VGG19 or the first-stage encoder) is decided by the caller (`models/feature_net.py`).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

# CoCosNet's `feature_normalize` (the definition that wins in MIDMs' util) adds float epsilon.
FEATURE_EPS = sys.float_info.epsilon


def feature_normalize(x: torch.Tensor, eps: float = FEATURE_EPS) -> torch.Tensor:
    """n(x): per-pixel L2 normalisation over channels, x / (||x||_2 + eps)."""
    return x / (x.norm(p=2, dim=1, keepdim=True) + eps)


def domain_alignment_loss(d_x: torch.Tensor, d_gt: torch.Tensor, d_y: torch.Tensor) -> torch.Tensor:
    """Eq. 12, as the official code computes it.

    L1(n(D_x), n(D_gt)) + L1(sg[n(D_y)] * n(D_x), sg[n(D_y)] * n(D_gt)) on the pre-trunk features
    D_x = SegEnc(c), D_gt = RealEnc(z_gt), D_y = RealEnc(z_y). The second term weights both sides
    by the detached, normalised exemplar features (an unusual weighting the paper does not describe).
    """
    n_x, n_gt = feature_normalize(d_x), feature_normalize(d_gt)
    weight = feature_normalize(d_y).detach()
    return F.l1_loss(n_x, n_gt) + F.l1_loss(weight * n_x, weight * n_gt)


def cycle_consistency_loss(back_warped: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """Eq. 13: L1 between a warp brought back to its source frame (transposed correlation) and the source.

    Used for the initial warp (back-warp(R0, C0^T) vs z_y) and the iterative ones.
    """
    return F.l1_loss(back_warped, original)


def source_condition_loss(
    output_features: Mapping[str, torch.Tensor],
    target_features: Mapping[str, torch.Tensor],
    layers: Sequence[str] = ("r12", "r22", "r32", "r42", "r52"),
    weights: Sequence[float] = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1.0),
) -> torch.Tensor:
    """Eq. 14: sum_l w_l * L1(F_l(Decode(GT path)), sg[F_l(GT)]) over five layers."""
    terms = [w * F.l1_loss(output_features[name], target_features[name].detach()) for name, w in zip(
        layers, weights, strict=True)]
    return torch.stack(terms).sum()


def perceptual_loss(output_feature: torch.Tensor, target_feature: torch.Tensor) -> torch.Tensor:
    """Eq. 15: L1(F_L(y_hat), sg[F_L(GT)]) at one layer (r42 CelebA/DeepFashion, r52 LSUN)."""
    return F.l1_loss(output_feature, target_feature.detach())


def contextual_affinity_max(x: torch.Tensor, y: torch.Tensor, h: float = 0.1) -> torch.Tensor:
    """s_i = max_j A_ij of the contextual similarity (Mechrez et al. 2018), shape (B, N).

    Both maps are centred with Y's per-pixel channel mean (PONO-style, X uses Y's statistics at the
    same pixel), L2-normalised, d_ij = 1 - cos(x_i, y_j), d~_ij = d_ij / (min_k d_ik + 1e-3),
    w_ij = exp((1 - d~_ij) / h), A = row-normalised w. The row normalisation is a softmax over j of
    (1 - d~)/h, which is the same number without overflow.
    """
    mean_y = y.mean(dim=1, keepdim=True)
    x = feature_normalize(x - mean_y).flatten(2)  # (B, C, N)
    y = feature_normalize(y - mean_y).flatten(2)
    d = 1 - torch.bmm(x.transpose(1, 2), y)  # (B, N, N)
    d_rel = d / (d.min(dim=-1, keepdim=True).values + 1e-3)
    affinity = torch.softmax((1 - d_rel) / h, dim=-1)
    return affinity.max(dim=-1).values


def contextual_loss(
    x: torch.Tensor, y: torch.Tensor, h: float = 0.1, mode: str = "wta", wta_threshold: float = 0.3
) -> torch.Tensor:
    """CX of Eq. 16 between generated features X and exemplar features Y, as the official code computes it.

    mode "wta" (official MIDMs): keep s_i >= threshold across the whole batch and return
    -log(mean of the kept s_i), or 0 when none passes. mode "cocosnet": per-sample
    -log(mean_i s_i), averaged over the batch.
    """
    s = contextual_affinity_max(x, y, h)
    if mode == "cocosnet":
        return (-torch.log(s.mean(dim=1))).mean()
    if mode != "wta":
        raise ValueError(f"unknown contextual loss mode {mode!r}")
    kept = s >= wta_threshold
    if not bool(kept.any()):
        return s.sum() * 0.0  # zero that stays in the graph, so every rank's backward matches
    return -torch.log(s[kept].mean())


def contextual_style_loss(
    output_features: Mapping[str, torch.Tensor],
    exemplar_features: Mapping[str, torch.Tensor],
    layers: Sequence[str] = ("r52", "r42", "r32", "r22"),
    weights: Sequence[float] = (8.0, 4.0, 2.0, 1.0),
    pools: Sequence[int] = (1, 1, 2, 4),
    h: float = 0.1,
    mode: str = "wta",
    wta_threshold: float = 0.3,
) -> torch.Tensor:
    """Eq. 16: 8 CX(r52) + 4 CX(r42) + 2 CX(avgpool2 r32) + 1 CX(avgpool4 r22).

    The exemplar side is detached.
    """
    terms = []
    for name, weight, pool in zip(layers, weights, pools, strict=True):
        x, y = output_features[name], exemplar_features[name].detach()
        if pool > 1:
            x, y = F.avg_pool2d(x, pool), F.avg_pool2d(y, pool)
        terms.append(weight * contextual_loss(x, y, h, mode, wta_threshold))
    return torch.stack(terms).sum()


def diffusion_loss_x0(x0_pred: torch.Tensor, z_gt: torch.Tensor) -> torch.Tensor:
    """Eq. 17 as the official code computes it: MSE(x0_pred, z_gt) in latent (x0) space."""
    return F.mse_loss(x0_pred, z_gt)


def diffusion_loss_eps(eps_pred: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Eq. 17 as the paper writes it: MSE between the predicted and the injected noise."""
    return F.mse_loss(eps_pred, eps)


def self_warp_reconstruction_loss(warped_gt: torch.Tensor, z_gt: torch.Tensor) -> torch.Tensor:
    """Warm-up replacement of Eq. 17: MSE(softwarp(z_gt, C_gt), z_gt)."""
    return F.mse_loss(warped_gt, z_gt)


def warped_segmentation_loss(
    warped_exemplar_onehot: torch.Tensor, gt_labels: torch.Tensor, exemplar_onehot: torch.Tensor
) -> torch.Tensor:
    """LSUN warped-segmentation loss, at latent resolution.

    sum_p w(p) * NLL(log(warped one-hot + 1e-10), label(p)) / (sum_p w(p) + 1e-5), where w(p) = 0 for
    class 0 and for GT classes that do not occur in the exemplar, else 1.
    warped_exemplar_onehot: (B, K, h, w) soft-warped exemplar one-hot; gt_labels: (B, h, w) long
    (nearest-downsampled); exemplar_onehot: (B, K, h, w) the exemplar's own one-hot.
    """
    present = exemplar_onehot.flatten(2).amax(dim=2) > 0  # (B, K) classes in the exemplar
    weight = torch.gather(present, 1, gt_labels.flatten(1)).view_as(gt_labels) & (gt_labels != 0)
    weight = weight.to(warped_exemplar_onehot.dtype)
    nll = F.nll_loss(torch.log(warped_exemplar_onehot + 1e-10), gt_labels, reduction="none")  # (B, h, w)
    return (nll * weight).sum() / (weight.sum() + 1e-5)
