"""DINO's views of a batch, made on the batch's device: resized crops, colour jitter, iBOT masks.

Every random draw comes from one generator seeded from (seed, step), so the views of step s
are the same whether the run started at 0 or resumed at s. Crops are affine resamplings
(one `grid_sample` for all crops of a size), not per-image Python loops. Colour jitter works
on normalised images (per-image contrast, per-channel shift, grayscale), so it needs no
knowledge of the data set's statistics; DINO's blur and solarisation are not applied.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trainers.data.sampling import derive_seed

ASPECT_RATIO = (3 / 4, 4 / 3)  # torchvision RandomResizedCrop's default
JITTER = 0.4  # DINO: ColorJitter(0.4, 0.4, 0.2, 0.1) with p = 0.8
JITTER_PROBABILITY = 0.8
GRAYSCALE_PROBABILITY = 0.2


@dataclass
class Views:
    global_crops: torch.Tensor  # [2B, 3, G, G]: crop c of image b at row c * B + b
    local_crops: torch.Tensor | None  # [nL * B, 3, L, L], same order
    masks: torch.Tensor | None  # bool [2B, h, w]: iBOT masks of the global crops' patches


def step_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(derive_seed(seed, "dino-views", step))


def _uniform(n: int, low: float, high: float, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=gen, device=device)


def resized_crops(
    images: torch.Tensor, copies: int, size: int, scale: tuple[float, float], gen: torch.Generator
) -> torch.Tensor:
    """`copies` random resized crops (area fraction in `scale`, flipped half the time) of each image."""
    batch, device = images.shape[0], images.device
    n = copies * batch
    area = _uniform(n, *scale, gen, device)
    log_ratio = _uniform(n, math.log(ASPECT_RATIO[0]), math.log(ASPECT_RATIO[1]), gen, device)
    width = torch.sqrt(area * log_ratio.exp()).clamp(max=1.0)
    height = torch.sqrt(area / log_ratio.exp()).clamp(max=1.0)
    # Centres keep the crop inside the image (coordinates in [-1, 1]).
    cx = _uniform(n, -1.0, 1.0, gen, device) * (1 - width)
    cy = _uniform(n, -1.0, 1.0, gen, device) * (1 - height)
    flip = torch.where(torch.rand(n, generator=gen, device=device) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3, device=device, dtype=images.dtype)
    theta[:, 0, 0], theta[:, 0, 2] = width * flip, cx
    theta[:, 1, 1], theta[:, 1, 2] = height, cy
    grid = F.affine_grid(theta, [n, images.shape[1], size, size], align_corners=False)
    source = images.repeat(copies, 1, 1, 1)
    return F.grid_sample(source, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def colour_jitter(images: torch.Tensor, gen: torch.Generator, strength: float = JITTER) -> torch.Tensor:
    """Random contrast and per-channel shift of up to `strength` (p = 0.8), then grayscale (p = 0.2)."""
    n, device = images.shape[0], images.device
    jitter = (torch.rand(n, generator=gen, device=device) < JITTER_PROBABILITY).float().view(n, 1, 1, 1)
    contrast = 1 + jitter * min(strength, 0.9) * (2 * torch.rand(n, 1, 1, 1, generator=gen, device=device) - 1)
    shift = jitter * strength * (2 * torch.rand(n, 3, 1, 1, generator=gen, device=device) - 1)
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    out = (images - mean) * contrast + mean + shift
    gray = torch.rand(n, generator=gen, device=device) < GRAYSCALE_PROBABILITY
    return torch.where(gray.view(n, 1, 1, 1), out.mean(dim=1, keepdim=True).expand_as(out), out)


def ibot_masks(
    images: int, grid: tuple[int, int], ratio: tuple[float, float], probability: float, gen: torch.Generator,
    device: torch.device,
) -> torch.Tensor:
    """bool [images, h, w]. As DINOv2's collate: a share `probability` of the images get a mask,
    their ratios spread evenly over `ratio` (one draw per sub-interval); the rest get none.
    Masked patches are drawn uniformly (DINOv2 masks blocks of patches)."""
    h, w = grid
    patches = h * w
    masked = int(images * probability)
    ratios = torch.zeros(images, device=device)
    if masked:
        edges = torch.linspace(ratio[0], ratio[1], masked + 1, device=device)
        draws = edges[:-1] + (edges[1:] - edges[:-1]) * torch.rand(masked, generator=gen, device=device)
        which = torch.randperm(images, generator=gen, device=device)[:masked]
        ratios[which] = draws
    counts = (ratios * patches).floor()
    rank = torch.rand(images, patches, generator=gen, device=device).argsort(dim=1).argsort(dim=1)
    return (rank < counts.unsqueeze(1)).view(images, h, w)


def make_views(
    images: torch.Tensor, *, seed: int, step: int, local_crops: int, local_size: int,
    global_scale: tuple[float, float], local_scale: tuple[float, float], patch_size: int,
    mask_ratio: tuple[float, float], mask_probability: float, with_masks: bool, jitter: float = JITTER,
) -> Views:
    gen = step_generator(seed, step, images.device)
    size = images.shape[-1]
    global_crops = colour_jitter(resized_crops(images, 2, size, global_scale, gen), gen, jitter)
    local = None
    if local_crops:
        local = colour_jitter(resized_crops(images, local_crops, local_size, local_scale, gen), gen, jitter)
    masks = None
    if with_masks:
        grid = (size // patch_size, size // patch_size)
        masks = ibot_masks(global_crops.shape[0], grid, mask_ratio, mask_probability, gen, images.device)
    return Views(global_crops, local, masks)
