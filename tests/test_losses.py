"""The training losses of spec 2.3 against hand computations and independent loop references."""

from __future__ import annotations

import math
import sys

import pytest
import torch

from midms_cli import losses


def _normalize_ref(x: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(x)
    for b in range(x.shape[0]):
        for i in range(x.shape[2]):
            for j in range(x.shape[3]):
                v = x[b, :, i, j]
                out[b, :, i, j] = v / (math.sqrt(float((v * v).sum())) + 2.220446049250313e-16)
    return out


def test_feature_normalize_gives_unit_vectors_per_pixel():
    x = torch.tensor([[[[3.0]], [[4.0]]]])  # one pixel, vector (3, 4)
    out = losses.feature_normalize(x)
    assert torch.allclose(out.flatten(), torch.tensor([0.6, 0.8]))


def test_domain_alignment_matches_reference_and_stops_gradient_into_exemplar_features():
    torch.manual_seed(0)
    d_x = torch.randn(2, 4, 3, 3, requires_grad=True)
    d_gt = torch.randn(2, 4, 3, 3, requires_grad=True)
    d_y = torch.randn(2, 4, 3, 3, requires_grad=True)
    loss = losses.domain_alignment_loss(d_x, d_gt, d_y)
    n_x, n_gt, n_y = (_normalize_ref(t.detach()) for t in (d_x, d_gt, d_y))
    expected = (n_x - n_gt).abs().mean() + (n_y * n_x - n_y * n_gt).abs().mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    assert d_x.grad is not None and d_gt.grad is not None
    assert d_y.grad is None  # sg[n(D_y)]: the exemplar features only weight the loss


def test_domain_alignment_is_zero_for_equal_directions():
    d = torch.randn(1, 5, 2, 2)
    assert losses.domain_alignment_loss(d, 3 * d, torch.randn(1, 5, 2, 2)).item() == pytest.approx(
        0, abs=1e-6
    )


def test_cycle_loss_is_l1():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 2, 2)
    b = torch.tensor([1.0, 0.0, 3.0, 8.0]).view(1, 1, 2, 2)
    assert losses.cycle_consistency_loss(a, b).item() == pytest.approx((0 + 2 + 0 + 4) / 4)


def test_source_condition_loss_weights_layers_and_detaches_target():
    names = ("r12", "r22", "r32", "r42", "r52")
    out = {n: torch.full((1, 2, 2, 2), float(i + 1), requires_grad=True) for i, n in enumerate(names)}
    target = {n: torch.zeros(1, 2, 2, 2, requires_grad=True) for n in names}
    loss = losses.source_condition_loss(out, target)
    # L1 of a constant map c against zeros is c; weights 1/32, 1/16, 1/8, 1/4, 1.
    expected = 1 / 32 * 1 + 1 / 16 * 2 + 1 / 8 * 3 + 1 / 4 * 4 + 1 * 5
    assert loss.item() == pytest.approx(expected)
    loss.backward()
    assert all(target[n].grad is None for n in names)
    assert out["r52"].grad is not None


def test_perceptual_loss_is_l1_against_detached_target():
    out = torch.tensor([0.0, 1.0], requires_grad=True)
    target = torch.tensor([1.0, 3.0], requires_grad=True)
    loss = losses.perceptual_loss(out, target)
    assert loss.item() == pytest.approx(1.5)
    loss.backward()
    assert target.grad is None


def _contextual_case() -> tuple[torch.Tensor, torch.Tensor]:
    """Two samples of 2 pixels (H=1, W=2) with hand-known affinities.

    Y (both samples): y1 = (1,-1,0), y2 = (-1,1,0); per-pixel channel means are 0, so centring is a no-op.
    Sample 0: both X pixels are (1,1,-2), orthogonal to y1 and y2 -> d = 1 for both -> A = 1/2 each,
    so s = (1/2, 1/2). Sample 1: X = Y -> d_ii = 0, d_ij = 2 -> d~_ij = 2000 -> A_ii = 1, s = (1, 1).
    """
    y_pix = torch.tensor([[1.0, -1.0, 0.0], [-1.0, 1.0, 0.0]])  # (N, C)
    y = y_pix.t().reshape(1, 3, 1, 2).repeat(2, 1, 1, 1)
    x0 = torch.tensor([[1.0, 1.0, -2.0], [1.0, 1.0, -2.0]]).t().reshape(1, 3, 1, 2)
    x = torch.cat([x0, y[1:]], dim=0)
    return x, y


