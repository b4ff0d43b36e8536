"""Image loading (every mode to RGB by the documented rule), limits, errors, PNG saving, resizing."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from midms_cli.errors import MidmsError
from midms_cli.images import (
    MAX_PIXELS_ENV,
    load_image,
    resize,
    resize_pil,
    save_png,
    to_uint8,
)

H, W = 5, 7  # non-square, so a transposed result cannot pass


def _rng() -> np.random.Generator:
    return np.random.default_rng(0)


def _as_tensor(rgb: np.ndarray) -> torch.Tensor:
    """Reference: uint8 (H, W, 3) -> (3, H, W) in [-1, 1] computed in float64."""
    return torch.from_numpy(rgb.astype(np.float64) / 127.5 - 1.0).permute(2, 0, 1).float()


def _over_white(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Reference compositing in integers: round((c * a + 255 * (255 - a)) / 255)."""
    c = colour.astype(np.int64)
    a = alpha.astype(np.int64)[..., None]
    numerator = c * a + 255 * (255 - a)
    return ((2 * numerator + 255) // 510).astype(np.uint8)


def _check(path, expected_rgb: np.ndarray) -> None:
    loaded = load_image(path)
    assert loaded.dtype == torch.float32 and loaded.shape == (3, *expected_rgb.shape[:2])
    assert torch.equal(to_uint8(loaded), torch.from_numpy(expected_rgb).permute(2, 0, 1))
    assert torch.allclose(loaded, _as_tensor(expected_rgb), atol=1e-6)


def test_rgb_png_loads_exactly(tmp_path):
    rgb = _rng().integers(0, 256, (H, W, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    _check(tmp_path / "a.png", rgb)
    assert load_image(tmp_path / "a.png").min() >= -1 and load_image(tmp_path / "a.png").max() <= 1


def test_grayscale_l_is_replicated(tmp_path):
    gray = _rng().integers(0, 256, (H, W), dtype=np.uint8)
    Image.fromarray(gray).save(tmp_path / "l.png")
    _check(tmp_path / "l.png", np.stack([gray] * 3, axis=2))


def test_la_and_rgba_are_composited_over_white(tmp_path):
    rng = _rng()
    gray = rng.integers(0, 256, (H, W), dtype=np.uint8)
    alpha = rng.integers(0, 256, (H, W), dtype=np.uint8)
    alpha[0, 0], alpha[0, 1] = 0, 255  # fully transparent -> white, opaque -> unchanged
    Image.fromarray(np.stack([gray, alpha], axis=2), mode="LA").save(tmp_path / "la.png")
    expected = _over_white(np.stack([gray] * 3, axis=2), alpha)
    assert expected[0, 0].tolist() == [255, 255, 255] and expected[0, 1].tolist() == [gray[0, 1]] * 3
    _check(tmp_path / "la.png", expected)

    colour = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    Image.fromarray(np.concatenate([colour, alpha[..., None]], axis=2)).save(tmp_path / "rgba.png")
    _check(tmp_path / "rgba.png", _over_white(colour, alpha))


def test_palette_image_uses_palette_and_transparency(tmp_path):
    rng = _rng()
    palette = rng.integers(0, 256, (256, 3), dtype=np.uint8)
    indices = rng.integers(0, 16, (H, W), dtype=np.uint8)
    image = Image.fromarray(indices, mode="P")
    image.putpalette(palette.reshape(-1).tolist())
    image.save(tmp_path / "p.png")
    _check(tmp_path / "p.png", palette[indices])

    image.save(tmp_path / "pt.png", transparency=3)  # palette index 3 is fully transparent
    expected = palette[indices].copy()
    expected[indices == 3] = 255
    _check(tmp_path / "pt.png", expected)


def test_cmyk_uses_the_naive_formula(tmp_path):
    cmyk = _rng().integers(0, 256, (H, W, 4), dtype=np.uint8)
    Image.fromarray(cmyk, mode="CMYK").save(tmp_path / "c.tiff")
    c = cmyk.astype(np.int64)
    numerator = (255 - c[..., :3]) * (255 - c[..., 3:4])
    _check(tmp_path / "c.tiff", ((2 * numerator + 255) // 510).astype(np.uint8))


def test_sixteen_bit_is_scaled_to_eight_bit(tmp_path):
    values = _rng().integers(0, 65536, (H, W), dtype=np.uint16)
    values[0, :3] = [0, 65535, 32896]  # -> 0, 255, 128
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    image.save(tmp_path / "g16.png")
    expected = ((2 * values.astype(np.int64) + 257) // 514).astype(np.uint8)
    assert expected[0, :3].tolist() == [0, 255, 128]
    _check(tmp_path / "g16.png", np.stack([expected] * 3, axis=2))


def test_modes_i_and_f_follow_the_documented_rule(tmp_path):
    ints = np.array([[0, 257, 70000, -5, 65535]], dtype=np.int32)  # clipped to [0, 65535], / 257
    Image.fromarray(ints).save(tmp_path / "i.tiff")
    _check(tmp_path / "i.tiff", np.stack([np.array([[0, 1, 255, 0, 255]], dtype=np.uint8)] * 3, axis=2))
    floats = np.array([[0.4, 127.6, 300.0, -2.0]], dtype=np.float32)  # PIL's 0..255 scale, clipped
    Image.fromarray(floats).save(tmp_path / "f.tiff")
    _check(tmp_path / "f.tiff", np.stack([np.array([[0, 128, 255, 0]], dtype=np.uint8)] * 3, axis=2))


def test_exif_orientation_is_applied(tmp_path):
    rgb = _rng().integers(0, 256, (H, W, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(rgb).save(tmp_path / "rot.png", exif=exif)
    _check(tmp_path / "rot.png", np.ascontiguousarray(np.rot90(rgb, k=-1)))


def test_size_resizes_with_pil_bicubic(tmp_path):
    rgb = _rng().integers(0, 256, (12, 10, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    reference = np.asarray(Image.fromarray(rgb).resize((4, 6), Image.Resampling.BICUBIC))
    assert torch.allclose(load_image(tmp_path / "a.png", size=(6, 4)), _as_tensor(reference), atol=1e-6)
    assert load_image(tmp_path / "a.png", size=8).shape == (3, 8, 8)


# --------------------------------------------------------------------------------------------
# Refusals


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height (no pixel data): cheap to write, huge to decode."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


@pytest.mark.parametrize("width,height", [(9000, 9000), (100_000, 100_000)])
def test_oversized_header_is_refused_before_decoding(tmp_path, width, height):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_only(width, height))
    with pytest.raises(MidmsError, match="too large to load safely") as info:
        load_image(path)
    assert str(path) in str(info.value)


def test_pixel_limit_is_configurable(tmp_path, monkeypatch):
    Image.fromarray(np.zeros((H, W, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    with pytest.raises(MidmsError, match=f"{W}x{H} = {W * H} pixels, limit 20"):
        load_image(tmp_path / "a.png", limit=20)
    monkeypatch.setenv(MAX_PIXELS_ENV, "34")
    with pytest.raises(MidmsError, match="limit 34"):
        load_image(tmp_path / "a.png")
    monkeypatch.setenv(MAX_PIXELS_ENV, "35")
    assert load_image(tmp_path / "a.png").shape == (3, H, W)


def test_missing_not_an_image_and_truncated_files_name_the_file(tmp_path):
    with pytest.raises(MidmsError, match="not found") as info:
        load_image(tmp_path / "missing.png")
    assert "missing.png" in str(info.value)
    (tmp_path / "notes.png").write_text("hello, not an image")
    with pytest.raises(MidmsError, match="is not an image file"):
        load_image(tmp_path / "notes.png")
    rgb = _rng().integers(0, 256, (64, 64, 3), dtype=np.uint8)
    for suffix in ("png", "jpg"):
        full = tmp_path / f"full.{suffix}"
        Image.fromarray(rgb).save(full)
        data = full.read_bytes()
        cut = tmp_path / f"cut.{suffix}"
        cut.write_bytes(data[: len(data) // 2])
        with pytest.raises(MidmsError, match="corrupt or truncated") as info:
            load_image(cut)
        assert str(cut) in str(info.value) and "\n" not in str(info.value)


# --------------------------------------------------------------------------------------------
# Saving


def test_to_uint8_rounds_and_clamps():
    values = torch.tensor([-1.0, 0.0, 1.0, -0.999, 0.5, 2.0, -3.0, 1 / 127.5 - 1])
    assert to_uint8(values).tolist() == [0, 128, 255, 0, 191, 255, 0, 1]
    with pytest.raises(ValueError, match="NaN"):
        to_uint8(torch.tensor([float("nan")]))


def test_save_png_round_trips_exactly_and_leaves_no_temp_file(tmp_path):
    levels = torch.randint(0, 256, (3, H, W), generator=torch.Generator().manual_seed(0)).float()
    image = levels / 127.5 - 1.0
    save_png(image, tmp_path / "out.png")
    assert torch.equal(load_image(tmp_path / "out.png"), image)
    gray = image[:1]
    save_png(gray, tmp_path / "gray.png")
    assert Image.open(tmp_path / "gray.png").mode == "L"
    assert torch.equal(load_image(tmp_path / "gray.png"), gray.expand(3, -1, -1))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gray.png", "out.png"]
    with pytest.raises(ValueError, match="expects a"):
        save_png(torch.zeros(2, 4, 4), tmp_path / "bad.png")


# --------------------------------------------------------------------------------------------
# Resizing


def test_nearest_modes_pick_the_hand_computed_pixels_and_keep_dtype():
    labels = torch.arange(16).reshape(1, 4, 4)
    # torch "nearest": source index floor(i * 4 / 2) = 0, 2
    assert resize(labels, 2, "nearest").tolist() == [[[0, 2], [8, 10]]]
    # "nearest-exact" (PIL's NEAREST): floor((i + 0.5) * 2) = 1, 3
    assert resize(labels, 2, "nearest-exact").tolist() == [[[5, 7], [13, 15]]]
    assert resize(labels, 2, "nearest").dtype == torch.int64
    mask = labels > 7
    assert resize(mask, (8, 8), "nearest").dtype == torch.bool
    pil = np.asarray(resize_pil(Image.fromarray(labels[0].numpy().astype(np.uint8)), 2, "nearest"))
    assert pil.tolist() == [[5, 7], [13, 15]]
    with pytest.raises(ValueError, match="nearest mode"):
        resize(mask, 2, "bilinear")


def test_bilinear_and_bicubic_downsampling_are_antialiased():
    x = torch.tensor([[[0.0, 1.0], [2.0, 3.0]]])
    assert torch.allclose(resize(x, 1, "bilinear"), torch.tensor([[[1.5]]]))
    # Stripes with period 4 shrunk 4x: plain bilinear samples only the dark columns (0), an
    # antialiased filter sees the 1-in-4 bright column (interior pixels 0.25).
    stripes = (torch.arange(16) % 4 == 0).float().expand(1, 16, 16)
    for mode in ("bilinear", "bicubic"):
        interior = resize(stripes, 4, mode)[..., 1:3]
        assert torch.allclose(interior, torch.full((1, 4, 2), 0.25), atol=0.01), mode


def test_resize_batched_equals_unbatched_and_is_identity_at_same_size():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 6, 8)
    for mode in ("bicubic", "bilinear", "nearest"):
        batched = resize(x, (5, 4), mode)
        assert batched.shape == (2, 3, 5, 4)
        assert torch.allclose(batched[1], resize(x[1], (5, 4), mode))
    assert resize(x, (6, 8), "bicubic") is x
    with pytest.raises(ValueError, match="unknown resize mode"):
        resize(x, 4, "lanczos")
