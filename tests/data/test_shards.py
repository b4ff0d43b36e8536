"""Shards: exact round trip, node/worker splitting, resumable deterministic preparation, corrupt shards."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from fake_dataset import PLUGIN, expected

from midms_cli.data import shards
from midms_cli.data.shards import (
    ReadStats,
    assigned_shards,
    decode_condition,
    encode_condition,
    iterate_samples,
    make_loader,
    read_index,
)
from midms_cli.errors import MidmsError
from midms_cli.pipelines import prepare as prepare_module
from midms_cli.pipelines.prepare import PrepareConfig, prepare

SIZE = 8


def run(out: Path, **overrides) -> dict:
    overrides.setdefault("options", {"count": 10})
    overrides.setdefault("shard_size", 4)
    config = PrepareConfig(dataset="fake", out=out, size=SIZE, **overrides)
    return prepare(config, PLUGIN)


def digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.glob("shard-*.tar"))}


def test_condition_encoding_is_lossless_for_uint8_levels_and_reproducible():
    levels = torch.arange(256, dtype=torch.float32).view(1, 16, 16).repeat(3, 1, 1) / 255
    data = encode_condition(levels)
    assert torch.equal(decode_condition(data), levels)
    assert encode_condition(levels) == data  # no timestamp inside
    assert data[:2] == b"\x1f\x8b"  # gzip stream of a .npy


def test_write_then_read_returns_exactly_the_samples_written(tmp_path):
    result = run(tmp_path, splits=("train",), seed=7)
    assert result["splits"]["train"] == {"count": 10, "shards": 3, "skipped": 0}
    index = read_index(tmp_path, "train")
    assert index["format_version"] == 2 and index["plugin"] == "fake" and index["plugin_version"] == "3"
    assert index["condition"]["kind"] == "fake" and index["condition"]["channels"] == 2
    assert index["shard_size"] == 4 and index["seed"] == 7 and index["source"] is None  # the plan
    assert [s["count"] for s in index["shards"]] == [4, 4, 2]
    for entry in index["shards"]:
        path = tmp_path / "train" / entry["name"]
        assert entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert entry["bytes"] == path.stat().st_size
    samples = list(iterate_samples(tmp_path, "train"))
    assert [s["meta"]["index"] for s in samples] == list(range(10))
    for sample in samples:
        i = sample["meta"]["index"]
        assert sample["meta"]["key"] == f"train{i:05d}"
        assert "oracle" not in sample
        for name, tensor in expected(7, "train", i, SIZE, 2).items():
            assert torch.equal(sample[name], tensor), (i, name)


def test_tar_members_follow_the_documented_schema(tmp_path):
    import tarfile

    run(tmp_path, splits=("val",), options={"count": 1})
    with tarfile.open(tmp_path / "val" / "shard-000000.tar") as archive:
        names = sorted(archive.getnames())
    assert names == ["val00000.cond.npy.gz", "val00000.image.png", "val00000.json", "val00000.ref.png",
                     "val00000.ref_cond.npy.gz"]  # fmt: skip


def test_assigned_shards_are_disjoint_and_cover_all():
    names = [Path(f"s{i}") for i in range(7)]
    parts = [assigned_shards(names, r, 2, w, 2) for r in range(2) for w in range(2)]
    flat = [p for part in parts for p in part]
    assert sorted(flat) == sorted(names) and len(flat) == len(set(flat))
    assert parts[0] == [Path("s0"), Path("s4")]  # rank 0 takes s0 s2 s4 s6, its worker 0 every other one


def test_two_ranks_two_workers_read_disjoint_samples_that_cover_the_split(tmp_path):
    # Ranks are simulated with the rank/world_size parameters (under torchrun they come from
    # torch.distributed or RANK/WORLD_SIZE); workers are real DataLoader worker processes.
    run(tmp_path, splits=("train",), options={"count": 10}, shard_size=2)  # 5 shards
    seen = []
    for rank in range(2):
        loader = make_loader(tmp_path, "train", 3, resample=False, num_workers=2, rank=rank, world_size=2)
        indices = [m["index"] for batch in loader for m in batch["meta"]]
        seen.append(indices)
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(10))


def test_resampled_loader_is_endless_and_collates_batches(tmp_path):
    run(tmp_path, splits=("train",), options={"count": 5})
    loader = make_loader(tmp_path, "train", 4, seed=3, buffer=8)
    iterator = iter(loader)
    batches = [next(iterator) for _ in range(4)]  # 16 samples from a 5-sample split
    batch = batches[0]
    assert batch["image"].shape == (4, 3, SIZE, SIZE) and batch["cond"].shape == (4, 2, SIZE, SIZE)
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1
    assert batch["cond"].min() >= 0 and batch["cond"].max() <= 1
    assert isinstance(batch["meta"], list) and len(batch["meta"]) == 4 and "oracle" not in batch
    i = batch["meta"][0]["index"]
    assert torch.equal(batch["image"][0], expected(0, "train", i, SIZE, 2)["image"])


def test_sample_depends_only_on_seed_and_index_not_on_workers(tmp_path):
    run(tmp_path / "one", splits=("train",), seed=1)
    run(tmp_path / "two", splits=("train",), seed=1, workers=2)
    assert digests(tmp_path / "one" / "train") == digests(tmp_path / "two" / "train")
    run(tmp_path / "other", splits=("train",), seed=2)
    assert digests(tmp_path / "one" / "train") != digests(tmp_path / "other" / "train")


def test_killed_prepare_resumes_to_the_same_shards(tmp_path, monkeypatch):
    run(tmp_path / "whole", splits=("train",))
    reference = digests(tmp_path / "whole" / "train")

    # First attempt dies after writing two shards (as a kill would), leaving a stale temporary.
    real_write_shard = prepare_module.write_shard
    calls = []

    def dying_write_shard(path, samples):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(path)
        return real_write_shard(path, samples)

    monkeypatch.setattr(prepare_module, "write_shard", dying_write_shard)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "resumed", splits=("train",))
    directory = tmp_path / "resumed" / "train"
    assert sorted(digests(directory)) == ["shard-000000.tar", "shard-000001.tar"]
    assert not (directory / "index.json").exists()
    kept = {p.name: p.stat().st_mtime_ns for p in directory.glob("shard-*.tar")}
    (directory / ".shard-000002.tar.x1y2.tmp.tar").write_bytes(b"half a shard")

    # The restart writes only the missing shard and ends with the same bytes.
    monkeypatch.setattr(prepare_module, "write_shard", real_write_shard)
    run(tmp_path / "resumed", splits=("train",))
    assert digests(directory) == reference
    assert {name: (directory / name).stat().st_mtime_ns for name in kept} == kept
    assert not list(directory.glob(".shard-*"))
    assert read_index(tmp_path / "resumed", "train")["count"] == 10


def test_restart_with_other_settings_is_refused(tmp_path):
    run(tmp_path, splits=("train",), seed=0)
    with pytest.raises(MidmsError, match="different preparation.*seed"):
        run(tmp_path, splits=("train",), seed=1)


def test_bad_source_item_is_skipped_with_a_warning_or_fails_with_strict(tmp_path):
    lines = []
    config = PrepareConfig(dataset="fake", out=tmp_path / "a", size=SIZE, shard_size=4, splits=("train",),
                           options={"count": 6, "bad": "2"})  # fmt: skip
    result = prepare(config, PLUGIN, report=lines.append)
    assert result["splits"]["train"]["count"] == 5 and result["splits"]["train"]["skipped"] == 1
    assert lines == ["warning: skipped train sample 2: broken source file item2.jpg"]
    assert [s["meta"]["index"] for s in iterate_samples(tmp_path / "a", "train")] == [0, 1, 3, 4, 5]
    config.out, config.strict = tmp_path / "b", True
    with pytest.raises(MidmsError, match="item2.jpg"):
        prepare(config, PLUGIN)


def _corrupt_middle(path: Path) -> None:
    """Flip bytes inside the first member's data (headers take the first 1536 bytes here)."""
    data = bytearray(path.read_bytes())
    for i in range(1600, 1700):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupt_shard_is_reported_by_name_and_skipped(tmp_path):
    run(tmp_path, splits=("train",))
    _corrupt_middle(tmp_path / "train" / "shard-000001.tar")
    lines: list[str] = []
    stats = ReadStats()
    samples = list(iterate_samples(tmp_path, "train", stats=stats, report=lines.append))
    assert [s["meta"]["index"] for s in samples] == [0, 1, 2, 3, 8, 9]
    assert stats.skipped_shards == ["shard-000001.tar"] and stats.samples == 6
    assert any("shard-000001.tar" in line for line in lines)
    with pytest.raises(MidmsError, match="shard-000001.tar"):
        list(iterate_samples(tmp_path, "train", strict=True))


