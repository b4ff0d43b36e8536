"""The weights registry: list, add (checksum, conversion), path, fetch (Range resume) and errors."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import subprocess
import sys
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from midms_cli import weights
from midms_cli.cli.app import main
from midms_cli.errors import MidmsError


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("MIDMS_HOME", str(home))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "huggingface"))
    return home


def run(capsys, *args):
    """Run the CLI in-process; returns (exit code, stdout, stderr)."""
    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


def save_state(path: Path, state: dict) -> Path:
    torch.save(state, path)
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Opaque:
    """A class torch.load(weights_only=True) must refuse to rebuild."""


def alexnet_like(seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {
        "features.0.weight": torch.randn(4, 3, 3, 3, generator=generator),
        "features.0.bias": torch.randn(4, generator=generator),
    }


def pin_checksum(monkeypatch, name: str, digest: str, url: str | None = None) -> None:
    """Give `name`'s first source a full sha256 (and URL) for the test."""
    entry = weights.REGISTRY[name]
    first = entry.sources[0]
    source = dataclasses.replace(first, sha256=digest, sha256_prefix=None, url=url or first.url)
    pinned = dataclasses.replace(entry, sources=(source, *entry.sources[1:]))
    monkeypatch.setitem(weights.REGISTRY, name, pinned)


# list


def test_list_shows_every_artefact_and_where_it_was_looked_for(capsys, cache):
    code, out, _ = run(capsys, "weights", "list")
    assert code == 0
    # The artefacts are all registered, and every registered one is listed with its path.
    assert {"vgg19", "inception-fid", "lpips-vgg", "lpips-alex", "alexnet", "ldm-celeba256",
            "ldm-lsun-churches", "vq-f4", "kl-f8"} <= set(weights.REGISTRY)
    for name, entry in weights.REGISTRY.items():
        assert f"{name}  missing" in out
        assert f"looked for {cache / 'weights' / name}.safetensors" in out
        for source in entry.sources:
            assert f"file {source.filename}" in out
    assert "vgg19-dcbb9e9d.pth" in out and "vgg19_conv.pth" in out
    assert "not published" in out


def test_list_json_has_status_paths_and_checksums(capsys, cache):
    code, out, _ = run(capsys, "--json", "weights", "list")
    assert code == 0
    rows = {row["name"]: row for row in json.loads(out)["weights"]}
    assert set(rows) == set(weights.REGISTRY)
    vgg = rows["vgg19"]
    assert vgg["present"] is False
    assert vgg["looked_for"] == [str(cache / "weights" / "vgg19.safetensors")]
    assert vgg["sources"][0]["sha256_prefix"] == "dcbb9e9d"
    assert rows["lpips-vgg"]["sources"][0]["sha256"] == "not published"
    assert rows["ldm-celeba256"]["sources"][0]["url"] == "https://ommer-lab.com/files/latent-diffusion/celeba.zip"


def test_list_points_at_an_original_in_the_torch_hub_cache(capsys, tmp_path):
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    save_state(hub / "alexnet-owt-7be5be79.pth", alexnet_like())
    _, out, _ = run(capsys, "--json", "weights", "list")
    rows = {row["name"]: row for row in json.loads(out)["weights"]}
    assert rows["alexnet"]["originals_found"] == [str(hub / "alexnet-owt-7be5be79.pth")]


def test_an_original_in_the_torch_hub_cache_is_stored_on_first_use(tmp_path, monkeypatch, capsys):
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    original = save_state(hub / "alexnet-owt-7be5be79.pth", alexnet_like())
    pin_checksum(monkeypatch, "alexnet", sha256(original))
    path = weights.require_weight("alexnet")  # no `weights add`: found in the cache, offline
    assert path == weights.stored_path("alexnet") and path.is_file()
    stored = weights.load_weight("alexnet")["features.0.weight"]
    assert torch.equal(stored, alexnet_like()["features.0.weight"])
    assert "note: stored alexnet from" in capsys.readouterr().err


def test_metrics_count_a_cached_original_as_available(tmp_path, monkeypatch):
    from midms_cli.metrics import METRICS, missing_weights

    name = next(metric for metric, spec in METRICS.items() if "alexnet" in spec.weights)  # LPIPS
    assert "alexnet" in missing_weights(name)
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    pin_checksum(monkeypatch, "alexnet", sha256(save_state(hub / "alexnet-owt-7be5be79.pth", alexnet_like())))
    assert "alexnet" not in missing_weights(name)


