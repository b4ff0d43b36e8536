"""synthfaces: determinism, geometry/appearance independence, exemplars and oracles."""

import numpy as np
import pytest
import torch
from midms_plugins.synthfaces import PLUGIN, split_seed
from midms_plugins.synthfaces.generator import (
    NEUTRAL_APPEARANCE,
    appearance_of,
    exemplar_appearance,
    exemplar_geometry,
    geometry_of,
    make_pair,
    oracle,
    render,
    render_condition,
    render_labels,
    sample_appearance,
    sample_geometry,
)

from midms_cli.conditions.celebahq import CELEBAHQ_PARTS
from midms_cli.data.plugin import DatasetPlugin, Sample
from midms_cli.extractors import get_extractor

SIZE = 32


def test_same_seed_gives_identical_bytes_and_other_seed_differs():
    first = make_pair(3, 7, SIZE, "official", "easy", "independent")
    second = make_pair(3, 7, SIZE, "official", "easy", "independent")
    for key in ("image", "cond", "ref", "ref_cond", "oracle"):
        assert first[key].numpy().tobytes() == second[key].numpy().tobytes()
    assert first["meta"] == second["meta"]
    assert not torch.equal(first["image"], make_pair(3, 8, SIZE, "official", "easy")["image"])
    assert not torch.equal(first["image"], make_pair(4, 7, SIZE, "official", "easy")["image"])


def test_render_shapes_ranges_and_parts():
    image, masks = render(geometry_of(0, 0), appearance_of(0, 0), 64)
    assert image.shape == (3, 64, 64) and masks.shape == (13, 64, 64) and masks.dtype == torch.bool
    assert image.min() >= -1 and image.max() <= 1
    assert torch.equal(torch.round((image + 1) * 127.5) / 127.5 - 1, image)  # on the 8-bit grid
    present = {CELEBAHQ_PARTS[k] for k in range(13) if masks[k].any()}
    assert {"skin", "l_eye", "r_eye", "l_brow", "r_brow", "nose", "u_lip", "l_lip"} <= present
    labels = render_labels(geometry_of(0, 0), 64)
    assert (labels == 0).any() and (labels == 14).any()  # background and neck


def test_official_condition_depends_only_on_geometry():
    geometry = sample_geometry(np.random.default_rng(1))
    appearance_a = sample_appearance(np.random.default_rng(2))
    appearance_b = sample_appearance(np.random.default_rng(3))
    image_a, masks_a = render(geometry, appearance_a, SIZE)
    image_b, masks_b = render(geometry, appearance_b, SIZE)
    assert not torch.equal(image_a, image_b)
    assert torch.equal(masks_a, masks_b)
    cond = render_condition(geometry, SIZE, "official")
    assert cond.shape == (15, SIZE, SIZE) and cond.min() >= 0 and cond.max() <= 1
    assert torch.equal(torch.round(cond * 255) / 255, cond)  # multiples of 1/255
    # The pair's condition is this geometry-only rendering, whatever the appearance of the sample.
    pair = make_pair(5, 0, SIZE, "official", "hard")
    assert torch.equal(pair["cond"], render_condition(geometry_of(5, 0), SIZE, "official"))
    assert torch.equal(pair["ref_cond"], render_condition(exemplar_geometry(5, 0, "hard"), SIZE, "official"))


@pytest.mark.parametrize("pairing", ["easy", "hard", "self"])
def test_canny_conditions_are_what_translate_computes_from_the_photos(pairing):
    # `midms translate` computes an exemplar's condition with the canny extractor; training pairs
    # must carry the same thing, for the condition and for the exemplar.
    extract = get_extractor("canny", torch.device("cpu"))
    pair = make_pair(3, 0, SIZE, "canny", pairing)
    for photo, condition in ((pair["image"], pair["cond"]), (pair["ref"], pair["ref_cond"])):
        assert condition.shape == (1, SIZE, SIZE)
        assert set(condition.unique().tolist()) == {0.0, 1.0}
        assert torch.equal(condition, extract(photo[None])[0])
    # Textures add edges that the flat structure rendering does not have.
    flat = render(geometry_of(3, 0), NEUTRAL_APPEARANCE, SIZE)[0]
    assert not torch.equal(pair["cond"], extract(flat[None])[0])
    with pytest.raises(ValueError, match="photo"):
        render_condition(geometry_of(3, 0), SIZE, "canny")


@pytest.mark.parametrize("pairing", ["easy", "hard"])
def test_independent_exemplar_has_its_own_appearance_and_geometry_and_the_oracle_is_exact(pairing):
    pair = make_pair(2, 0, SIZE, "official", pairing, "independent")
    geometry, ref_geometry = geometry_of(2, 0), exemplar_geometry(2, 0, pairing)
    ref_appearance = exemplar_appearance(2, 0, "independent")
    assert ref_geometry != geometry and ref_appearance != appearance_of(2, 0)
    assert (
        pair["meta"]["ref_appearance"] == ref_appearance
        and pair["meta"]["exemplar_appearance"] == "independent"
    )
    assert torch.equal(pair["ref"], render(ref_geometry, ref_appearance, SIZE)[0])
    # The oracle: the condition's geometry in the exemplar's colours; neither the photo nor the exemplar.
    assert torch.equal(pair["oracle"], oracle(geometry, ref_appearance, SIZE))
    assert not torch.equal(pair["oracle"], pair["image"]) and not torch.equal(pair["oracle"], pair["ref"])


