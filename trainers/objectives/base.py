"""What every training objective gives the loop: its networks, a loss on a batch, its evaluation.

The loop (trainers/loop.py) stays one loop whatever the objective: it asks the objective for
parameter groups, calls `loss(batch, step)`, steps the optimizer between the two hooks, and
calls `evaluate` and the probes on `probe_model`. Everything an objective keeps besides the
backbone (teacher, heads, centres, text tower, temperature) goes through `state_dict`, as
tensors, numbers, strings, lists and dicts only, so checkpoints load with weights_only=True.

Data parallel: `forward` is the one call of a step through which every trained parameter is
used (the classifier, DINO's student networks, CLIP's two towers); the loop replaces it with
PyTorch DDP's wrapper of `trainable()`, whose backward averages the gradients over the ranks.
Statistics over the batch (DINO's centring, CLIP's negatives) are the objective's to gather.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.distributed as dist
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from trainers.config import TrainConfig
from trainers.data.base import Batch, DataSource

# Token parameters that get no weight decay, besides every 1-d parameter (norms, biases).
NO_DECAY_NAMES = ("pos_embed", "cls_token", "reg_token", "positional_embedding", "token_embedding", "logit_scale", "mask")
DECAY_KEY = "apply_weight_decay"  # marks the param groups whose weight decay a schedule may change


def decay_groups(named: Iterable[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay for matrices, none for norms, biases, embeddings of tokens and positions."""
    decay, no_decay = [], []
    for name, param in named:
        if not param.requires_grad:
            continue  # e.g. the DINO head's frozen weight-norm gain
        leaf = name.rsplit(".", 1)[-1]
        skip = param.ndim <= 1 or leaf in NO_DECAY_NAMES or name in NO_DECAY_NAMES
        (no_decay if skip else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay, DECAY_KEY: True},
        {"params": no_decay, "weight_decay": 0.0, DECAY_KEY: False},
    ]


class Objective(ABC):
    """One training objective. Subclasses build their networks in __init__."""

    name: str
    model: VisionTransformer  # the trained ViT: classifier, DINO student or CLIP image tower
    # Data-parallel training: (this rank, ranks). Every objective is handed its rank's share of the
    # global batch (the data source reads only that); batch-level draws (3-Augment, DINO's jitter
    # and masks) are made for the global batch and the objective applies its share's rows.
    share: tuple[int, int] = (0, 1)
    # The step's forward through the trained modules: trainable() itself, or its DDP wrapper (the loop's).
    forward: Callable[..., Any]
    # Parameters that may get no gradient in a step (DDP's find_unused_parameters).
    unused_parameters: bool = False

    def __init__(self, cfg: TrainConfig, data: DataSource, device: torch.device) -> None:
        self.cfg, self.data, self.device = cfg, data, device

    # ---------------------------------------------------------------- networks

    @abstractmethod
    def trainable(self) -> nn.Module:
        """Every module the optimizer trains (the model included)."""

    @property
    def probe_model(self) -> VisionTransformer:
        """The network the artifact probes measure (DINO: the teacher, the network DINOv2 releases)."""
        return self.model

    def param_groups(self) -> list[dict[str, Any]]:
        return decay_groups(self.trainable().named_parameters(), self.cfg.optim.weight_decay)

    def parameters(self) -> Iterator[nn.Parameter]:
        return (p for p in self.trainable().parameters() if p.requires_grad)

    def train(self) -> None:
        self.trainable().train()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the blocks' activations in the backward pass (train.grad_checkpointing)."""
        self.model.set_grad_checkpointing(enable)

    # ---------------------------------------------------------------- one step

    @abstractmethod
    def loss(self, batch: Batch, step: int) -> torch.Tensor:
        """The loss of `step` on `batch` (a device scalar; the caller runs it under autocast)."""

    def before_optimizer_step(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        """After backward, before the optimizer: schedules that act on gradients or groups."""

    def after_optimizer_step(self, step: int) -> None:
        """After the optimizer: EMA teachers, clamps."""

    def log_values(self) -> dict[str, float]:
        """Loss terms and schedule values of the last step, read at log points (a host sync).
        Every rank calls it at the same steps, so it may run collectives."""
        return {}

    def mean_over_ranks(self, values: list[torch.Tensor]) -> list[float]:
        """Device scalars averaged over the ranks (one all-reduce), as floats."""
        if not values:
            return []
        stacked = torch.stack([v.detach().float() for v in values])
        if self.share[1] > 1:
            dist.all_reduce(stacked)
            stacked /= self.share[1]
        return stacked.tolist()

    # ---------------------------------------------------------------- measuring

    @abstractmethod
    def evaluate(self, batch_size: int) -> dict[str, float]:
        """Validation metrics by name (names.py); the caller sets no_grad and autocast."""

    # ---------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict[str, Any]:
        """What the checkpoint keeps besides the model: tensors, numbers, strings, lists, dicts."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
