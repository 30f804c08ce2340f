"""train.grad_checkpointing works for every objective (issue 22, item 7): the activations a step
keeps for its backward pass, counted with torch.autograd.graph.saved_tensors_hooks, at most halve.

DINO used to run `vit.blocks(x)` itself, so the flag changed nothing there; every objective now
runs the blocks through trainers/model.py's run_blocks (or timm's forward, which does the same).
Counted: the distinct storages saved for backward that are not parameters (weights saved by a
matmul cost no memory of their own); non-reentrant checkpointing saves each block's input
through the same hooks, so what checkpointing keeps is counted too.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from test_objectives import tiny
from trainers.config import ModelConfig
from trainers.loop import Trainer

CPU = torch.device("cpu")


def saved_activation_bytes(trainer: Trainer) -> int:
    """Bytes of distinct non-parameter storages saved for backward by one training step's loss."""
    objective = trainer.objective
    params = {p.untyped_storage().data_ptr() for p in objective.trainable().parameters()}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> Any:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    batch = next(trainer.data.train_batches(0, trainer.cfg.optim.batch_size))
    objective.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = objective.loss(batch, 0)
    loss.backward()  # the checkpointed step still trains
    return sum(storages.values())


def config(objective: str, checkpointing: bool) -> Any:
    # 8 blocks of a ViT with 64 patches: the blocks' activations dominate, as in a real ViT.
    model = ModelConfig(size=None, embed_dim=64, depth=8, num_heads=2, img_size=64, patch_size=8, num_registers=4)
    return tiny(objective, model=model, grad_checkpointing=checkpointing)


@pytest.mark.parametrize("objective", ["supervised", "dino", "clip"])
def test_checkpointing_keeps_at_most_half_the_activations(objective: str) -> None:
    plain = saved_activation_bytes(Trainer(config(objective, False), CPU))
    checkpointed_trainer = Trainer(config(objective, True), CPU)
    assert checkpointed_trainer.model.grad_checkpointing
    checkpointed = saved_activation_bytes(checkpointed_trainer)
    print(f"{objective}: {plain} -> {checkpointed} bytes saved for backward ({checkpointed / plain:.2f})")
    assert checkpointed <= plain / 2, (objective, plain, checkpointed)


def test_checkpointing_changes_no_dino_or_clip_gradient() -> None:
    for objective in ("dino", "clip"):
        plain, checkpointed = Trainer(config(objective, False), CPU), Trainer(config(objective, True), CPU)
        batch = next(plain.data.train_batches(0, plain.cfg.optim.batch_size))
        for _ in range(2):  # recomputing activations in the backward pass gives the same step
            torch.testing.assert_close(plain.train_step(batch), checkpointed.train_step(batch), rtol=1e-5, atol=1e-6)
        for a, b in zip(plain.objective.parameters(), checkpointed.objective.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
