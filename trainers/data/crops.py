"""Random resized crops of whole training images: what to cut (the plan), where (host-drawn
boxes), and the cutting itself, per image in a loader worker or batched on the device.

DeiT-III's 3-Augment and DINOv2's multi-crop cut their random crops from the whole decoded
image, in the data set's transform (DeiT `datasets.py`, DINOv2 `DataAugmentationDINO`). So
do we, for every real source: the loader cuts each crop plan's boxes from the full image,
and the device does the rest (3-Augment's colour operations, DINO's jitter and iBOT masks).

Every box is a pure function of (seed, step, position in the global batch): each output
position of a step has its own seed (`sampling.derive_seeds`), from which
`draw_uniforms` draws UNIFORMS_PER_CROP numbers per crop on the host, and `crop_boxes`
turns them into a pixel box for the image's height and width, as torchvision's
RandomResizedCrop.get_params does (10 tries of area and log-ratio, then a central crop).
So the crops are the same on any device, for any number of ranks and after a resume.

Two cutters:
- `resized_crop` (one image, in a CPU worker): crop the pixel box, then antialiased
  bilinear resize (torch's `interpolate(antialias=True)`, as torchvision's Resize).
- `cut_crops` (a batch of images of different sizes, on any device): the images are packed
  into one uint8 atlas (shelf packing, a 1-pixel replicated border around each, so that no
  sample reads a neighbour) and every crop of the batch is one `torchvision.ops.roi_align`
  call: bilinear samples averaged over each output pixel's footprint (adaptive sampling
  ratio), i.e. an area-style antialiased resize. An atlas, not a padded [N, C, Hmax, Wmax]
  batch: one large photo in a batch (ImageNet has some of 4000 px) would make a padded batch
  of 256 images tens of GB; the atlas holds about the images' own pixels. The two cutters
  agree closely but not bit for bit (area vs triangle filter; the atlas offset changes float
  rounding); each is deterministic, so resume is exact either way.
Crops are computed in float32 with autocast off, whatever the trainer's precision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

TRIES = 10  # torchvision's RandomResizedCrop tries 10 boxes, then falls back to a central crop
# Per crop: TRIES area draws, TRIES log-ratio draws, then top, left and flip.
UNIFORMS_PER_CROP = 2 * TRIES + 3
EVAL_CROP_PCT = 0.875  # ImageNet evaluation: resize to size / 0.875, central crop of size
RATIO = (3 / 4, 4 / 3)


@dataclass(frozen=True)
class CropGroup:
    """`copies` random resized crops of each image at `size` x `size`, area fraction in `scale`."""

    copies: int
    size: int
    scale: tuple[float, float]
    ratio: tuple[float, float] = RATIO


@dataclass(frozen=True)
class CropPlan:
    """What the loader cuts from each training image: one or more crop groups (DINO: 2 global,
    N local), each crop flipped with p = 0.5. repeats: each image fills this many consecutive
    positions of the batch (DeiT-III's repeated augmentation), each position its own crops."""

    groups: tuple[CropGroup, ...]
    repeats: int = 1

    @classmethod
    def single(cls, size: int, scale: tuple[float, float] = (0.08, 1.0), repeats: int = 1) -> "CropPlan":
        """RandomResizedCrop(size, scale) + horizontal flip (torchvision's defaults)."""
        return cls((CropGroup(1, size, scale),), repeats)

    @property
    def crops_per_position(self) -> int:
        return sum(g.copies for g in self.groups)


# ----------------------------------------------------------------------------- boxes (host)


def draw_uniforms(seed: int, crops: int) -> np.ndarray:
    """float64 [crops, UNIFORMS_PER_CROP] in [0, 1): one output position's draws, from its seed."""
    return np.random.Generator(np.random.PCG64(seed)).random((crops, UNIFORMS_PER_CROP))


def crop_boxes(
    uniforms: np.ndarray, heights: np.ndarray, widths: np.ndarray, scale: tuple[float, float],
    ratio: tuple[float, float] = RATIO,
) -> tuple[np.ndarray, np.ndarray]:
    """(boxes int64 [m, 4] as (top, left, height, width), flips bool [m]) for m crops.

    uniforms [m, UNIFORMS_PER_CROP]; heights, widths [m]: each crop's source image size.
    torchvision's RandomResizedCrop.get_params, vectorised: area U(scale) of the image,
    log aspect ratio uniform, w and h rounded; the first of TRIES boxes that fits, else a
    central crop of the whole image clamped to `ratio`."""
    heights = np.asarray(heights, dtype=np.int64)
    widths = np.asarray(widths, dtype=np.int64)
    m = uniforms.shape[0]
    area = (heights * widths).astype(np.float64)[:, None]
    target = area * (scale[0] + (scale[1] - scale[0]) * uniforms[:, :TRIES])
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    aspect = np.exp(log_low + (log_high - log_low) * uniforms[:, TRIES : 2 * TRIES])
    w = np.rint(np.sqrt(target * aspect)).astype(np.int64)  # rint: round half to even, as Python's round
    h = np.rint(np.sqrt(target / aspect)).astype(np.int64)
    fits = (w > 0) & (w <= widths[:, None]) & (h > 0) & (h <= heights[:, None])
    first = fits.argmax(axis=1)
    found = fits[np.arange(m), first]
    w, h = w[np.arange(m), first], h[np.arange(m), first]
    u_top, u_left, u_flip = uniforms[:, 2 * TRIES], uniforms[:, 2 * TRIES + 1], uniforms[:, 2 * TRIES + 2]
    top = np.minimum(np.floor(u_top * (heights - h + 1)).astype(np.int64), heights - h)
    left = np.minimum(np.floor(u_left * (widths - w + 1)).astype(np.int64), widths - w)
    # No box fitted: torchvision's fallback, a central crop with the ratio clamped into range.
    in_ratio = widths / heights
    fw = np.where(in_ratio < ratio[0], widths, np.where(in_ratio > ratio[1], np.rint(heights * ratio[1]), widths))
    fh = np.where(in_ratio < ratio[0], np.rint(widths / ratio[0]), heights)
    fw, fh = fw.astype(np.int64), fh.astype(np.int64)
    boxes = np.stack([
        np.where(found, top, (heights - fh) // 2), np.where(found, left, (widths - fw) // 2),
        np.where(found, h, fh), np.where(found, w, fw),
    ], axis=1)
    return boxes, u_flip < 0.5


def eval_box(height: int, width: int, crop_pct: float = EVAL_CROP_PCT) -> tuple[int, int, int, int]:
    """The ImageNet evaluation view (resize the short side to size / crop_pct, central crop of
    size) as a box in the source image: a central square of crop_pct of the short side."""
    side = max(1, round(crop_pct * min(height, width)))
    return (height - side) // 2, (width - side) // 2, side, side


@dataclass(frozen=True)
class PositionCrops:
    """The crop boxes of the output positions of one image (all crops of one source image)."""

    boxes: np.ndarray  # int64 [m, 4]
    flips: np.ndarray  # bool [m]
    group: np.ndarray  # int64 [m]: index of the crop group


def image_crops(plan: CropPlan, uniforms: np.ndarray, height: int, width: int) -> PositionCrops:
    """Every crop of one image for its positions: uniforms [positions, crops_per_position, K],
    in plan order (group by group, copy by copy) within each position."""
    positions = uniforms.shape[0]
    group = np.repeat(np.arange(len(plan.groups)), [g.copies for g in plan.groups])
    boxes, flips = np.empty((positions, len(group), 4), np.int64), np.empty((positions, len(group)), bool)
    for g, spec in enumerate(plan.groups):
        cols = group == g
        u = uniforms[:, cols].reshape(-1, UNIFORMS_PER_CROP)
        b, f = crop_boxes(u, np.full(len(u), height), np.full(len(u), width), spec.scale, spec.ratio)
        boxes[:, cols], flips[:, cols] = b.reshape(positions, -1, 4), f.reshape(positions, -1)
    return PositionCrops(boxes.reshape(-1, 4), flips.reshape(-1), np.tile(group, positions))


# ----------------------------------------------------------------------------- cutting


def resized_crop(image: torch.Tensor, box: Sequence[int], size: int, flip: bool = False) -> torch.Tensor:
    """uint8 [3, size, size] from uint8 [3, H, W]: the box (top, left, h, w), antialiased bilinear."""
    top, left, h, w = (int(v) for v in box)
    part = image[:, top : top + h, left : left + w].unsqueeze(0).float()
    out = F.interpolate(part, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    out = out.round_().clamp_(0, 255).to(torch.uint8)[0]
    return out.flip(-1) if flip else out


def views_of_image(image: torch.Tensor, plan: CropPlan, uniforms: np.ndarray) -> tuple[torch.Tensor, ...]:
    """One image's crops for its positions, per crop group: uint8 [positions * copies, 3, s, s],
    position-major (the collate makes the batch crop-major). For CPU workers."""
    crops = image_crops(plan, uniforms, image.shape[-2], image.shape[-1])
    out = []
    for g, spec in enumerate(plan.groups):
        rows = np.nonzero(crops.group == g)[0]
        out.append(torch.stack([resized_crop(image, crops.boxes[r], spec.size, bool(crops.flips[r])) for r in rows]))
    return tuple(out)


def eval_view(image: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [3, size, size]: the central crop_pct square, resized (the evaluation view)."""
    return resized_crop(image, eval_box(image.shape[-2], image.shape[-1]), size)


def _pack(shapes: Sequence[tuple[int, int]]) -> tuple[list[tuple[int, int]], int, int]:
    """Shelf packing of (h, w) rectangles: (top, left) of each, atlas height and width.
    Tallest first, left to right, a new shelf when the row is full."""
    width = max(max(w for _, w in shapes), math.ceil(math.sqrt(sum(h * w for h, w in shapes) * 1.2)))
    order = sorted(range(len(shapes)), key=lambda i: -shapes[i][0])
    places: list[tuple[int, int]] = [(0, 0)] * len(shapes)
    shelf_top, shelf_height, x = 0, 0, 0
    for i in order:
        h, w = shapes[i]
        if x + w > width:
            shelf_top, shelf_height, x = shelf_top + shelf_height, 0, 0
        places[i] = (shelf_top, x)
        shelf_height, x = max(shelf_height, h), x + w
    return places, shelf_top + shelf_height, width


def cut_crops(
    images: Sequence[torch.Tensor], owners: Sequence[int], boxes: np.ndarray, flips: np.ndarray, size: int
) -> torch.Tensor:
    """uint8 [m, 3, size, size]: crop r is boxes[r] (top, left, h, w) of images[owners[r]],
    resized to size and mirrored where flips[r]; one roi_align over an atlas of the images.

    images: uint8 [3, H_i, W_i] on one device (any sizes). Float32 with autocast off."""
    from torchvision.ops import roi_align

    device = images[0].device
    padded = [(int(im.shape[-2]) + 2, int(im.shape[-1]) + 2) for im in images]
    places, height, width = _pack(padded)
    atlas = torch.empty((3, height, width), dtype=torch.uint8, device=device)  # gaps are never read
    for image, (top, left), (h, w) in zip(images, places, padded):
        # Replicate one pixel around each image: samples half a pixel outside read the edge, not a neighbour.
        atlas[:, top : top + h, left : left + w] = F.pad(image.unsqueeze(0), (1, 1, 1, 1), mode="replicate")[0]
    offsets = np.array([places[o] for o in owners], dtype=np.float64) + 1  # the image's (top, left) in the atlas
    rois = np.stack([
        np.zeros(len(owners)), offsets[:, 1] + boxes[:, 1], offsets[:, 0] + boxes[:, 0],
        offsets[:, 1] + boxes[:, 1] + boxes[:, 3], offsets[:, 0] + boxes[:, 0] + boxes[:, 2],
    ], axis=1)
    with torch.autocast(device.type, enabled=False):
        out = roi_align(atlas.unsqueeze(0).float(), _to(torch.from_numpy(rois).float(), device), (size, size),
                        spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    out = out.round_().clamp_(0, 255).to(torch.uint8)
    return _flip(out, flips)


def cut_same_size(images: torch.Tensor, owners: np.ndarray, boxes: np.ndarray, flips: np.ndarray, size: int) -> torch.Tensor:
    """float32 [m, C, size, size] crops of a batch of equally sized float images (the generated
    'shapes', rendered on the device): one roi_align, no atlas; edges clamp (replicate)."""
    from torchvision.ops import roi_align

    rois = np.stack([owners, boxes[:, 1], boxes[:, 0], boxes[:, 1] + boxes[:, 3], boxes[:, 0] + boxes[:, 2]], axis=1)
    with torch.autocast(images.device.type, enabled=False):
        out = roi_align(images.float(), _to(torch.from_numpy(rois.astype(np.float32)), images.device), (size, size),
                        spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    return _flip(out, flips)


def _flip(crops: torch.Tensor, flips: np.ndarray) -> torch.Tensor:
    if not flips.any():
        return crops
    mask = _to(torch.from_numpy(np.ascontiguousarray(flips)), crops.device).view(-1, 1, 1, 1)
    return torch.where(mask, crops.flip(-1), crops)


def _to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor onto the device without a host sync (pinned, non-blocking on CUDA)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