def test_loader_skips_a_truncated_shard_and_counts_it(tmp_path):
    run(tmp_path, splits=("train",))
    path = tmp_path / "train" / "shard-000000.tar"
    path.write_bytes(path.read_bytes()[:1000])
    lines: list[str] = []
    loader = make_loader(tmp_path, "train", 2, resample=False, shuffle=False, report=lines.append)
    assert loader.skipped_shards == ["shard-000000.tar"]
    assert sorted(m["index"] for batch in loader for m in batch["meta"]) == list(range(4, 10))
    assert any("shard-000000.tar" in line for line in lines)
    with pytest.raises(MidmsError, match="shard-000000.tar"):
        make_loader(tmp_path, "train", 2, strict=True)


def test_loader_reports_a_shard_that_fails_while_reading(tmp_path):
    run(tmp_path, splits=("train",))
    _corrupt_middle(tmp_path / "train" / "shard-000002.tar")  # same size: found only when read
    lines: list[str] = []
    loader = make_loader(tmp_path, "train", 1, resample=False, shuffle=False, report=lines.append)
    indices = [m["index"] for batch in loader for m in batch["meta"]]
    assert set(indices) <= set(range(10)) and set(range(8)) <= set(indices)
    assert loader.stream.stats.skipped_shards == ["shard-000002.tar"]
    assert any("shard-000002.tar" in line for line in lines)


