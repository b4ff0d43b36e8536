"""Bad inputs to every command: exit code 2, one line on stderr naming the problem, nothing left behind.

Each case runs the CLI in this process (`main`) from an empty working folder. The fixtures (tiny
shards, broken files) live in a folder of their own, and both folders must be unchanged afterwards:
no half-written output, no temporary file, no run directory without a checkpoint. A full disk is a
write failure with ENOSPC injected at the write boundary of every atomic write.
"""

from __future__ import annotations

import errno
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from midms_cli import atomic
from midms_cli.cli.app import main
from midms_cli.pipelines.prepare import PrepareConfig, prepare


def _png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels: a valid header, and only one (empty) data chunk."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + data


@pytest.fixture(scope="module")
def fx(tmp_path_factory) -> Path:
    """Every file the cases read: shards at 64 px, broken configs, images, conditions, checkpoints."""
    from midms_plugins.synthfaces import PLUGIN

    root = tmp_path_factory.mktemp("bad-inputs")
    prepare(PrepareConfig(dataset="synthfaces", out=root / "shards", size=64, limit=4, shard_size=2), PLUGIN)
    (root / "file.txt").write_text("not a folder\n")
    (root / "bad.json").write_text("{not json")
    (root / "list.json").write_text("[1, 2]")
    (root / "latin1.json").write_bytes(b"{\"a\": \"\xe9\xff\"}")
    (root / "unknown-field.json").write_text(json.dumps({"no_such_field": 1}))
    (root / "empty").mkdir()
    (root / "dir.png").mkdir()
    (root / "noindex").mkdir()
    (root / "noindex" / "train").mkdir()
    (root / "badindex" / "train").mkdir(parents=True)
    (root / "badindex" / "train" / "index.json").write_text("{oops")
    (root / "listindex" / "train").mkdir(parents=True)
    (root / "listindex" / "train" / "index.json").write_text("[]")
    (root / "runbad").mkdir()
    (root / "runbad" / "config.json").write_text("{broken")
    (root / "runlist").mkdir()
    (root / "runlist" / "config.json").write_text("[]")
    Image.new("RGB", (64, 64), (120, 30, 200)).save(root / "photo.png")
    edges = Image.new("L", (64, 64), 0)  # a binary edge map: white edges on black
    edges.paste(255, (10, 10, 54, 12))
    edges.save(root / "edges.png")
    (root / "huge.png").write_bytes(_png_header(30000, 30000))
    (root / "notimage.png").write_bytes(b"this is text, not a PNG")
    (root / "photos").mkdir()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(root / "photos" / "a.png")
    (root / "badphotos").mkdir()
    (root / "badphotos" / "a.png").write_bytes(b"broken")
    (root / "bombs").mkdir()
    (root / "bombs" / "big.png").write_bytes(_png_header(30000, 30000))
    np.save(root / "nan.npy", np.full((1, 64, 64), np.nan, dtype=np.float32))
    np.save(root / "cond2.npy", np.zeros((2, 64, 64), dtype=np.float32))
    np.save(root / "object.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.save(root / "huge.npy", np.lib.format.open_memmap(root / "huge-src.npy", mode="w+",
                                                          dtype=np.uint8, shape=(1, 9000, 9000)))
    (root / "huge-src.npy").unlink()
    (root / "cond.txt").write_text("0 1 0\n")
    (root / "empty-pairs.txt").write_text("# nothing\n")
    (root / "bad-pairs.txt").write_text("only-one-field\n")
    (root / "pairs.txt").write_text("photo.png photo.png\n")
    (root / "not-safetensors.safetensors").write_bytes(b"\x00" * 64)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, root / "foreign.safetensors")
    (root / "bad.yaml").write_text("model: [unclosed\n")
    (root / "typed.yaml").write_text(
        "model:\n  target: ldm.models.diffusion.ddpm.LatentDiffusion\n  params:\n"
        "    first_stage_config:\n      target: ldm.models.autoencoder.VQModelInterface\n"
        "      params:\n        embed_dim: 3\n        n_embed: 8\n        ddconfig:\n"
        "          double_z: false\n          z_channels: 3\n          resolution: 64\n"
        "          in_channels: 3\n"
        "          out_ch: 3\n          ch: 8\n          ch_mult: [1, 2]\n          num_res_blocks: 1\n"
        "          attn_resolutions: []\n          dropout: 0.0\n"
        "    unet_config:\n      target: ldm.modules.diffusionmodules.openaimodel.UNetModel\n      params:\n"
        "        image_size: 32\n        in_channels: 3\n        out_channels: 3\n"
        "        model_channels: thirty-two\n        num_res_blocks: 1\n        attention_resolutions: [2]\n"
        "        channel_mult: [1, 2]\n        num_head_channels: 8\n"
    )
    (root / "ckpt.bin").write_bytes(b"PK\x03\x04 not a torch checkpoint")
    return root


