"""`prepare ... --extract` and `translate --extract`: missing weights fail before any work, and
photos without annotations get the extractor's condition, labelled with the estimator."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from midms_plugins.deepfashion import PLUGIN as DEEPFASHION
from midms_plugins.lsun_churches import PLUGIN as LSUN
from PIL import Image
from torch import nn

from midms_cli.conditions.pose import render_pose
from midms_cli.conditions.segmentation import one_hot_ade20k
from midms_cli.data.shards import iterate_samples
from midms_cli.errors import MidmsError
from midms_cli.extractors import EXTRACTORS, Extractor
from midms_cli.pipelines.prepare import PrepareConfig, prepare
from midms_cli.pipelines.translate import read_condition

SIZE = 16


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MIDMS_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))


def write_photos(folder, names):
    rng = np.random.default_rng(0)
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(folder / name)


def config(dataset, source, out, **options):
    options = {"val_fraction": 0.0, "hard_probability": 0.0, "self_probability": 1.0, **options}
    return PrepareConfig(dataset=dataset, out=out, source=source, size=SIZE, splits=("train",),
                         options=options, strict=True)  # fmt: skip


KEYPOINTS = torch.tensor([[3.0 + k * 0.5, 2.0 + k * 0.6, 0.9] for k in range(18)])
LABELS = torch.arange(SIZE * SIZE).remainder(150).add(1).view(SIZE, SIZE)  # ids 1..150


def fake_get_extractor(kind, device="cpu", **options):
    """A test double of the registry: fixed keypoints / labels instead of the big networks."""
    if kind == "openpose":
        run = lambda images: render_pose(KEYPOINTS.expand(len(images), -1, -1), tuple(images.shape[-2:]))  # noqa: E731
    else:
        run = lambda images: one_hot_ade20k(LABELS.expand(len(images), -1, -1))  # noqa: E731
    return Extractor(EXTRACTORS[kind], run, {"estimator": EXTRACTORS[kind].estimator})


def test_deepfashion_extract_without_weights_fails_before_any_sample(tmp_path):
    write_photos(tmp_path / "df" / "img", ["MEN/a/01.jpg", "MEN/a/02.jpg"])
    with pytest.raises(MidmsError, match="midms weights add openpose-body FILE") as info:
        prepare(config("deepfashion", tmp_path / "df", tmp_path / "out", extract=True), DEEPFASHION)
    assert "\n" not in str(info.value)
    assert not list((tmp_path / "out").rglob("*.tar"))


def test_lsun_extract_without_weights_fails_before_any_sample(tmp_path):
    write_photos(tmp_path / "src", ["a.jpg", "b.jpg"])
    with pytest.raises(MidmsError, match="midms weights add swin-s-ade20k FILE"):
        prepare(config("lsun-churches", tmp_path / "src", tmp_path / "out", extract=True), LSUN)
    assert not list((tmp_path / "out").rglob("*.tar"))


def test_deepfashion_extract_estimates_pose_for_photos_without_pose_files(tmp_path, monkeypatch):
    monkeypatch.setattr("midms_cli.extractors.get_extractor", fake_get_extractor)
    write_photos(tmp_path / "df" / "img", ["MEN/a/01.jpg", "MEN/a/02.jpg"])
    prepare(config("deepfashion", tmp_path / "df", tmp_path / "out", extract=True), DEEPFASHION)
    samples = list(iterate_samples(tmp_path / "out", "train"))
    assert len(samples) == 2
    expected = render_pose(KEYPOINTS[None], SIZE)[0]
    for sample in samples:
        torch.testing.assert_close(sample["cond"], expected, atol=0.5 / 255, rtol=0)
        assert sample["meta"]["source"]["estimator"] == "openpose-body-coco18"


def test_lsun_extract_segments_photos_without_label_maps(tmp_path, monkeypatch):
    monkeypatch.setattr("midms_cli.extractors.get_extractor", fake_get_extractor)
    write_photos(tmp_path / "src", ["a.jpg", "b.jpg"])
    prepare(config("lsun-churches", tmp_path / "src", tmp_path / "out", extract=True), LSUN)
    samples = list(iterate_samples(tmp_path / "out", "train"))
    assert len(samples) == 2
    for sample in samples:
        assert torch.equal(sample["cond"].argmax(0), LABELS)
        assert sample["meta"]["source"]["estimator"] == "upernet-swin-s-ade20k"


class ModelStandIn(nn.Module):
    """The attributes `read_condition` reads from a MIDM: its config and its device."""

    def __init__(self, kind: str, channels: int):
        super().__init__()
        self.device = torch.device("cpu")
        self.config = SimpleNamespace(condition=kind, correspondence=SimpleNamespace(cond_channels=channels))


def test_translate_extract_names_the_missing_weights(tmp_path):
    write_photos(tmp_path, ["photo.png"])
    with pytest.raises(MidmsError, match="midms weights add openpose-body FILE"):
        read_condition(ModelStandIn("openpose", 20), tmp_path / "photo.png", SIZE, extract=True)
    with pytest.raises(MidmsError, match="no extractor for condition kind 'celebahq-edges'"):
        read_condition(ModelStandIn("celebahq-edges", 15), tmp_path / "photo.png", SIZE, extract=True)


def test_translate_extract_uses_the_registry(tmp_path, monkeypatch):
    monkeypatch.setattr("midms_cli.pipelines.inputs.get_extractor", fake_get_extractor)
    write_photos(tmp_path, ["photo.png"])
    condition = read_condition(ModelStandIn("ade20k", 151), tmp_path / "photo.png", SIZE, extract=True)
    assert torch.equal(condition.argmax(0), LABELS)
