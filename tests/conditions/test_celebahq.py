"""The CelebA-HQ 15-channel recipe on toy faces."""

import numpy as np
import pytest
import torch
from PIL import Image

from midms_cli.conditions.celebahq import (
    CELEBAHQ_PARTS,
    celebamask_part_paths,
    inner_label,
    load_part_masks,
    part_boundaries,
    part_masks_from_labels,
    render_celebahq,
)
from midms_cli.errors import MidmsError


def brute_force_boundaries(label: torch.Tensor) -> torch.Tensor:
    height, width = label.shape
    out = torch.zeros(height, width, dtype=torch.bool)
    for y in range(height):
        for x in range(width):
            for dy, dx in ((0, 1), (0, -1), (1, 0), (-1, 0)):
                ny, nx = y + dy, x + dx
                if 0 <= ny < height and 0 <= nx < width and label[ny, nx] != label[y, x]:
                    out[y, x] = True
    return out


def test_part_order_matches_the_official_loader():
    assert CELEBAHQ_PARTS == ("skin", "l_brow", "r_brow", "l_eye", "r_eye", "l_ear", "r_ear",
                              "nose", "u_lip", "mouth", "l_lip", "eye_g", "hair")  # fmt: skip


def test_boundaries_of_two_part_mask_are_two_pixels_wide():
    label = torch.zeros(6, 8, dtype=torch.long)
    label[:, 4:] = 1  # two regions side by side
    label[0:2, 0:2] = 2
    edge = part_boundaries(label)
    assert torch.equal(edge, brute_force_boundaries(label))
    assert edge[:, 3].all() and edge[:, 4].all() and not edge[3:, 5:].any()
    assert edge[3:, 0:3].sum() == 0


def toy_face(size=16):
    masks = torch.zeros(1, 13, size, size, dtype=torch.bool)
    masks[0, 0, 3:13, 4:12] = True  # skin
    masks[0, 3, 6:8, 5:7] = True  # l_eye (overlapping skin, as CelebAMask-HQ masks do)
    masks[0, 12, 0:5, 2:14] = True  # hair, over the top of the skin
    return masks


def test_recipe_channel_semantics_on_toy_face():
    masks = toy_face()
    cond = render_celebahq(masks)
    assert cond.shape == (1, 15, 16, 16)
    boundaries = torch.stack([brute_force_boundaries(masks[0, k].long()) for k in range(13)])
    union = boundaries.any(0).float()
    assert torch.equal(cond[0, 14], union)
    assert torch.equal(cond[0, 0], union)  # no image: channel 0 = boundaries only
    # Channel 1 + k: distance to part k's boundary, /3, truncated, /255; zero on the boundary.
    skin_distance = cond[0, 1]
    assert (skin_distance[boundaries[0]] == 0).all()
    assert skin_distance[8, 8] == pytest.approx(1 / 255)  # 3 px from the boundary column 11
    far = cond[0, 1][15, 0]  # 6 px from the nearest skin-boundary pixels (12, 3) and (13, 4)
    assert far == pytest.approx(2 / 255)
    missing = [k for k in range(13) if not masks[0, k].any()]
    for k in missing:
        assert torch.equal(cond[0, 1 + k], torch.ones(16, 16))


def test_canny_kept_only_outside_face_parts_and_inside_hair():
    masks = toy_face()
    image = -torch.ones(1, 3, 16, 16)
    image[..., :, 8:] = 1.0  # a vertical step through background, hair and skin
    cond = render_celebahq(masks, image)
    keep = inner_label(masks)[0, 0]
    extra = (cond[0, 0] - cond[0, 14]).clamp(min=0)  # pixels that only Canny added
    assert extra.sum() > 0
    assert not extra[~keep].any()
    # scikit-image keeps both pixels of an exactly symmetric step (its suppression keeps ties).
    assert extra[1, 7] + extra[1, 8] == 2  # inside the hair Canny is kept
    assert extra[14:].sum() == 2  # and in the background below the face (not on the border row)
    assert torch.equal(cond[0, 14], render_celebahq(masks)[0, 14])  # channel 14 ignores the image


def test_inner_label_hair_wins_over_other_parts():
    masks = toy_face()
    keep = inner_label(masks)[0, 0]
    assert keep[0, 0] and keep[2, 5] and not keep[8, 8] and not keep[6, 5]


def test_part_masks_from_label_map():
    labels = torch.tensor([[0, 1], [13, 4]])
    masks = part_masks_from_labels(labels)
    assert masks.shape == (13, 2, 2)
    assert masks[0, 0, 1] and masks[12, 1, 0] and masks[3, 1, 1] and masks.sum() == 3


def test_load_part_masks_from_celebamask_layout(tmp_path):
    folder = tmp_path / "2"
    folder.mkdir()
    skin = np.zeros((8, 8), np.uint8)
    skin[2:6, 2:6] = 255
    Image.fromarray(skin).save(folder / "04001_skin.png")
    Image.fromarray(255 - skin).save(folder / "04001_hair.png")
    paths = celebamask_part_paths(tmp_path, 4001)
    assert set(paths) == {"skin", "hair"}
    masks = load_part_masks(paths, 4)  # nearest down-sampling 8 -> 4
    assert masks.shape == (13, 4, 4)
    assert torch.equal(masks[0], torch.from_numpy(skin[::2, ::2] > 0))
    assert torch.equal(masks[12], ~masks[0]) and not masks[1:12].any()
    with pytest.raises(MidmsError, match="unknown CelebAMask-HQ part"):
        load_part_masks({"beard": paths["skin"]}, 4)
