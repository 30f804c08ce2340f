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


SampleKey = tuple[int, "tuple[int, ...] | None"]  # (dataset index, seeds of its output positions; None: evaluation view)


def rank_positions(global_batch: int, rank: int, world_size: int) -> range:
    """The output positions of a step's global batch that rank `rank` trains: a contiguous 1/world_size."""
    if global_batch % world_size:
        raise ValueError(f"global batch {global_batch} does not split evenly over {world_size} workers")
    share = global_batch // world_size
    return range(rank * share, (rank + 1) * share)


def share_keys(
    order: EpochOrder, seed: int, step: int, global_batch: int, *, repeats: int = 1, rank: int = 0, world_size: int = 1
) -> list[SampleKey]:
    """The samples rank `rank` reads for `step`: one key per distinct image of its share.

    The global batch of a step has `global_batch` output positions; position p shows image
    p // repeats of the step's ceil(global_batch / repeats) images (EpochOrder) and has its
    own augmentation seed, derived from (seed, step) for the whole global batch. A rank reads
    only the images under its positions, each once, with the seeds of its positions there:
    rank r's share is positions [r * n, (r + 1) * n) of the one-process batch, exactly."""
    images = order.indices(step, -(-global_batch // repeats)).tolist()
    seeds = derive_seeds(global_batch, seed, "augment", step)
    keys: list[SampleKey] = []
    for p in rank_positions(global_batch, rank, world_size):
        image = images[p // repeats]
        if keys and p % repeats and keys[-1][0] == image:
            keys[-1] = (image, keys[-1][1] + (seeds[p],))  # type: ignore[operator]
        else:
            keys.append((image, (seeds[p],)))
    return keys
