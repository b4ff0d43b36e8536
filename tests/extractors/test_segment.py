"""Swin-S UperNet segmenter: published layout, Swin details, whole/slide inference, label ids, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from midms_cli.conditions.segmentation import one_hot_ade20k
from midms_cli.errors import MidmsError
from midms_cli.extractors import extract_segmentation, get_extractor
from midms_cli.extractors.loading import load_published
from midms_cli.extractors.segment import (
    inference_size,
    labels_from_network,
    slide_logits,
    whole_logits,
    window_starts,
)
from midms_cli.models.swin_upernet import (
    PatchMerging,
    ShiftWindowMSA,
    SwinUperNet,
    SwinUperNetConfig,
    derived_keys,
    relative_position_index,
    shifted_window_mask,
)

SMALL = SwinUperNetConfig(
    embed_dims=8, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), channels=16, aux_channels=8, num_classes=150
)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MIDMS_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))


def published_upernet_shapes(cfg: SwinUperNetConfig) -> dict[str, tuple[int, ...]]:
    """Key/shape table of mmseg's upernet_swin checkpoint, written out independently of the model."""
    s: dict[str, tuple[int, ...]] = {}
    c0 = cfg.embed_dims
    s["backbone.patch_embed.projection.weight"] = (c0, 3, 4, 4)
    s["backbone.patch_embed.projection.bias"] = (c0,)
    s["backbone.patch_embed.norm.weight"] = s["backbone.patch_embed.norm.bias"] = (c0,)
    dims = [c0 * 2**i for i in range(4)]
    for i, (c, depth, heads) in enumerate(zip(dims, cfg.depths, cfg.num_heads, strict=True)):
        for j in range(depth):
            b = f"backbone.stages.{i}.blocks.{j}"
            for norm in ("norm1", "norm2"):
                s[f"{b}.{norm}.weight"] = s[f"{b}.{norm}.bias"] = (c,)
            s[f"{b}.attn.w_msa.relative_position_bias_table"] = (169, heads)
            s[f"{b}.attn.w_msa.relative_position_index"] = (49, 49)
            s[f"{b}.attn.w_msa.qkv.weight"], s[f"{b}.attn.w_msa.qkv.bias"] = (3 * c, c), (3 * c,)
            s[f"{b}.attn.w_msa.proj.weight"], s[f"{b}.attn.w_msa.proj.bias"] = (c, c), (c,)
            s[f"{b}.ffn.layers.0.0.weight"], s[f"{b}.ffn.layers.0.0.bias"] = (4 * c, c), (4 * c,)
            s[f"{b}.ffn.layers.1.weight"], s[f"{b}.ffn.layers.1.bias"] = (c, 4 * c), (c,)
        if i < 3:
            s[f"backbone.stages.{i}.downsample.norm.weight"] = s[
                f"backbone.stages.{i}.downsample.norm.bias"
            ] = (4 * c,)
            s[f"backbone.stages.{i}.downsample.reduction.weight"] = (2 * c, 4 * c)
        s[f"backbone.norm{i}.weight"] = s[f"backbone.norm{i}.bias"] = (c,)

    def conv_module(prefix, cin, cout, k):
        s[f"{prefix}.conv.weight"] = (cout, cin, k, k)
        for name in ("weight", "bias", "running_mean", "running_var"):
            s[f"{prefix}.bn.{name}"] = (cout,)
        s[f"{prefix}.bn.num_batches_tracked"] = ()

    ch = cfg.channels
    for k in range(4):
        conv_module(f"decode_head.psp_modules.{k}.1", dims[3], ch, 1)
    conv_module("decode_head.bottleneck", dims[3] + 4 * ch, ch, 3)
    for i in range(3):
        conv_module(f"decode_head.lateral_convs.{i}", dims[i], ch, 1)
        conv_module(f"decode_head.fpn_convs.{i}", ch, ch, 3)
    conv_module("decode_head.fpn_bottleneck", 4 * ch, ch, 3)
    s["decode_head.conv_seg.weight"], s["decode_head.conv_seg.bias"] = (150, ch, 1, 1), (150,)
    conv_module("auxiliary_head.convs.0", dims[2], cfg.aux_channels, 3)
    s["auxiliary_head.conv_seg.weight"] = (150, cfg.aux_channels, 1, 1)
    s["auxiliary_head.conv_seg.bias"] = (150,)
    return s


