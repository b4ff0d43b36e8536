"""Pretrained networks that only a user can supply: find, verify, store and load them.

The artefacts and their files are listed in `midms_cli.weight_registry`. `add_weight` verifies a
file and stores its tensors as `$MIDMS_HOME/weights/NAME.safetensors` (never a pickle);
`fetch_weight` downloads with HTTP Range resume first. An original file already in the torch hub
cache or the Hugging Face cache is found there (offline, by file name, then verified by checksum
and key layout) and stored on first use, so nothing is asked for that is already on disk.
Third-party checkpoints are read with torch.load(weights_only=True).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from midms_cli.atomic import atomic_path
from midms_cli.downloads import download_once, download_progress
from midms_cli.errors import MidmsError
from midms_cli.paths import weights_dir
from midms_cli.weight_registry import REGISTRY, Artefact, Source  # noqa: F401  (this module's API too)

FORMAT_VERSION = "1"
CHUNK = 1 << 20


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
    """torch.hub's download folder: $TORCH_HOME/hub/checkpoints (torch's own default rules)."""
    torch_home = os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache")), "torch"
    )
    return Path(torch_home).expanduser() / "hub" / "checkpoints"


def _hugging_face_hub_dir() -> Path:
    """The Hugging Face hub cache: $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    hf_home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache")), "huggingface"
    )
    return Path(hf_home).expanduser() / "hub"


def originals_found(name: str) -> list[Path]:
    """Original files of `name` already on disk: in torch.hub's cache (`checkpoints/FILE`) and in
    the Hugging Face cache (`models--ORG--REPO/snapshots/REVISION/.../FILE`), by file name."""
    hub, hugging_face = _torch_hub_dir(), _hugging_face_hub_dir()
    found = []
    for source in artefact(name).sources:
        if (hub / source.filename).is_file():
            found.append(hub / source.filename)
        if hugging_face.is_dir():
            snapshots = hugging_face.glob(f"*/snapshots/*/**/{source.filename}")
            found += sorted(path for path in snapshots if path.is_file())
    return found


def adopt_original(name: str) -> Path | None:
    """Store the first original of `name` found in a cache that passes `add_weight`'s checks
    (checksum where published, key layout); None when there is none. Says so on stderr."""
    for original in originals_found(name):
        try:
            result = add_weight(name, original)
        except MidmsError:  # same name, other content: not ours to use
            continue
        sys.stderr.write(f"note: stored {name} from {original} (verified: {result['verified']})\n")
        return Path(result["path"])
    return None


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


def weight_available(name: str) -> bool:
    """Whether `name` is stored, or can be stored now from an original in a cache (see above)."""
    return stored_path(name).is_file() or adopt_original(name) is not None


def require_weight(name: str) -> Path:
    """The stored file of `name` (stored from a cache first if an original is there); a user error
    saying how to add it when it is missing."""
    path = stored_path(name)
    if not path.is_file() and adopt_original(name) is None:
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
    with download_progress(source.filename) as progress:
        for _ in range(attempts):
            if download_once(url, part, progress):
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