def test_contextual_affinity_max_hand_case():
    x, y = _contextual_case()
    s = losses.contextual_affinity_max(x, y, h=0.1)
    assert torch.allclose(s, torch.tensor([[0.5, 0.5], [1.0, 1.0]]), atol=1e-4)


def test_contextual_loss_cocosnet_is_per_sample_log_mean_averaged():
    x, y = _contextual_case()
    loss = losses.contextual_loss(x, y, mode="cocosnet")
    assert loss.item() == pytest.approx((-math.log(0.5) + -math.log(1.0)) / 2, abs=1e-4)


def test_contextual_loss_wta_keeps_large_maxima_across_the_batch():
    x, y = _contextual_case()
    # Threshold 0.3: all four maxima pass -> -log(mean(0.5, 0.5, 1, 1)).
    assert losses.contextual_loss(x, y, mode="wta", wta_threshold=0.3).item() == pytest.approx(
        -math.log(0.75), abs=1e-4
    )
    # Threshold 0.6: only sample 1's maxima (1, 1) pass -> -log(1) = 0.
    assert losses.contextual_loss(x, y, mode="wta", wta_threshold=0.6).item() == pytest.approx(0.0, abs=1e-4)
    # Nothing passes -> 0, still differentiable.
    x.requires_grad_(True)
    none = losses.contextual_loss(x, y, mode="wta", wta_threshold=1.5)
    assert none.item() == 0.0
    none.backward()
    assert x.grad is not None


def _contextual_loop_reference(x, y, h, mode, threshold):
    """Literal per-element transcription of spec 2.3 CX (loops, python floats)."""
    b, c, hh, ww = x.shape
    n = hh * ww
    all_s = []
    for k in range(b):
        xs, ys = [], []
        for p in range(n):
            i, j = divmod(p, ww)
            mu = float(y[k, :, i, j].mean())
            xv = [float(v) - mu for v in x[k, :, i, j]]
            yv = [float(v) - mu for v in y[k, :, i, j]]
            xn, yn = math.sqrt(sum(v * v for v in xv)), math.sqrt(sum(v * v for v in yv))
            xs.append([v / xn for v in xv])
            ys.append([v / yn for v in yv])
        s_k = []
        for i in range(n):
            d = [1 - sum(a * b_ for a, b_ in zip(xs[i], ys[j], strict=True)) for j in range(n)]
            dmin = min(d)
            w = [math.exp((1 - dj / (dmin + 1e-3)) / h) for dj in d]
            s_k.append(max(wj / sum(w) for wj in w))
        all_s.append(s_k)
    if mode == "cocosnet":
        return sum(-math.log(sum(s) / len(s)) for s in all_s) / b
    kept = [v for s in all_s for v in s if v >= threshold]
    return -math.log(sum(kept) / len(kept)) if kept else 0.0


@pytest.mark.parametrize("mode", ["wta", "cocosnet"])
def test_contextual_loss_matches_loop_reference(mode):
    torch.manual_seed(1)
    x = torch.randn(2, 6, 3, 3, dtype=torch.float64)
    y = x + 0.5 * torch.randn(2, 6, 3, 3, dtype=torch.float64)
    for h in (0.1, 0.5):
        got = losses.contextual_loss(x, y, h=h, mode=mode, wta_threshold=0.3).item()
        assert got == pytest.approx(_contextual_loop_reference(x, y, h, mode, 0.3), rel=1e-6, abs=1e-9)


def test_contextual_style_loss_pools_and_weights_layers():
    torch.manual_seed(2)
    feats_x = {n: torch.randn(1, 4, 8, 8) for n in ("r52", "r42", "r32", "r22")}
    feats_y = {n: torch.randn(1, 4, 8, 8) for n in ("r52", "r42", "r32", "r22")}
    got = losses.contextual_style_loss(feats_x, feats_y, mode="cocosnet", h=0.2)
    expected = 0.0
    for name, weight, pool in zip(("r52", "r42", "r32", "r22"), (8, 4, 2, 1), (1, 1, 2, 4), strict=True):
        x = torch.nn.functional.avg_pool2d(feats_x[name], pool) if pool > 1 else feats_x[name]
        y = torch.nn.functional.avg_pool2d(feats_y[name], pool) if pool > 1 else feats_y[name]
        expected += weight * _contextual_loop_reference(x, y, 0.2, "cocosnet", 0.0)
    assert got.item() == pytest.approx(expected, rel=1e-4)


