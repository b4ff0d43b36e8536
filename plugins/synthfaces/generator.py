"""Procedural face-like images with CelebAMask-HQ-style part masks.

A face is a GEOMETRY (shapes, positions, sizes, pose) and an APPEARANCE (colours, textures,
background pattern), drawn from separate random streams. `render(geometry, appearance, size)` is a
pure function of both, so the oracle of a translation (geometry of the condition, appearance of
the exemplar) is one call. The condition is rendered from the geometry alone.

Coordinates: the image spans [-1, 1] on both axes (y down); each face lives in its own frame
(u right, v down), mapped to the image by a rotation, a scale and an offset. Shapes are signed
distance fields in pixels: a part mask is `distance < 0`, the image uses a one-pixel soft edge.
"l_" parts sit on the image's left.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import numpy as np
import torch

from midms_cli.conditions.canny import canny_edges
from midms_cli.conditions.celebahq import CELEBAHQ_PARTS, render_celebahq

# Label ids of the full label map: 0 background, 1..13 the CelebA-HQ parts, then neck and cloth.
LABELS = ("background", *CELEBAHQ_PARTS, "neck", "cloth")
LABEL = {name: i for i, name in enumerate(LABELS)}

VARIANTS = {"official": 15, "canny": 1}  # condition channels per variant
PAIRINGS = ("easy", "hard", "self")

# Continuous geometry parameters: (low, high) of a uniform draw. Face-frame units: the image is 2 wide.
GEOMETRY_RANGES: dict[str, tuple[float, float]] = {
    # pose
    "center_x": (-0.07, 0.07), "center_y": (-0.10, 0.02), "angle": (-0.20, 0.20), "scale": (0.88, 1.08),
    "yaw": (-1.0, 1.0),  # shifts the inner features sideways, as a small head turn would
    # face outline
    "face_w": (0.40, 0.48), "face_h": (0.54, 0.64), "jaw": (0.05, 0.22),
    # eyes and brows
    "eye_x": (0.15, 0.20), "eye_y": (-0.10, -0.02), "eye_w": (0.070, 0.095), "eye_h": (0.030, 0.048),
    "gaze_x": (-0.35, 0.35), "gaze_y": (-0.2, 0.2),
    "brow_gap": (0.07, 0.11), "brow_w": (0.10, 0.13), "brow_h": (0.018, 0.030), "brow_tilt": (-0.25, 0.25),
    # nose and mouth
    "nose_len": (0.14, 0.21), "nose_w": (0.045, 0.070),
    "mouth_y": (0.30, 0.38), "mouth_w": (0.11, 0.17), "upper_lip": (0.025, 0.045),
    "lower_lip": (0.030, 0.055), "mouth_open": (-0.02, 0.035),  # <= 0.004: closed, no mouth part
    # ears and neck
    "ear_y": (-0.02, 0.08), "ear_w": (0.065, 0.09), "ear_h": (0.12, 0.16), "neck_w": (0.20, 0.27),
    "shoulder_y": (0.88, 1.02),
    # hair
    "hair_volume": (1.05, 1.25), "hair_top": (0.10, 0.22), "hairline": (-0.42, -0.28),
    "fringe": (0.0, 0.25), "hair_length": (-0.05, 0.95), "hair_side": (-0.08, 0.08),
}  # fmt: skip
P_GLASSES = 0.15
P_BALD = 0.05

# Palettes (RGB in [0, 1]) for appearance draws.
SKIN_LIGHT, SKIN_DARK = (0.96, 0.82, 0.72), (0.42, 0.28, 0.20)
HAIR_COLOURS = ((0.08, 0.06, 0.05), (0.30, 0.18, 0.10), (0.55, 0.38, 0.20), (0.85, 0.72, 0.45),
                (0.60, 0.25, 0.12), (0.62, 0.62, 0.62))  # fmt: skip
IRIS_COLOURS = ((0.35, 0.22, 0.12), (0.25, 0.45, 0.70), (0.30, 0.50, 0.30), (0.45, 0.45, 0.50))
BACKGROUNDS = ("gradient", "stripes", "checker", "blobs")


# --- Geometry and appearance draws ---------------------------------------------------------------------


def sample_geometry(rng: np.random.Generator) -> dict[str, Any]:
    """Shapes, positions, sizes and pose of one face: JSON-ready floats and flags."""
    geometry: dict[str, Any] = {name: float(rng.uniform(*bounds)) for name, bounds in GEOMETRY_RANGES.items()}
    geometry["glasses"] = bool(rng.random() < P_GLASSES)
    geometry["bald"] = bool(rng.random() < P_BALD)
    return geometry


def perturb_geometry(geometry: dict[str, Any], rng: np.random.Generator, amount: float) -> dict[str, Any]:
    """A similar geometry: each parameter moves by N(0, amount * its range), clipped to the range."""
    moved = dict(geometry)
    for name, (lo, hi) in GEOMETRY_RANGES.items():
        moved[name] = float(np.clip(geometry[name] + rng.normal(0.0, amount * (hi - lo)), lo, hi))
    return moved


def sample_appearance(rng: np.random.Generator) -> dict[str, Any]:
    """Colours, textures and the background pattern of one face: JSON-ready values."""

    def jitter(colour, spread):
        return [float(np.clip(c + rng.normal(0.0, spread), 0.0, 1.0)) for c in colour]

    tone = rng.uniform()
    skin = [a + (b - a) * tone for a, b in zip(SKIN_LIGHT, SKIN_DARK, strict=True)]
    hair = jitter(HAIR_COLOURS[rng.integers(len(HAIR_COLOURS))], 0.04)
    skin = jitter(skin, 0.025)
    return {
        "skin": skin,
        "skin_shading": float(rng.uniform(0.15, 0.35)),
        "light_angle": float(rng.uniform(-math.pi, math.pi)),
        "skin_texture": float(rng.uniform(0.01, 0.04)),
        "hair": hair,
        "hair_strand_freq": float(rng.uniform(12.0, 30.0)),
        "hair_strand_amp": float(rng.uniform(0.05, 0.18)),
        "brow": [c * float(rng.uniform(0.5, 0.8)) for c in hair],
        "iris": jitter(IRIS_COLOURS[rng.integers(len(IRIS_COLOURS))], 0.04),
        "lips": jitter([0.75, 0.35, 0.35], 0.07),
        "mouth": jitter([0.30, 0.08, 0.08], 0.03),
        "glasses": jitter([0.12, 0.12, 0.14], 0.08),
        "cloth": [float(c) for c in rng.uniform(0.05, 0.95, 3)],
        "cloth_stripes": float(rng.uniform(0.0, 0.25)),
        "cloth_freq": float(rng.uniform(8.0, 30.0)),
        "background": BACKGROUNDS[rng.integers(len(BACKGROUNDS))],
        "bg_colours": [[float(c) for c in rng.uniform(0.0, 1.0, 3)] for _ in range(2)],
        "bg_freq": float(rng.uniform(2.0, 9.0)),
        "bg_angle": float(rng.uniform(0.0, math.pi)),
        "bg_phase": float(rng.uniform(0.0, 2 * math.pi)),
        "noise_waves": [[float(v) for v in rng.uniform([-1, -1, 0], [1, 1, 2 * math.pi])] for _ in range(6)],
        "noise_seed": int(rng.integers(2**31 - 1)),
    }


# A fixed appearance with flat, well separated grey levels and no texture: the Canny part of the
# official (CelebA-HQ recipe) condition is computed from the geometry rendered with it, so that
# condition never depends on the appearance (colours and textures of the real sample).
NEUTRAL_APPEARANCE: dict[str, Any] = {
    "skin": [0.62] * 3, "skin_shading": 0.0, "light_angle": 0.0, "skin_texture": 0.0,
    "hair": [0.15] * 3, "hair_strand_freq": 1.0, "hair_strand_amp": 0.0, "brow": [0.05] * 3,
    "iris": [0.3] * 3, "lips": [0.4] * 3, "mouth": [0.1] * 3, "glasses": [0.0] * 3,
    "cloth": [0.35] * 3, "cloth_stripes": 0.0, "cloth_freq": 1.0,
    "background": "gradient", "bg_colours": [[0.9] * 3, [0.9] * 3], "bg_freq": 1.0, "bg_angle": 0.0,
    "bg_phase": 0.0, "noise_waves": [], "noise_seed": 0,
}  # fmt: skip


# --- Signed distance fields (pixels; negative inside) --------------------------------------------------


def _ellipse(u, v, cu, cv, a, b, px, angle=0.0):
    """Approximate signed distance to an ellipse: (r - 1) / |grad r|, exact on the boundary's normal."""
    c, s = math.cos(angle), math.sin(angle)
    x, y = c * (u - cu) + s * (v - cv), -s * (u - cu) + c * (v - cv)
    r = torch.sqrt((x / a) ** 2 + (y / b) ** 2 + 1e-12)
    grad = torch.sqrt((x / a**2) ** 2 + (y / b**2) ** 2 + 1e-12) / r
    return (r - 1.0) / grad * px


