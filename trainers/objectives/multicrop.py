"""DINO's views of a batch: the loader's crops, colour jitter and iBOT masks on the device.

The 2 global and N local random resized crops of each image are cut by the loader from the
whole decoded image (trainers/data/crops.py, as DINOv2's DataAugmentationDINO), and arrive in
`Batch.views`, crop-major. Here: colour jitter (per-image contrast, per-channel shift,
grayscale; on normalised images, so it needs no knowledge of the data set's statistics) and
the iBOT masks. DINO's blur and solarisation are not applied.

Every random draw is made on the host, for the whole global batch of the step, from one
generator seeded from (seed, step); a rank applies the rows of its share (`share`). So the
views of step s are the same whether the run started at 0 or resumed at s, and for any number
of ranks. Jitter runs in float32 with autocast off, whatever the trainer's precision.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trainers.data.sampling import derive_seed

JITTER = 0.4  # DINO: ColorJitter(0.4, 0.4, 0.2, 0.1) with p = 0.8
JITTER_PROBABILITY = 0.8
GRAYSCALE_PROBABILITY = 0.2


@dataclass
class Views:
    global_crops: torch.Tensor  # [2B, 3, G, G]: crop c of image b at row c * B + b (B: this rank's images)
    local_crops: torch.Tensor | None  # [nL * B, 3, L, L], same order
    masks: torch.Tensor | None  # bool [2B, h, w]: iBOT masks of the global crops' patches


def step_generator(seed: int, step: int) -> torch.Generator:
    """The host generator of one step's draws."""
    return torch.Generator().manual_seed(derive_seed(seed, "dino-views", step))


def share_rows(copies: int, images: int, share: tuple[int, int]) -> torch.Tensor:
    """Rows of a crop-major global tensor (copies x images * ranks) that hold this rank's images."""
    rank, ranks = share
    total = images * ranks
    return (torch.arange(copies).view(-1, 1) * total + rank * images + torch.arange(images)).flatten()


def _to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def colour_jitter(
    images: torch.Tensor, rows: torch.Tensor, total: int, gen: torch.Generator, strength: float = JITTER
) -> torch.Tensor:
    """Random contrast and per-channel shift of up to `strength` (p = 0.8), then grayscale (p = 0.2).

    Draws for all `total` crops of the global batch; `rows` are those of `images` among them."""
    jitter = (torch.rand(total, generator=gen) < JITTER_PROBABILITY).float().view(total, 1, 1, 1)
    contrast = 1 + jitter * min(strength, 0.9) * (2 * torch.rand(total, 1, 1, 1, generator=gen) - 1)
    shift = jitter * strength * (2 * torch.rand(total, 3, 1, 1, generator=gen) - 1)
    gray = torch.rand(total, generator=gen) < GRAYSCALE_PROBABILITY
    device = images.device
    contrast, shift, gray = _to(contrast[rows], device), _to(shift[rows], device), _to(gray[rows], device)
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    out = (images - mean) * contrast + mean + shift
    return torch.where(gray.view(-1, 1, 1, 1), out.mean(dim=1, keepdim=True).expand_as(out), out)


def ibot_masks(
    images: int, grid: tuple[int, int], ratio: tuple[float, float], probability: float, gen: torch.Generator,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """bool [len(rows), h, w] on the host (rows of `images` global crops; all if None). As DINOv2's
    collate: a share `probability` of the images get a mask, their ratios spread evenly over
    `ratio` (one draw per sub-interval); the rest get none. Masked patches are drawn uniformly
    (DINOv2 masks blocks of patches)."""
    h, w = grid
    patches = h * w
    masked = int(images * probability)
    ratios = torch.zeros(images)
    if masked:
        edges = torch.linspace(ratio[0], ratio[1], masked + 1)
        draws = edges[:-1] + (edges[1:] - edges[:-1]) * torch.rand(masked, generator=gen)
        which = torch.randperm(images, generator=gen)[:masked]
        ratios[which] = draws
    scores = torch.rand(images, patches, generator=gen)
    if rows is not None:
        scores, ratios = scores[rows], ratios[rows]
    counts = (ratios * patches).floor()
    rank = scores.argsort(dim=1).argsort(dim=1)
    return (rank < counts.unsqueeze(1)).view(-1, h, w)


def make_views(
    crops: tuple[torch.Tensor, ...], *, seed: int, step: int, patch_size: int, mask_ratio: tuple[float, float],
    mask_probability: float, with_masks: bool, jitter: float = JITTER, share: tuple[int, int] = (0, 1),
) -> Views:
    """crops: the loader's (global [2B, 3, G, G], local [nL * B, 3, L, L]) of this rank's B images,
    crop-major; share: (rank, ranks), the draws cover the global batch of B * ranks images."""
    global_crops = crops[0]
    images = global_crops.shape[0] // 2
    total = images * share[1]
    gen = step_generator(seed, step)
    global_rows = share_rows(2, images, share)
    with torch.autocast(global_crops.device.type, enabled=False):
        views = colour_jitter(global_crops.float(), global_rows, 2 * total, gen, jitter)
        local = None
        if len(crops) > 1:
            copies = crops[1].shape[0] // images
            local = colour_jitter(crops[1].float(), share_rows(copies, images, share), copies * total, gen, jitter)
    masks = None
    if with_masks:
        size = global_crops.shape[-1]
        grid = (size // patch_size, size // patch_size)
        masks = _to(ibot_masks(2 * total, grid, mask_ratio, mask_probability, gen, global_rows), global_crops.device)
    return Views(views, local, masks)
