"""Correlation, soft warp, back-warp, flows and confidence mask against hand computations."""

from __future__ import annotations

import pytest
import torch

from midms_cli.matching import (
    attention_warp,
    back_warp,
    confidence_mask,
    consistency_error,
    correlation,
    majority_smooth,
    soft_argmax_flow,
    soft_warp,
)


def one_hot_features(targets: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(1, HW, H, W) features whose position p is the one-hot vector of exemplar position targets[p]."""
    n = height * width
    features = torch.zeros(1, n, n)
    features[0, targets, torch.arange(n)] = 1.0
    return features.reshape(1, n, height, width)


def identity_features(height: int, width: int) -> torch.Tensor:
    return one_hot_features(torch.arange(height * width), height, width)


def naive_warp(value: torch.Tensor, f_x: torch.Tensor, f_y: torch.Tensor, tau: float) -> torch.Tensor:
    """softmax(relu(cos)/τ)·V with the whole HW x HW matrix, written out independently."""
    q = f_x.flatten(2)
    k = f_y.flatten(2)
    q = q / (q.norm(dim=1, keepdim=True) + 1e-5)
    k = k / (k.norm(dim=1, keepdim=True) + 1e-5)
    corr = torch.einsum("bci,bcj->bij", q, k).clamp(min=0)
    weights = torch.softmax(corr / tau, dim=-1)
    out = torch.einsum("bij,bvj->bvi", weights, value.flatten(2))
    return out.reshape(value.shape[0], value.shape[1], *f_x.shape[-2:])


def test_correlation_is_clamped_cosine():
    f_x = torch.tensor([[1.0, 0.0], [3.0, 4.0]]).T.reshape(1, 2, 1, 2)  # two query vectors
    f_y = torch.tensor([[-1.0, 0.0], [0.0, 2.0]]).T.reshape(1, 2, 1, 2)
    corr = correlation(f_x, f_y)
    expected = torch.tensor([[0.0, 0.0], [0.0, 0.8]])  # cos((1,0),(-1,0)) = -1 -> 0; cos((3,4),(0,2)) = 0.8
    assert torch.allclose(corr[0], expected, atol=1e-4)


def test_one_hot_features_make_the_warp_a_permutation():
    torch.manual_seed(0)
    h, w = 4, 5
    perm = torch.randperm(h * w)
    value = torch.randn(1, 3, h, w)
    warped = soft_warp(value, one_hot_features(perm, h, w), identity_features(h, w), tau=0.005)
    expected = value.flatten(2)[:, :, perm].reshape(1, 3, h, w)
    assert torch.allclose(warped, expected, atol=1e-6)


@pytest.mark.parametrize("tau", [0.005, 0.1])
@pytest.mark.parametrize("chunk_size", [7, 1024])
def test_chunked_warp_equals_naive_softmax(tau, chunk_size):
    torch.manual_seed(1)
    f_x, f_y = torch.randn(2, 8, 5, 6), torch.randn(2, 8, 4, 7)
    value = torch.randn(2, 3, 4, 7)
    ours = soft_warp(value, f_x, f_y, tau, chunk_size=chunk_size)
    assert ours.shape == (2, 3, 5, 6)
    assert torch.allclose(ours, naive_warp(value, f_x, f_y, tau), atol=1e-5)


def test_chunked_warp_gradients_equal_naive_gradients():
    torch.manual_seed(2)
    inputs = [torch.randn(1, 8, 6, 6, requires_grad=True) for _ in range(2)]
    value = torch.randn(1, 3, 6, 6, requires_grad=True)
    grads = []
    for fn in (
        lambda a, b, v: soft_warp(v, a, b, 0.1, chunk_size=5),
        lambda a, b, v: naive_warp(v, a, b, 0.1),
    ):
        out = fn(*inputs, value)
        grads.append(
            torch.autograd.grad(
                (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum(), [*inputs, value]
            )
        )
    for ours, reference in zip(*grads, strict=True):
        assert torch.allclose(ours, reference, atol=1e-5)


@pytest.mark.parametrize("with_grad", [False, True])
def test_warp_and_mask_never_hold_more_than_a_chunk_of_correlation_rows(monkeypatch, with_grad):
    """Linear memory: every softmax sees at most `chunk_size` query rows, and the full HW x HW
    `correlation` is never built by the warp, the back-warp, the flows or the mask."""
    import midms_cli.matching as matching

    rows = []
    original = matching._clamped_attention

    def recording(queries, keys, values, tau):
        rows.append((queries.shape[1], keys.shape[1]))
        return original(queries, keys, values, tau)

    def forbidden(*args, **kwargs):
        raise AssertionError("the full correlation matrix was materialised")

    monkeypatch.setattr(matching, "_clamped_attention", recording)
    monkeypatch.setattr(matching, "correlation", forbidden)
    torch.manual_seed(6)
    f_x, f_y = torch.randn(1, 8, 6, 6, requires_grad=with_grad), torch.randn(1, 8, 6, 6)
    value = torch.randn(1, 3, 6, 6)
    with torch.set_grad_enabled(with_grad):
        warped = matching.soft_warp(value, f_x, f_y, chunk_size=10)
        matching.back_warp(warped, f_x, f_y, chunk_size=10)
    if with_grad:
        warped.sum().backward()  # checkpointed chunks are recomputed one at a time
    matching.confidence_mask(f_x, f_y, "cycle", chunk_size=10)
    assert rows and max(query_rows for query_rows, _ in rows) <= 10
    assert all(key_rows == 36 for _, key_rows in rows)
    # Each of the 36 query rows is covered exactly once per warp (2 warps, 2 flows, + recomputation).
    assert sum(query_rows for query_rows, _ in rows) % 36 == 0


def test_relu_clamp_differs_from_plain_attention():
    """The clamp matters: negative similarities count as logit 0, not as a negative logit."""
    q = torch.tensor([[[1.0, 0.0]]])
    k = torch.tensor([[[0.6, 0.8], [-1.0, 0.0]]])
    v = torch.tensor([[[1.0], [0.0]]])
    ours = attention_warp(q, k, v, tau=1.0)
    expected = torch.exp(torch.tensor(0.6)) / (torch.exp(torch.tensor(0.6)) + 1.0)  # exp(relu(-1)) = 1
    assert torch.allclose(ours.squeeze(), expected)


def test_back_warp_of_a_permutation_warp_returns_the_exemplar():
    torch.manual_seed(3)
    h, w = 4, 4
    perm = torch.randperm(h * w)
    f_x, f_y = one_hot_features(perm, h, w), identity_features(h, w)
    exemplar = torch.randn(1, 3, h, w)
    cycled = back_warp(soft_warp(exemplar, f_x, f_y), f_x, f_y)
    assert torch.allclose(cycled, exemplar, atol=1e-6)


def test_soft_argmax_flow_of_identity_is_zero_and_of_a_shift_is_the_shift():
    h, w = 4, 6
    mapping, flow = soft_argmax_flow(identity_features(h, w), identity_features(h, w))
    assert torch.allclose(flow, torch.zeros_like(flow), atol=1e-6)
    assert torch.allclose(mapping[0, 0, 0], torch.linspace(-1, 1, w), atol=1e-6)  # channel 0 is x
    assert torch.allclose(mapping[0, 1, :, 0], torch.linspace(-1, 1, h), atol=1e-6)  # channel 1 is y
    down = torch.arange(h * w).reshape(h, w).roll(-1, dims=0).flatten()  # row r -> row r+1 (wrapping)
    _, flow = soft_argmax_flow(one_hot_features(down, h, w), identity_features(h, w))
    assert torch.allclose(flow[0, 1, :-1], torch.full((h - 1, w), 2 / (h - 1)), atol=1e-6)
    assert torch.allclose(flow[0, 0], torch.zeros(h, w), atol=1e-6)


def shift_right_clamped(height: int, width: int) -> torch.Tensor:
    """Query (r, c) matches exemplar (r, min(c + 1, W − 1)): a shift with a many-to-one border."""
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    return (rows * width + (cols + 1).clamp(max=width - 1)).flatten()


def test_official_and_cycle_errors_match_hand_computation():
    h, w = 2, 8
    f_x, f_y = one_hot_features(shift_right_clamped(h, w), h, w), identity_features(h, w)
    map_fwd, flow_fwd = soft_argmax_flow(f_x, f_y)
    _, flow_bwd = soft_argmax_flow(f_y, f_x)
    dx = 2 / (w - 1)  # one column in [-1, 1] units
    # Official: flow_fwd(p) + flow_fwd(p + 1 column): 2·dx inside, dx next to the border, 0 on it.
    official = torch.tensor([2 * dx] * 6 + [dx, 0.0]).expand(h, w)
    # Cycle: the backward flow of the border column averages its two sources (columns 6 and 7).
    cycle = torch.tensor([0.0] * 6 + [dx / 2, dx / 2]).expand(h, w)
    assert torch.allclose(consistency_error(flow_fwd, map_fwd)[0, 0], official, atol=1e-4)
    assert torch.allclose(consistency_error(flow_fwd, map_fwd, flow_bwd)[0, 0], cycle, atol=1e-4)
    # Threshold 0.5 (2·dx = 0.571 fails) and 2x2 majority: official keeps the last two columns only.
    official_mask = confidence_mask(f_x, f_y, "official")
    assert official_mask[0, 0].tolist() == [[0.0] * 6 + [1.0, 1.0]] * h
    assert bool((confidence_mask(f_x, f_y, "cycle") == 1).all())


def test_cycle_mask_keeps_a_bijection_and_rejects_a_many_to_one_match():
    torch.manual_seed(4)
    h, w = 8, 8
    identity = identity_features(h, w)
    bijection = one_hot_features(torch.randperm(h * w), h, w)
    assert bool((confidence_mask(bijection, identity, "cycle") == 1).all())
    # Rows r and r + 4 both match exemplar row r: the backward flow lands halfway between them,
    # 4 rows (4 · 2/7 = 1.14) apart, so every pixel misses its own position by 0.57 > 0.5.
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    folded = one_hot_features(((rows % 4) * w + cols).flatten(), h, w)
    mask = confidence_mask(folded, identity, "cycle")
    assert bool((mask == 0).all())
    assert not mask.requires_grad


def test_confidence_mask_is_detached_even_from_features_with_gradients():
    f = torch.randn(1, 4, 4, 4, requires_grad=True)
    assert not confidence_mask(f, f.detach().clone()).requires_grad


def test_majority_smoothing_matches_its_definition():
    torch.manual_seed(5)
    mask = (torch.rand(2, 1, 6, 8) > 0.4).float()
    expected = torch.zeros_like(mask)
    for b in range(2):
        for i in range(0, 6, 2):
            for j in range(0, 8, 2):
                expected[b, 0, i : i + 2, j : j + 2] = float(mask[b, 0, i : i + 2, j : j + 2].sum() >= 3)
    assert torch.equal(majority_smooth(mask), expected)


def test_unknown_mask_variant_is_rejected():
    f = torch.randn(1, 4, 2, 2)
    with pytest.raises(ValueError, match="variant"):
        confidence_mask(f, f, "backwards")
