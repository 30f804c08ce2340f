"""Training objectives, by name: supervised (DeiT-III's family), dino (DINOv2), clip (OpenCLIP).

    build_objective(cfg, data, device) -> Objective

Each objective is one object that builds its networks, computes its loss on a batch and names
its evaluation (base.py); the training loop in trainers/loop.py is the same for all of them.
Modules load on first use, so the supervised path never imports lightly or open_clip.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from trainers.config import TrainConfig

if TYPE_CHECKING:
    import torch

    from trainers.data.base import DataSource
    from trainers.objectives.base import Objective


def build_objective(cfg: TrainConfig, data: "DataSource", device: "torch.device") -> "Objective":
    if cfg.objective == "dino":
        from trainers.objectives.dino import DinoObjective

        return DinoObjective(cfg, data, device)
    if cfg.objective == "clip":
        from trainers.objectives.clip import ClipObjective

        return ClipObjective(cfg, data, device)
    from trainers.objectives.supervised import SupervisedObjective

    return SupervisedObjective(cfg, data, device)
