"""Build a MIDM from a model file holding one copy of its weights in memory.

The plain way (build the model, read the whole safetensors file into a dict, `load_state_dict`)
holds the weights twice at its peak, three times counting the pages of a memory-mapped file,
which is what a process's peak resident set records. Here the model is built on the meta device
(no storage), every entry is read with ordinary file reads into a fresh tensor already in the
dtype it will compute in (the UNet in bfloat16 for precision "bf16", everything else float32,
whatever the file stores) and memory layout, and the tensors become the parameters
(`load_state_dict(assign=True)`).
The arithmetic is unchanged: the same values reach the same parameters as with `load_modules`.
`StagedWeights` goes further for `midms translate --low-memory`: each network is read only while a
step of the translation runs it.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from midms_cli.checkpoint import _read_header
from midms_cli.config import ModelConfig
from midms_cli.diffusion.schedule import NoiseSchedule
from midms_cli.errors import MidmsError
from midms_cli.models.midm import MIDM, precision_layout

# safetensors dtype names -> torch dtypes (the ones torch can hold).
TORCH_DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
    "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
    "F64": torch.float64,
}


# The submodules set_precision lays out (channels-last except at "fp32").
LAID_OUT = ("first_stage", "unet")


def compute_dtypes(precision: str) -> dict[str, torch.dtype]:
    """The dtype each submodule's floating-point weights compute in at `precision` (MIDM.set_precision)."""
    return {
        "first_stage": torch.float32,
        "unet": torch.bfloat16 if precision == "bf16" else torch.float32,
        "correspondence": torch.float32,
    }


def read_entry(handle, data_start: int, entry: Mapping) -> torch.Tensor:
    """One safetensors entry read into a fresh CPU tensor (ordinary reads: no mapped pages stay resident)."""
    begin, end = (int(x) for x in entry["data_offsets"])
    raw = torch.empty(end - begin, dtype=torch.uint8)
    handle.seek(data_start + begin)
    if end > begin and handle.readinto(memoryview(raw.numpy())) != end - begin:
        raise MidmsError(f"{handle.name} ended inside tensor data; re-save the model file")
    return raw.view(TORCH_DTYPES[entry["dtype"]]).reshape(entry["shape"])


def _check_entries(path: Path, prefix: str, module: nn.Module, header: Mapping) -> dict[str, Mapping]:
    """The file's entries under "<prefix>." by parameter name, checked against the module's state."""
    expected = module.state_dict()
    start = prefix + "."
    stored = {name[len(start):]: entry for name, entry in header.items() if name.startswith(start)}
    if not stored:
        raise MidmsError(f"{path} holds no weights for {prefix!r}; it was saved for another model")

    def mismatch(detail: str) -> MidmsError:
        return MidmsError(f"{path} does not match the {prefix!r} model built from this config ({detail})")

    missing = [name for name in expected if name not in stored]
    unexpected = [name for name in stored if name not in expected]
    if missing:
        raise mismatch(f"missing key(s) in state_dict: {', '.join(missing[:3])}")
    if unexpected:
        raise mismatch(f"unexpected key(s) in state_dict: {', '.join(unexpected[:3])}")
    for name, target in expected.items():
        entry = stored[name]
        if tuple(entry["shape"]) != tuple(target.shape):
            raise mismatch(
                f"size mismatch for {name}: the file has {list(entry['shape'])}, "
                f"the model {list(target.shape)}"
            )
        if entry["dtype"] not in TORCH_DTYPES:
            raise mismatch(f"{name} is stored as {entry['dtype']}, which this torch cannot hold")
    return {name: stored[name] for name in expected}


def _read_state(
    handle,
    data_start: int,
    entries: Mapping[str, Mapping],
    module: nn.Module,
    dtype: torch.dtype,
    layout: torch.memory_format,
) -> dict[str, torch.Tensor]:
    """Checked entries read in the module's compute dtype and layout."""
    expected = module.state_dict()
    state = {}
    for name, entry in entries.items():
        tensor = read_entry(handle, data_start, entry)
        wanted = dtype if expected[name].is_floating_point() else expected[name].dtype
        tensor = tensor.to(wanted)  # a no-op when the file already stores this dtype
        if tensor.dim() == 4 and layout != torch.contiguous_format:
            # Laid out now, so that set_precision finds it in place: no second copy of the weights.
            tensor = tensor.contiguous(memory_format=layout)
        state[name] = tensor
    return state