def test_read_index_errors_name_the_file(tmp_path):
    with pytest.raises(MidmsError, match="no shard index at .*index.json"):
        read_index(tmp_path, "train")
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "index.json").write_text(json.dumps({"format_version": 99, "shards": []}))
    with pytest.raises(MidmsError, match="format version 99"):
        read_index(tmp_path, "train")
    assert shards.SHARD_FORMAT_VERSION == 2


def _window(full: torch.Tensor, part: torch.Tensor) -> set[tuple[int, int, bool]]:
    """Every (top, left, mirrored) under which `part` is a crop (then flip) of `full`."""
    crop, size = part.shape[-1], full.shape[-1]
    found = set()
    for top in range(size - crop + 1):
        for left in range(size - crop + 1):
            window = full[..., top : top + crop, left : left + crop]
            for mirrored in (False, True):
                if torch.equal(window.flip(-1) if mirrored else window, part):
                    found.add((top, left, mirrored))
    return found


def test_crop_and_flip_share_the_target_window_and_draw_the_exemplars_own(tmp_path):
    run(tmp_path, splits=("train",), options={"count": 6})
    loader = make_loader(tmp_path, "train", 1, resample=False, crop=5, flip=True, seed=4)
    windows_differ = False
    for batch in loader:
        sample = {k: v[0] for k, v in batch.items() if k != "meta"}
        full = expected(0, "train", batch["meta"][0]["index"], SIZE, 2)
        assert sample["image"].shape == (3, 5, 5) and sample["ref_cond"].shape == (2, 5, 5)
        target = _window(full["image"], sample["image"])
        exemplar = _window(full["ref"], sample["ref"])
        assert target and target == _window(full["cond"], sample["cond"])  # condition aligned with image
        assert exemplar and exemplar == _window(full["ref_cond"], sample["ref_cond"])
        windows_differ |= target != exemplar
    assert windows_differ  # the exemplar has its own crop/flip
    with pytest.raises(MidmsError, match="crop 9"):
        next(iter(make_loader(tmp_path, "train", 1, crop=9)))


