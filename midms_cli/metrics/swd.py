"""Sliced Wasserstein Distance between image sets, PGGAN protocol (Karras et al. 2018).

Each image is decomposed into a Laplacian pyramid down to 16 px; from every level 128 random 7x7x3
neighbourhoods are drawn per image. Descriptors are normalised per colour channel over the whole
set, then real and fake descriptors are compared along 4 x 128 random unit directions by the mean
absolute difference of their sorted projections. Results are reported x10^3; the headline number
is the average over levels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from midms_cli.errors import MidmsError

NEIGHBOURHOOD = 7  # 7x7 patches
DESCRIPTORS_PER_IMAGE = 128
DIRECTION_REPEATS = 4
DIRECTIONS_PER_REPEAT = 128
MIN_RESOLUTION = 16


def binomial_kernel() -> torch.Tensor:
    """The 5x5 binomial filter [1 4 6 4 1]^T [1 4 6 4 1] / 256 of cv2.pyrDown / pyrUp."""
    taps = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0])
    return torch.outer(taps, taps) / 256


def _filter(images: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Depthwise 5x5 filtering with mirror padding (scipy 'mirror' = cv2 BORDER_REFLECT_101)."""
    channels = images.shape[1]
    weight = kernel.to(images).expand(channels, 1, 5, 5)
    return F.conv2d(F.pad(images, (2, 2, 2, 2), mode="reflect"), weight, groups=channels)


def pyramid_down(images: torch.Tensor) -> torch.Tensor:
    """Blur with the binomial kernel, keep every second pixel (cv2.pyrDown)."""
    return _filter(images, binomial_kernel())[:, :, ::2, ::2]


def pyramid_up(images: torch.Tensor) -> torch.Tensor:
    """Insert zeros between pixels, blur with 4x the binomial kernel (cv2.pyrUp)."""
    batch, channels, height, width = images.shape
    upsampled = images.new_zeros(batch, channels, 2 * height, 2 * width)
    upsampled[:, :, ::2, ::2] = images
    return _filter(upsampled, 4 * binomial_kernel())


