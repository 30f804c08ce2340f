"""Weights of the probe model at past steps, so that a suspicion can look back in time.

When a regular probe first flags outliers, the onset lies somewhere in the window since the
last clean probe, and the model as it was at those steps is gone. So while no suspicion is
open the trainer copies the probe model's weights every `every / 8` steps into host memory
(at most 8 copies: the window between two regular probes), drops them at every clean probe,
and measures them when a probe flags. Only the network the probes read is copied (the
classifier ViT, DINO's teacher, CLIP's image tower), never optimizer state: a copy is one
model's parameters and buffers, in their training dtype.

The copies are measured in a separate scratch model built once, so the live model, its
compiled graph and its optimizer are never touched. Copying reads the weights and draws no
random numbers: the training trajectory is the same with and without snapshots.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator

import torch

from trainers.probes.capture import unwrap


class WeightSnapshots:
    def __init__(self) -> None:
        self._by_step: dict[int, dict[str, torch.Tensor]] = {}
        self._spare: list[dict[str, torch.Tensor]] = []  # host buffers of dropped copies, reused

    def __len__(self) -> int:
        return len(self._by_step)

    @property
    def steps(self) -> list[int]:
        return sorted(self._by_step)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for state in self._by_step.values() for t in state.values())

    @torch.no_grad()
    def take(self, step: int, model: torch.nn.Module) -> None:
        state = unwrap(model).state_dict()
        if self._spare:  # the window rolled on: refill the buffers of a dropped copy, no new allocation
            buffers = self._spare.pop()
            for name, tensor in state.items():
                buffers[name].copy_(tensor.detach())
        else:
            buffers = {name: tensor.detach().to("cpu", copy=True) for name, tensor in state.items()}
        self._by_step[step] = buffers

    def drop_through(self, step: int) -> None:
        """Forget every copy at or before `step` (a clean probe there: nothing before it is needed)."""
        for old in [s for s in self._by_step if s <= step]:
            self._spare.append(self._by_step.pop(old))

    def clear(self) -> None:
        """Free everything (the event is confirmed: no window will be looked at again)."""
        self._by_step.clear()
        self._spare.clear()

    def measured(
        self, model: torch.nn.Module, after: int, before: int, measure: Callable[[torch.nn.Module], tuple[float, float]]
    ) -> Iterator[tuple[int, tuple[float, float]]]:
        """measure(scratch model with the weights of step s) for each kept step after < s < before, in step order."""
        wanted = [step for step in self.steps if after < step < before]
        if not wanted:
            return
        # Built per window and freed after it: suspicions are rare, a resident copy would not be.
        scratch = copy.deepcopy(unwrap(model))
        for step in wanted:
            scratch.load_state_dict(self._by_step[step])
            yield step, measure(scratch)
        del scratch
