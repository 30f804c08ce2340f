"""Test-only: a register neuron planted into a *training* model from a chosen step k on.

Real artifacts need GPU-days, so the emergence tests make them appear: from step k on, right
after each optimizer step, the probe model gets tests/planted_neuron.py's register neuron
(by position: every `PLANT_EVERY`-th patch of every image leaves block `LAYER` with a norm of
about 300). It is planted again after every later step, so training cannot wash it out; the
planting draws no random numbers (its generator is seeded locally), so two runs planted at
the same k follow the same trajectory.

Two ways in, neither reachable from a sweep spec:

* in-process: `plant_from_step(trainer, k)` wraps one Trainer instance's train_step;
* in a sweep's Ray workers: `tests/plant_hook/sitecustomize.py`, active only when the test puts
  that folder on PYTHONPATH *and* sets PLANT_ENV; it patches trainers.loop.Trainer when the
  worker imports it. No module of orchestrator/ or trainers/ knows about either.
"""

from __future__ import annotations

import os

import torch

from planted_neuron import TRIGGER_DIM, plant_register_neuron

PLANT_ENV = "REGISTER_TESTS_PLANT_AT_STEP"  # read by tests/plant_hook/sitecustomize.py only
LAYER, UNIT = 1, 7
PLANT_EVERY = 4  # every 4th patch: a quarter of the output patches become outliers
TRIGGER_BOOST = 10.0
WRITE_BOOST = 4.0


def planted_positions(num_patches: int) -> list[int]:
    return list(range(0, num_patches, PLANT_EVERY))


def plant(trainer) -> None:
    model = trainer.objective.probe_model
    with torch.no_grad():
        plant_register_neuron(
            model, layer=LAYER, unit=UNIT, by="position", positions=planted_positions(trainer.cfg.model.num_patches)
        )
        # In a trained model other units read the trigger channel too and would carry its +-10 into
        # every token; only the planted unit may read it, so that the rest of the tokens stay as trained.
        for index, block in enumerate(model.blocks):
            block.attn.qkv.weight[:, TRIGGER_DIM] = 0.0
            keep = block.mlp.fc1.weight[UNIT, TRIGGER_DIM].clone()
            block.mlp.fc1.weight[:, TRIGGER_DIM] = 0.0
            if index == LAYER:
                block.mlp.fc1.weight[UNIT, TRIGGER_DIM] = keep
        # A trained model's tokens vary in norm from image to image, and so would the planted unit's
        # input after LayerNorm: a 10x stronger trigger dominates every token, so the unit's output,
        # and the norms of the other tokens, hardly vary (a clean high mode about 10x the rest).
        model.pos_embed[..., TRIGGER_DIM] *= TRIGGER_BOOST
        model.blocks[LAYER].mlp.fc2.weight[:, UNIT] *= WRITE_BOOST


def wrap_train_step(train_step, k: int):
    """train_step(self, batch) that plants after the optimizer step of every step from k on.
    Inside train_step `self.step` is the step being taken (0-based); the model "at step s" is
    the one after s steps, so the step that makes it s = k is self.step == k - 1."""

    def planted_train_step(self, batch):
        loss = train_step(self, batch)
        if self.step + 1 >= k:
            plant(self)
        return loss

    return planted_train_step


def plant_from_step(trainer, k: int) -> None:
    """Plant into this trainer from step k on (one instance; the class is left alone)."""
    step = wrap_train_step(type(trainer).train_step, k)
    trainer.train_step = step.__get__(trainer)


def patch_trainer_class(trainer_class) -> None:
    """Used by tests/plant_hook/sitecustomize.py in a sweep's worker processes."""
    k = int(os.environ[PLANT_ENV])
    trainer_class.train_step = wrap_train_step(trainer_class.train_step, k)