def _load_submodule(path: Path, prefix: str, module: nn.Module, entries: Mapping, precision: str) -> None:
    """Read one submodule's weights from the file into it (assigned: no second copy)."""
    layout = precision_layout(precision) if prefix in LAID_OUT else torch.contiguous_format
    with open(path, "rb") as handle:
        (header_len,) = struct.unpack("<Q", handle.read(8))
        dtype = compute_dtypes(precision)[prefix]
        state = _read_state(handle, 8 + header_len, entries, module, dtype, layout)
    module.load_state_dict(state, strict=True, assign=True)


def _restore_unsaved_buffers(model: MIDM) -> None:
    """Buffers the file does not hold are rebuilt from the config (only ᾱ); anything else left on the
    meta device is a model whose state dict is incomplete, a programming error."""
    model.alphas_cumprod = NoiseSchedule(model.config.diffusion).alphas_cumprod
    left = [name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"tensors without stored values after loading: {', '.join(left[:5])}")


def midm_from_file(
    path: str | Path, config: ModelConfig, device: torch.device | str = "cpu", precision: str = "fp32"
) -> MIDM:
    """A MIDM with `config` and the weights of the model file at `path`, in eval mode on `device`,
    networks at `precision`. A file whose entries do not fit the config is a MidmsError naming it."""
    path = Path(path)
    header = _read_header(path)
    with torch.device("meta"):
        model = MIDM(config)
    for prefix, module in model.modules_to_save().items():
        _load_submodule(path, prefix, module, _check_entries(path, prefix, module, header), precision)
    _restore_unsaved_buffers(model)
    return model.to(device).eval().set_precision(precision)


# What each phase of a translation runs (sampler.translate names the phases).
PHASE_NETWORKS = {
    "encode": ("first_stage", "correspondence"),  # the exemplar's latent and features
    "condition": ("correspondence",),  # the condition's features
    "loop": ("unet", "correspondence"),  # interleaved steps and re-warps
    "refine": ("unet",),
    "refine-separate": (),  # a refiner of its own (the pretrained UNet)
    "decode": ("first_stage",),
}


class StagedWeights:
    """A MIDM whose networks are in memory only while a phase of the translation runs them.

    Built from the model file with every weight checked and none read; `enter(phase)` reads the
    networks the phase needs (PHASE_NETWORKS) and releases the others, whose weights go back to the
    meta device. At paper size the UNet (1.0 GB in float32, 0.5 GB in bfloat16) is then absent
    while the first stage encodes and decodes at full image size, and the first stage while the
    UNet runs. Every entry is read as `midm_from_file` reads it: the same values in every phase.
    """

    def __init__(
        self, path: str | Path, config: ModelConfig, device: torch.device | str, precision: str
    ) -> None:
        self.path = Path(path)
        header = _read_header(self.path)
        with torch.device("meta"):
            self.model = MIDM(config)
        self.networks = self.model.modules_to_save()
        self.entries = {
            prefix: _check_entries(self.path, prefix, module, header)
            for prefix, module in self.networks.items()
        }
        self.device, self.precision = torch.device(device), precision
        self.model.precision = precision
        self.model.alphas_cumprod = NoiseSchedule(config.diffusion).alphas_cumprod.to(self.device)
        self.model.eval()
        self.resident: set[str] = set()
        self.reads = 0  # networks read from the file so far

    def enter(self, phase: str) -> None:
        needed = PHASE_NETWORKS[phase]
        for prefix in self.resident - set(needed):  # released first: the peak is one phase's networks
            self.networks[prefix].to("meta")
            self.resident.discard(prefix)
        for prefix in needed:
            if prefix not in self.resident:
                network = self.networks[prefix]
                _load_submodule(self.path, prefix, network, self.entries[prefix], self.precision)
                network.to(self.device)
                self.model.lay_out(prefix)  # as set_precision lays out a whole model (1x1 kernels' strides)
                self.resident.add(prefix)
                self.reads += 1

    __call__ = enter