def _union(*d):
    out = d[0]
    for other in d[1:]:
        out = torch.minimum(out, other)
    return out


def _intersect(*d):
    out = d[0]
    for other in d[1:]:
        out = torch.maximum(out, other)
    return out


def _subtract(d, cut):
    return torch.maximum(d, -cut)


def _face_frame(geometry: dict[str, Any], size: int):
    """Face-frame coordinates (u, v) of every pixel centre and the pixels per face-frame unit."""
    axis = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2.0 - 1.0
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    dx, dy = x - geometry["center_x"], y - geometry["center_y"]
    c, s = math.cos(geometry["angle"]), math.sin(geometry["angle"])
    scale = geometry["scale"]
    u = (c * dx + s * dy) / scale
    v = (-s * dx + c * dy) / scale
    return x, y, u, v, scale * size / 2.0


def _layers(geometry: dict[str, Any], u, v, px) -> list[tuple[str, torch.Tensor]]:
    """The face as signed distance fields in painting order (later layers cover earlier ones)."""
    g = geometry
    fw, fh = g["face_w"], g["face_h"]
    shift = 0.05 * g["yaw"]  # inner features move with the head turn; the outline stays
    mirror = (-1.0, 1.0)  # l_ part on the image's left, r_ on the right

    # Face outline: an egg, narrower towards the chin.
    width = fw * (1.0 - g["jaw"] * torch.clamp(v / fh, min=0.0))
    r = torch.sqrt((u / width) ** 2 + (v / fh) ** 2 + 1e-12)
    skin = (r - 1.0) * min(fw, fh) * px

    neck = _intersect((u.abs() - g["neck_w"]) * px, (0.3 * fh - v) * px)
    cloth = _ellipse(u, v, 0.0, g["shoulder_y"] + 0.55, 1.15, 0.62, px)
    ears = [_ellipse(u, v, m * fw * 0.97, g["ear_y"], g["ear_w"], g["ear_h"], px) for m in mirror]

    # Hair: a cap behind the head down to hair_length, and a fringe above the hairline over the skin.
    hair_a, hair_b = fw * g["hair_volume"], fh * g["hair_volume"]
    hair_cv = -g["hair_top"] * fh * 0.3
    back = _intersect(_ellipse(u, v, g["hair_side"], hair_cv, hair_a, hair_b + 0.08, px),
                      (v - g["hair_length"] * fh) * px)  # fmt: skip
    hairline = g["hairline"] + g["fringe"] * (u - g["hair_side"] * 2) ** 2 * 4.0
    front = _intersect(skin, (v - hairline) * px)

    eyes, brows = [], []
    for m in mirror:
        eu = m * g["eye_x"] + shift
        eyes.append(_ellipse(u, v, eu, g["eye_y"], g["eye_w"], g["eye_h"], px))
        brows.append(_ellipse(u, v, eu, g["eye_y"] - g["brow_gap"], g["brow_w"], g["brow_h"], px,
                              angle=-m * g["brow_tilt"]))  # fmt: skip
    nose_top, nose_len, nose_w = g["eye_y"] + 0.04, g["nose_len"], g["nose_w"]
    nose = _union(  # a narrow bridge and a wider tip
        _ellipse(u, v, 1.1 * shift, nose_top + nose_len * 0.5, nose_w * 0.45, nose_len * 0.5, px),
        _ellipse(u, v, 1.1 * shift, nose_top + nose_len * 0.92, nose_w, nose_w * 0.55, px),
    )
    mu, my = 0.9 * shift, g["mouth_y"]
    gap = max(g["mouth_open"], 0.0)
    lip_outer = _union(
        _intersect(_ellipse(u, v, mu, my, g["mouth_w"], g["upper_lip"] + gap, px), (v - my) * px),
        _intersect(_ellipse(u, v, mu, my, g["mouth_w"], g["lower_lip"] + gap, px), (my - v) * px),
    )
    mouth = _ellipse(u, v, mu, my, g["mouth_w"] * 0.8, gap, px) if gap > 0.004 else None
    upper = _intersect(lip_outer, (v - my) * px)
    lower = _intersect(lip_outer, (my - v) * px)
    if mouth is not None:
        upper, lower = _subtract(upper, mouth), _subtract(lower, mouth)

    layers = [("cloth", cloth), ("neck", neck)]
    if not g["bald"]:
        layers.append(("hair", back))
    layers += [("l_ear", ears[0]), ("r_ear", ears[1]), ("skin", skin)]
    if not g["bald"]:
        layers.append(("hair", front))
    layers += [("l_brow", brows[0]), ("r_brow", brows[1]), ("l_eye", eyes[0]), ("r_eye", eyes[1]),
               ("nose", nose), ("u_lip", upper), ("l_lip", lower)]  # fmt: skip
    if mouth is not None:
        layers.append(("mouth", mouth))
    if g["glasses"]:
        rings = [
            _subtract(_ellipse(u, v, m * g["eye_x"] + shift, g["eye_y"], 0.125, 0.085, px),
                      _ellipse(u, v, m * g["eye_x"] + shift, g["eye_y"], 0.105, 0.067, px))
            for m in mirror
        ]  # fmt: skip
        bridge = _intersect(((u - shift).abs() - 0.05) * px, ((v - g["eye_y"] + 0.01).abs() - 0.012) * px)
        layers.append(("eye_g", _union(*rings, bridge)))
    return layers


