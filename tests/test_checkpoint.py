"""Checkpoints: bit-exact round-trips, truncation and foreign files, atomic saves, resume, run dirs."""

from __future__ import annotations

import json
import os
import random
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import midms_cli
from midms_cli import checkpoint as ckpt_mod
from midms_cli.checkpoint import (
    FORMAT_VERSION,
    RunDir,
    flatten_state,
    get_rng_state,
    load_checkpoint,
    load_modules,
    load_training_state,
    module_state,
    read_metadata,
    save_checkpoint,
    save_modules,
    save_training_state,
    set_rng_state,
    unflatten_state,
)
from midms_cli.errors import MidmsError


def _tensors_of_every_dtype() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(3, 5, generator=g)
    return {
        "f32": base,
        "f16": base.half(),
        "bf16": base.bfloat16(),
        "i64": torch.randint(-(2**40), 2**40, (4, 2), generator=g),
        "u8": torch.randint(0, 256, (7,), generator=g).to(torch.uint8),
        "bool": torch.rand(2, 3, generator=g) > 0.5,
        "scalar": torch.tensor(3.25),
        "empty": torch.zeros(0, 4),
        "strided": base.t(),  # non-contiguous input must be stored correctly
    }


def _bytes(tensor: torch.Tensor) -> list[int]:
    return tensor.contiguous().reshape(-1).view(torch.uint8).tolist()


def _saved(tmp_path: Path) -> Path:
    path = tmp_path / "model.safetensors"
    metadata = {"config": {"a": [1, 2], "b": "x"}, "note": 1.5}
    save_checkpoint(path, _tensors_of_every_dtype(), metadata, kind="test")
    return path


def test_round_trip_is_bit_exact_for_every_dtype_with_metadata(tmp_path, monkeypatch):
    monkeypatch.setattr("sys.argv", ["midms", "train", "--out", "runs/x"])
    path = _saved(tmp_path)
    loaded = load_checkpoint(path, expected_kind="test")
    original = _tensors_of_every_dtype()
    assert set(loaded.tensors) == set(original)
    for name, tensor in original.items():
        got = loaded.tensors[name]
        assert got.dtype == tensor.dtype and got.shape == tensor.shape, name
        # Compare raw bytes so that -0.0/NaN patterns and bfloat16 bits are checked exactly.
        assert _bytes(got) == _bytes(tensor), name
    meta = loaded.metadata
    assert loaded.kind == "test"
    assert meta["config"] == {"a": [1, 2], "b": "x"} and meta["note"] == 1.5
    assert meta["format"] == "midms" and meta["format_version"] == FORMAT_VERSION == 1
    assert meta["package_version"] == midms_cli.__version__
    assert meta["command"] == ["midms", "train", "--out", "runs/x"]
    assert meta["created"].endswith("+00:00") and "T" in meta["created"]
    assert read_metadata(path) == meta


def test_reserved_metadata_key_is_refused(tmp_path):
    with pytest.raises(ValueError, match="reserved"):
        save_checkpoint(tmp_path / "x.safetensors", {}, {"kind": "mine"}, kind="test")


def test_tied_weights_are_saved(tmp_path):
    """Shared storage (tied embeddings) is refused by safetensors itself; we store copies."""
    weight = torch.randn(4, 4)
    save_checkpoint(tmp_path / "t.safetensors", {"a": weight, "b": weight, "c": weight[1]}, {}, kind="test")
    loaded = load_checkpoint(tmp_path / "t.safetensors").tensors
    assert torch.equal(loaded["a"], weight) and torch.equal(loaded["b"], weight)
    assert torch.equal(loaded["c"], weight[1])


@pytest.mark.parametrize("where", ["length", "header", "middle", "last-byte"])
def test_truncated_checkpoint_never_loads(tmp_path, where):
    path = _saved(tmp_path)
    data = path.read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    body = len(data) - 8 - header_len
    cut = {"length": 5, "header": 8 + header_len // 2, "middle": 8 + header_len + body // 2,
           "last-byte": len(data) - 1}[where]
    path.write_bytes(data[:cut])
    with pytest.raises(MidmsError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert str(path) in message and "truncated or corrupt" in message and "\n" not in message


def test_foreign_files_are_refused_with_the_file_named(tmp_path):
    png = tmp_path / "picture.safetensors"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, plain)  # a valid safetensors file without our metadata
    text = tmp_path / "notes.safetensors"
    text.write_bytes(struct.pack("<Q", 4) + b"nope")
    for path in (png, plain, text):
        with pytest.raises(MidmsError, match="not a midms checkpoint") as info:
            load_checkpoint(path)
        assert str(path) in str(info.value)
    with pytest.raises(MidmsError, match="not found"):
        load_checkpoint(tmp_path / "missing.safetensors")


