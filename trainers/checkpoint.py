"""Checkpoint files that load without unpickling code: RNG states as tensors and plain values.

A checkpoint comes back from the sweep's storage, often a shared bucket, and torch.load with
weights_only=False would run whatever a changed file asks for on every worker that restores
it. So the trainer writes only tensors, numbers, strings and containers of them, and loads
with weights_only=True; a file holding anything else is refused with CheckpointError.
"""

from __future__ import annotations

import pickle
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch


class CheckpointError(ValueError):
    """A checkpoint file that is refused; the message names the file."""


def rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """Python's, numpy's, torch's and the CUDA device's RNG states in a form weights_only=True loads."""
    version, internal, gauss_next = random.getstate()
    bit_generator, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    assert bit_generator == "MT19937", bit_generator  # the legacy global generator always is
    return {
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss_next": gauss_next},
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
        # The current device's state only: a retry may land on a node with another number of
        # visible GPUs, where a per-GPU list would not fit (each rank uses one device).
        "cuda": torch.cuda.get_rng_state(device) if device is not None and device.type == "cuda" else None,
    }


def restore_rng_state(rng: dict[str, Any], device: torch.device | None = None) -> None:
    # .cpu(): torch.load's map_location moves every tensor, and the RNG setters take CPU bytes.
    python = rng["python"]
    random.setstate((python["version"], tuple(python["state"].tolist()), python["gauss_next"]))
    numpy = rng["numpy"]
    keys = numpy["keys"].cpu().numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, numpy["pos"], numpy["has_gauss"], numpy["cached_gaussian"]))
    torch.set_rng_state(rng["torch"].cpu())
    if device is not None and device.type == "cuda":
        cuda = cuda_rng_state(rng.get("cuda"), device.index or 0)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda.cpu(), device)


def cuda_rng_state(saved: Any, index: int) -> torch.Tensor | None:
    """The CUDA state to restore on device `index`: checkpoints of this version hold one state
    (None when written without CUDA); older ones a list with one state per visible GPU, of which
    that device's is taken, or the first if the list is shorter (another node's GPU count)."""
    if isinstance(saved, torch.Tensor):
        return saved
    if not saved:
        return None
    return saved[index] if index < len(saved) else saved[0]


def load_checkpoint(path: Path, map_location: torch.device | str | None = None) -> dict[str, Any]:
    """torch.load with weights_only=True; CheckpointError naming the file if it holds a pickled object."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL ([\w.]+)", str(error))
        what = f"a pickled object ({found.group(1)})" if found else "a pickled object"
        raise CheckpointError(
            f"checkpoint {path} refused: it holds {what}, and only tensors, numbers, strings and their "
            "containers are loaded (torch.load weights_only=True); it was not written by this version "
            "of the trainer, or was changed since"
        ) from None