def test_diffusion_losses_are_mse():
    a, b = torch.tensor([0.0, 2.0]), torch.tensor([1.0, 0.0])
    assert losses.diffusion_loss_x0(a, b).item() == pytest.approx(2.5)
    assert losses.diffusion_loss_eps(a, b).item() == pytest.approx(2.5)
    assert losses.self_warp_reconstruction_loss(a, b).item() == pytest.approx(2.5)


def test_warped_segmentation_loss_ignores_class_zero_and_classes_absent_from_exemplar():
    # 3 classes, 1x4 latent. GT labels: [1, 2, 0, 1]. Exemplar contains classes 0 and 1 only.
    warped = torch.tensor([[0.5, 0.5, 0.2, 0.1], [0.25, 0.2, 0.2, 0.8], [0.25, 0.3, 0.6, 0.1]]).view(
        1, 3, 1, 4
    )
    labels = torch.tensor([[[1, 2, 0, 1]]])
    exemplar = torch.zeros(1, 3, 1, 4)
    exemplar[0, 0, 0, :2] = 1
    exemplar[0, 1, 0, 2:] = 1
    loss = losses.warped_segmentation_loss(warped, labels, exemplar)
    # Kept pixels: 0 (label 1, p=0.25) and 3 (label 1, p=0.8).
    # Dropped: pixel 1 (class 2 is absent from the exemplar) and pixel 2 (class 0).
    expected = (-math.log(0.25 + 1e-10) - math.log(0.8 + 1e-10)) / (2 + 1e-5)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def _cocosnet_reference(x, y, h, centring):
    """CoCosNet's per-sample contextual loss written out with plain tensor steps (float64)."""
    b, c = x.shape[:2]
    if centring == "channel":
        mean = y.reshape(b, c, -1).mean(dim=-1).reshape(b, c, 1, 1)
    else:
        mean = y.mean(dim=1, keepdim=True)
    xs, ys = (x - mean).reshape(b, c, -1), (y - mean).reshape(b, c, -1)
    xs = xs / (xs.norm(dim=1, keepdim=True) + sys.float_info.epsilon)
    ys = ys / (ys.norm(dim=1, keepdim=True) + sys.float_info.epsilon)
    d = 1 - xs.transpose(1, 2) @ ys
    w = torch.exp((1 - d / (d.min(dim=-1, keepdim=True).values + 1e-3)) / h)
    a = w / w.sum(dim=-1, keepdim=True)
    return -torch.log(a.max(dim=-1).values.mean(dim=1))


@pytest.mark.parametrize("centring", ["channel", "pono"])
def test_per_sample_cocosnet_loss_with_either_centring(centring):
    torch.manual_seed(3)
    x = torch.randn(3, 5, 4, 4, dtype=torch.float64) + 2.0  # offset per channel: centring matters
    y = x + 0.4 * torch.randn(3, 5, 4, 4, dtype=torch.float64) + torch.linspace(0, 3, 5).view(1, 5, 1, 1)
    per_sample = losses.contextual_loss_per_sample(x, y, h=0.2, centring=centring)
    assert per_sample.shape == (3,)
    assert torch.allclose(per_sample, _cocosnet_reference(x, y, 0.2, centring), rtol=1e-10)
    batch = losses.contextual_loss(x, y, h=0.2, mode="cocosnet", centring=centring)
    assert batch.item() == pytest.approx(per_sample.mean().item(), rel=1e-12)


def test_channel_centring_is_not_pono_and_unknown_centring_fails():
    torch.manual_seed(4)
    x, y = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3) + torch.arange(4.0).view(1, 4, 1, 1)
    pono = losses.contextual_loss_per_sample(x, y, centring="pono")
    channel = losses.contextual_loss_per_sample(x, y, centring="channel")
    assert not torch.allclose(pono, channel)
    # Channel centring removes a constant per-channel offset of Y from both maps alike.
    shifted = losses.contextual_loss_per_sample(x + 5.0, y + 5.0, centring="channel")
    assert torch.allclose(shifted, channel, atol=1e-5)
    with pytest.raises(ValueError, match="centring"):
        losses.contextual_loss(x, y, centring="spatial")