def test_lying_tensor_offsets_are_caught_before_loading(tmp_path):
    """A header whose byte range points past the end of the file (same length) is corrupt."""
    path = _saved(tmp_path)
    data = path.read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_len])
    begin, end = header["u8"]["data_offsets"]
    header["u8"]["data_offsets"] = [begin + 10_000, end + 10_000]
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + header_len :])
    with pytest.raises(MidmsError, match="truncated or corrupt"):
        load_checkpoint(path)


def test_wrong_kind_and_newer_format_are_refused(tmp_path):
    path = _saved(tmp_path)
    with pytest.raises(MidmsError, match=r"holds a 'test' checkpoint, expected 'midms'"):
        load_checkpoint(path, expected_kind="midms")
    newer = tmp_path / "newer.safetensors"
    metadata = {"format": json.dumps("midms"), "format_version": json.dumps(FORMAT_VERSION + 1),
                "kind": json.dumps("test")}
    save_file({"w": torch.zeros(1)}, newer, metadata=metadata)
    with pytest.raises(MidmsError, match="newer midms") as info:
        load_checkpoint(newer)
    assert str(newer) in str(info.value)


def test_interrupted_save_keeps_previous_checkpoint_and_leaves_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, {"w": torch.ones(3)}, {"version": "old"}, kind="test")

    def crash(src, dst):
        raise KeyboardInterrupt  # e.g. Ctrl-C between write and rename

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"w": torch.zeros(3)}, {"version": "new"}, kind="test")
    monkeypatch.undo()
    loaded = load_checkpoint(path)
    assert loaded.metadata["version"] == "old" and torch.equal(loaded.tensors["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


# --------------------------------------------------------------------------------------------
# Modules


class _Net(torch.nn.Module):
    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, width, 3)
        self.norm = torch.nn.BatchNorm2d(width)  # buffers (running stats, int64 counter) travel too


def test_save_and_load_modules_under_prefixes(tmp_path):
    torch.manual_seed(0)
    first, second = _Net(), _Net(2)
    first.norm.running_mean.normal_()
    path = tmp_path / "m.safetensors"
    modules = {"unet": first, "correspondence": second}
    save_modules(path, modules, {"name": "tiny"}, kind="midms", extra={"step": 7})
    ckpt = load_checkpoint(path)
    assert set(module_state(ckpt, "unet")) == set(first.state_dict())
    fresh_first, fresh_second = _Net(), _Net(2)
    meta = load_modules(path, {"unet": fresh_first, "correspondence": fresh_second}, expected_kind="midms")
    assert meta["config"] == {"name": "tiny"} and meta["step"] == 7
    for a, b in zip(first.state_dict().values(), fresh_first.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(MidmsError, match="does not match the 'unet' model"):
        load_modules(path, {"unet": _Net(5)})
    with pytest.raises(MidmsError, match="holds no weights for 'vgg'"):
        load_modules(path, {"vgg": _Net()})


# --------------------------------------------------------------------------------------------
# Nested state and RNG


def test_flatten_unflatten_preserves_structure_types_and_tensors():
    from collections import Counter

    state = {
        "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.arange(4.0)}},
        "groups": [{"betas": (0.9, 0.999), "params": [0, 1], "lr": float("inf"), "foreach": None}],
        "milestones": Counter({10: 1, 12: 2}),
        "$odd": "a key that looks like a marker",
        "array": np.arange(5, dtype=np.int32),
        (1, 2): "tuple key",
    }
    tensors: dict[str, torch.Tensor] = {}
    encoded = flatten_state(state, tensors, "x")
    decoded = unflatten_state(json.loads(json.dumps(encoded)), tensors)
    assert decoded["state"][0]["step"] is tensors["x.0"]
    assert torch.equal(decoded["state"][0]["exp_avg"], torch.arange(4.0))
    assert decoded["groups"] == state["groups"] and isinstance(decoded["groups"][0]["betas"], tuple)
    assert isinstance(decoded["milestones"], Counter) and decoded["milestones"] == state["milestones"]
    assert decoded["$odd"] == state["$odd"] and decoded[(1, 2)] == "tuple key"
    assert decoded["array"].dtype == np.int32 and decoded["array"].tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(TypeError, match="without pickle"):
        flatten_state({"f": object()}, {}, "x")


def _draws() -> tuple:
    python = random.random(), random.gauss(0, 1)
    return python, np.random.rand(3).tolist(), np.random.randn(), torch.rand(4).tolist()


def test_rng_state_round_trip_through_a_file_reproduces_the_next_draws(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)  # leaves a cached gaussian in both python and numpy state
    np.random.randn()
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path / "state.safetensors"
    save_training_state(path, optimizers={"opt": optimizer}, schedulers={}, step=5, extra={"epoch": 2})
    expected = _draws()
    _draws()  # move every generator on
    result = load_training_state(path, {"opt": optimizer}, {})
    assert result == {"step": 5, "extra": {"epoch": 2}}
    assert _draws() == expected


def test_get_set_rng_state_in_memory():
    state = get_rng_state()
    expected = _draws()
    set_rng_state(state)
    assert _draws() == expected


def _train(model, optimizer, scheduler, steps: int, generator: torch.Generator) -> None:
    for _ in range(steps):
        x = torch.randn(8, 4, generator=generator)
        loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean() + 0.01 * torch.randn(1).abs().sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[3, 5], gamma=0.3)
    return model, optimizer, scheduler


def test_resumed_adamw_multisteplr_training_matches_uninterrupted_bit_exactly(tmp_path):
    # Uninterrupted: 8 steps.
    model, optimizer, scheduler = _setup()
    torch.manual_seed(42)
    _train(model, optimizer, scheduler, 8, torch.Generator().manual_seed(7))
    reference = [p.detach().clone() for p in model.parameters()]

    # Interrupted after 4 steps, saved, rebuilt from scratch, resumed for 4 more.
    model, optimizer, scheduler = _setup()
    torch.manual_seed(42)
    data = torch.Generator().manual_seed(7)
    _train(model, optimizer, scheduler, 4, data)
    run = RunDir(tmp_path / "run", keep=2)
    run.save(4, {"model": model}, {"preset": "test"}, optimizers={"adamw": optimizer},
             schedulers={"lr": scheduler}, state_extra={"data_state": data.get_state()})
    torch.manual_seed(999)  # a fresh process would start from other RNG states

    model, optimizer, scheduler = _setup(seed=123)
    load_modules(run.latest(), {"model": model})
    resumed = load_training_state(run.latest_state(), {"adamw": optimizer}, {"lr": scheduler})
    assert resumed["step"] == 4
    data = torch.Generator()
    data.set_state(resumed["extra"]["data_state"])
    assert scheduler.get_last_lr() == [pytest.approx(1e-2 * 0.3)]
    _train(model, optimizer, scheduler, 4, data)
    for got, want in zip(model.parameters(), reference, strict=True):
        assert torch.equal(got, want)


def test_training_state_for_other_optimizers_is_refused(tmp_path):
    model, optimizer, scheduler = _setup()
    path = tmp_path / "state.safetensors"
    save_training_state(path, optimizers={"adamw": optimizer}, schedulers={"lr": scheduler}, step=1)
    with pytest.raises(MidmsError, match="holds optimizers"):
        load_training_state(path, {"sgd": optimizer}, {"lr": scheduler})
    save_modules(tmp_path / "m.safetensors", {"model": model}, {}, kind="midms")
    with pytest.raises(MidmsError, match="expected 'training-state'"):
        load_training_state(tmp_path / "m.safetensors", {"adamw": optimizer}, {"lr": scheduler})


# --------------------------------------------------------------------------------------------
# Run directories


def test_run_dir_keeps_last_k_and_points_to_latest(tmp_path):
    run = RunDir(tmp_path / "run", keep=2)
    assert run.latest() is None and run.latest_state() is None
    model, optimizer, scheduler = _setup()
    for step in (100, 200, 300):
        with torch.no_grad():
            model[0].bias.fill_(step)
        run.save(step, {"model": model}, {"preset": "test"}, optimizers={"adamw": optimizer},
                 schedulers={"lr": scheduler})
    names = sorted(p.name for p in run.path.iterdir())
    assert names == ["ckpt-00000200.safetensors", "ckpt-00000300.safetensors", "latest",
                     "state-00000200.safetensors", "state-00000300.safetensors"]
    pointer = json.loads((run.path / "latest").read_text())
    assert pointer == {"step": 300, "checkpoint": "ckpt-00000300.safetensors",
                       "state": "state-00000300.safetensors"}
    assert run.latest() == run.path / "ckpt-00000300.safetensors"
    assert run.latest_state() == run.path / "state-00000300.safetensors"
    fresh, _, _ = _setup()
    meta = load_modules(run.latest(), {"model": fresh})
    assert meta["step"] == 300 and torch.equal(fresh[0].bias, torch.full((8,), 300.0))


def test_run_dir_pointer_ignores_a_newer_half_finished_save(tmp_path, monkeypatch):
    """A crash after the model file but before the pointer leaves the previous step current."""
    run = RunDir(tmp_path / "run", keep=3)
    model, optimizer, scheduler = _setup()
    run.save(1, {"model": model}, {}, optimizers={"adamw": optimizer}, schedulers={"lr": scheduler})

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt_mod, "save_training_state", crash)
    with pytest.raises(KeyboardInterrupt):
        run.save(2, {"model": model}, {}, optimizers={"adamw": optimizer}, schedulers={"lr": scheduler})
    monkeypatch.undo()
    assert run.path.joinpath("ckpt-00000002.safetensors").is_file()
    assert run.latest_step() == 1 and run.latest_state() == run.state_path(1)
    # Without a pointer (deleted by hand), the newest model file on disk is used.
    (run.path / "latest").unlink()
    assert run.latest() == run.checkpoint_path(2) and run.latest_state() is None


