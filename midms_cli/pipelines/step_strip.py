"""The `--save-steps` picture: one labelled row per interleaved step of the sampler.

Columns: the warp fed into the step, its confidence mask, and the UNet's x0-prediction, all
decoded to images; a header names the columns and each row names its loop position and timestep.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from midms_cli.images import to_uint8
from midms_cli.models.midm import MIDM, LoopResult

COLUMNS = ("warp", "mask", "x0")  # short: a column is as wide as the image (64 px for tiny models)
HEADER_HEIGHT = 14  # pixels of the column titles (PIL's built-in 11 px font)
LABEL_WIDTH = 64  # pixels of the row titles
BACKGROUND = (255, 255, 255)
INK = (0, 0, 0)


def _to_image(map_: Tensor, size: tuple[int, int]) -> Tensor:
    """A (1, H, W) mask in {0, 1} as a (3, size) image in [−1, 1] (white = confident)."""
    return F.interpolate(map_[None], size=size, mode="nearest")[0].expand(3, -1, -1) * 2 - 1


@torch.no_grad()
def step_strip(model: MIDM, initial_warp: Tensor, loop: LoopResult) -> Tensor:
    """One row per interleaved step: [warp fed in, confidence mask, x0-prediction], decoded; (3, H', W').

    Row 0 shows the initial warp R0 (everything confident); re-warp rows show R_k and M_k; rows
    without a warp are grey in the first two columns.
    """
    rows = []
    for step in loop.steps:
        x0 = model.decode(step.x0_pred[:1]).clamp(-1, 1)[0]
        size = tuple(x0.shape[-2:])
        blank = torch.zeros_like(x0)
        if step.position == 0:
            warp, mask = model.decode(initial_warp[:1]).clamp(-1, 1)[0], torch.ones_like(x0)
        elif step.rewarp is not None:
            warp = model.decode(step.rewarp.warped[:1]).clamp(-1, 1)[0]
            mask = _to_image(step.rewarp.mask[0], size)
        else:
            warp, mask = blank, blank
        rows.append(torch.cat([warp, mask, x0], dim=2))
    return torch.cat(rows, dim=1)


def row_titles(loop: LoopResult) -> list[str]:
    """`step k` and its timestep t, per row; a row without a warp says so."""
    titles = []
    for step in loop.steps:
        note = "" if step.position == 0 or step.rewarp is not None else "\n(no warp)"
        titles.append(f"step {step.position + 1}\nt={step.t}{note}")
    return titles


def labelled_strip(strip: Tensor, titles: list[str]) -> Image.Image:
    """The strip (3, rows*H, 3*W) in [−1, 1] with the column titles above and `titles` left of each row."""
    pixels = to_uint8(strip).permute(1, 2, 0).cpu().numpy()
    height, width = pixels.shape[:2]
    rows, row_height, column_width = len(titles), height // max(len(titles), 1), width // len(COLUMNS)
    canvas = Image.new("RGB", (LABEL_WIDTH + width, HEADER_HEIGHT + height), BACKGROUND)
    canvas.paste(Image.fromarray(np.ascontiguousarray(pixels)), (LABEL_WIDTH, HEADER_HEIGHT))
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
    for index, title in enumerate(COLUMNS):
        draw.text((LABEL_WIDTH + index * column_width + 2, 1), title, fill=INK, font=font)
    for index in range(rows):
        draw.multiline_text((2, HEADER_HEIGHT + index * row_height + 2), titles[index], fill=INK, font=font)
    return canvas
