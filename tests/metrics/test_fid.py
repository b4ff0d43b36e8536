"""FID and KID maths against closed forms and independent computations."""

from __future__ import annotations

import math

import pytest
import torch

from midms_cli.errors import MidmsError
from midms_cli.metrics.fid import (
    feature_statistics,
    fid_from_features,
    frechet_distance,
    image_set_hash,
    kernel_inception_distance,
    load_statistics,
    save_statistics,
)


def _random_rotation(dim: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=torch.float64))
    return q


def test_diagonal_gaussians_match_closed_form():
    mu1, mu2 = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 0.0])
    var1, var2 = torch.tensor([1.0, 4.0, 9.0]), torch.tensor([4.0, 1.0, 0.25])
    # Commuting covariances: d^2 = |mu1 - mu2|^2 + sum (sqrt(a_i) - sqrt(b_i))^2
    expected = 1 + 0 + 4 + (1 - 2) ** 2 + (2 - 1) ** 2 + (3 - 0.5) ** 2
    assert frechet_distance(mu1, torch.diag(var1), mu2, torch.diag(var2)) == pytest.approx(expected, abs=1e-9)


def test_commuting_covariances_in_a_rotated_basis_match_closed_form():
    q = _random_rotation(6, seed=1)
    a = torch.tensor([0.5, 1.0, 2.0, 3.0, 0.1, 7.0], dtype=torch.float64)
    b = torch.tensor([2.0, 1.0, 0.5, 3.0, 0.4, 1.0], dtype=torch.float64)
    sigma1, sigma2 = q @ torch.diag(a) @ q.T, q @ torch.diag(b) @ q.T
    mu1 = torch.arange(6, dtype=torch.float64)
    mu2 = mu1 + 0.5
    expected = 6 * 0.25 + float(((a.sqrt() - b.sqrt()) ** 2).sum())
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, abs=1e-9)


def test_non_commuting_2x2_matches_trace_sqrt_formula():
    # For a 2x2 matrix M with non-negative eigenvalues, tr sqrt(M) = sqrt(tr M + 2 sqrt(det M)).
    sigma1 = torch.tensor([[2.0, 0.7], [0.7, 1.0]], dtype=torch.float64)
    sigma2 = torch.tensor([[1.0, -0.3], [-0.3, 3.0]], dtype=torch.float64)
    product = sigma1 @ sigma2
    trace_sqrt = math.sqrt(float(product.trace()) + 2 * math.sqrt(float(torch.linalg.det(product))))
    expected = float(sigma1.trace() + sigma2.trace()) - 2 * trace_sqrt
    zero = torch.zeros(2, dtype=torch.float64)
    assert frechet_distance(zero, sigma1, zero, sigma2) == pytest.approx(expected, abs=1e-9)


def test_set_against_itself_is_zero_and_distance_is_symmetric():
    generator = torch.Generator().manual_seed(0)
    features_a = torch.randn(300, 64, generator=generator) @ torch.randn(64, 64, generator=generator)
    features_b = torch.randn(250, 64, generator=generator) + 0.3
    assert fid_from_features(features_a, features_a) == pytest.approx(0.0, abs=1e-6)
    stats_a, stats_b = feature_statistics(features_a), feature_statistics(features_b)
    assert frechet_distance(*stats_a, *stats_b) == frechet_distance(*stats_b, *stats_a)
    assert frechet_distance(*stats_a, *stats_b) > 1.0


def test_image_space_route_for_small_sets_matches_covariance_route():
    generator = torch.Generator().manual_seed(4)
    a = torch.randn(20, 64, generator=generator, dtype=torch.float64) * 2
    b = torch.randn(30, 64, generator=generator, dtype=torch.float64) + 0.2
    via_covariances = frechet_distance(*feature_statistics(a), *feature_statistics(b))
    assert fid_from_features(a, b) == pytest.approx(via_covariances, rel=1e-6)
    # Symmetric up to rounding: the summation order of the two routes depends on the thread count.
    assert fid_from_features(a, b) == pytest.approx(fid_from_features(b, a), rel=1e-9)
    assert fid_from_features(a, a) == pytest.approx(0.0, abs=1e-9)


def test_rank_deficient_covariances_stay_real_and_finite():
    # Fewer samples than dimensions: singular covariances, where sqrtm-based code returns complex parts.
    generator = torch.Generator().manual_seed(3)
    a, b = torch.randn(10, 32, generator=generator), torch.randn(12, 32, generator=generator)
    value = fid_from_features(a, b)
    assert math.isfinite(value) and value > 0


def test_statistics_are_mean_and_unbiased_covariance():
    features = torch.tensor([[1.0, 2.0], [3.0, 0.0], [2.0, 4.0]])
    mu, sigma = feature_statistics(features)
    assert torch.allclose(mu, torch.tensor([2.0, 2.0], dtype=torch.float64))
    # hand computation: deviations (-1,0),(1,-2),(0,2) -> sums / (N - 1)
    assert torch.allclose(sigma, torch.tensor([[1.0, -1.0], [-1.0, 4.0]], dtype=torch.float64))


def test_one_image_is_a_user_error():
    with pytest.raises(MidmsError, match="at least 2 images"):
        feature_statistics(torch.zeros(1, 8))


def _naive_kid(x: torch.Tensor, y: torch.Tensor) -> float:
    """Unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3 by explicit loops."""
    d = x.shape[1]

    def k(a, b):
        return (float(a @ b) / d + 1) ** 3

    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_kid_with_whole_sets_matches_loop_implementation():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(7, 5, generator=generator, dtype=torch.float64)
    y = torch.randn(7, 5, generator=generator, dtype=torch.float64) + 0.5
    mean, std = kernel_inception_distance(x, y, subsets=3, subset_size=100)
    assert mean == pytest.approx(_naive_kid(x, y), rel=1e-9)
    assert std == pytest.approx(0.0, abs=1e-12)  # every subset is the whole set, permuted


def test_kid_is_near_zero_for_one_distribution_and_positive_for_shifted():
    generator = torch.Generator().manual_seed(2)
    x, y = torch.randn(200, 16, generator=generator), torch.randn(200, 16, generator=generator)
    same, _ = kernel_inception_distance(x, y, subsets=10, subset_size=100)
    shifted, _ = kernel_inception_distance(x, y + 1.0, subsets=10, subset_size=100)
    assert abs(same) < 0.05 < shifted


def test_statistics_cache_round_trip_and_key_mismatch(tmp_path):
    files = []
    for name, content in (("a.png", b"one"), ("b.png", b"two")):
        (tmp_path / name).write_bytes(content)
        files.append(tmp_path / name)
    key = image_set_hash(files, extra="net")
    features = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    cache = tmp_path / "cache" / "stats.safetensors"
    save_statistics(cache, key, features)
    loaded = load_statistics(cache, key)
    mu, sigma = feature_statistics(features)
    assert loaded is not None and torch.equal(loaded["features"], features)
    assert torch.allclose(loaded["mu"], mu) and torch.allclose(loaded["sigma"], sigma)
    assert load_statistics(cache, "other") is None
    (tmp_path / "b.png").write_bytes(b"changed")
    assert image_set_hash(files, extra="net") != key
    assert image_set_hash(list(reversed(files)), extra="net") == image_set_hash(files, extra="net")
    cache.write_bytes(b"garbage")
    assert load_statistics(cache, key) is None