# --- Appearance: colour fields -------------------------------------------------------------------------


def _colour(rgb) -> torch.Tensor:
    return torch.tensor(rgb, dtype=torch.float32).view(3, 1, 1)


def _waves(appearance, u, v, freq):
    """Smooth pseudo-random texture in [-1, 1]: a sum of plane waves fixed by the appearance."""
    out = torch.zeros_like(u)
    for wx, wy, phase in appearance["noise_waves"]:
        out = out + torch.sin(freq * (wx * u + wy * v) + phase)
    return out / max(len(appearance["noise_waves"]), 1) ** 0.5


def _background(appearance, x, y) -> torch.Tensor:
    c0, c1 = _colour(appearance["bg_colours"][0]), _colour(appearance["bg_colours"][1])
    ca, sa = math.cos(appearance["bg_angle"]), math.sin(appearance["bg_angle"])
    along = ca * x + sa * y
    kind, freq, phase = appearance["background"], appearance["bg_freq"], appearance["bg_phase"]
    if kind == "gradient":
        t = (along + 1.4) / 2.8
    elif kind == "stripes":
        t = 0.5 + 0.5 * torch.sin(freq * math.pi * along + phase)
    elif kind == "checker":
        across = -sa * x + ca * y
        t = (torch.sin(freq * along + phase) * torch.sin(freq * across + phase) > 0).float() * 0.8 + 0.1
    else:  # blobs
        t = 0.5 + 0.5 * torch.tanh(3.0 * _waves(appearance, x, y, freq))
    return c0 + (c1 - c0) * t


