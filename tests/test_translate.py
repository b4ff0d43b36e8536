"""`midms translate` and model files: outputs, step strips, batch modes, and one-line failures."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

import midms_cli.pipelines.translate as translate_pipeline
from midms_cli.checkpoint import RunDir, save_checkpoint, save_modules
from midms_cli.cli.app import main
from midms_cli.cli.state import STATE
from midms_cli.errors import MidmsError
from midms_cli.models.midm import MIDM
from midms_cli.pipelines.translate import load_midm, resolve_model_file, sampling_settings, save_midm
from midms_cli.presets import preset

SIZE = 32


def micro_config(condition: str = "canny", channels: int = 1):
    """32 px images, 8x8 latents, narrow nets; the official sampler settings."""
    config = preset("tiny")
    config.image_size = SIZE
    config.condition = condition
    config.autoencoder = dataclasses.replace(config.autoencoder, resolution=SIZE, n_embed=16)
    config.unet = dataclasses.replace(
        config.unet, image_size=8, channel_mult=(1, 2), attention_resolutions=(2,)
    )
    config.correspondence = dataclasses.replace(
        config.correspondence,
        cond_channels=channels,
        channels=16,
        stem_channels=(8, 16, 16),
        trunk_blocks=1,
        spade_hidden=8,
    )
    return config


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("translate")
    torch.manual_seed(0)
    model = MIDM(micro_config())
    save_midm(root / "model.safetensors", model)
    rng = np.random.default_rng(0)
    for name in ("photo", "ref", "ref2"):
        Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(root / f"{name}.png")
    edges = np.zeros((SIZE, SIZE), dtype=np.uint8)
    edges[8:24, 12] = 255
    edges[16, 4:28] = 255
    Image.fromarray(edges).save(root / "cond.png")
    np.save(root / "cond15.npy", np.zeros((15, SIZE, SIZE), dtype=np.float32))
    (root / "notimage.png").write_text("this is not a picture")
    save_checkpoint(root / "ldm.safetensors", {"unet.weight": torch.zeros(1)}, {"config": {}}, "ldm")
    return root


def run(args, capsys):
    STATE.json = False
    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def png_size(path):
    with Image.open(path) as image:
        return image.size


def test_translate_writes_a_png_of_the_model_size(files, tmp_path, capsys):
    out = tmp_path / "out.png"
    code, stdout, err = run(
        [
            "translate",
            str(files / "cond.png"),
            str(files / "ref.png"),
            "-o",
            str(out),
            "--model",
            str(files / "model.safetensors"),
        ],
        capsys,
    )
    assert code == 0, err
    assert png_size(out) == (SIZE, SIZE)
    assert "wrote" in stdout


def test_extract_and_same_seed_give_identical_files(files, tmp_path, capsys):
    outputs = []
    for name, seed in (("a.png", "3"), ("b.png", "3"), ("c.png", "4")):
        code, _, err = run(
            [
                "translate",
                str(files / "photo.png"),
                str(files / "ref.png"),
                "--extract",
                "-o",
                str(tmp_path / name),
                "--seed",
                seed,
                "--model",
                str(files / "model.safetensors"),
            ],
            capsys,
        )
        assert code == 0, err
        outputs.append((tmp_path / name).read_bytes())
    assert outputs[0] == outputs[1]
    assert outputs[0] != outputs[2]


def test_size_option_changes_the_working_resolution(files, tmp_path, capsys):
    out = tmp_path / "big.png"
    args = ["translate", str(files / "cond.png"), str(files / "ref.png"), "-o", str(out), "--size", "64"]
    code, _, err = run([*args, "--refine", "none", "--model", str(files / "model.safetensors")], capsys)
    assert code == 0, err
    assert png_size(out) == (64, 64)
    code, _, err = run([*args[:-1], "20", "--model", str(files / "model.safetensors")], capsys)
    assert code == 2 and "multiple of 8" in err


def test_a_condition_kind_that_needs_the_exemplar_condition_file(files, tmp_path, capsys):
    torch.manual_seed(0)
    save_midm(tmp_path / "edges15.safetensors", MIDM(micro_config("celebahq-edges", 15)))
    args = [
        "translate",
        str(files / "cond15.npy"),
        str(files / "ref.png"),
        "-o",
        str(tmp_path / "o.png"),
        "--model",
        str(tmp_path / "edges15.safetensors"),
        "--refine",
        "none",
    ]
    code, _, err = run(args, capsys)
    assert code == 2 and "--ref-cond" in err and not (tmp_path / "o.png").exists()
    code, _, err = run([*args, "--ref-cond", str(files / "cond15.npy")], capsys)
    assert code == 0, err
    assert png_size(tmp_path / "o.png") == (SIZE, SIZE)


def test_save_steps_writes_the_strip(files, tmp_path, capsys):
    out = tmp_path / "out.png"
    code, _, err = run(
        [
            "translate",
            str(files / "cond.png"),
            str(files / "ref.png"),
            "-o",
            str(out),
            "--save-steps",
            "--refine",
            "none",
            "--model",
            str(files / "model.safetensors"),
        ],
        capsys,
    )
    assert code == 0, err
    # 4 interleaved steps as rows; warp, mask and x0-prediction as columns; titles above and left.
    from midms_cli.pipelines.step_strip import HEADER_HEIGHT, LABEL_WIDTH

    assert png_size(tmp_path / "out.steps.png") == (LABEL_WIDTH + 3 * SIZE, HEADER_HEIGHT + 4 * SIZE)
    pixels = np.asarray(Image.open(tmp_path / "out.steps.png").convert("L"))
    header, labels = pixels[:HEADER_HEIGHT, LABEL_WIDTH:], pixels[HEADER_HEIGHT:, :LABEL_WIDTH]
    for block in [header[:, i * SIZE : (i + 1) * SIZE] for i in range(3)] + [
        labels[i * SIZE : (i + 1) * SIZE] for i in range(4)
    ]:  # every column and every row has its title: dark text on white
        assert block.max() == 255 and block.min() < 100


def test_pairs_file_and_folders_match_single_mode(files, tmp_path, capsys):
    model = str(files / "model.safetensors")
    single = tmp_path / "single.png"
    assert (
        run(
            [
                "translate",
                str(files / "cond.png"),
                str(files / "ref2.png"),
                "-o",
                str(single),
                "--model",
                model,
            ],
            capsys,
        )[0]
        == 0
    )
    pairs = tmp_path / "pairs.txt"
    pairs.write_text(
        f"# condition exemplar\n{files / 'cond.png'} {files / 'ref.png'}\n"
        f"{files / 'cond.png'}, {files / 'ref2.png'}\n"
    )
    code, _, err = run(
        ["translate", "--pairs", str(pairs), "--out-dir", str(tmp_path / "batch"), "--model", model], capsys
    )
    assert code == 0, err
    written = sorted((tmp_path / "batch").iterdir())
    assert [p.name for p in written] == ["00000_cond.png", "00001_cond.png"]
    assert written[1].read_bytes() == single.read_bytes()  # a pair's image does not depend on the others
    conditions, exemplars = tmp_path / "conds", tmp_path / "refs"
    conditions.mkdir()
    exemplars.mkdir()
    (conditions / "face1.png").write_bytes((files / "cond.png").read_bytes())
    (exemplars / "face1.png").write_bytes((files / "ref2.png").read_bytes())
    code, _, err = run(
        [
            "translate",
            str(conditions),
            str(exemplars),
            "--out-dir",
            str(tmp_path / "folders"),
            "--model",
            model,
        ],
        capsys,
    )
    assert code == 0, err
    assert (tmp_path / "folders" / "face1.png").read_bytes() == single.read_bytes()


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["{root}/missing.png", "{root}/ref.png", "--model", "{root}/model.safetensors"], "does not exist"),
        (["{root}/cond.png", "{root}/notimage.png", "--model", "{root}/model.safetensors"], "notimage.png"),
        (["{root}/cond15.npy", "{root}/ref.png", "--model", "{root}/model.safetensors"], "channels"),
        (["{root}/cond.png", "{root}/ref.png", "--model", "{root}/ldm.safetensors"], "expected 'midms'"),
        (["{root}/cond.png", "{root}/ref.png", "--model", "{root}/none.safetensors"], "does not exist"),
        (
            ["{root}/cond.png", "{root}/ref.png", "--model", "{root}/model.safetensors", "--variant", "x"],
            "variant",
        ),
        (
            [
                "{root}/cond.png",
                "{root}/ref.png",
                "--model",
                "{root}/model.safetensors",
                "--refine",
                "pretrained",
            ],
            "--pretrained",
        ),
        (
            ["{root}/cond.png", "{root}/ref.png", "--model", "{root}/model.safetensors", "--steps", "0"],
            "--steps",
        ),
        (["{root}/cond.png", "{root}/ref.png"], "no bundled model found; pass --model"),
    ],
)
def test_failures_are_one_line_and_write_nothing(files, tmp_path, capsys, monkeypatch, arguments, message):
    monkeypatch.setattr(translate_pipeline, "BUNDLED_MODEL", files / "no-such-bundle.safetensors")
    out_dir = tmp_path / "out"
    args = ["translate", *(a.format(root=files) for a in arguments), "-o", str(out_dir / "x.png")]
    code, stdout, err = run(args, capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert not out_dir.exists()


def test_model_file_round_trip(files):
    model = load_midm(files / "model.safetensors")
    torch.manual_seed(12345)  # a differently initialised model (loading draws no random numbers)
    again = MIDM(model.config)
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    save_modules(files / "copy.safetensors", model.modules_to_save(), model.config, "midms")
    loaded = load_midm(files / "copy.safetensors")
    assert loaded.config == model.config
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, reference[name]), name
    assert not all(torch.equal(t, reference[n]) for n, t in again.state_dict().items())


def test_model_file_with_a_config_that_does_not_fit_its_weights(files, tmp_path):
    model = load_midm(files / "model.safetensors")
    wrong = micro_config("celebahq-edges", 15)
    save_modules(tmp_path / "bad.safetensors", model.modules_to_save(), wrong, "midms")
    with pytest.raises(MidmsError, match="does not match"):
        load_midm(tmp_path / "bad.safetensors")


def test_sampling_settings_map_steps_and_noise_level(files):
    model = load_midm(files / "model.safetensors")
    official = sampling_settings(model)
    assert (official.ddim_steps, official.interleaved_steps, official.rewarp_positions) == (16, 4, (1, 2))
    eight = sampling_settings(model, steps=8, noise_level=0.25, variant="corrected")
    assert (eight.ddim_steps, eight.interleaved_steps, eight.grid) == (32, 8, "exact")
    assert sampling_settings(model, steps=2).rewarp_positions == ()
    assert sampling_settings(model, noise_level=0.2).ddim_steps == 20


def test_official_sampler_comes_back_from_a_one_step_model_file(files):
    """The bundled model stores a one-step loop (no room for re-warps); asking for 4 steps at 0.25
    restores the official loop, re-warps included, while a stored 4-step choice is kept as it is."""
    model = load_midm(files / "model.safetensors")
    stored = model.config.sampling
    model.config.sampling = dataclasses.replace(stored, interleaved_steps=1, rewarp_positions=())
    back = sampling_settings(model, steps=4, noise_level=0.25, refine="finetuned")
    assert (back.ddim_steps, back.interleaved_steps, back.rewarp_positions) == (16, 4, (1, 2))
    assert back.refine == "finetuned"
    model.config.sampling = dataclasses.replace(stored, interleaved_steps=4, rewarp_positions=(2,))
    assert sampling_settings(model, steps=6, noise_level=0.25).rewarp_positions == (2,)


def test_a_run_directory_resolves_to_its_latest_checkpoint(files, tmp_path):
    model = load_midm(files / "model.safetensors")
    run_dir = RunDir(tmp_path / "run", keep=2)
    for step in (10, 20):
        run_dir.save(step, model.modules_to_save(), model.config)
    assert resolve_model_file(tmp_path / "run") == tmp_path / "run" / "ckpt-00000020.safetensors"
    assert load_midm(resolve_model_file(tmp_path / "run")).config == model.config
    (tmp_path / "empty").mkdir()
    with pytest.raises(MidmsError, match="without checkpoints"):
        resolve_model_file(tmp_path / "empty")


def test_a_finished_run_resolves_to_its_final_model_unless_resumed_since(files, tmp_path):
    """The final model.safetensors holds the EMA weights when EMA is on: a finished run's model is
    that file, not the raw last checkpoint; checkpoints written after it (a resumed run) win."""
    import os

    model = load_midm(files / "model.safetensors")
    run_dir = RunDir(tmp_path / "run", keep=2)
    checkpoint = run_dir.save(10, model.modules_to_save(), model.config)
    final = tmp_path / "run" / "model.safetensors"
    save_midm(final, model)
    os.utime(checkpoint, ns=(1_000_000_000, 1_000_000_000))
    os.utime(final, ns=(2_000_000_000, 2_000_000_000))
    assert resolve_model_file(tmp_path / "run") == final
    os.utime(checkpoint, ns=(3_000_000_000, 3_000_000_000))
    assert resolve_model_file(tmp_path / "run") == checkpoint


def test_a_bad_file_late_in_a_batch_fails_before_any_output(files, tmp_path, capsys):
    pairs = tmp_path / "pairs.txt"
    pairs.write_text(
        f"{files / 'cond.png'} {files / 'ref.png'}\n{files / 'cond.png'} {files / 'notimage.png'}\n"
    )
    out_dir = tmp_path / "batch"
    code, _, err = run(
        ["translate", "--pairs", str(pairs), "--out-dir", str(out_dir),
         "--model", str(files / "model.safetensors")],
        capsys,
    )
    assert code == 2 and len(err.strip().splitlines()) == 1 and "notimage.png" in err, err
    assert not out_dir.exists()


def test_low_memory_gives_the_same_files_reading_each_network_per_phase(files, tmp_path, capsys, monkeypatch):
    """--low-memory keeps only the networks of the running phase in memory: same bytes, steps strip too."""
    import midms_cli.memory
    from midms_cli.models import model_file

    monkeypatch.setattr(midms_cli.memory, "map_large_blocks", lambda: True)  # leave this process's allocator
    reads = []
    original = model_file._load_submodule
    monkeypatch.setattr(model_file, "_load_submodule", lambda path, prefix, *a: (reads.append(prefix),
                                                                                original(path, prefix, *a)))
    pairs = tmp_path / "pairs.txt"
    pairs.write_text(
        f"{files / 'cond.png'} {files / 'ref.png'}\n{files / 'cond.png'} {files / 'ref.png'}\n"
        f"{files / 'cond.png'} {files / 'ref2.png'}\n"
    )
    model = str(files / "model.safetensors")
    outputs = {}
    for name, extra in (("plain", []), ("low", ["--low-memory"])):
        reads.clear()
        code, _, err = run(["translate", "--pairs", str(pairs), "--out-dir", str(tmp_path / name), "--model",
                            model, "--save-steps", "--refine", "finetuned", *extra], capsys)
        assert code == 0, err
        outputs[name] = {p.name: p.read_bytes() for p in sorted((tmp_path / name).iterdir())}
        if name == "low":  # per pair: the UNet and the correspondence for its loop, the first stage to decode
            per_pair = ["correspondence", "unet", "first_stage"]
            assert reads == ["first_stage", *per_pair * 3], reads  # the first encode, then each pair
        else:
            assert reads == ["first_stage", "unet", "correspondence"]
    assert len(outputs["plain"]) == 6 and outputs["plain"] == outputs["low"]