def test_resumable_step_needs_the_checkpoint_and_its_state(tmp_path, monkeypatch):
    """Killed after a checkpoint file but before its state: that step is never resumed from."""
    run = RunDir(tmp_path / "run", keep=3)
    model, optimizer, scheduler = _setup()
    save = {"optimizers": {"adamw": optimizer}, "schedulers": {"lr": scheduler}}

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    # The first save dies after its checkpoint: no pointer, no state, nothing to resume.
    monkeypatch.setattr(ckpt_mod, "save_training_state", crash)
    with pytest.raises(KeyboardInterrupt):
        run.save(1, {"model": model}, {}, **save)
    monkeypatch.undo()
    assert run.steps() == [1] and run.steps(with_state=True) == []
    assert run.latest_resumable() is None and run.latest() == run.checkpoint_path(1)
    # Steps 1 and 2 complete, then a save of 3 dies the same way and the pointer is lost.
    run.save(1, {"model": model}, {}, **save)
    run.save(2, {"model": model}, {}, **save)
    monkeypatch.setattr(ckpt_mod, "save_training_state", crash)
    with pytest.raises(KeyboardInterrupt):
        run.save(3, {"model": model}, {}, **save)
    monkeypatch.undo()
    assert run.latest_resumable() == (run.checkpoint_path(2), run.state_path(2))  # the pointer's
    (run.path / "latest").write_text("{half a pointer")
    assert run.latest_resumable() == (run.checkpoint_path(2), run.state_path(2))  # scanned
    assert run.latest_step() == 3  # a model file is still the newest model


def test_a_full_disk_while_safetensors_writes_is_one_error_naming_the_file(tmp_path, monkeypatch):
    """safetensors reports a failed write as its own error type, with the system's error number."""
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(ckpt_mod, "save_file", full)
    with pytest.raises(MidmsError, match=r"cannot write .*ckpt.safetensors: the disk is full"):
        ckpt_mod.save_checkpoint(tmp_path / "ckpt.safetensors", {"x": torch.zeros(2)}, {}, "midms")
    assert list(tmp_path.iterdir()) == []