def _part_colour(name: str, geometry, appearance, u, v) -> torch.Tensor:
    """(3, H, W) colour of part `name` everywhere; the painter keeps it only where the part is."""
    a = appearance
    skin = _colour(a["skin"])
    if name in ("skin", "l_ear", "r_ear", "nose"):
        # Shading of a lit ball plus a faint skin texture.
        light = (math.cos(a["light_angle"]) * u + math.sin(a["light_angle"]) * v) * a["skin_shading"]
        ball = a["skin_shading"] * 0.6 * (u**2 + v**2)
        shade = 1.0 + light - ball + a["skin_texture"] * _waves(a, u, v, 60.0)
        if name == "nose":
            return skin * (shade * 0.95 + 0.04 * torch.tanh(20 * u))
        return skin * shade * (1.0 if name == "skin" else 0.9)
    if name == "neck":
        return skin * (0.8 - 0.2 * torch.clamp(v - 0.3, 0.0, 1.0))
    if name == "hair":
        # Strands fan out from a crown above the head, with a gentle wave.
        crown_angle = torch.atan2(u, v + 0.9) + 0.03 * torch.sin(9.0 * v)
        strands = torch.sin(a["hair_strand_freq"] * 1.5 * crown_angle)
        return _colour(a["hair"]) * (1.0 + a["hair_strand_amp"] * strands - 0.15 * v)
    if name in ("l_brow", "r_brow"):
        return _colour(a["brow"]) * (1.0 + 0.1 * torch.sin(80.0 * u))
    if name in ("l_eye", "r_eye"):
        g = geometry
        eu = (-1.0 if name == "l_eye" else 1.0) * g["eye_x"] + 0.05 * g["yaw"]
        iu = eu + g["gaze_x"] * g["eye_w"] * 0.5
        iv = g["eye_y"] + g["gaze_y"] * g["eye_h"] * 0.5
        ring = torch.sqrt((u - iu) ** 2 + (v - iv) ** 2) / (g["eye_h"] * 0.95)
        sclera = _colour([0.93, 0.92, 0.90])
        iris = _colour(a["iris"]) * (1.0 - 0.3 * ring)
        pupil = _colour([0.03, 0.03, 0.03])
        return torch.where(ring < 0.4, pupil, torch.where(ring < 1.0, iris, sclera))
    if name == "u_lip":
        return _colour(a["lips"]) * 0.9
    if name == "l_lip":
        return _colour(a["lips"]) * (1.05 - 2.0 * (v - geometry["mouth_y"]).clamp(min=0.0))
    if name == "mouth":
        return _colour(a["mouth"]).expand(3, *u.shape)
    if name == "eye_g":
        return _colour(a["glasses"]).expand(3, *u.shape)
    if name == "cloth":
        return _colour(a["cloth"]) * (1.0 + a["cloth_stripes"] * torch.sin(a["cloth_freq"] * (u + v)))
    raise KeyError(name)


