"""The registry of pretrained networks that only a user can supply (architecture 6).

Each artefact names the file(s) users have, the checksum where one is published, the key layout
its loader expects and a download URL where one is known. `add_weight` verifies a file and stores
its tensors as `$MIDMS_HOME/weights/NAME.safetensors` (never a pickle); `fetch_weight` downloads
with HTTP Range resume first. Third-party checkpoints are read with torch.load(weights_only=True).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from midms_cli.atomic import atomic_path
from midms_cli.errors import MidmsError
from midms_cli.paths import weights_dir

FORMAT_VERSION = "1"
CHUNK = 1 << 20


@dataclass(frozen=True)
class Source:
    """One file a user may have for an artefact, and how to recognise it.

    `sha256` is a full published digest; `sha256_prefix` is the leading hex digits that the file's
    own name carries under the torch.hub / OpenMMLab convention `name-<sha256 prefix>.ext`.
    `marker_key` is a state-dict key every file of this layout has, checked after loading.
    """

    filename: str
    layout: str
    marker_key: str
    url: str | None = None
    sha256: str | None = None
    sha256_prefix: str | None = None
    origin: str = ""

    @property
    def checksum(self) -> str | None:
        """The digest (or digest prefix) to compare with, None when none is published."""
        return self.sha256 or self.sha256_prefix

    def matches(self, digest: str) -> bool:
        return self.checksum is not None and digest.startswith(self.checksum)


@dataclass(frozen=True)
class Artefact:
    name: str
    description: str
    used_by: str
    sources: tuple[Source, ...]

    @property
    def url(self) -> str | None:
        return next((source.url for source in self.sources if source.url), None)


_TORCHVISION = "https://download.pytorch.org/models/"
_LDM = "https://ommer-lab.com/files/latent-diffusion/"
_LPIPS = "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/"
_SWIN_S = (
    "https://download.openmmlab.com/mmsegmentation/v0.5/swin/"
    "upernet_swin_small_patch4_window7_512x512_160k_ade20k_pretrain_224x224_1K/"
    "upernet_swin_small_patch4_window7_512x512_160k_ade20k_pretrain_224x224_1K_20210526_192015-ee2fff1c.pth"
)

REGISTRY: dict[str, Artefact] = {
    artefact.name: artefact
    for artefact in (
        Artefact(
            "vgg19",
            "VGG19 ImageNet features",
            "training losses (spec 2.5), style metrics",
            (
                Source(
                    "vgg19-dcbb9e9d.pth",
                    "torchvision-vgg19",
                    "features.0.weight",
                    url=_TORCHVISION + "vgg19-dcbb9e9d.pth",
                    sha256_prefix="dcbb9e9d",
                    origin="torchvision",
                ),
                Source(
                    "vgg19_conv.pth", "cocosnet-vgg19", "conv1_1.weight", origin="CoCosNet models/ (spec 3.6)"
                ),
            ),
        ),
        Artefact(
            "inception-fid",
            "Inception-v3 ported from TensorFlow's FID graph",
            "FID",
            (
                Source(
                    "pt_inception-2015-12-05-6726825d.pth",
                    "pytorch-fid-inception",
                    "Conv2d_1a_3x3.conv.weight",
                    url="https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                    "pt_inception-2015-12-05-6726825d.pth",
                    sha256_prefix="6726825d",
                    origin="pytorch-fid",
                ),
            ),
        ),
        Artefact(
            "lpips-vgg",
            "LPIPS v0.1 linear heads on VGG16",
            "LPIPS diversity",
            (
                Source(
                    "vgg.pth",
                    "lpips-linear",
                    "lin0.model.1.weight",
                    url=_LPIPS + "vgg.pth",
                    origin="LPIPS v0.1",
                ),
            ),
        ),
        Artefact(
            "lpips-alex",
            "LPIPS v0.1 linear heads on AlexNet",
            "LPIPS diversity",
            (
                Source(
                    "alex.pth",
                    "lpips-linear",
                    "lin0.model.1.weight",
                    url=_LPIPS + "alex.pth",
                    origin="LPIPS v0.1",
                ),
            ),
        ),
        Artefact(
            "alexnet",
            "AlexNet ImageNet backbone of lpips-alex",
            "LPIPS diversity",
            (
                Source(
                    "alexnet-owt-7be5be79.pth",
                    "torchvision-alexnet",
                    "features.0.weight",
                    url=_TORCHVISION + "alexnet-owt-7be5be79.pth",
                    sha256_prefix="7be5be79",
                    origin="torchvision",
                ),
            ),
        ),
        Artefact(
            "vgg16",
            "VGG16 ImageNet backbone of lpips-vgg",
            "LPIPS (VGG variant)",
            (
                Source(
                    "vgg16-397923af.pth",
                    "torchvision-vgg16",
                    "features.0.weight",
                    url=_TORCHVISION + "vgg16-397923af.pth",
                    sha256_prefix="397923af",
                    origin="torchvision",
                ),
            ),
        ),
        Artefact(
            "openpose-body",
            "OpenPose body-25 COCO-18 keypoint network",
            "DeepFashion pose conditions",
            (
                Source(
                    "body_pose_model.pth",
                    "openpose-body",
                    "conv1_1.weight",
                    url="https://huggingface.co/lllyasviel/Annotators/resolve/main/body_pose_model.pth",
                    origin="pytorch-openpose",
                ),
            ),
        ),
        Artefact(
            "swin-s-ade20k",
            "UperNet Swin-S ADE20K segmenter",
            "LSUN segmentation conditions and loss",
            (
                Source(
                    _SWIN_S.rsplit("/", 1)[1],
                    "mmseg-upernet-swin",
                    "decode_head.conv_seg.weight",
                    url=_SWIN_S,
                    sha256_prefix="ee2fff1c",
                    origin="mmsegmentation v0.5",
                ),
            ),
        ),
        Artefact(
            "ldm-celeba256",
            "LDM CelebA-HQ 256 (VQ-f4 first stage + UNet)",
            "first stage + UNet",
            (
                Source(
                    "celeba.zip",
                    "ldm-latent-diffusion",
                    "model.diffusion_model.input_blocks.0.0.weight",
                    url=_LDM + "celeba.zip",
                    origin="CompVis latent-diffusion",
                ),
            ),
        ),
        Artefact(
            "ldm-lsun-churches",
            "LDM LSUN-Churches 256 (KL-f8 first stage + UNet)",
            "first stage + UNet",
            (
                Source(
                    "lsun_churches.zip",
                    "ldm-latent-diffusion",
                    "model.diffusion_model.input_blocks.0.0.weight",
                    url=_LDM + "lsun_churches.zip",
                    origin="CompVis latent-diffusion",
                ),
            ),
        ),
        Artefact(
            "vq-f4",
            "LDM VQ-f4 autoencoder (Z=8192, d=3)",
            "first stage pretraining",
            (
                Source(
                    "vq-f4.zip",
                    "ldm-vq",
                    "quantize.embedding.weight",
                    url=_LDM + "vq-f4.zip",
                    origin="CompVis latent-diffusion",
                ),
            ),
        ),
        Artefact(
            "kl-f8",
            "LDM KL-f8 autoencoder",
            "first stage pretraining",
            (
                Source(
                    "kl-f8.zip",
                    "ldm-kl",
                    "quant_conv.weight",
                    url=_LDM + "kl-f8.zip",
                    origin="CompVis latent-diffusion",
                ),
            ),
        ),
    )
}


# Looking things up.


def artefact(name: str) -> Artefact:
    """The registry entry `name`, or a user error listing the known names."""
    if name not in REGISTRY:
        raise MidmsError(f"unknown weights {name!r}; known: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def stored_path(name: str) -> Path:
    """Where `name` is stored once added: $MIDMS_HOME/weights/NAME.safetensors."""
    return weights_dir() / f"{artefact(name).name}.safetensors"


def _torch_hub_dir() -> Path:
    torch_home = os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache")), "torch"
    )
    return Path(torch_home).expanduser() / "hub" / "checkpoints"


def originals_found(name: str) -> list[Path]:
    """Unconverted original files already on disk (torch.hub's cache), to suggest to `add`."""
    hub = _torch_hub_dir()
    return [hub / source.filename for source in artefact(name).sources if (hub / source.filename).is_file()]


def weight_status() -> list[dict[str, Any]]:
    """One row per artefact: present or not, where it was looked for, checksums and URLs."""
    rows = []
    for entry in REGISTRY.values():
        path = stored_path(entry.name)
        rows.append(
            {
                "name": entry.name,
                "description": entry.description,
                "used_by": entry.used_by,
                "present": path.is_file(),
                "path": str(path),
                "looked_for": [str(path)],
                "originals_found": [str(p) for p in originals_found(entry.name)],
                "sources": [
                    {
                        "file": source.filename,
                        "layout": source.layout,
                        "origin": source.origin,
                        "url": source.url,
                        "sha256": source.sha256 or "not published",
                        "sha256_prefix": source.sha256_prefix,
                    }
                    for source in entry.sources
                ],
            }
        )
    return rows


def _how_to_get(name: str) -> str:
    entry = artefact(name)
    hint = f"run `midms weights add {name} FILE` with {' or '.join(s.filename for s in entry.sources)}"
    if entry.url:
        hint += f", or `midms weights fetch {name}`"
    return hint


def require_weight(name: str) -> Path:
    """The stored file of `name`; a user error saying how to add it when it is missing."""
    path = stored_path(name)
    if not path.is_file():
        raise MidmsError(f"weights {name!r} not found at {path}; {_how_to_get(name)}")
    return path


def load_weight(name: str) -> dict[str, Tensor]:
    """The stored tensors of `name` (on CPU)."""
    return load_file(str(require_weight(name)))


def weight_metadata(name: str) -> dict[str, str]:
    """The stored metadata of `name`: name, layout, source file and its sha256, format version."""
    with safe_open(str(require_weight(name)), framework="pt") as handle:
        return dict(handle.metadata() or {})


# Verifying and converting.


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def choose_source(entry: Artefact, file_name: str, digest: str) -> Source:
    """The source a file is: by checksum first, then by its name, then the one unverifiable source.

    A file named like a source that publishes a checksum must match it; so must any file when
    every source publishes one.
    """
    for source in entry.sources:
        if source.matches(digest):
            return source
    named = [s for s in entry.sources if s.filename == file_name]
    candidates = named or [s for s in entry.sources if s.checksum is None] or list(entry.sources)
    source = candidates[0]
    if source.checksum is not None:
        raise MidmsError(
            f"checksum mismatch: expected {source.checksum}, got {digest} "
            f"({file_name} is not {source.filename} of {entry.name})"
        )
    return source


def _is_torch_zip(archive: zipfile.ZipFile) -> bool:
    return any(member.endswith("data.pkl") for member in archive.namelist())


def _checkpoint_in_archive(path: Path, scratch: Path) -> Path:
    """The .ckpt/.pth inside a release archive such as LDM's celeba.zip (extracted to scratch)."""
    with zipfile.ZipFile(path) as archive:
        if _is_torch_zip(archive):
            return path
        members = [m for m in archive.namelist() if m.endswith((".ckpt", ".pth", ".pt"))]
        if len(members) != 1:
            raise MidmsError(
                f"{path} holds {len(members)} checkpoints (expected one .ckpt/.pth); unpack it and add that"
            )
        target = scratch / Path(members[0]).name
        with archive.open(members[0]) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, CHUNK)
        return target


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """The tensors of a third-party checkpoint, read without unpickling code.

    Unwraps a top-level "state_dict" (Lightning, OpenMMLab); entries that are not tensors
    (counters, metadata) are dropped.
    """
    weights_dir().mkdir(parents=True, exist_ok=True)  # scratch space beside the store, not in /tmp
    with tempfile.TemporaryDirectory(dir=weights_dir()) as scratch:
        checkpoint = _checkpoint_in_archive(path, Path(scratch)) if zipfile.is_zipfile(path) else path
        try:
            loaded = torch.load(checkpoint, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise MidmsError(
                f"cannot read {path} as plain weights ({type(exc).__name__}); "
                "only tensor checkpoints are accepted"
            ) from exc
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict):
        raise MidmsError(f"{path} does not hold a state dict (found {type(loaded).__name__})")
    return {key: value for key, value in loaded.items() if isinstance(value, Tensor)}


