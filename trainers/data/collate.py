"""What a loader worker hands over for one sample, and how a rank's share becomes one batch.

A sample is read by its key (sampling.SampleKey): a dataset index and the seeds of its output
positions in this rank's share (several with repeated augmentation), or None for the
evaluation view. Per sample a worker returns either

- `Views`: the crops already cut (decoded in the worker, crops.views_of_image), or
- `Encoded`: the JPEG bytes (or, for an image the GPU decoder cannot take, the image decoded
  in the worker) and the crop draws, for decoding and cutting on the device (`EncodedBatch`).

`collate` joins them into per-group uint8 crops in crop-major order (crop c of position b at
row c * positions + b, DINO's layout) and repeats each target once per position. Captions are
tokenised here, i.e. in the loader workers (`CaptionTokens`), not on the training thread.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from .crops import UNIFORMS_PER_CROP, CropPlan, crop_boxes, cut_crops, draw_uniforms, eval_box

Target = Any  # int label, or caption string


def uniforms_for(plan: CropPlan, seeds: Sequence[int]) -> np.ndarray:
    """float64 [positions, crops_per_position, K]: each position's draws from its own seed."""
    return np.stack([draw_uniforms(s, plan.crops_per_position) for s in seeds])


def crop_major(crops: torch.Tensor, copies: int) -> torch.Tensor:
    """[positions * copies, ...] position-major -> [copies * positions, ...] crop-major."""
    if copies == 1:
        return crops
    return crops.view(-1, copies, *crops.shape[1:]).transpose(0, 1).reshape(crops.shape)


@dataclass
class Views:
    crops: tuple[torch.Tensor, ...]  # per crop group: uint8 [positions * copies, 3, s, s], position-major
    target: Target
    positions: int


@dataclass
class Encoded:
    image: torch.Tensor  # 1-D uint8 JPEG bytes (decoded on the device), or uint8 [3, H, W] decoded already
    uniforms: np.ndarray | None  # [positions, crops, K]; None: the evaluation view
    target: Target
    positions: int
    name: str  # shard and member, for warnings about an undecodable image


@dataclass
class EncodedBatch:
    """A rank's share before decoding: decoded and cut on the trainer's device."""

    items: list[Encoded]
    plan: CropPlan | None
    eval_size: int

    def pin_memory(self) -> "EncodedBatch":
        return self  # the decoder copies the bytes itself

    def decode(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """Per crop group, uint8 [copies * positions, 3, s, s] on `device`, crop-major."""
        from .decode import decode_on_device

        encoded = [i for i, item in enumerate(self.items) if item.image.ndim == 1]
        images: list[torch.Tensor] = [item.image for item in self.items]
        if encoded:
            decoded = decode_on_device([images[i] for i in encoded], device, [self.items[i].name for i in encoded])
            for i, image in zip(encoded, decoded):
                images[i] = image
        images = [im.to(device, non_blocking=True) for im in images]
        heights = np.array([im.shape[-2] for im in images])
        widths = np.array([im.shape[-1] for im in images])
        if self.plan is None or self.items[0].uniforms is None:
            boxes = np.array([eval_box(h, w) for h, w in zip(heights, widths)], dtype=np.int64)
            return (cut_crops(images, list(range(len(images))), boxes, np.zeros(len(images), bool), self.eval_size),)
        owners = np.repeat(np.arange(len(self.items)), [item.positions for item in self.items])
        uniforms = np.concatenate([item.uniforms for item in self.items])  # type: ignore[misc]
        out, column = [], 0
        for group in self.plan.groups:
            # Crop-major rows: copy c of every position, then copy c + 1.
            u = uniforms[:, column : column + group.copies].transpose(1, 0, 2).reshape(-1, UNIFORMS_PER_CROP)
            who = np.tile(owners, group.copies)
            boxes, flips = crop_boxes(u, heights[who], widths[who], group.scale, group.ratio)
            out.append(cut_crops(images, who.tolist(), boxes, flips, group.size))
            column += group.copies
        return tuple(out)


class CaptionTokens:
    """open_clip's tokenizer for captions, made once per process (workers make their own)."""

    def __init__(self, context_length: int) -> None:
        self.context_length = context_length
        self._tokenizer: Any = None

    def __call__(self, captions: list[str]) -> torch.Tensor:
        if self._tokenizer is None:
            from open_clip.tokenizer import SimpleTokenizer

            self._tokenizer = SimpleTokenizer(context_length=self.context_length)
        return self._tokenizer(captions)

    def __getstate__(self) -> dict[str, Any]:
        return {"context_length": self.context_length, "_tokenizer": None}


@dataclass
class Collated:
    images: torch.Tensor | tuple[torch.Tensor, ...] | EncodedBatch  # uint8; a tuple: crop groups
    targets: torch.Tensor | list[str]
    tokens: torch.Tensor | None = None

    def pin_memory(self) -> "Collated":
        pin = (lambda t: t.pin_memory()) if torch.cuda.is_available() else (lambda t: t)
        images: Any = self.images
        if isinstance(images, torch.Tensor):
            images = pin(images)
        elif isinstance(images, tuple):
            images = tuple(pin(t) for t in images)
        return Collated(images, self.targets, None if self.tokens is None else pin(self.tokens))


class Collate:
    """The loader's collate_fn: samples of one dataset (all Views, all Encoded, or (image, target))."""

    def __init__(self, plan: CropPlan | None = None, eval_size: int = 0, tokens: CaptionTokens | None = None) -> None:
        self.plan, self.eval_size, self.tokens = plan, eval_size, tokens

    def _targets(self, targets: list[Target]) -> tuple[torch.Tensor | list[str], torch.Tensor | None]:
        if targets and isinstance(targets[0], str):
            return list(targets), (self.tokens(list(targets)) if self.tokens is not None else None)
        return torch.tensor(targets, dtype=torch.int64), None

    def __call__(self, samples: list[Any]) -> Collated:
        first = samples[0]
        if isinstance(first, Encoded):
            targets = [s.target for s in samples for _ in range(s.positions)]
            return Collated(EncodedBatch(samples, self.plan, self.eval_size), *self._targets(targets))
        if isinstance(first, Views):
            targets = [s.target for s in samples for _ in range(s.positions)]
            groups = tuple(
                crop_major(torch.cat([s.crops[g] for s in samples]), first.crops[g].shape[0] // first.positions)
                for g in range(len(first.crops))
            )
            return Collated(groups, *self._targets(targets))
        images = torch.stack([s[0] for s in samples])
        return Collated(images, *self._targets([s[1] for s in samples]))
