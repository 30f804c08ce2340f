"""DINO's step makes no host sync (issue 22, item 8) and its loss is the one of the boolean-mask formulas.

iBOT's masked patches used to be picked by boolean indexing (three per step: teacher patches,
student patches, the loss weights): each makes the host wait for the device to learn the output
size. They are now gathered into fixed-size slots (trainers/objectives/dino_losses.py). The
check runs the step under a dispatch mode that records every op whose output shape or value the
host must read from the device; the same mode flags the old formulas, so it can fail.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from test_objectives import tiny
from trainers.loop import Trainer
from trainers.objectives.dino import encode
from trainers.objectives.dino_losses import dino_cross_entropy

CPU = torch.device("cpu")
aten = torch.ops.aten
# Ops whose result the host must read before it can go on: data-dependent sizes and scalars.
SYNCING = {
    aten.nonzero.default, aten.masked_select.default, aten._local_scalar_dense.default, aten.is_nonzero.default,
    aten.item.default, aten.repeat_interleave.Tensor, aten.unique_consecutive.default, aten._unique2.default,
    aten.masked_scatter.default,
}


class HostSyncs(TorchDispatchMode):
    """Records the ops of SYNCING, and indexing with a boolean mask (nonzero inside)."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in SYNCING:
            self.found.append(str(func))
        elif func in (aten.index.Tensor, aten.index_put_.default, aten.index_put.default):
            indices = args[1]
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices):
                self.found.append(f"{func} with a boolean mask")
        return func(*args, **kwargs)


# ------------------------------------------------------------------ the formulas before the change


@torch.no_grad()
def old_sinkhorn(logits: torch.Tensor, temperature: float, iterations: int = 3) -> torch.Tensor:
    logits = logits.float()
    q = torch.exp((logits - logits.max()) / temperature).t()
    prototypes, samples = q.shape
    q /= q.sum()
    for _ in range(iterations):
        q /= q.sum(dim=1, keepdim=True)
        q /= prototypes
        q /= q.sum(dim=0, keepdim=True)
        q /= samples
    q *= samples
    return q.t()


def old_centring(centring: Any, logits: torch.Tensor, temperature: float) -> torch.Tensor:
    logits = logits.float()
    if centring.centre is None:
        return old_sinkhorn(logits, temperature)
    probs = F.softmax((logits - centring.centre.value) / temperature, dim=-1)
    centring.centre.update(logits)  # lightly's Center: momentum on the batch mean
    return probs


def old_ibot(teacher_probs: torch.Tensor, student_logits: torch.Tensor, masks: torch.Tensor, temp: float) -> torch.Tensor:
    ce = -(teacher_probs * F.log_softmax(student_logits.float() / temp, dim=-1)).sum(dim=-1)
    flat = masks.flatten(1)
    weight = (1.0 / flat.sum(dim=1).clamp(min=1)).unsqueeze(1).expand_as(flat)[flat]
    return (ce * weight).sum() / flat.shape[0]


def old_terms(objective: Any, batch: Any, step: int) -> dict[str, torch.Tensor]:
    """The loss terms as dino.py computed them before (boolean indexing), on the same views."""
    d = objective.d
    temp = objective.schedule(step)["teacher_temp"]
    views = objective.views(batch, step)
    prefix = objective.model.num_prefix_tokens
    student, teacher, centring = objective.student, objective.teacher, copy.deepcopy(objective.centring)
    with torch.no_grad():
        t_tokens = encode(teacher["backbone"], views.global_crops)
        t_probs = old_centring(centring["dino"], teacher["dino_head"](t_tokens[:, 0]), temp).chunk(2)
    s_global = encode(student["backbone"], views.global_crops, views.masks, student["tokens"]["mask"])
    logits = list(student["dino_head"](s_global[:, 0]).chunk(2))
    logits += list(student["dino_head"](encode(student["backbone"], views.local_crops)[:, 0]).chunk(d.local_crops))
    flat = views.masks.flatten(1)
    with torch.no_grad():
        t_patch = old_centring(centring["ibot"], teacher.patch_head(t_tokens[:, prefix:][flat]), temp)
    s_patch = student.patch_head(s_global[:, prefix:][flat])
    return {
        "dino_loss": dino_cross_entropy(list(t_probs), logits, d.student_temp),
        "ibot_loss": old_ibot(t_patch, s_patch, views.masks, d.student_temp),
    }


@pytest.mark.parametrize("centering", ["sinkhorn_knopp", "momentum"])
def test_the_loss_terms_equal_the_boolean_mask_formulas(centering: str) -> None:
    cfg = tiny("dino")
    cfg.dino = cfg.dino.model_copy(update={"centering": centering, "ibot_separate_head": centering == "momentum"})
    trainer = Trainer(cfg, CPU)
    objective = trainer.objective
    batches = trainer.data.train_batches(0, cfg.optim.batch_size)
    for step in range(3):  # the centre (momentum) and the networks move between the steps
        batch = next(batches)
        trainer.objective.train()
        expected = old_terms(objective, batch, step)
        trainer.step = step
        trainer.train_step(batch)
        for key, value in expected.items():
            torch.testing.assert_close(objective._terms[key], value.detach(), rtol=1e-6, atol=1e-7)


def test_a_dino_step_makes_no_host_sync() -> None:
    cfg = tiny("dino")
    trainer = Trainer(cfg, CPU)
    objective = trainer.objective
    batch = next(trainer.data.train_batches(0, cfg.optim.batch_size))
    objective.train()
    with HostSyncs() as syncs:
        loss = objective.loss(batch, 0)
        loss.backward()
        objective.before_optimizer_step(0, trainer.optimizer)
        objective.after_optimizer_step(0)
    assert syncs.found == []
    assert "ibot_loss" in objective._terms  # the iBOT term (the old syncs' place) was computed
    # The mode does see syncs: the old formulas make three per step, and .item() is one.
    objective.train()
    with HostSyncs() as old:
        old_terms(objective, batch, 0)
        loss.detach().item()
    assert len([f for f in old.found if "boolean" in f]) == 3 and "aten._local_scalar_dense.default" in old.found
