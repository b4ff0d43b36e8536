"""Canny edges (kornia, skimage defaults) on hand-made step images."""

import torch

from midms_cli.conditions.canny import canny_edges


def test_vertical_step_gives_one_thin_vertical_line():
    image = -torch.ones(1, 3, 20, 20)
    image[..., 10:] = 1.0
    edges = canny_edges(image)
    assert edges.shape == (1, 1, 20, 20)
    assert set(edges.unique().tolist()) <= {0.0, 1.0}
    columns = edges[0, 0].sum(dim=0)
    assert columns[9] + columns[10] == 18  # one pixel per row at the step, except the border rows
    assert columns.sum() == 18 and edges[0, 0, 0].sum() == 0 and edges[0, 0, -1].sum() == 0


def test_flat_and_weak_images_have_no_edges():
    assert canny_edges(torch.zeros(2, 3, 16, 16)).sum() == 0
    weak = torch.zeros(1, 1, 16, 16)
    weak[..., 8:] = 0.05  # a step of 0.025 in [0, 1]: gradient magnitude 0.1 < high threshold 0.2
    assert canny_edges(weak).sum() == 0


def test_step_above_high_threshold_is_found_in_grayscale_input():
    step = torch.zeros(1, 1, 16, 16)
    step[..., 8:, :] = 0.2  # a horizontal step of 0.1: Sobel magnitude 0.4 > 0.2
    edges = canny_edges(step)[0, 0]
    assert edges[7:9].sum() == 14 and edges.sum() == 14  # 16 columns minus the two border ones
