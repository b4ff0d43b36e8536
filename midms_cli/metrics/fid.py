"""Frechet Inception Distance and Kernel Inception Distance (pytorch-fid's Inception port).

FID (Heusel et al. 2017) compares Gaussians fitted to Inception pool3 features; KID (Binkowski et
al. 2018) is the unbiased polynomial-kernel MMD, preferred for small sets. Statistics of an image
set can be cached in a safetensors file keyed by a hash of its file names and contents.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from midms_cli.atomic import atomic_path
from midms_cli.errors import MidmsError

STATS_FORMAT_VERSION = "1"


def feature_statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased covariance (divisor N-1, as numpy.cov) of features (N, D), in float64."""
    features = features.to(torch.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise MidmsError(
            f"FID needs at least 2 images per set, got {features.shape[0]}; add images or use KID"
        )
    mu = features.mean(dim=0)
    centred = features - mu
    sigma = centred.T @ centred / (features.shape[0] - 1)
    return mu, sigma


def _psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix by eigendecomposition.

    Tiny negative eigenvalues from round-off are clipped to 0, so the result is always real.
    """
    matrix = (matrix + matrix.T) / 2
    eigenvalues, eigenvectors = torch.linalg.eigh(matrix)
    root = eigenvalues.clamp_min(0).sqrt()
    return (eigenvectors * root) @ eigenvectors.T


def _trace_sqrt_product(sigma1: torch.Tensor, sigma2: torch.Tensor) -> torch.Tensor:
    """tr sqrt(S1 S2) = tr sqrt(sqrt(S1) S2 sqrt(S1)); the inner matrix is symmetric PSD."""
    root1 = _psd_sqrt(sigma1)
    inner = root1 @ sigma2 @ root1
    eigenvalues = torch.linalg.eigvalsh((inner + inner.T) / 2)
    return eigenvalues.clamp_min(0).sqrt().sum()


def frechet_distance(
    mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor
) -> float:
    """d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr sqrt(S1 S2)  (Frechet distance of two Gaussians).

    Computed in float64 through symmetric eigendecompositions, so no complex parts appear (unlike
    scipy.linalg.sqrtm); the trace term is averaged over both argument orders, which makes the
    result exactly symmetric.
    """
    mu1, mu2 = mu1.to(torch.float64), mu2.to(torch.float64)
    sigma1, sigma2 = sigma1.to(torch.float64), sigma2.to(torch.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics differ in shape: {tuple(mu1.shape)} vs {tuple(mu2.shape)}")
    trace_sqrt = (_trace_sqrt_product(sigma1, sigma2) + _trace_sqrt_product(sigma2, sigma1)) / 2
    distance = (mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * trace_sqrt
    return float(distance.clamp_min(0))


def polynomial_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """k(x, y) = (x.y / d + 1)^3, the KID kernel of Binkowski et al. (2018)."""
    return (x @ y.T / x.shape[1] + 1) ** 3


def mmd2_unbiased(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Unbiased MMD^2 estimate: off-diagonal means of k(x,x) and k(y,y) minus twice mean k(x,y)."""
    m, n = x.shape[0], y.shape[0]
    k_xx, k_yy, k_xy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    term_xx = (k_xx.sum() - k_xx.diagonal().sum()) / (m * (m - 1))
    term_yy = (k_yy.sum() - k_yy.diagonal().sum()) / (n * (n - 1))
    return term_xx + term_yy - 2 * k_xy.mean()


def kernel_inception_distance(
    features1: torch.Tensor,
    features2: torch.Tensor,
    subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """KID: mean and standard deviation of unbiased MMD^2 over random subsets (without replacement).

    The subset size shrinks to the smaller set when a set is small (the usual torch-fidelity rule).
    """
    features1, features2 = features1.to(torch.float64), features2.to(torch.float64)
    size = min(subset_size, features1.shape[0], features2.shape[0])
    if size < 2:
        raise MidmsError("KID needs at least 2 images per set; add images")
    generator = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(subsets):
        pick1 = torch.randperm(features1.shape[0], generator=generator)[:size]
        pick2 = torch.randperm(features2.shape[0], generator=generator)[:size]
        values.append(mmd2_unbiased(features1[pick1], features2[pick2]))
    stacked = torch.stack(values)
    std = float(stacked.std(unbiased=False)) if len(values) > 1 else 0.0
    return float(stacked.mean()), std


# --------------------------------------------------------------------------------------------
# Statistics cache


def image_set_hash(paths: Iterable[str | Path], extra: str = "") -> str:
    """SHA-256 over the sorted file names and their bytes (plus `extra`, e.g. the network's hash).

    Renaming, editing, adding or removing a file changes the key; the directory does not matter.
    """
    digest = hashlib.sha256(extra.encode())
    for path in sorted(Path(p) for p in paths):
        digest.update(path.name.encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def save_statistics(path: str | Path, key: str, features: torch.Tensor) -> None:
    """Cache an image set's features with their (mu, sigma) atomically as safetensors; the set hash
    and image count go in the metadata. Features are kept so KID can reuse the cache too."""
    mu, sigma = feature_statistics(features)
    metadata = {"format_version": STATS_FORMAT_VERSION, "key": key, "count": str(features.shape[0])}
    tensors = {"mu": mu.contiguous(), "sigma": sigma.contiguous(), "features": features.float().contiguous()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def load_statistics(path: str | Path, key: str) -> dict[str, torch.Tensor] | None:
    """{"mu", "sigma", "features"} from a cache file made for `key`, else None (also when damaged)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        if metadata.get("key") != key or metadata.get("format_version") != STATS_FORMAT_VERSION:
            return None
        tensors = load_file(str(path))
    except Exception:  # a damaged cache file is recomputed, never trusted
        return None
    return tensors if {"mu", "sigma", "features"} <= set(tensors) else None


def _trace_sqrt_from_features(centred1: torch.Tensor, centred2: torch.Tensor) -> torch.Tensor:
    """tr sqrt(S1 S2) from centred features A1 (n1, D), A2 (n2, D), with S_i = A_i^T A_i / (n_i - 1).

    The non-zero eigenvalues of S1 S2 are those of M M^T / c with M = A1 A2^T and
    c = (n1 - 1)(n2 - 1), so the trace is the nuclear norm of M over sqrt(c): exact, symmetric, and
    an (n x n) instead of a (D x D) problem when a set has fewer images than feature dimensions.
    """
    product = centred1 @ centred2.T  # (n1, n2)
    gram = product @ product.T if product.shape[0] <= product.shape[1] else product.T @ product
    singular_values = torch.linalg.eigvalsh((gram + gram.T) / 2).clamp_min(0).sqrt()
    return singular_values.sum() / ((centred1.shape[0] - 1) * (centred2.shape[0] - 1)) ** 0.5


def fid_from_features(features1: torch.Tensor, features2: torch.Tensor) -> float:
    """FID between two feature sets (N, D) and (M, D).

    With fewer images than dimensions in the smaller set, the trace term is computed in image
    space (`_trace_sqrt_from_features`); otherwise from the covariances (`frechet_distance`).
    """
    mu1, sigma1 = feature_statistics(features1)
    mu2, sigma2 = feature_statistics(features2)
    if min(features1.shape[0], features2.shape[0]) >= features1.shape[1]:
        return frechet_distance(mu1, sigma1, mu2, sigma2)
    centred1 = features1.to(torch.float64) - mu1
    centred2 = features2.to(torch.float64) - mu2
    trace_sqrt = _trace_sqrt_from_features(centred1, centred2)
    distance = (mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * trace_sqrt
    return float(distance.clamp_min(0))