def test_a_cached_file_with_the_wrong_checksum_is_not_used(tmp_path, monkeypatch):
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    save_state(hub / "alexnet-owt-7be5be79.pth", alexnet_like())  # its sha256 does not start 7be5be79
    with pytest.raises(MidmsError, match="midms weights add alexnet FILE"):
        weights.require_weight("alexnet")
    assert not weights.stored_path("alexnet").exists()


def test_an_original_in_the_hugging_face_cache_is_found(tmp_path):
    snapshot = tmp_path / "huggingface" / "models--lllyasviel--Annotators" / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    original = save_state(snapshot / "body_pose_model.pth", {"conv1_1.weight": torch.ones(2, 3, 3, 3)})
    assert weights.originals_found("openpose-body") == [original]
    stored = weights.require_weight("openpose-body")  # no published checksum: name and key layout
    assert weights.weight_metadata("openpose-body")["source_file"] == "body_pose_model.pth"
    assert stored == weights.stored_path("openpose-body")


# add / path / require / load


def test_missing_weight_error_names_add_and_fetch(capsys):
    with pytest.raises(MidmsError, match=r"midms weights add alexnet FILE.*midms weights fetch alexnet"):
        weights.require_weight("alexnet")
    code, out, err = run(capsys, "weights", "path", "alexnet")
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert "midms weights add alexnet FILE" in err


def test_no_fetch_hint_without_a_url(monkeypatch):
    entry = weights.REGISTRY["lpips-vgg"]
    bare = dataclasses.replace(entry, sources=(dataclasses.replace(entry.sources[0], url=None),))
    monkeypatch.setitem(weights.REGISTRY, "lpips-vgg", bare)
    with pytest.raises(MidmsError) as info:
        weights.require_weight("lpips-vgg")
    assert "weights fetch" not in str(info.value)
    with pytest.raises(MidmsError, match="no download URL is known"):
        weights.fetch_weight("lpips-vgg")


def test_add_refuses_a_wrong_file_with_the_checksum_mismatch(capsys, tmp_path, cache):
    wrong = save_state(tmp_path / "vgg19-dcbb9e9d.pth", {"features.0.weight": torch.zeros(1)})
    code, out, err = run(capsys, "weights", "add", "vgg19", str(wrong))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"checksum mismatch: expected dcbb9e9d, got {sha256(wrong)}" in err
    assert not (cache / "weights" / "vgg19.safetensors").exists()


def test_add_when_every_source_has_a_checksum_refuses_any_name(tmp_path):
    other = save_state(tmp_path / "mine.pth", alexnet_like())
    with pytest.raises(MidmsError, match=f"checksum mismatch: expected 7be5be79, got {sha256(other)}"):
        weights.add_weight("alexnet", other)


