"""Picture grids with captions: one row per translated pair, one captioned column per picture kind.

Used by `midms demo` (condition | exemplar | output | oracle) and the examples. Tiles are enlarged
by a whole factor (nearest neighbour, so the pixels stay honest) and captioned with PIL's built-in
font, so no font file is needed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from midms_cli.images import save_png

CAPTION_HEIGHT = 16
GAP = 2  # white pixels between tiles


def condition_picture(condition: torch.Tensor) -> torch.Tensor:
    """A condition (C, H, W) in [0, 1] as a picture in [-1, 1]: channel 0 (the edge map) black on white."""
    return (1 - condition[:1]).expand(3, -1, -1) * 2 - 1


def labelled_grid(
    rows: Sequence[Sequence[torch.Tensor]], captions: Sequence[str], scale: int = 2, title: str = ""
) -> torch.Tensor:
    """(3, H', W') in [-1, 1]: captions over the columns, then one row of tiles per entry of `rows`.

    Every tile is (3, h, w) in [-1, 1], all of one size; `scale` enlarges each by that whole factor.
    """
    if not rows or any(len(row) != len(captions) for row in rows):
        raise ValueError("every row needs one tile per caption")
    height, width = rows[0][0].shape[-2] * scale, rows[0][0].shape[-1] * scale
    top = CAPTION_HEIGHT * (2 if title else 1)
    canvas = Image.new("RGB", (len(captions) * (width + GAP) + GAP, top + len(rows) * (height + GAP) + GAP),
                       "white")  # fmt: skip
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    if title:
        draw.text((GAP + 2, 2), title, fill="black", font=font)
    for column, caption in enumerate(captions):
        left = GAP + column * (width + GAP)
        text_width = draw.textlength(caption, font=font)
        position = (left + max(0.0, (width - text_width) / 2), top - CAPTION_HEIGHT + 2)
        draw.text(position, caption, fill="black", font=font)
    for r, row in enumerate(rows):
        for column, tile in enumerate(row):
            pixels = ((tile.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
            picture = Image.fromarray(pixels.permute(1, 2, 0).cpu().numpy()).resize(
                (width, height), Image.NEAREST
            )
            canvas.paste(picture, (GAP + column * (width + GAP), top + GAP + r * (height + GAP)))
    array = torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1).float()
    return array / 127.5 - 1


def save_labelled_grid(
    path: str | os.PathLike,
    rows: Sequence[Sequence[torch.Tensor]],
    captions: Sequence[str],
    scale: int = 2,
    title: str = "",
) -> None:
    """`labelled_grid` written as a PNG (atomically)."""
    save_png(labelled_grid(rows, captions, scale, title), path)