def test_self_pair_exemplar_keeps_the_targets_crop_and_flip():
    import random

    from midms_cli.data.shards import crop_and_flip

    image = torch.arange(2 * 64, dtype=torch.float32).view(2, 8, 8)
    sample = {
        "image": image,
        "cond": image + 1,
        "ref": image.clone(),
        "ref_cond": image + 1,
        "meta": {"pairing": "self"},
    }
    for seed in range(5):
        out = crop_and_flip(sample, 4, True, random.Random(seed))
        assert torch.equal(out["ref"], out["image"]) and torch.equal(out["ref_cond"], out["cond"])
    # "own": the same photo through a window of its own draw, still aligned with its own condition.
    moved = 0
    for seed in range(20):
        out = crop_and_flip(sample, 4, True, random.Random(seed), self_pair_window="own")
        assert torch.equal(out["ref_cond"], out["ref"] + 1)
        moved += not torch.equal(out["ref"], out["image"])
    assert moved >= 15  # 1 chance in 18 per draw that both windows coincide
    with pytest.raises(MidmsError, match="self_pair_window must be one of shared, own"):
        crop_and_flip(sample, 4, True, random.Random(0), self_pair_window="mine")


def test_load_size_resizes_then_crops_back_to_the_shard_size(tmp_path):
    import torch.nn.functional as F

    run(tmp_path, splits=("train",), options={"count": 6})
    load = SIZE + 3
    loader = make_loader(tmp_path, "train", 1, resample=False, load_size=load, seed=1)
    windows_differ = False
    for batch in loader:
        sample = {k: v[0] for k, v in batch.items() if k != "meta"}
        full = expected(0, "train", batch["meta"][0]["index"], SIZE, 2)
        loaded = {  # the official recipe: photos bilinear, label/edge maps nearest, then the crop
            name: F.interpolate(full[name][None], size=(load, load),
                                mode="nearest" if name.endswith("cond") else "bilinear")[0]
            for name in ("image", "cond", "ref", "ref_cond")
        }
        assert sample["image"].shape == (3, SIZE, SIZE) and sample["ref_cond"].shape == (2, SIZE, SIZE)
        target, exemplar = _window(loaded["image"], sample["image"]), _window(loaded["ref"], sample["ref"])
        assert target and target == _window(loaded["cond"], sample["cond"])
        assert exemplar and exemplar == _window(loaded["ref_cond"], sample["ref_cond"])
        assert all(not mirrored for _, _, mirrored in target | exemplar)  # flip is off
        # Nearest keeps the condition's values: a binary edge map stays binary.
        assert set(sample["cond"].unique().tolist()) <= set(full["cond"].unique().tolist())
        windows_differ |= target != exemplar
    assert windows_differ
    with pytest.raises(MidmsError, match=f"load size {SIZE - 1} must be at least the crop size {SIZE}"):
        next(iter(make_loader(tmp_path, "train", 1, load_size=SIZE - 1)))


def test_single_pass_with_fewer_shards_than_ranks_is_a_clear_error(tmp_path):
    run(tmp_path, splits=("train",), options={"count": 4}, shard_size=2)  # 2 shards
    with pytest.raises(MidmsError, match="2 readable shard\\(s\\) for 3 processes.*--shard-size"):
        make_loader(tmp_path, "train", 1, resample=False, rank=2, world_size=3)
    # Resampling draws from every shard, so any number of ranks still gets data.
    batch = next(iter(make_loader(tmp_path, "train", 2, rank=2, world_size=3)))
    assert len(batch["meta"]) == 2