def test_add_verifies_converts_and_stores_safetensors(capsys, monkeypatch, tmp_path, cache):
    state = alexnet_like()
    original = save_state(tmp_path / "alexnet-owt-7be5be79.pth", state)
    pin_checksum(monkeypatch, "alexnet", sha256(original))
    code, out, err = run(capsys, "weights", "add", "alexnet", str(original))
    assert code == 0, err
    stored = cache / "weights" / "alexnet.safetensors"
    assert stored.is_file() and str(stored) in out
    loaded = weights.load_weight("alexnet")
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[key], state[key]) for key in state)
    with safe_open(str(stored), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["name"] == "alexnet" and metadata["layout"] == "torchvision-alexnet"
    assert metadata["source_sha256"] == sha256(original) and metadata["verified"] == "yes"
    assert not list(stored.parent.glob(".*.tmp*"))  # the atomic write left no temporary file
    code, out, _ = run(capsys, "weights", "path", "alexnet")
    assert code == 0 and out.strip() == str(stored)
    _, out, _ = run(capsys, "--json", "info")
    assert json.loads(out)["weights"] == ["alexnet"]


def test_a_file_matching_the_checksum_prefix_is_accepted_under_any_name(monkeypatch, tmp_path):
    original = save_state(tmp_path / "renamed.pth", alexnet_like())
    entry = weights.REGISTRY["alexnet"]
    prefixed = dataclasses.replace(entry.sources[0], sha256_prefix=sha256(original)[:8])
    monkeypatch.setitem(weights.REGISTRY, "alexnet", dataclasses.replace(entry, sources=(prefixed,)))
    assert weights.add_weight("alexnet", original)["verified"].startswith("yes (sha256 prefix")


def test_unverifiable_source_is_stored_with_its_layout(tmp_path):
    cocosnet = save_state(tmp_path / "vgg19_conv.pth", {"conv1_1.weight": torch.ones(2, 3, 3, 3)})
    result = weights.add_weight("vgg19", cocosnet)
    assert result["layout"] == "cocosnet-vgg19" and result["verified"].startswith("no")
    assert weights.weight_metadata("vgg19")["layout"] == "cocosnet-vgg19"


def test_add_refuses_a_file_with_the_wrong_key_layout(tmp_path, cache):
    lpips = save_state(tmp_path / "vgg.pth", {"something.else": torch.ones(1)})
    with pytest.raises(MidmsError, match="key 'lin0.model.1.weight' is missing"):
        weights.add_weight("lpips-vgg", lpips)
    assert not (cache / "weights" / "lpips-vgg.safetensors").exists()


def test_add_refuses_a_checkpoint_that_needs_unpickling_code(tmp_path):
    pickled = tmp_path / "vgg.pth"
    torch.save({"lin0.model.1.weight": torch.ones(1), "obj": Opaque()}, pickled)
    with pytest.raises(MidmsError, match="only tensor checkpoints are accepted"):
        weights.add_weight("lpips-vgg", pickled)


def test_add_unpacks_a_release_zip_and_a_lightning_state_dict(tmp_path):
    state = {"quantize.embedding.weight": torch.randn(8, 3), "encoder.conv_in.weight": torch.randn(4, 3)}
    buffer = io.BytesIO()
    torch.save({"state_dict": state, "global_step": 7}, buffer)
    archive = tmp_path / "vq-f4.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        handle.writestr("model.ckpt", buffer.getvalue())
    weights.add_weight("vq-f4", archive)
    loaded = weights.load_weight("vq-f4")
    assert loaded.keys() == state.keys()
    assert torch.equal(loaded["quantize.embedding.weight"], state["quantize.embedding.weight"])


def test_add_stores_tied_tensors(tmp_path):
    shared = torch.randn(3, 3)
    tied = save_state(tmp_path / "vgg.pth", {"lin0.model.1.weight": shared, "lin1.model.1.weight": shared})
    weights.add_weight("lpips-vgg", tied)
    loaded = weights.load_weight("lpips-vgg")
    assert torch.equal(loaded["lin0.model.1.weight"], loaded["lin1.model.1.weight"])


def test_unknown_name_lists_the_known_ones(capsys, tmp_path):
    code, _, err = run(capsys, "weights", "add", "resnet", str(tmp_path / "x.pth"))
    assert code == 2 and "unknown weights 'resnet'; known: vgg19" in err


# fetch against a local HTTP server with Range support


class Server:
    """A 127.0.0.1 file server that honours `Range: bytes=N-` and can drop the first response midway."""

    def __init__(self, payload: bytes, drop_first: bool = False, honour_range: bool = True):
        self.payload = payload
        self.drop_next = drop_first
        self.honour_range = honour_range
        self.ranges: list[str | None] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                requested = self.headers.get("Range")
                server.ranges.append(requested)
                requested = requested if server.honour_range else None
                start = int(requested.split("=")[1].rstrip("-")) if requested else 0
                body = server.payload[start:]
                self.send_response(206 if requested else 200)
                if requested:
                    size = len(server.payload)
                    self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if server.drop_next:
                    server.drop_next = False
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/alexnet-owt-7be5be79.pth"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def payload_of(state: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def test_fetch_downloads_verifies_and_stores(capsys, monkeypatch, cache):
    state = {**alexnet_like(), "classifier.6.weight": torch.randn(300, 200)}
    payload = payload_of(state)
    with Server(payload) as server:
        pin_checksum(monkeypatch, "alexnet", hashlib.sha256(payload).hexdigest(), server.url)
        code, out, err = run(capsys, "weights", "fetch", "alexnet")
    assert code == 0, err
    assert server.ranges == [None]
    loaded = weights.load_weight("alexnet")
    assert torch.equal(loaded["classifier.6.weight"], state["classifier.6.weight"])
    assert not list((cache / "weights" / "downloads").iterdir())  # nothing left behind


def test_fetch_resumes_an_interrupted_download_with_range(monkeypatch):
    state = {**alexnet_like(), "classifier.6.weight": torch.randn(300, 200)}
    payload = payload_of(state)
    with Server(payload, drop_first=True) as server:
        pin_checksum(monkeypatch, "alexnet", hashlib.sha256(payload).hexdigest(), server.url)
        weights.fetch_weight("alexnet")
    assert server.ranges[0] is None and len(server.ranges) == 2
    assert server.ranges[1] == f"bytes={len(payload) // 2}-"
    assert torch.equal(weights.load_weight("alexnet")["classifier.6.weight"], state["classifier.6.weight"])


def test_an_interrupted_fetch_keeps_the_part_file_and_the_next_run_resumes(monkeypatch, cache):
    payload = payload_of({**alexnet_like(), "classifier.6.weight": torch.randn(300, 200)})
    part = cache / "weights" / "downloads" / "alexnet-owt-7be5be79.pth.part"
    with Server(payload, drop_first=True) as server:
        pin_checksum(monkeypatch, "alexnet", hashlib.sha256(payload).hexdigest(), server.url)
        with pytest.raises(MidmsError, match="interrupted after .* bytes; run the command again to resume"):
            weights.fetch_weight("alexnet", attempts=1)
        assert part.stat().st_size == len(payload) // 2
        weights.fetch_weight("alexnet", attempts=1)
    assert server.ranges == [None, f"bytes={len(payload) // 2}-"]
    assert not part.exists() and weights.stored_path("alexnet").is_file()


def test_a_server_ignoring_range_restarts_the_download(monkeypatch):
    state = {**alexnet_like(), "classifier.6.weight": torch.randn(300, 200)}
    payload = payload_of(state)
    with Server(payload, drop_first=True, honour_range=False) as server:
        pin_checksum(monkeypatch, "alexnet", hashlib.sha256(payload).hexdigest(), server.url)
        weights.fetch_weight("alexnet")
    assert server.ranges == [None, f"bytes={len(payload) // 2}-"]  # asked to resume, got the whole file
    assert torch.equal(weights.load_weight("alexnet")["classifier.6.weight"], state["classifier.6.weight"])


def test_fetch_skips_a_stored_weight_unless_forced(capsys, monkeypatch):
    payload = payload_of(alexnet_like())
    with Server(payload) as server:
        pin_checksum(monkeypatch, "alexnet", hashlib.sha256(payload).hexdigest(), server.url)
        assert run(capsys, "weights", "fetch", "alexnet")[0] == 0
        code, out, _ = run(capsys, "weights", "fetch", "alexnet")
        assert code == 0 and "already stored" in out and len(server.ranges) == 1
        assert run(capsys, "weights", "fetch", "alexnet", "--force")[0] == 0
    assert len(server.ranges) == 2


def test_fetch_refuses_a_bad_checksum_and_leaves_nothing_behind(capsys, monkeypatch, cache):
    payload = payload_of(alexnet_like())
    with Server(payload) as server:
        pin_checksum(monkeypatch, "alexnet", "0" * 64, server.url)
        code, _, err = run(capsys, "weights", "fetch", "alexnet")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"checksum mismatch: expected {'0' * 64}, got {hashlib.sha256(payload).hexdigest()}" in err
    assert not list((cache / "weights" / "downloads").iterdir())
    assert not weights.stored_path("alexnet").exists()


def test_the_installed_command_reports_a_missing_weight_in_one_line(cache):
    env = {**os.environ, "MIDMS_HOME": str(cache)}
    command = [sys.executable, "-m", "midms_cli", "weights", "path", "vgg19"]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    assert done.returncode == 2 and done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1 and "midms weights add vgg19 FILE" in done.stderr


def test_fetch_from_a_mirror_url_for_an_entry_without_one(capsys, monkeypatch):
    entry = weights.REGISTRY["lpips-vgg"]
    bare = dataclasses.replace(entry, sources=(dataclasses.replace(entry.sources[0], url=None),))
    monkeypatch.setitem(weights.REGISTRY, "lpips-vgg", bare)
    heads = {"lin0.model.1.weight": torch.randn(1, 64, 1, 1)}
    with Server(payload_of(heads)) as server:
        code, out, err = run(capsys, "weights", "fetch", "lpips-vgg", "--url", server.url)
    assert code == 0, err
    assert torch.equal(weights.load_weight("lpips-vgg")["lin0.model.1.weight"], heads["lin0.model.1.weight"])
    assert weights.weight_metadata("lpips-vgg")["verified"] == "no (no published checksum)"
