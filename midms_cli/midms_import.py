"""Import the released MIDMs checkpoint as a midms model file (kind "midms").

The release stores `{"state_dict": ...}` of the whole official module: the fine-tuned UNet and the
frozen first stage under `diff_model.` in latent-diffusion's layout, and the correspondence
networks (`seg_enc`, `real_enc`, `iter_enc`, `layer`, `theta`, `phi`) with legacy spectral-norm
entries. It carries no config, so the architecture comes from the LDM it was fine-tuned from (an
imported LDM file) and from the correspondence tensors' own shapes. Read with
torch.load(weights_only=True); every key is mapped or named in an error before anything is written.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from midms_cli.config import CorrespondenceConfig, ModelConfig, validate
from midms_cli.errors import ConfigError, MidmsError
from midms_cli.ldm_import import expected_shapes, load_ldm
from midms_cli.models import ldm_layout
from midms_cli.models.blocks import convert_legacy_spectral_norm
from midms_cli.models.midm import MIDM
from midms_cli.pipelines.translate import save_midm
from midms_cli.weights import read_state_dict

DIFFUSION_PREFIX = "diff_model."
CORRESPONDENCE_PREFIXES = ("seg_enc.", "real_enc.", "iter_enc.", "layer.", "theta.", "phi.")
# The official `set_copy()` builds a second, never-loaded LDM for refinement; a
# checkpoint saved after calling it would carry that random UNet, which nothing should use.
DROPPED_PREFIXES = ("copied_diff_model.",)
# Condition kind by the number of condition channels of the released models.
KIND_BY_CHANNELS = {15: "celebahq-edges", 20: "openpose", 151: "ade20k", 1: "canny"}


def split_state_dict(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(latent-diffusion layout tensors without the `diff_model.` prefix, correspondence tensors)."""
    diffusion, correspondence = {}, {}
    for key, tensor in state.items():
        if key.startswith(DIFFUSION_PREFIX):
            diffusion[key[len(DIFFUSION_PREFIX) :]] = tensor
        elif key.startswith(CORRESPONDENCE_PREFIXES):
            correspondence[key] = tensor
        elif not key.startswith(DROPPED_PREFIXES):
            raise MidmsError(
                f"unexpected key {key!r}: this is not a released MIDMs checkpoint "
                "(expected diff_model.*, seg_enc.*, real_enc.*, iter_enc.*, layer.*, theta.*, phi.*)"
            )
    if not correspondence:
        raise MidmsError(
            "the checkpoint holds no correspondence networks (seg_enc.*, ...): it is not a MIDMs checkpoint"
        )
    return diffusion, correspondence


def _shape(tensors: dict[str, Tensor], key: str) -> torch.Size:
    if key not in tensors:
        raise MidmsError(f"the checkpoint is missing {key!r}; it is not a complete MIDMs checkpoint")
    return tensors[key].shape


def correspondence_config(tensors: dict[str, Tensor]) -> CorrespondenceConfig:
    """The correspondence widths read off the official tensors' shapes."""
    stem = tuple(int(_shape(tensors, f"seg_enc.layer{i}.0.weight_orig")[0]) for i in (1, 2, 3))
    blocks = {int(m.group(1)) for k in tensors if (m := re.match(r"layer\.(\d+)\.", k))}
    return CorrespondenceConfig(
        cond_channels=int(_shape(tensors, "seg_enc.layer1.0.weight_orig")[1]),
        channels=int(_shape(tensors, "theta.weight")[0]),
        stem_channels=stem,  # type: ignore[arg-type]
        trunk_blocks=len(blocks),
        spade_hidden=int(_shape(tensors, "seg_enc.G_middle_1.norm_0.mlp_shared.1.weight")[0]),
    )


def import_midms(checkpoint: Path, ldm: Path, out: Path, condition: str | None = None) -> dict[str, Any]:
    """Map the released checkpoint onto a MIDM built from the LDM file's configs; write `out`."""
    if not Path(checkpoint).is_file():
        raise MidmsError(f"checkpoint not found: {checkpoint}")
    configs, _ = load_ldm(Path(ldm))
    if configs.unet is None or configs.diffusion is None:
        raise MidmsError(
            f"{ldm} holds only a first stage; import-midms needs the full LDM (first stage + UNet) "
            "the model was fine-tuned from"
        )
    diffusion_state, correspondence_state = split_state_dict(read_state_dict(Path(checkpoint)))

    # The configs: the LDM's first stage, UNet and schedule; correspondence widths from the tensors.
    correspondence = correspondence_config(correspondence_state)
    kind = condition or KIND_BY_CHANNELS.get(correspondence.cond_channels)
    if kind is None:
        raise MidmsError(
            f"{correspondence.cond_channels} condition channels match no known condition kind; "
            "name it with --condition"
        )
    config = ModelConfig(
        name="midms-import",
        image_size=configs.unet.image_size * configs.autoencoder.downsample,
        condition=kind,
        autoencoder=configs.autoencoder,
        unet=configs.unet,
        diffusion=configs.diffusion,
        correspondence=correspondence,
    )
    try:
        validate(config)
    except ConfigError as exc:
        raise MidmsError(f"the checkpoint does not fit {ldm}: {exc}") from None

    # The weights: the fine-tuned UNet and the first stage in LDM layout (non-EMA, as the release
    # samples), the correspondence with its spectral-norm entries renamed.
    ours = ldm_layout.from_ldm_state_dict(diffusion_state, expected_shapes(configs), "ldm", ema=False)
    model = MIDM(config)
    for prefix in (ldm_layout.FIRST_STAGE, ldm_layout.UNET):
        state = {k[len(prefix) + 1 :]: v.float() for k, v in ours.items() if k.startswith(prefix + ".")}
        getattr(model, prefix).load_state_dict(state, strict=True)
    renamed = {convert_legacy_spectral_norm(k): v.float() for k, v in correspondence_state.items()}
    try:
        model.correspondence.load_state_dict(renamed, strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:300]
        raise MidmsError(f"the correspondence tensors do not fit the official layout ({detail})") from None
    save_midm(out, model, {"source": {"checkpoint": Path(checkpoint).name, "ldm": Path(ldm).name}})
    return {
        "out": str(out),
        "kind": "midms",
        "condition": kind,
        "tensors": len(ours) + len(renamed),
        "parameters": {p: sum(t.numel() for t in m.parameters()) for p, m in model.modules_to_save().items()},
    }
