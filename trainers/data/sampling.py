"""Step-addressed sample order shared by every data source.

The sample at global position k = step * batch_size + j belongs to epoch k // n and is
entry k % n of that epoch's permutation, and each permutation is seeded from
(seed, epoch). So the batch for a step is a pure function of (seed, step): resuming at
step s needs no replay of steps 0..s-1.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch


def derive_seed(*parts: int | str) -> int:
    """A well-mixed 63-bit seed from integers and string tags (SeedSequence hashing)."""
    entropy = [zlib.crc32(p.encode()) if isinstance(p, str) else int(p) for p in parts]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> np.uint64(1))


def derive_seeds(count: int, *parts: int | str) -> list[int]:
    """`count` independent 63-bit seeds from one (parts) key, e.g. one per sample of a batch."""
    entropy = [zlib.crc32(p.encode()) if isinstance(p, str) else int(p) for p in parts]
    states = np.random.SeedSequence(entropy).generate_state(count, np.uint64) >> np.uint64(1)
    return [int(s) for s in states]


class EpochOrder:
    """Dataset indices for each training step: a fresh permutation of range(n) per epoch."""

    def __init__(self, n: int, seed: int) -> None:
        if n <= 0:
            raise ValueError(f"cannot sample from an empty split (n={n})")
        self.n = n
        self.seed = seed
        self._perms: dict[int, torch.Tensor] = {}

    def permutation(self, epoch: int) -> torch.Tensor:
        perm = self._perms.get(epoch)
        if perm is None:
            gen = torch.Generator().manual_seed(derive_seed(self.seed, "epoch", epoch))
            perm = torch.randperm(self.n, generator=gen)
            # A batch touches at most a few epochs, and steps only move forward: keep the latest two.
            if len(self._perms) >= 2:
                self._perms.pop(min(self._perms))
            self._perms[epoch] = perm
        return perm

    def indices(self, step: int, batch_size: int) -> torch.Tensor:
        """int64 CPU tensor [batch_size] of dataset indices for this step."""
        positions = step * batch_size + torch.arange(batch_size)
        epochs, offsets = positions // self.n, positions % self.n
        out = torch.empty(batch_size, dtype=torch.int64)
        for epoch in torch.unique(epochs).tolist():
            sel = epochs == epoch
            out[sel] = self.permutation(int(epoch))[offsets[sel]]
        return out