@pytest.fixture()
def work(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MIDMS_HOME", str(tmp_path.parent / f"{tmp_path.name}-home"))
    monkeypatch.setenv("COLUMNS", "300")
    return tmp_path


def _snapshot(*roots: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for root in roots for p in root.rglob("*")}


S, F, W = "{shards}", "{fx}", "{work}"

# (argv, a fragment of the error line, case-insensitive). {fx}: fixtures; {shards}: 64 px shards;
# {work}: the empty working folder (outputs that must not appear).
CASES: list[tuple[str, str]] = [
    # Usage errors from the option parser, one line each.
    ("prepare synthfaces --out {work}/o --limit -1", "--limit"),
    ("prepare synthfaces --out {work}/o --shard-size 0", "--shard-size"),
    ("prepare synthfaces --out {work}/o --size big", "--size"),
    ("prepare synthfaces --out {work}/o --size 4", "--size"),
    ("prepare synthfaces --out {work}/o --workers 0", "--workers"),
    ("prepare synthfaces --out {work}/o --split nope", "--split"),
    ("prepare synthfaces", "--out"),
    ("prepare synthfaces --out {work}/o --no-such-option", "no-such-option"),
    ("prepare no-such-dataset --out {work}/o", "no-such-dataset"),
    ("pretrain autoencoder --data {shards} --out {work}/r --iters 0", "--iters"),
    ("pretrain autoencoder --data {shards} --out {work}/r --batch-size 0", "--batch-size"),
    ("pretrain autoencoder --data {shards}", "--out"),
    ("pretrain no-such-model", "no-such-model"),
    ("pretrain autoencoder --data {shards} --out {work}/r --seed x", "--seed"),
    ("pretrain autoencoder --data {shards} --out {work}/r --checkpoint-every 0", "--checkpoint-every"),
    ("pretrain diffusion --data {shards} --out {work}/r", "--autoencoder"),
    ("train --data {shards} --out {work}/r --batch-size 0", "--batch-size"),
    ("train --data {shards} --out {work}/r --iters 0", "--iters"),
    ("train --data {shards} --out {work}/r --grad-accumulation 0", "--grad-accumulation"),
    ("train --data {shards} --out {work}/r --warmup-iters -1", "--warmup-iters"),
    ("train --data {shards} --out {work}/r --amp maybe", "maybe"),
    ("warmup --data {shards} --base {fx}/photo.png --out {work}/r --iters abc", "--iters"),
    ("warmup --data {shards} --base {fx}/photo.png --out {work}/r --epochs 0", "--epochs"),
    ("warmup --data {shards} --out {work}/r", "--base"),
    ("translate {fx}/photo.png {fx}/photo.png -o {work}/o.png --seed x", "--seed"),
    ("eval --data {shards} --out {work}/e --limit 0", "--limit"),
    ("eval --data {shards} --out {work}/e --batch-size 0", "--batch-size"),
    ("eval --data {shards} --out {work}/e --diversity -1", "--diversity"),
    ("no-such-command", "no-such-command"),
    ("info --no-such-flag", "--no-such-flag"),
    ("weights import-ldm --config {fx}/bad.yaml", "--ckpt"),
    ("weights no-such", "no-such"),
    # prepare: values, sources, outputs.
    ("prepare synthfaces --out {work}/o --train-count -5", "--train-count"),
    ("prepare synthfaces --out {work}/o --val-count -1", "--val-count"),
    ("prepare synthfaces --out {fx}/file.txt --limit 2", "is a file"),
    ("prepare synthfaces --out {fx}/file.txt/sub --limit 2", "file.txt"),
    ("prepare synthfaces --out {fx}/shards --limit 2 --seed 7 --size 64 --shard-size 2",
     "different preparation"),
    ("prepare folder --out {work}/o", "--source"),
    ("prepare folder --source {work}/missing --out {work}/o", "not a folder"),
    ("prepare folder --source {fx}/file.txt --out {work}/o", "not a folder"),
    ("prepare folder --source {fx}/empty --out {work}/o", "no photos"),
    ("prepare folder --source {fx}/badphotos --out {work}/o --strict --size 32 --val-fraction 0", "a.png"),
    ("prepare folder --source {fx}/badphotos --out {work}/o --size 32 --val-fraction 0", "skipped"),
    ("prepare folder --source {fx}/bombs --out {work}/o --size 32 --val-fraction 0", "too large"),
    ("prepare folder --source {fx}/photos --out {work}/o --val-fraction nan", "--val-fraction"),
    ("prepare folder --source {fx}/photos --out {work}/o --hard-probability 2", "probabilit"),
    ("prepare folder --source {fx}/photos --out {work}/o --train-list {work}/missing.txt", "missing.txt"),
    # pretrain: data, outputs, values, model files.
    ("pretrain autoencoder --data {work}/missing --out {work}/r", "--data"),
    ("pretrain autoencoder --data {fx}/file.txt --out {work}/r", "--data"),
    ("pretrain autoencoder --data {fx}/noindex --out {work}/r", "no shard index"),
    ("pretrain autoencoder --data {fx}/badindex --out {work}/r", "not valid JSON"),
    ("pretrain autoencoder --data {fx}/listindex --out {work}/r", "not a midms shard index"),
    ("pretrain autoencoder --data {shards} --out {fx}/file.txt", "is a file"),
    ("pretrain autoencoder --data {shards} --out {fx}/file.txt/run", "file.txt"),
    ("pretrain autoencoder --data {shards} --out {work}/r --lr 0", "lr"),
    ("pretrain autoencoder --data {shards} --out {work}/r --lr nan", "lr"),
    ("pretrain autoencoder --data {shards} --out {work}/r --lr -1", "lr"),
    ("pretrain autoencoder --data {shards} --out {work}/r --reconstruction huber", "reconstruction"),
    ("pretrain autoencoder --data {shards} --out {work}/r --perceptual 1", "vgg19"),
    ("pretrain autoencoder --data {shards} --out {work}/r --preset no-such", "no-such"),
    ("pretrain autoencoder --data {shards} --out {work}/r --preset paper-celebahq", "px"),
    ("pretrain autoencoder --data {shards} --out {fx}/runbad", "not valid JSON"),
    ("pretrain autoencoder --data {shards} --out {fx}/runlist", "not a run config"),
    ("pretrain diffusion --data {shards} --out {work}/r --autoencoder {work}/missing", "not found"),
    ("pretrain diffusion --data {shards} --out {work}/r --autoencoder {fx}/empty", "no model.safetensors"),
    ("pretrain diffusion --data {shards} --out {work}/r --autoencoder {fx}/not-safetensors.safetensors",
     "not-safetensors"),
    ("pretrain diffusion --data {shards} --out {work}/r --autoencoder {fx}/foreign.safetensors", "midms"),
    ("pretrain diffusion --data {shards} --out {work}/r --autoencoder {fx}/photo.png --ema-decay 1.5",
     "ema_decay"),
    # warmup: config files, base models, values.
    ("warmup --data {shards} --base {work}/missing --out {work}/r", "missing"),
    ("warmup --data {shards} --base {fx}/photo.png --out {work}/r", "photo.png"),
    ("warmup --data {shards} --base {fx}/foreign.safetensors --out {work}/r", "foreign.safetensors"),
    ("warmup --data {shards} --base {fx}/photo.png --out {work}/r --config {work}/missing.json", "not found"),
    ("warmup --data {shards} --base {fx}/photo.png --out {work}/r --config {fx}/bad.json", "not valid JSON"),
    ("warmup --data {shards} --base {fx}/photo.png --out {work}/r --config {fx}/list.json", "JSON list"),
    ("warmup --data {shards} --base {fx}/photo.png --out {work}/r --config {fx}/latin1.json", "UTF-8"),
    ("warmup --data {shards} --base {fx}/photo.png --out {work}/r --config {fx}/unknown-field.json",
     "no_such_field"),
    ("warmup --data {shards} --base {fx}/photo.png --out {work}/r --config {fx}/empty", "folder"),
    ("warmup --data {shards} --base {fx}/photo.png --out {work}/r --config /dev/null", "not valid JSON"),
    ("warmup --data {shards} --base {fx}/photo.png --out {work}/r --preset no-such", "no-such"),
    ("warmup --data {shards} --base {fx}/photo.png --out {work}/r --feature-net bogus", "feature_net"),
    ("warmup --data {shards} --base {fx}/photo.png --out {work}/r --lr nan", "lr_correspondence"),
    ("warmup --data {shards} --base {fx}/photo.png --out {work}/r --grad-clip nan", "grad_clip"),
    ("warmup --data {work}/missing --base {fx}/photo.png --out {work}/r", "--data"),
    ("warmup --data {shards} --base {fx}/photo.png --out {fx}/file.txt", "is a file"),
    # train.
    ("train --data {shards} --out {work}/r", "--init"),
    ("train --data {shards} --out {work}/r --init {work}/missing", "missing"),
    ("train --data {shards} --out {work}/r --init {fx}/not-safetensors.safetensors", "not-safetensors"),
    ("train --data {shards} --out {work}/r --init {fx}/empty", "empty"),
    ("train --data {shards} --out {work}/r --base {fx}/photo.png --ema-decay 2", "ema_decay"),
    ("train --data {shards} --out {work}/r --base {fx}/photo.png --lr-unet -1", "lr_unet"),
    ("train --data {shards} --out {work}/r --base {fx}/photo.png --config {fx}/bad.json", "not valid JSON"),
    ("train --data {shards} --out {work}/r --base {fx}/photo.png --preset paper-celebahq", "vgg19"),
    ("train --data {shards} --out {work}/r --base {fx}/photo.png --preset paper-celebahq "
     "--feature-net first-stage", "px"),
    ("train --data {shards} --out {fx}/file.txt --base {fx}/photo.png", "is a file"),
    ("train --data {fx}/noindex --out {work}/r --base {fx}/photo.png", "no shard index"),
    # translate: inputs, outputs, options.
    ("translate", "condition"),
    ("translate {work}/missing.png {fx}/photo.png -o {work}/o.png", "missing.png"),
    ("translate {fx}/photo.png {work}/missing.png -o {work}/o.png", "missing.png"),
    ("translate {fx}/photo.png {fx}/photo.png -o {fx}/dir.png", "is a directory"),
    ("translate {fx}/photo.png {fx}/photo.png -o {fx}/file.txt/o.png", "file.txt"),
    ("translate {fx}/photo.png {fx}/photo.png -o {work}/o.jpg", "PNG"),
    ("translate --pairs {work}/missing.txt --out-dir {work}/o", "missing.txt"),
    ("translate --pairs {fx}/empty-pairs.txt --out-dir {work}/o", "no pairs"),
    ("translate --pairs {fx}/bad-pairs.txt --out-dir {work}/o", "bad-pairs.txt:1"),
    ("translate --pairs {fx}/pairs.txt", "--out-dir"),
    ("translate {fx}/photo.png {fx}/photo.png --pairs {fx}/pairs.txt --out-dir {work}/o", "not both"),
    ("translate --pairs {fx}/pairs.txt --out-dir {fx}/file.txt", "is a file"),
    ("translate --pairs {fx}/empty --out-dir {work}/o", "folder"),
    ("translate {fx}/nan.npy {fx}/photo.png -o {work}/o.png", "NaN"),
    ("translate {fx}/huge.png {fx}/photo.png -o {work}/o.png", "too large"),
    ("translate {fx}/huge.npy {fx}/photo.png -o {work}/o.png", "too large"),
    ("translate {fx}/edges.png {fx}/huge.png -o {work}/o.png", "too large"),
    ("translate {fx}/edges.png {fx}/notimage.png -o {work}/o.png", "notimage.png"),
    ("translate {fx}/notimage.png {fx}/photo.png -o {work}/o.png", "notimage.png"),
    ("translate {fx}/cond.txt {fx}/photo.png -o {work}/o.png", "cond.txt"),
    ("translate {fx}/object.npy {fx}/photo.png -o {work}/o.png", "object.npy"),
    ("translate {fx}/cond2.npy {fx}/photo.png -o {work}/o.png", "channels"),
    ("translate {fx}/photo.png {fx}/photo.png -o {work}/o.png --variant nope", "--variant"),
    ("translate {fx}/photo.png {fx}/photo.png -o {work}/o.png --precision fp8", "--precision"),
    ("translate {fx}/photo.png {fx}/photo.png -o {work}/o.png --model {work}/missing", "missing"),
    ("translate {fx}/photo.png {fx}/photo.png -o {work}/o.png --model {fx}/file.txt", "file.txt"),
    ("translate {fx}/photo.png {fx}/photo.png -o {work}/o.png --refine pretrained", "--pretrained"),
    ("translate {fx}/photos {fx}/photo.png --out-dir {work}/o", "both"),
    ("translate {fx}/photos {fx}/photos", "--out-dir"),
    ("translate {fx}/photo.png {fx}/photo.png -o {work}/o.png --out-dir {work}/d", "not both"),
    # eval.
    ("eval", "--data"),
    ("eval --real {fx}/photos", "--fake"),
    ("eval --real {fx}/photos --fake {fx}/photos --model {fx}/file.txt", "not both"),
    ("eval --data {work}/missing --out {work}/e", "missing"),
    ("eval --data {shards} --out {fx}/file.txt", "is a file"),
    ("eval --data {shards} --out {work}/e --metrics bogus", "bogus"),
    ("eval --data {shards} --out {work}/e --split nope", "nope"),
    ("eval --real {work}/missing --fake {fx}/photos --out {work}/e", "missing"),
    # demo.
    ("demo --profile nope --out {work}/d", "--profile"),
    ("demo --quick --profile bundle --out {work}/d", "--quick"),
    ("demo --quick --out {fx}/file.txt", "is a file"),
    # weights and info.
    ("weights add no-such-name {fx}/photo.png", "no-such-name"),
    ("weights add vgg19 {work}/missing.pth", "missing.pth"),
    ("weights path no-such-name", "no-such-name"),
    ("weights import-ldm --config {work}/missing.yaml --ckpt {fx}/ckpt.bin --out {work}/o.safetensors",
     "missing.yaml"),
    ("weights import-ldm --config {fx}/bad.yaml --ckpt {fx}/ckpt.bin --out {work}/o.safetensors", "YAML"),
    ("weights import-ldm --config {fx}/typed.yaml --ckpt {fx}/ckpt.bin --out {work}/o.safetensors",
     "model_channels"),
    ("weights import-ldm --config {fx}/typed.yaml --ckpt {fx}/ckpt.bin --out {fx}/empty", "is a directory"),
    ("weights import-midms {work}/missing.pth --ldm {fx}/foreign.safetensors --out {work}/o.safetensors",
     "missing.pth"),
    ("weights import-midms {fx}/ckpt.bin --ldm {fx}/foreign.safetensors --out {fx}/empty", "is a directory"),
    ("info --device bogus", "bogus"),
]


def _argv(case: str, fx: Path, work: Path) -> list[str]:
    return [part.format(fx=fx, shards=fx / "shards", work=work) for part in case.split()]


def _check_one_line_and_nothing_left(argv: list[str], fragment: str, fx: Path, work: Path, capsys) -> str:
    before = _snapshot(fx, work)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert exit_info.value.code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert fragment.lower() in lines[0].lower(), lines[0]
    assert _snapshot(fx, work) == before, "files were left behind or changed"
    return lines[0]


def test_there_are_at_least_a_hundred_cases_covering_every_command():
    commands = {case.split()[0] for case, _ in CASES}
    assert len(CASES) >= 100
    every = {"prepare", "pretrain", "warmup", "train", "translate", "eval", "demo", "weights", "info"}
    assert every <= commands


@pytest.mark.parametrize(("case", "fragment"), CASES, ids=[c for c, _ in CASES])
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(case, fragment, fx, work, capsys):
    _check_one_line_and_nothing_left(_argv(case, fx, work), fragment, fx, work, capsys)


def _full_disk(event: str, path: Path) -> None:
    if event == "written":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


FULL_DISK = [
    "prepare synthfaces --out {work}/o --size 32 --limit 2",
    "pretrain autoencoder --data {shards} --out {work}/r --iters 1 --batch-size 2",
    "translate {fx}/photo.png {fx}/photo.png -o {work}/o.png --extract",
]


@pytest.mark.parametrize("case", FULL_DISK, ids=[c.split()[0] for c in FULL_DISK])
def test_a_full_disk_is_one_line_and_leaves_nothing(case, fx, work, capsys, monkeypatch):
    monkeypatch.setattr(atomic, "_fault_hook", _full_disk)
    line = _check_one_line_and_nothing_left(_argv(case, fx, work), "disk is full", fx, work, capsys)
    assert "cannot write" in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
@pytest.mark.parametrize("case", [
    "prepare synthfaces --out {work}/ro/o --size 32 --limit 2",
    "pretrain autoencoder --data {shards} --out {work}/ro/r",
    "translate {fx}/photo.png {fx}/photo.png -o {work}/ro/o.png",
    "eval --data {shards} --out {work}/ro/e",
])
def test_a_read_only_folder_is_refused_before_any_work(case, fx, work, capsys):
    (work / "ro").mkdir()
    (work / "ro").chmod(0o555)
    try:
        _check_one_line_and_nothing_left(_argv(case, fx, work), "cannot write", fx, work, capsys)
    finally:
        (work / "ro").chmod(0o755)


def test_an_existing_output_is_replaced_with_a_notice(fx, work, capsys):
    target = work / "o.png"
    target.write_bytes(b"old")
    with pytest.raises(SystemExit) as exit_info:
        main(["translate", str(fx / "photo.png"), str(fx / "photo.png"), "-o", str(target), "--extract"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 0, err
    assert f"note: {target} exists and will be replaced" in err
    assert Image.open(target).size[0] > 0


def test_pairs_from_stdin_are_read():
    """`--pairs /dev/stdin`: a stream, not a missing file (here an empty one: no pairs)."""
    result = subprocess.run(
        [sys.executable, "-m", "midms_cli", "translate", "--pairs", "/dev/stdin", "--out-dir", "unused"],
        input="# no pairs\n", capture_output=True, text=True, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "300"},
    )
    assert result.returncode == 2
    assert result.stderr.strip() == "error: pairs file /dev/stdin lists no pairs"