# --- Rendering -----------------------------------------------------------------------------------------


@contextlib.contextmanager
def one_intra_op_thread():
    """Run torch on one intra-op thread inside, restoring the previous count after.

    A face is hundreds of operations on small (size x size) tensors; with several intra-op threads
    on a busy machine each of them can wait for the thread pool, measured 100x slower on 2 cores
    under load. One thread costs nothing here, since no single operation is large.
    """
    previous = torch.get_num_threads()
    if previous == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@one_intra_op_thread()
def render_labels(geometry: dict[str, Any], size: int) -> torch.Tensor:
    """The label map (size, size) long, ids as in LABELS: depends on the geometry only."""
    _, _, u, v, px = _face_frame(geometry, size)
    labels = torch.zeros(size, size, dtype=torch.long)
    for name, distance in _layers(geometry, u, v, px):
        labels[distance < 0] = LABEL[name]
    return labels


def part_masks_of(labels: torch.Tensor) -> torch.Tensor:
    """(H, W) label map -> (13, H, W) bool CelebA-HQ part masks in CELEBAHQ_PARTS order."""
    return labels.unsqueeze(0) == torch.arange(1, len(CELEBAHQ_PARTS) + 1).view(-1, 1, 1)


@one_intra_op_thread()
def render(
    geometry: dict[str, Any], appearance: dict[str, Any], size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Paint one face: image (3, size, size) in [-1, 1] and part masks (13, size, size) bool.

    The masks depend on the geometry only; the image edges are anti-aliased over one pixel.
    """
    x, y, u, v, px = _face_frame(geometry, size)
    image = _background(appearance, x, y).expand(3, size, size)
    labels = torch.zeros(size, size, dtype=torch.long)
    for name, distance in _layers(geometry, u, v, px):
        coverage = torch.clamp(0.5 - distance, 0.0, 1.0)
        image = image + (_part_colour(name, geometry, appearance, u, v) - image) * coverage
        labels[distance < 0] = LABEL[name]
    if appearance["noise_seed"]:
        # Fine grain (sensor-like noise), seeded by the appearance so bytes are reproducible.
        grain = torch.randn(3, size, size, generator=torch.Generator().manual_seed(appearance["noise_seed"]))
        image = image + 0.012 * grain
    image = image.clamp(0.0, 1.0) * 2.0 - 1.0
    return quantise(image), part_masks_of(labels)


def quantise(image: torch.Tensor) -> torch.Tensor:
    """Round an image in [-1, 1] to the 8-bit grid so a PNG round trip is lossless."""
    return torch.round((image + 1.0) * 127.5) / 127.5 - 1.0


@one_intra_op_thread()
def render_condition(
    geometry: dict[str, Any], size: int, variant: str = "official", photo: torch.Tensor | None = None
) -> torch.Tensor:
    """The condition of a face: (15, H, W) CelebA-HQ recipe or (1, H, W) Canny, in [0, 1].

    official: the recipe runs on the geometry painted with NEUTRAL_APPEARANCE (flat greys, no
    texture), so the condition depends on the geometry alone and never leaks the appearance.
    canny: Canny edges of the face's own `photo` (3, H, W) in [-1, 1], exactly what `midms
    translate` computes from an exemplar photo and how edge datasets are made from real photos, so
    a model trained on these pairs sees the same kind of exemplar condition at inference.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown synthfaces variant {variant!r}; expected one of {sorted(VARIANTS)}")
    if variant == "canny":
        if photo is None:
            raise ValueError("the canny variant computes the condition from the photo; pass photo=")
        return canny_edges(photo.unsqueeze(0))[0]
    structure, masks = render(geometry, NEUTRAL_APPEARANCE, size)
    return render_celebahq(masks.unsqueeze(0), structure.unsqueeze(0))[0]


# --- Samples and pairs ---------------------------------------------------------------------------------

# Independent random streams of sample `index`: entropy [seed, index, stream].
GEOMETRY_STREAM, APPEARANCE_STREAM, EASY_STREAM, HARD_STREAM, EXEMPLAR_APPEARANCE_STREAM = 0, 1, 2, 3, 4
# "easy" exemplar: each geometry parameter moves by this share of its range (1 sigma). 0.45 moves the
# parts by several pixels at 64 px, so a copy of the exemplar lands visibly off the condition.
EASY_AMOUNT = 0.45
# A "similar" exemplar appearance (training pairs): another face that looks alike, as a retrieval list
# would pick it. Colours move by these standard deviations (on [0, 1]); texture and background draws
# are the other face's own.
SIMILAR_COLOUR_SPREAD = 0.08
# Whose appearance the exemplar has: the sample's own (same), a similar face's (similar), or an
# unrelated face's (independent).
APPEARANCES = ("same", "similar", "independent")


def _rng(seed: int, index: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, index, stream])


def geometry_of(index: int, seed: int) -> dict[str, Any]:
    """Geometry of sample `index`."""
    return sample_geometry(_rng(seed, index, GEOMETRY_STREAM))


def appearance_of(index: int, seed: int) -> dict[str, Any]:
    """Appearance of sample `index`."""
    return sample_appearance(_rng(seed, index, APPEARANCE_STREAM))


def similar_appearance(appearance: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    """Another face that looks like `appearance`: same palette choices and background kind, every colour
    moved by N(0, SIMILAR_COLOUR_SPREAD), textures, lighting and background layout drawn afresh."""
    other = sample_appearance(rng)

    def near(colour):
        return [float(np.clip(c + rng.normal(0.0, SIMILAR_COLOUR_SPREAD), 0.0, 1.0)) for c in colour]

    for name in ("skin", "hair", "brow", "iris", "lips", "mouth", "glasses", "cloth"):
        other[name] = near(appearance[name])
    other["bg_colours"] = [near(colour) for colour in appearance["bg_colours"]]
    other["background"] = appearance["background"]
    return other


def exemplar_appearance(index: int, seed: int, kind: str) -> dict[str, Any]:
    """Appearance of the exemplar of sample `index`: the sample's own, a similar one, or an unrelated one."""
    if kind == "same":
        return appearance_of(index, seed)
    rng = _rng(seed, index, EXEMPLAR_APPEARANCE_STREAM)
    if kind == "similar":
        return similar_appearance(appearance_of(index, seed), rng)
    if kind == "independent":
        return sample_appearance(rng)
    raise ValueError(f"unknown exemplar appearance {kind!r}; expected one of {APPEARANCES}")


def exemplar_geometry(index: int, seed: int, pairing: str) -> dict[str, Any]:
    """Geometry of the exemplar of sample `index`: identical (self), similar (easy) or new (hard)."""
    geometry = geometry_of(index, seed)
    if pairing == "self":
        return geometry
    if pairing == "easy":
        return perturb_geometry(geometry, _rng(seed, index, EASY_STREAM), EASY_AMOUNT)
    if pairing == "hard":
        other = sample_geometry(_rng(seed, index, HARD_STREAM))
        # A very different pose: turn and shift the other way from the sample.
        other["yaw"] = -math.copysign(abs(other["yaw"]), geometry["yaw"])
        other["angle"] = -math.copysign(abs(other["angle"]), geometry["angle"])
        return other
    raise ValueError(f"unknown pairing {pairing!r}; expected one of {PAIRINGS}")


def oracle(cond_geometry: dict[str, Any], ref_appearance: dict[str, Any], size: int) -> torch.Tensor:
    """The right answer of a translation: the condition's geometry in the exemplar's appearance."""
    return render(cond_geometry, ref_appearance, size)[0]


@one_intra_op_thread()
def make_pair(
    index: int,
    seed: int,
    size: int,
    variant: str = "official",
    pairing: str = "easy",
    appearance: str = "independent",
) -> dict:
    """One example: sample `index` (photo and condition), its exemplar and the oracle.

    The exemplar has the pairing's geometry and the `appearance` kind's colours; a self pair is the
    sample itself whatever `appearance` says. Returns image, cond, ref, ref_cond, oracle (tensors;
    images in [-1, 1], conditions in [0, 1]) and meta (ids, pairing, appearance kind, the geometry and
    appearance parameters of both faces).
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown synthfaces variant {variant!r}; expected one of {sorted(VARIANTS)}")
    if appearance not in APPEARANCES:
        raise ValueError(f"unknown exemplar appearance {appearance!r}; expected one of {APPEARANCES}")
    geometry = geometry_of(index, seed)
    own_appearance = appearance_of(index, seed)
    image, _ = render(geometry, own_appearance, size)
    cond = render_condition(geometry, size, variant, image)
    if pairing == "self":
        appearance = "same"
        ref_geometry, ref_appearance = geometry, own_appearance
        ref, ref_cond, answer = image.clone(), cond.clone(), image.clone()
    else:
        ref_geometry = exemplar_geometry(index, seed, pairing)
        ref_appearance = exemplar_appearance(index, seed, appearance)
        ref, _ = render(ref_geometry, ref_appearance, size)
        ref_cond = render_condition(ref_geometry, size, variant, ref)
        # The condition's geometry in the exemplar's appearance (the sample itself when they share it).
        answer = image.clone() if appearance == "same" else oracle(geometry, ref_appearance, size)
    return {
        "image": image,
        "cond": cond,
        "ref": ref,
        "ref_cond": ref_cond,
        "oracle": answer,
        "meta": {
            "index": index,
            "seed": seed,
            "pairing": pairing,
            "exemplar_appearance": appearance,
            "variant": variant,
            "geometry": geometry,
            "ref_geometry": ref_geometry,
            "appearance": own_appearance,
            "ref_appearance": ref_appearance,
        },  # fmt: skip
    }
