"""`midms translate`: one condition + one exemplar -> one image, or a batch over a pairs list / folders."""

from __future__ import annotations

from pathlib import Path

import typer

from midms_cli.atomic import check_output_dir, check_output_files
from midms_cli.cli.state import STATE, emit, err_console, progress_bar
from midms_cli.errors import MidmsError

# The choices are spelled out here so that `midms translate --help` does not import torch;
# tests/test_translate_inputs.py checks them against the modules that define them.
SAMPLING_BUNDLES = ("official", "corrected")  # midms_cli.config.SAMPLING_BUNDLES
PRECISIONS = ("fp32", "fp32-cl", "bf16")  # midms_cli.models.midm.PRECISIONS
REFINERS = ("finetuned", "pretrained", "none")  # midms_cli.sampler.REFINERS
FITS = ("crop", "pad", "squash")  # midms_cli.pipelines.inputs.FITS
NOISE_ORDERS = ("midms", "official")  # midms_cli.sampler.NOISE_ORDERS

_SAMPLER = "Sampler"
_BATCH = "Batch mode"


def _plan(
    condition: Path | None,
    exemplar: Path | None,
    out: Path | None,
    out_dir: Path | None,
    pairs: Path | None,
    ref_cond: Path | None,
) -> list:
    """The jobs of this invocation (pipelines.inputs.Pair): a pairs file, two folders, or one pair."""
    from midms_cli.pipelines.inputs import Pair, pairs_from_folders, read_pairs_file

    if pairs is not None:
        if condition is not None or exemplar is not None:
            raise MidmsError("give either --pairs FILE or COND and REF, not both")
        if out_dir is None:
            raise MidmsError("--pairs needs --out-dir DIR for the outputs")
        return read_pairs_file(pairs, out_dir)
    if condition is None or exemplar is None:
        raise MidmsError(
            "give a condition and an exemplar: midms translate COND REF -o OUT.png (or --pairs FILE)"
        )
    if condition.is_dir() or exemplar.is_dir():
        if not (condition.is_dir() and exemplar.is_dir()):
            raise MidmsError("batch mode needs both COND and REF to be folders")
        if out_dir is None:
            raise MidmsError("folders of conditions and exemplars need --out-dir DIR for the outputs")
        if ref_cond is not None:
            raise MidmsError("--ref-cond names one file; in batch mode use a pairs file with a third column")
        return pairs_from_folders(condition, exemplar, out_dir)
    if out_dir is not None and out is not None:
        raise MidmsError("give either -o OUT or --out-dir DIR, not both")
    if out is None:
        out = (out_dir or Path.cwd()) / f"{condition.stem}_{exemplar.stem}.png"
    if out.suffix.lower() != ".png":
        raise MidmsError(f"-o {out}: outputs are PNG; name the file *.png")
    return [Pair(condition, exemplar, out, ref_cond)]


