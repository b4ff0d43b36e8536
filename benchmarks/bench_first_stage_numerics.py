"""Float32 rounding error of the first stage's encoder against a float64 reference, per layout.

The encoder latent z_y = E(y) feeds every soft warp, and the warp's τ = 0.005 softmax amplifies
small latent differences, so the float32 path should be as close to exact arithmetic as the
original code's float32 forward is. This measures, on random weights and images of the preset's
size (same weights everywhere):

- `midms fp32`: the first stage after `set_precision("fp32")` (the default path);
- `midms fp32-cl`: after `set_precision("fp32-cl")` (channels-last convolutions);
- with `--original DIR` (a checkout of CompVis/latent-diffusion), latent-diffusion's own `Encoder`
  and 1x1 `quant_conv` with the same state dict, in float32, contiguous and channels-last; the
  checkout is imported from DIR at run time and nothing of it is copied here.

Each error is |z_float32 - z_float64| of the same module run in float64 (midms's float64 encoder
is checked against the original's float64 encoder too when both are present: they must agree to
float64 rounding). Accuracy does not depend on machine load, so these numbers are stable.

    python benchmarks/bench_first_stage_numerics.py --preset paper-celebahq --original LATENT_DIFFUSION_DIR
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import format_table, machine_info  # noqa: E402

from midms_cli.models.midm import MIDM  # noqa: E402
from midms_cli.presets import preset  # noqa: E402


def original_encoder_class(checkout: Path) -> type:
    """latent-diffusion's `Encoder` from a checkout, without installing its dependencies.

    Its module imports einops, `ldm.util` and `ldm.modules.attention` only for other classes and
    attention types; the vanilla encoder of the VQ-f4 / KL-f8 first stages uses none of them, so
    empty stand-ins are registered for the import to succeed.
    """
    source = checkout / "ldm" / "modules" / "diffusionmodules" / "model.py"
    if not source.is_file():
        raise SystemExit(f"{checkout} is not a latent-diffusion checkout (no {source})")
    stand_ins = {
        "einops": {"rearrange": None},
        "ldm": {},
        "ldm.util": {"instantiate_from_config": None},
        "ldm.modules": {},
        "ldm.modules.attention": {"LinearAttention": object},
    }
    for name, attributes in stand_ins.items():
        if name not in sys.modules:
            module = types.ModuleType(name)
            module.__dict__.update(attributes)
            sys.modules[name] = module
    spec = importlib.util.spec_from_file_location("original_ldm_model", source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Encoder


class OriginalFirstStageEncoder(torch.nn.Module):
    """The original encoder followed by quant_conv: what VQModelInterface.encode returns."""

    def __init__(self, encoder_class: type, cfg) -> None:
        super().__init__()
        self.encoder = encoder_class(
            ch=cfg.ch, out_ch=cfg.out_ch, ch_mult=tuple(cfg.ch_mult), num_res_blocks=cfg.num_res_blocks,
            attn_resolutions=list(cfg.attn_resolutions), dropout=cfg.dropout, in_channels=cfg.in_channels,
            resolution=cfg.resolution, z_channels=cfg.z_channels, double_z=cfg.double_z,
        )
        z_out = 2 * cfg.z_channels if cfg.double_z else cfg.z_channels
        self.quant_conv = torch.nn.Conv2d(z_out, 2 * cfg.embed_dim if cfg.double_z else cfg.embed_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(x))


def errors(low: torch.Tensor, exact: torch.Tensor) -> dict[str, float]:
    diff = (low.double() - exact).abs()
    return {
        "mean_abs_error": float(diff.mean()),
        "max_abs_error": float(diff.max()),
        "relative_rms_error": float(diff.pow(2).mean().sqrt() / exact.pow(2).mean().sqrt()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="paper-celebahq")
    parser.add_argument("--images", type=int, default=2, help="images encoded (batch)")
    parser.add_argument("--original", type=Path, default=None, help="latent-diffusion checkout")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    config = preset(args.preset)
    cfg = config.autoencoder
    model = MIDM(config).eval()
    size = config.image_size
    generator = torch.Generator().manual_seed(args.seed)
    images = torch.rand(args.images, 3, size, size, generator=generator) * 2 - 1

    def midms_encode(precision: str, dtype: torch.dtype) -> torch.Tensor:
        midm = copy.deepcopy(model)
        midm.set_precision(precision)
        midm.first_stage.to(dtype=dtype)
        x = images.to(dtype)
        if precision != "fp32":
            x = x.contiguous(memory_format=torch.channels_last)
        first_stage = midm.first_stage
        with torch.no_grad():  # the pre-quantisation latent (VQ) or the posterior's moments (KL)
            return first_stage.quant_conv(first_stage.encoder(x))

    rows, results = [], {}
    exact = midms_encode("fp32", torch.float64)
    for precision in ("fp32", "fp32-cl"):
        results[f"midms {precision}"] = errors(midms_encode(precision, torch.float32), exact)

    if args.original is not None:
        original = OriginalFirstStageEncoder(original_encoder_class(args.original), cfg).eval()
        state = {k: v for k, v in model.first_stage.state_dict().items()
                 if k.startswith(("encoder.", "quant_conv."))}
        original.load_state_dict(state, strict=True)
        with torch.no_grad():
            original_exact = copy.deepcopy(original).double()(images.double())
            results["original float64 vs midms float64"] = errors(original_exact, exact)
            results["original fp32"] = errors(original(images), original_exact)
            cl = copy.deepcopy(original).to(memory_format=torch.channels_last)
            results["original fp32 channels-last"] = errors(
                cl(images.contiguous(memory_format=torch.channels_last)), original_exact
            )
            results["original fp32 vs midms fp32"] = errors(
                original(images), midms_encode("fp32", torch.float32)
            )

    for name, numbers in results.items():
        rows.append({"path": name, **numbers})
    info = machine_info(args.threads)
    print(f"first stage of {args.preset}: {cfg.kind}, {size} px, {args.images} images, latent |z| rms "
          f"{float(exact.pow(2).mean().sqrt()):.3g}; torch {info['torch']}, {info['cpu_capability']}")
    print(format_table(rows, ["path", "mean_abs_error", "max_abs_error", "relative_rms_error"]))
    if args.json:
        report = {"machine": info, "preset": args.preset, "results": results}
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