def test_same_appearance_keeps_the_old_pairs_whose_oracle_is_the_photo():
    pair = make_pair(2, 0, SIZE, "official", "easy", "same")
    assert torch.equal(pair["ref"], render(exemplar_geometry(2, 0, "easy"), appearance_of(2, 0), SIZE)[0])
    assert torch.equal(pair["oracle"], pair["image"])


def _colour_distance(a: dict, b: dict) -> float:
    names = ("skin", "hair", "lips", "cloth")
    return sum(float(np.abs(np.subtract(a[n], b[n])).sum()) for n in names)


def test_similar_appearance_is_closer_than_an_independent_one_but_not_identical():
    similar = [_colour_distance(appearance_of(i, 0), exemplar_appearance(i, 0, "similar")) for i in range(20)]
    independent = [_colour_distance(appearance_of(i, 0), exemplar_appearance(i, 0, "independent"))
                   for i in range(20)]  # fmt: skip
    assert all(d > 0 for d in similar)
    assert 3 * np.mean(similar) < np.mean(independent)
    assert exemplar_appearance(3, 0, "similar")["background"] == appearance_of(3, 0)["background"]
    with pytest.raises(ValueError, match="exemplar appearance"):
        exemplar_appearance(0, 0, "twin")


def test_plugin_pairs_train_with_similar_and_val_with_independent_exemplars_by_default():
    options = {**PLUGIN.default_options(), "train_count": 4, "val_count": 4, "variant": "canny"}
    assert PLUGIN.appearance_of("train", options) == "similar"
    assert PLUGIN.appearance_of("val", options) == "independent"
    assert PLUGIN.appearance_of("val", {**options, "exemplar_appearance": "same"}) == "same"
    for split, kind in (("train", "similar"), ("val", "independent")):
        for sample in PLUGIN.samples(None, split, options, seed=0, size=SIZE):
            expected = "same" if sample.meta["pairing"] == "self" else kind
            assert sample.meta["exemplar_appearance"] == expected
            if expected != "same":
                assert not torch.equal(sample.oracle, sample.image)


def test_hard_exemplar_differs_more_than_easy():
    def spread(pairing):
        total = 0.0
        for index in range(8):
            a, b = geometry_of(index, 0), exemplar_geometry(index, 0, pairing)
            keys = ("center_x", "center_y", "angle", "yaw", "face_w", "eye_y")
            total += sum(abs(a[k] - b[k]) for k in keys)
        return total

    assert spread("hard") > 2 * spread("easy") > 0


def test_self_pair_oracle_equals_image_and_ref():
    pair = make_pair(4, 1, SIZE, "canny", "self")
    assert torch.equal(pair["oracle"], pair["image"])
    assert torch.equal(pair["ref"], pair["image"]) and torch.equal(pair["ref_cond"], pair["cond"])


def test_oracle_renders_condition_geometry_in_exemplar_appearance():
    cond_geometry, ref_appearance = geometry_of(0, 0), appearance_of(1, 0)
    expected = render(cond_geometry, ref_appearance, SIZE)[0]
    assert torch.equal(oracle(cond_geometry, ref_appearance, SIZE), expected)
    assert not torch.equal(expected, render(cond_geometry, appearance_of(0, 0), SIZE)[0])


def test_plugin_protocol_samples_and_splits():
    assert isinstance(PLUGIN, DatasetPlugin) and not PLUGIN.needs_source
    options = {**PLUGIN.default_options(), "train_count": 5, "val_count": 3}
    assert PLUGIN.condition_spec(options).channels == 15
    assert PLUGIN.condition_spec({**options, "variant": "canny"}).channels == 1
    assert PLUGIN.count(None, "val", options) == 3
    samples = list(PLUGIN.samples(None, "train", options, seed=0, size=SIZE, start=1, stop=3))
    assert [s.key for s in samples] == ["train0000001", "train0000002"]
    assert all(isinstance(s, Sample) and s.meta["pairing"] in ("easy", "hard", "self") for s in samples)
    again = next(iter(PLUGIN.samples(None, "train", options, seed=0, size=SIZE, start=2, stop=3)))
    assert torch.equal(again.image, samples[1].image)  # sample i does not depend on the range asked for
    val = next(iter(PLUGIN.samples(None, "val", options, seed=0, size=SIZE, start=1, stop=2)))
    assert not torch.equal(val.image, samples[0].image) and split_seed(0, "val") != split_seed(0, "train")
    assert {PLUGIN.pairing_of("val", options, 0, i) for i in range(50)} <= {"easy", "hard"}