def laplacian_pyramid(images: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """Band-pass levels from fine to coarse; the last level is the low-pass residual."""
    pyramid = [images.to(torch.float32)]
    for _ in range(levels - 1):
        pyramid.append(pyramid_down(pyramid[-1]))
        pyramid[-2] = pyramid[-2] - pyramid_up(pyramid[-1])
    return pyramid


def pyramid_levels(resolution: int, min_resolution: int = MIN_RESOLUTION) -> list[int]:
    """Resolutions of the pyramid: 256 -> [256, 128, 64, 32, 16]; 64 -> [64, 32, 16]."""
    levels = []
    while resolution >= min_resolution:
        levels.append(resolution)
        resolution //= 2
    return levels


def sample_patch_centres(
    num_images: int, height: int, width: int, per_image: int, generator: torch.Generator
) -> torch.Tensor:
    """Random (image, y, x) centres of whole 7x7 patches, `per_image` per image, as (N, 3) long."""
    half = NEIGHBOURHOOD // 2
    image_index = torch.arange(num_images).repeat_interleave(per_image)
    # PGGAN draws x before y; the order matters only for reproducing its random stream, not the law.
    xs = torch.randint(half, width - half, (num_images * per_image,), generator=generator)
    ys = torch.randint(half, height - half, (num_images * per_image,), generator=generator)
    return torch.stack([image_index, ys, xs], dim=1)


def extract_descriptors(images: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """7x7 neighbourhoods around `centres` (N, 3) of images (B, C, H, W) -> (N, C, 7, 7)."""
    half = NEIGHBOURHOOD // 2
    offsets = torch.arange(-half, half + 1)
    rows = (centres[:, 1:2] + offsets)[:, :, None]  # (N, 7, 1)
    cols = (centres[:, 2:3] + offsets)[:, None, :]  # (N, 1, 7)
    patches = images[centres[:, 0, None, None], :, rows, cols]  # (N, 7, 7, C)
    return patches.permute(0, 3, 1, 2)


def normalise_descriptors(descriptors: torch.Tensor) -> torch.Tensor:
    """Per colour channel: subtract the mean and divide by the std over all descriptors and pixels;
    flatten to (N, C*7*7)."""
    mean = descriptors.mean(dim=(0, 2, 3), keepdim=True)
    std = descriptors.std(dim=(0, 2, 3), keepdim=True, unbiased=False)
    return ((descriptors - mean) / std.clamp_min(1e-12)).flatten(1)


def random_directions(dim: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` random unit vectors in R^dim as columns (dim, count)."""
    directions = torch.randn(dim, count, generator=generator, dtype=torch.float64)
    return directions / directions.norm(dim=0, keepdim=True)


def sliced_wasserstein(
    descriptors_a: torch.Tensor,
    descriptors_b: torch.Tensor,
    generator: torch.Generator,
    repeats: int = DIRECTION_REPEATS,
    directions_per_repeat: int = DIRECTIONS_PER_REPEAT,
) -> float:
    """Mean over repeats and directions of mean |sort(A d) - sort(B d)| (equal sizes N x D)."""
    a, b = descriptors_a.to(torch.float64), descriptors_b.to(torch.float64)
    results = []
    for _ in range(repeats):
        directions = random_directions(a.shape[1], directions_per_repeat, generator)
        # (directions, N): sorting along the contiguous last dimension is much faster on CPU.
        projected_a = (directions.T @ a.T).sort(dim=1).values
        projected_b = (directions.T @ b.T).sort(dim=1).values
        results.append((projected_a - projected_b).abs().mean(dim=1))
    return float(torch.stack(results).mean())


@dataclass
class DescriptorSet:
    """Accumulates SWD descriptors of one image set batch by batch.

    Patch positions come from a generator seeded with `seed`, so the same images with the same
    seed always give the same descriptors, whichever set they are compared with.
    """

    resolution: int
    seed: int = 0
    per_image: int = DESCRIPTORS_PER_IMAGE
    levels: list[list[torch.Tensor]] = field(default_factory=list)
    count: int = 0

    def __post_init__(self) -> None:
        self.resolutions = pyramid_levels(self.resolution)
        if not self.resolutions:
            raise MidmsError(
                f"SWD needs images of at least {MIN_RESOLUTION} px, got {self.resolution}; "
                "evaluate larger images or leave swd out of --metrics"
            )
        self.levels = [[] for _ in self.resolutions]
        self.generator = torch.Generator().manual_seed(self.seed)

    def add(self, images: torch.Tensor) -> None:
        """Add a batch of images (B, 3, H, W) in uint8 range [0, 255] (float or uint8 dtype)."""
        if images.shape[-1] != self.resolution or images.shape[-2] != self.resolution:
            raise ValueError(f"SWD set was started at {self.resolution} px, got {tuple(images.shape[-2:])}")
        pyramid = laplacian_pyramid(images.to(torch.float32), len(self.resolutions))
        for store, level in zip(self.levels, pyramid, strict=True):
            centres = sample_patch_centres(
                level.shape[0], level.shape[2], level.shape[3], self.per_image, self.generator
            )
            store.append(extract_descriptors(level, centres))
        self.count += images.shape[0]

    def finalised(self) -> list[torch.Tensor]:
        """Normalised descriptors per level, (N_images * per_image, 147) each."""
        return [normalise_descriptors(torch.cat(level)) for level in self.levels]


def _match_sizes(
    a: torch.Tensor, b: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sets of unequal size are compared on a random subset of the larger one (sorted projections
    need equal counts)."""
    if a.shape[0] > b.shape[0]:
        a = a[torch.randperm(a.shape[0], generator=generator)[: b.shape[0]]]
    elif b.shape[0] > a.shape[0]:
        b = b[torch.randperm(b.shape[0], generator=generator)[: a.shape[0]]]
    return a, b


def swd_from_sets(real: DescriptorSet, fake: DescriptorSet, seed: int = 0) -> dict[str, float]:
    """SWD x10^3 per pyramid level (keys "swd_<res>") and their average ("swd")."""
    if real.resolutions != fake.resolutions:
        raise ValueError(f"SWD sets differ in resolution: {real.resolution} vs {fake.resolution}")
    generator = torch.Generator().manual_seed(seed)
    result = {}
    for resolution, a, b in zip(real.resolutions, real.finalised(), fake.finalised(), strict=True):
        a, b = _match_sizes(a, b, generator)
        result[f"swd_{resolution}"] = 1e3 * sliced_wasserstein(a, b, generator)
    result["swd"] = sum(result.values()) / len(result)
    return result


def sliced_wasserstein_distance(real: torch.Tensor, fake: torch.Tensor, seed: int = 0) -> dict[str, float]:
    """SWD between two in-memory image sets (B, 3, H, W) in [0, 255]; see `swd_from_sets`."""
    real_set, fake_set = DescriptorSet(real.shape[-1], seed), DescriptorSet(fake.shape[-1], seed)
    real_set.add(real)
    fake_set.add(fake)
    return swd_from_sets(real_set, fake_set, seed)