def _unshared(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Contiguous tensors with no two sharing storage (safetensors refuses shared memory)."""
    seen: set[int] = set()
    result = {}
    for key, value in tensors.items():
        value = value.detach().contiguous()
        pointer = value.untyped_storage().data_ptr()
        if pointer in seen and value.numel() > 0:
            value = value.clone()
        seen.add(pointer)
        result[key] = value
    return result


def _verification(source: Source) -> str:
    if source.sha256:
        return "yes"
    if source.sha256_prefix:
        return f"yes (sha256 prefix {source.sha256_prefix} from the file name)"
    return "no (no published checksum)"


def add_weight(name: str, file: Path, digest: str | None = None) -> dict[str, Any]:
    """Verify `file` against the registry and store its tensors as NAME.safetensors, atomically."""
    entry = artefact(name)
    file = Path(file)
    if not file.is_file():
        raise MidmsError(f"no such file: {file}")
    digest = digest or sha256_file(file)
    source = choose_source(entry, file.name, digest)
    weights_dir().mkdir(parents=True, exist_ok=True)
    tensors = read_state_dict(file)
    if source.marker_key not in tensors:
        raise MidmsError(
            f"{file} does not look like {source.filename} ({source.layout}): "
            f"key {source.marker_key!r} is missing"
        )
    metadata = {
        "name": entry.name,
        "layout": source.layout,
        "source_file": file.name,
        "source_sha256": digest,
        "verified": _verification(source),
        "format_version": FORMAT_VERSION,
    }
    target = stored_path(name)
    with atomic_path(target) as tmp:
        save_file(_unshared(tensors), str(tmp), metadata=metadata)
    return {**metadata, "path": str(target), "tensors": len(tensors)}


# Downloading.


def _download_once(url: str, part: Path, progress: Callable[[int, int | None], None]) -> bool:
    """Append the rest of `url` to `part` (HTTP Range when part is non-empty); True when complete."""
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "midms"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        response = urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as exc:
        if exc.code == 416:  # the part file already holds the whole resource
            return True
        raise MidmsError(f"download of {url} failed: HTTP {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise MidmsError(f"cannot reach {url}: {exc}") from exc
    with response:
        if have and response.status != 206:  # the server ignored Range: start again
            have = 0
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        received = have
        progress(received, total)
        with open(part, "ab" if have else "wb") as handle:
            try:
                for block in iter(lambda: response.read(CHUNK), b""):
                    handle.write(block)
                    received += len(block)
                    progress(received, total)
            except (http.client.IncompleteRead, ConnectionError, TimeoutError) as exc:
                if isinstance(exc, http.client.IncompleteRead):
                    handle.write(exc.partial)
                return False
    return total is None or received >= total


def fetch_weight(name: str, attempts: int = 3, url: str | None = None) -> dict[str, Any]:
    """Download `name` (resuming a partial `.part` file), verify its checksum, then `add_weight`.

    A checksum mismatch deletes the download; an interrupted one keeps the `.part` file, so
    running the command again resumes it.
    """
    entry = artefact(name)
    source = next((s for s in entry.sources if s.url), None if url is None else entry.sources[0])
    if source is None:
        raise MidmsError(f"no download URL is known for {name!r}; {_how_to_get(name)}")
    url = url or source.url
    downloads = weights_dir() / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    part = downloads / f"{source.filename}.part"
    complete = False
    with _DownloadProgress(source.filename) as progress:
        for _ in range(attempts):
            if _download_once(url, part, progress):
                complete = True
                break
    if not complete:
        size = part.stat().st_size if part.exists() else 0
        raise MidmsError(
            f"download of {name} interrupted after {size} bytes; run the command again to resume"
        )
    digest = sha256_file(part)
    if source.checksum is not None and not source.matches(digest):
        part.unlink()
        raise MidmsError(f"checksum mismatch: expected {source.checksum}, got {digest} (download deleted)")
    downloaded = downloads / source.filename
    os.replace(part, downloaded)
    try:
        return add_weight(name, downloaded, digest)
    finally:
        downloaded.unlink(missing_ok=True)


class _DownloadProgress:
    """A tqdm byte counter on stderr, as a context manager yielding update(received, total)."""

    def __init__(self, label: str):
        from tqdm import tqdm

        self._bar = tqdm(
            desc=label,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            file=sys.stderr,
            disable=None,
            leave=False,
        )

    def __enter__(self) -> Callable[[int, int | None], None]:
        def update(received: int, total: int | None) -> None:
            if total is not None and self._bar.total != total:
                self._bar.total = total
            self._bar.n = received
            self._bar.refresh()

        return update

    def __exit__(self, *exc_info: object) -> None:
        self._bar.close()