def test_fewer_shards_than_workers_reads_every_sample_once(tmp_path):
    # 1 shard, 1 rank, 2 DataLoader workers: the second worker has no shard and ends at once.
    run(tmp_path, splits=("train",), options={"count": 3}, shard_size=4)
    loader = make_loader(tmp_path, "train", 2, resample=False, num_workers=2)
    assert sorted(m["index"] for batch in loader for m in batch["meta"]) == [0, 1, 2]


def _flip_inside_member(path: Path, member_suffix: str, old: bytes, new: bytes) -> None:
    """Replace bytes inside one member's payload, same length: the tar stays valid, its sha256 does not."""
    import tarfile

    with tarfile.open(path) as archive:
        member = next(m for m in archive.getmembers() if m.name.endswith(member_suffix))
        start, size = member.offset_data, member.size
    data = bytearray(path.read_bytes())
    payload = bytes(data[start : start + size])
    assert old in payload and len(old) == len(new)
    data[start : start + size] = payload.replace(old, new, 1)
    path.write_bytes(bytes(data))


def test_a_same_size_change_inside_a_member_is_caught_by_sha256_before_its_samples_are_used(tmp_path):
    run(tmp_path, splits=("train",))
    path = tmp_path / "train" / "shard-000002.tar"
    size = path.stat().st_size
    # Sample 8's metadata still parses (index 8 -> 9): without the checksum it would train silently.
    _flip_inside_member(path, "train00008.json", b'"index": 8', b'"index": 9')
    assert path.stat().st_size == size
    lines: list[str] = []
    loader = make_loader(tmp_path, "train", 1, resample=False, shuffle=False, report=lines.append)
    assert sorted(m["index"] for batch in loader for m in batch["meta"]) == list(range(8))
    assert loader.stream.stats.skipped_shards == ["shard-000002.tar"]
    assert any("shard-000002.tar" in line and "sha256" in line for line in lines)
    with pytest.raises(MidmsError, match="shard-000002.tar: sha256 differs"):
        list(make_loader(tmp_path, "train", 1, resample=False, shuffle=False, strict=True))
    stats = ReadStats()
    samples = list(iterate_samples(tmp_path, "train", stats=stats, report=lines.append))
    assert [s["meta"]["index"] for s in samples] == list(range(8))
    assert stats.skipped_shards == ["shard-000002.tar"]


def test_prepare_removes_every_temporary_a_killed_run_left(tmp_path):
    run(tmp_path, splits=("train",))
    leftovers = [tmp_path / "train" / ".index.json.k1ll3d00.tmp.json",
                 tmp_path / "train" / ".prepare.json.abcdefgh.tmp.json",
                 tmp_path / "train" / ".shard-000001.tar.zzzzzzzz.tmp.tar"]
    for leftover in leftovers:
        leftover.write_bytes(b"partial")
    run(tmp_path, splits=("train",))
    assert not any(p.exists() for p in leftovers)
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == [
        "index.json", "prepare.json", "shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]


def test_a_negative_or_nan_count_option_is_refused_and_nothing_is_written(tmp_path):
    with pytest.raises(MidmsError, match="--count must be >= 0, got -5"):
        run(tmp_path / "out", options={"count": -5})
    assert not (tmp_path / "out").exists()


def test_a_preparation_that_fails_before_any_shard_leaves_nothing(tmp_path):
    with pytest.raises(MidmsError, match="every train sample was skipped"):
        run(tmp_path / "out", splits=("train",), options={"count": 2, "bad": "0,1"})
    assert not (tmp_path / "out").exists()
    with pytest.raises(MidmsError, match="broken source file item0"):
        run(tmp_path / "strict", splits=("train",), strict=True, options={"count": 2, "bad": "0"})
    assert not (tmp_path / "strict").exists()