def random_checkpoint(cfg: SwinUperNetConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random values in the published layout; positive BN variances; mmseg's position index."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for key, shape in published_upernet_shapes(cfg).items():
        if key.endswith("relative_position_index"):
            tensors[key] = mmseg_relative_position_index(7)
        elif key.endswith("num_batches_tracked"):
            tensors[key] = torch.tensor(1000)
        elif key.endswith("running_var"):
            tensors[key] = torch.rand(shape, generator=generator) + 0.5
        else:
            tensors[key] = torch.randn(shape, generator=generator) * 0.2
    return tensors


def mmseg_relative_position_index(window: int) -> torch.Tensor:
    """mmseg's construction: double_step_seq(2w - 1, w, 1, w), index + index.T, flipped along dim 1."""
    seq = (
        torch.arange(0, (2 * window - 1) * window, 2 * window - 1)[:, None] + torch.arange(window)[None]
    ).reshape(1, -1)
    return (seq + seq.T).flip(1).contiguous()


def small_net(seed: int = 0) -> SwinUperNet:
    net = SwinUperNet(SMALL)
    return load_published(net, random_checkpoint(SMALL, seed), "swin-s-ade20k", derived_keys(net))


# --- Layout ------------------------------------------------------------------------------------------------


def test_real_dims_match_the_published_key_layout_and_parameter_count():
    with torch.device("meta"):
        net = SwinUperNet()
    assert {k: tuple(v.shape) for k, v in net.state_dict().items()} == published_upernet_shapes(
        SwinUperNetConfig()
    )
    assert sum(p.numel() for p in net.parameters()) == 81_259_766  # mmseg reports 81 M


def test_small_published_checkpoint_loads_strictly_and_errors_name_the_key():
    tensors = random_checkpoint(SMALL)
    net = small_net()
    torch.testing.assert_close(
        net.state_dict()["decode_head.conv_seg.weight"], tensors["decode_head.conv_seg.weight"]
    )
    without = {k: v for k, v in tensors.items() if k != "backbone.stages.2.blocks.1.ffn.layers.1.bias"}
    with pytest.raises(MidmsError, match=r"lack key 'backbone.stages.2.blocks.1.ffn.layers.1.bias'.*"
                       r"midms weights add swin-s-ade20k FILE"):  # fmt: skip
        load_published(SwinUperNet(SMALL), without, "swin-s-ade20k", derived_keys(SwinUperNet(SMALL)))
    shuffled = dict(tensors)
    shuffled["backbone.stages.0.blocks.0.attn.w_msa.relative_position_index"] = torch.zeros(
        49, 49, dtype=torch.long
    )
    with pytest.raises(MidmsError, match="relative_position_index' differs"):
        load_published(SwinUperNet(SMALL), shuffled, "swin-s-ade20k", derived_keys(SwinUperNet(SMALL)))
    # The index is derived from the window size, so a file without it still loads.
    no_index = {k: v for k, v in tensors.items() if not k.endswith("relative_position_index")}
    load_published(SwinUperNet(SMALL), no_index, "swin-s-ade20k", derived_keys(SwinUperNet(SMALL)))


# --- Swin details ------------------------------------------------------------------------------------------


def test_relative_position_index_equals_mmsegs_construction():
    assert torch.equal(relative_position_index(7), mmseg_relative_position_index(7))


def test_patch_merging_uses_the_unfold_channel_order_of_the_checkpoint():
    torch.manual_seed(0)
    merge = PatchMerging(3)
    with torch.no_grad():
        merge.norm.weight.normal_()
    x = torch.randn(2, 6, 4, 3)  # (B, H, W, C)
    out, h, w = merge(x.reshape(2, 24, 3), 6, 4)
    unfolded = F.unfold(x.permute(0, 3, 1, 2), kernel_size=2, stride=2).transpose(1, 2)  # (B, L, C*4)
    torch.testing.assert_close(out, merge.reduction(merge.norm(unfolded)))
    assert (h, w) == (3, 2)


def test_unshifted_attention_on_one_window_is_multi_head_attention_with_relative_bias():
    torch.manual_seed(3)
    attn = ShiftWindowMSA(dims=6, heads=2, window=7, shift=0)
    with torch.no_grad():
        attn.w_msa.relative_position_bias_table.normal_()
    x = torch.randn(1, 49, 6)
    q, k, v = attn.w_msa.qkv(x)[0].split(6, dim=-1)  # (49, 6) each
    table = attn.w_msa.relative_position_bias_table
    heads = []
    for h in range(2):
        cols = slice(3 * h, 3 * h + 3)
        logits = q[:, cols] @ k[:, cols].T / 3**0.5
        for i in range(49):
            for j in range(49):
                dy, dx = i // 7 - j // 7, i % 7 - j % 7
                logits[i, j] += table[(dy + 6) * 13 + (dx + 6), h]
        heads.append(logits.softmax(dim=-1) @ v[:, cols])
    expected = attn.w_msa.proj(torch.cat(heads, dim=-1))
    torch.testing.assert_close(attn(x, 7, 7)[0], expected)


def test_shifted_window_mask_separates_regions_that_the_roll_brought_together():
    mask = shifted_window_mask(14, 14, 7, 3, "cpu")
    assert mask.shape == (4, 49, 49)
    assert (mask[0] == 0).all()  # the top-left window holds one contiguous region
    assert set(mask[3].unique().tolist()) == {0.0, -100.0}
    # In the last window, token (0, 0) and token (6, 6) come from different regions.
    assert mask[3, 0, 48] == -100.0 and mask[3, 0, 1] == 0.0


# --- Inference ---------------------------------------------------------------------------------------------


def test_inference_size_follows_the_keep_ratio_rule():
    assert inference_size(256, 256) == (512, 512)
    assert inference_size(375, 500) == (512, 683)
    assert inference_size(100, 4000) == (51, 2048)  # the long side limit wins


def test_window_grid_matches_the_slide_rule():
    assert window_starts(700, 512, 341) == [0, 188]
    assert window_starts(512, 512, 341) == [0]
    assert window_starts(300, 512, 341) == [0]
    assert window_starts(1200, 512, 341) == [0, 341, 682, 688]


def test_segmentation_is_photo_sized_with_ids_in_range():
    torch.manual_seed(0)
    net = small_net()
    images = torch.rand(1, 3, 40, 36) * 2 - 1  # inferred at 569 x 512, the checkpoint's scale
    labels = extract_segmentation(images, net=net)
    assert labels.shape == (1, 40, 36) and labels.dtype == torch.long
    assert labels.min() >= 1 and labels.max() <= 150  # class + 1; 0 ("unknown") is never predicted
    assert len(labels.unique()) > 1
    assert one_hot_ade20k(labels).shape == (1, 151, 40, 36)


def test_slide_equals_whole_when_one_window_covers_the_image():
    torch.manual_seed(1)
    net = small_net(seed=1)
    x = torch.randn(1, 3, 40, 48)
    torch.testing.assert_close(slide_logits(net, x, crop=64, stride=40), whole_logits(net, x))
    images = torch.rand(1, 3, 40, 48) * 2 - 1
    whole = labels_from_network(net, images, "whole", short_side=40)
    assert torch.equal(labels_from_network(net, images, "slide", short_side=40, crop=48, stride=32), whole)


def test_slide_averages_overlapping_windows():
    torch.manual_seed(2)
    net = small_net(seed=2)
    x = torch.randn(1, 3, 32, 48)
    logits = slide_logits(net, x, crop=32, stride=16)  # windows at x = 0 and 16, overlapping on 16..31
    left, right = whole_logits(net, x[..., :32]), whole_logits(net, x[..., 16:])
    torch.testing.assert_close(logits[..., :16], left[..., :16])
    torch.testing.assert_close(logits[..., 16:32], (left[..., 16:] + right[..., :16]) / 2)
    torch.testing.assert_close(logits[..., 32:], right[..., 16:])


# --- Registry ----------------------------------------------------------------------------------------------


def test_missing_weights_or_bad_mode_fail_before_any_work():
    with pytest.raises(MidmsError, match="midms weights add swin-s-ade20k FILE") as info:
        get_extractor("ade20k")
    assert "\n" not in str(info.value)
    with pytest.raises(MidmsError, match="midms weights add swin-s-ade20k FILE"):
        extract_segmentation(torch.zeros(1, 3, 8, 8))
    with pytest.raises(MidmsError, match="unknown segmentation mode 'tiles'"):
        get_extractor("ade20k", mode="tiles")


def test_canny_needs_no_weights():
    extractor = get_extractor("canny")
    image = torch.full((1, 3, 16, 16), -1.0)
    image[..., 4:12, 4:12] = 1.0
    edges = extractor(image)
    assert (
        edges.shape == (1, 1, 16, 16)
        and edges.max() == 1
        and extractor.metadata["estimator"] == "kornia-canny"
    )