def translate_command(
    condition: Path | None = typer.Argument(
        None,
        help="Condition file (.png/.npy/.safetensors of the model's condition kind), a photo with "
        "--extract, or a folder of them.",
    ),
    exemplar: Path | None = typer.Argument(None, help="Exemplar photo (or a folder, paired by file name)."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Output PNG (default: COND_REF.png here)."),
    model: Path | None = typer.Option(
        None, "--model", "-m", help="Model file or training run folder (default: the bundled tiny model)."
    ),
    extract: bool = typer.Option(
        False, "--extract", help="COND is a photo: compute its condition (canny, openpose, ade20k)."
    ),
    ref_cond: Path | None = typer.Option(
        None, "--ref-cond", help="The exemplar's own condition file (default: computed from the photo)."
    ),
    size: int | None = typer.Option(
        None, "--size", help="Working image size (default: the model's training size; others warn)."
    ),
    resize: str = typer.Option(
        "crop",
        "--resize",
        help="How non-square inputs become square: crop (the centred square), pad (borders added) "
        "or squash (both sides resized apart).",
    ),
    steps: int | None = typer.Option(
        None, "--steps", help="Interleaved DDIM steps (official 4).", rich_help_panel=_SAMPLER
    ),
    noise_level: float | None = typer.Option(
        None,
        "--noise-level",
        help="Fraction of the DDIM grid that is run (official 0.25).",
        rich_help_panel=_SAMPLER,
    ),
    refine: str | None = typer.Option(
        None,
        "--refine",
        help=f"Refining UNet: {', '.join(REFINERS)} (default: the model's setting, official 'finetuned').",
        rich_help_panel=_SAMPLER,
    ),
    pretrained: Path | None = typer.Option(
        None,
        "--pretrained",
        help="Imported LDM file whose UNet refines with --refine pretrained.",
        rich_help_panel=_SAMPLER,
    ),
    variant: str | None = typer.Option(
        None,
        "--variant",
        help=f"Sampler bundle: {', '.join(SAMPLING_BUNDLES)} (default: the model's).",
        rich_help_panel=_SAMPLER,
    ),
    seed: int = typer.Option(
        0, "--seed", help="Seed of the noise: same seed, same image.", rich_help_panel=_SAMPLER
    ),
    # Noise order (official MIDMs random stream).
    noise_order: str = typer.Option(
        "midms", "--noise-order", rich_help_panel=_SAMPLER,
        help="midms: one generator; official: torch's and numpy's streams from --seed consumed as the "
        "official MIDMs forward consumes them (43 draws at the official settings).",
    ),
    precision: str = typer.Option(
        "fp32",
        "--precision",
        help=f"Network precision: {', '.join(PRECISIONS)}. bf16 runs the UNet in bfloat16 (faster on GPUs "
        "and CPUs with AMX / AVX-512 BF16; output within ~0.02/255 of fp32, benchmarks/README.md); "
        "fp32-cl is float32 in channels-last layout (other rounding than fp32).",
        rich_help_panel=_SAMPLER,
    ),
    low_memory: bool = typer.Option(
        False,
        "--low-memory",
        help="Keep only the networks the running step needs in memory (each re-read from the model "
        "file when needed) and return freed activations to the system at once: the same images, "
        "about 0.4 GB less peak memory for a 256 px model, about 1.5x the time (benchmarks/README.md).",
        rich_help_panel=_SAMPLER,
    ),
    save_steps: bool = typer.Option(
        False,
        "--save-steps",
        help="Also write OUT.steps.png: warp, mask and x0-prediction of every step, labelled.",
    ),
    save_condition: Path | None = typer.Option(
        None,
        "--save-condition",
        help="Also write the condition the model was given (e.g. the edges --extract computed) "
        "to this .png, .npy or .safetensors file; it reads back as COND.",
    ),
    pairs: Path | None = typer.Option(
        None, "--pairs", help="Pairs list: 'COND REF [REF_COND]' per line.", rich_help_panel=_BATCH
    ),
    out_dir: Path | None = typer.Option(
        None, "--out-dir", help="Output folder for batch mode.", rich_help_panel=_BATCH
    ),
) -> None:
    """Translate a condition into an image in the style of an exemplar (MIDMs, Algorithm 1).

    Example: midms translate edges.png face.jpg -o out.png --model runs/celeba --seed 1
    """
    if variant is not None and variant not in SAMPLING_BUNDLES:
        raise MidmsError(f"--variant {variant!r}: choose one of {', '.join(SAMPLING_BUNDLES)}")
    if precision not in PRECISIONS:
        raise MidmsError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if noise_order not in NOISE_ORDERS:
        raise MidmsError(f"--noise-order {noise_order!r}: choose one of {', '.join(NOISE_ORDERS)}")
    if resize not in FITS:
        raise MidmsError(f"--resize {resize!r}: choose one of {', '.join(FITS)}")
    if out_dir is not None:
        check_output_dir(out_dir, "--out-dir")
    jobs = _plan(condition, exemplar, out, out_dir, pairs, ref_cond)
    check_output_files([job.output for job in jobs], "--out-dir" if out_dir else "-o")  # before any work
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

    from midms_cli import distributed
    from midms_cli.devices import resolve_device
    from midms_cli.memory import map_large_blocks
    from midms_cli.pipelines.translate import (
        TranslateOptions,
        describe_sampler,
        load_midm,
        load_pretrained_unet,
        load_staged,
        resolve_model_file,
        sampling_settings,
        translate_pairs,
    )
    from midms_cli.pipelines.translate_parallel import rank_device, translate_pairs_data_parallel

    # Under torchrun (WORLD_SIZE > 1) each process translates its share of the jobs.
    parallel = distributed.init()
    device = rank_device(STATE.device) if parallel else resolve_device(STATE.device)
    model_file = resolve_model_file(model)
    staged = None
    if low_memory:
        map_large_blocks()  # before the weights and activations are allocated
        staged = load_staged(model_file, device, precision)
        midm = staged.model
    else:
        midm = load_midm(model_file, device, precision)
    sampling = sampling_settings(midm, variant=variant, steps=steps, noise_level=noise_level, refine=refine)
    pretrained_unet = None
    if sampling.refine == "pretrained":
        if pretrained is None:
            raise MidmsError(
                "--refine pretrained needs --pretrained LDM.safetensors (from `midms weights import-ldm`)"
            )
        pretrained_unet = load_pretrained_unet(pretrained, midm, device)
    options = TranslateOptions(
        size=size,
        sampling=sampling,
        seed=seed,
        extract=extract,
        save_steps=save_steps,
        pretrained_unet=pretrained_unet,
        noise_order=noise_order,
        fit=resize,
        save_condition=save_condition,
        phases=staged.enter if staged else None,
        notice=lambda message: err_console.print(message, highlight=False, markup=False, soft_wrap=True),
    )
    run = translate_pairs_data_parallel if parallel else translate_pairs
    try:
        with progress_bar(
            TextColumn("translating"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
            transient=True, disable=len(jobs) == 1 or not distributed.is_main(),
        ) as bar:
            task = bar.add_task("translate", total=len(distributed.rank_share(len(jobs))))
            results = run(midm, jobs, options, progress=lambda done: bar.update(task, completed=done))
    except BaseException:
        distributed.cleanup(finished=False)
        raise
    distributed.cleanup()
    if results is None:  # another process of a data-parallel run reports
        return
    summary = {
        "model": str(model_file),
        "sampler": describe_sampler(sampling),
        "refine": sampling.refine,
        "seed": seed,
        "noise_order": noise_order,
        "outputs": results,
    }
    lines = "\n".join(
        f"wrote {r['output']}" + (f" (steps: {r['steps']})" if "steps" in r else "") for r in results
    )
    emit(summary, lines)


def register(app: typer.Typer) -> None:
    app.command("translate")(translate_command)
