"""Supervised classification from [CLS] (DeiT-III's family in the registers paper).

With the `augment` block on, a training batch goes through DeiT-III's recipe: the loader cuts
the repeated RandomResizedCrops from the whole image (trainers/data/crops.py), the device
applies the rest of 3-Augment (trainers/augment.py), then timm's Mixup/CutMix, then timm's
BinaryCrossEntropy on targets binarised after mixing (or a soft-target / smoothed
cross-entropy). Every random draw of step s is seeded from (seed, s), so the batch and the
targets of a step do not depend on what ran before it: resume stays exact.

Data parallel: the batch is this rank's share of the global batch. 3-Augment's draws are made
for the global batch and each rank applies its rows, so every rank's augmented images are
those one process would make. Mixup/CutMix pairs images within the rank's share, as DeiT does
per GPU (timm's Mixup mixes a batch with its flip); its lambda and CutMix box come from (seed,
step), the same on every rank. So with Mixup/CutMix on, the pairs differ from one process's.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trainers.augment import BatchAugment
from trainers.compile import compiled
from trainers.config import TrainConfig
from trainers.data.base import Batch, DataSource
from trainers.data.sampling import derive_seed
from trainers.model import build_model
from trainers.objectives.base import Objective
from trainers.probes import names


def pixel_stats(data: DataSource, name: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The (mean, std) per channel with which the source normalised its images."""
    stats = getattr(data, "pixel_stats", None)
    if stats is not None:  # shapes: measured on its own images
        mean, std = stats
        return mean.to(device), std.to(device)
    from trainers.data.real import CIFAR_STATS, IMAGENET_STATS

    mean_std = CIFAR_STATS.get(name, IMAGENET_STATS)
    return torch.tensor(mean_std[0], device=device), torch.tensor(mean_std[1], device=device)


@contextlib.contextmanager
def seeded_numpy(seed: int) -> Iterator[None]:
    """timm's Mixup draws from numpy's global RNG: seed it for one call, then put the stream back."""
    state = np.random.get_state()
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        np.random.set_state(state)


class SupervisedObjective(Objective):
    name = "supervised"

    def __init__(self, cfg: TrainConfig, data: DataSource, device: torch.device) -> None:
        super().__init__(cfg, data, device)
        self.model = build_model(cfg.model, data.num_classes).to(device)
        # Compilation pays off only for long trials; the spec turns it on explicitly.
        self.forward = compiled(self.model, cfg.compile_backend) if cfg.compile else self.model
        a = cfg.augment
        self.augment = None
        if a.three_augment:
            mean, std = pixel_stats(data, cfg.data.name, device)
            self.augment = BatchAugment(
                seed=cfg.seed, mean=mean, std=std, jitter=a.color_jitter, global_batch=cfg.optim.batch_size
            )
        self.mixup = None
        if a.mixing:
            from timm.data import Mixup

            # Mixup smooths the labels itself; the loss then gets soft targets and smooths no more.
            self.mixup = Mixup(
                mixup_alpha=a.mixup, cutmix_alpha=a.cutmix, label_smoothing=a.label_smoothing,
                num_classes=data.num_classes,
            )
        self.criterion = self._criterion()

    def _criterion(self) -> nn.Module:
        from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

        a = self.cfg.augment
        smoothing = 0.0 if self.mixup is not None else a.label_smoothing
        if a.loss == "bce":
            return BinaryCrossEntropy(smoothing=smoothing, target_threshold=a.bce_target_threshold)
        if self.mixup is not None:
            return SoftTargetCrossEntropy()
        if smoothing > 0:
            return LabelSmoothingCrossEntropy(smoothing=smoothing)
        return nn.CrossEntropyLoss()

    def trainable(self) -> nn.Module:
        return self.model

    def inputs(self, batch: Batch, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's training images and targets of `step`: augmented and mixed when the recipe says so."""
        images, targets = batch.images, batch.labels
        if self.augment is not None:
            images = self.augment(images, step, self.share)
        if self.mixup is not None:
            # fp32 with autocast off, whatever the trainer's precision (the mixing writes into the batch).
            with seeded_numpy(derive_seed(self.cfg.seed, "mixup", step)), torch.autocast(images.device.type, enabled=False):
                images, targets = self.mixup(images.float(), targets)
        return images, targets

    def loss(self, batch: Batch, step: int) -> torch.Tensor:
        # The loss is a mean over the rank's share; DDP's gradient average makes it the global batch's mean.
        images, targets = self.inputs(batch, step)
        return self.criterion(self.forward(images).float(), targets)

    def evaluate(self, batch_size: int) -> dict[str, float]:
        self.model.eval()
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device)
        count = 0
        for batch in self.data.val_batches(batch_size):
            logits = self.forward(batch.images).float()
            loss_sum += F.cross_entropy(logits, batch.labels, reduction="sum")
            correct += (logits.argmax(-1) == batch.labels).sum()
            count += len(batch)
        self.model.train()
        return {names.VAL_LOSS: float(loss_sum) / count, names.VAL_TOP1: float(correct) / count}
