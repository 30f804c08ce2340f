"""What every data source gives the trainer: deterministic batches by step.

A batch for step s depends only on (seed, s), never on how many batches came before in
this process, so a trial restored from a checkpoint at step s sees exactly the batches
it would have seen without the interruption.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Protocol

import torch


@dataclass
class Batch:
    images: torch.Tensor  # float32 [B, 3, H, W], normalised
    labels: torch.Tensor  # int64 [B]
    masks: torch.Tensor | None = None  # int64 [B, H, W]: 0 background, c + 1 object of class c
    captions: list[str] | None = None  # one caption per image, where the data has them (CLIP)
    tokens: torch.Tensor | None = None  # int64 [B, context]: the captions tokenised by the loader (CLIP)
    # With a crop plan (3-Augment, DINO): the loader's crops, one tensor per crop group, crop-major
    # (crop c of position b at row c * B + b); `images` is then views[0].
    views: tuple[torch.Tensor, ...] | None = None

    def to(self, device: torch.device, non_blocking: bool = False) -> "Batch":
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=non_blocking)

        views = None if self.views is None else tuple(v.to(device, non_blocking=non_blocking) for v in self.views)
        return Batch(
            move(self.images), move(self.labels), move(self.masks), self.captions, move(self.tokens), views  # type: ignore[arg-type]
        )

    def __len__(self) -> int:
        return int(self.labels.shape[0])


class DataSource(Protocol):
    num_classes: int
    has_masks: bool
    class_names: list[str]  # of the labelled validation split: zero-shot prompts name them

    def train_batches(self, start_step: int, batch_size: int) -> Iterator[Batch]:
        """This rank's share of the global batch (batch_size output positions) of steps start_step,
        start_step + 1, ... on the source's device: positions [r * n, (r + 1) * n), n = batch_size
        / world_size, of the batch one process would draw. Only those images are read and decoded."""

    def val_batches(self, batch_size: int) -> Iterator[Batch]:
        """One pass over the validation split, always in the same order."""

    def probe_batch(self, size: int) -> Batch:
        """The first `size` validation images: the fixed probe batch."""

    def reference_batches(self, count: int, batch_size: int) -> Iterator[Batch]:
        """Up to `count` labelled training images without augmentation, always the same ones
        (the feature bank of a k-NN evaluation)."""
