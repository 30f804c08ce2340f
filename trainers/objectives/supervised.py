"""Supervised classification from [CLS] (DeiT-III's family in the registers paper)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trainers.config import TrainConfig
from trainers.data.base import Batch, DataSource
from trainers.model import build_model
from trainers.objectives.base import Objective
from trainers.probes import names


class SupervisedObjective(Objective):
    name = "supervised"

    def __init__(self, cfg: TrainConfig, data: DataSource, device: torch.device) -> None:
        super().__init__(cfg, data, device)
        self.model = build_model(cfg.model, data.num_classes).to(device)
        # Compilation pays off only for long trials; the spec turns it on explicitly.
        self.forward = torch.compile(self.model) if cfg.compile else self.model

    def trainable(self) -> nn.Module:
        return self.model

    def loss(self, batch: Batch, step: int) -> torch.Tensor:
        return F.cross_entropy(self.forward(batch.images).float(), batch.labels)

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
