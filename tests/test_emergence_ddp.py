"""Data-parallel ranks agree on what rank 0's emergence watch decides: both stop at the same step,
and both write the checkpoint at the confirming probe (gloo on CPU, two processes)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.slow

TESTS = Path(__file__).resolve().parent


def rank_main(rank: int, world_size: int, folder: str) -> None:
    sys.path.insert(0, str(TESTS))
    from planted_training import plant_from_step
    from test_emergence_training import K_PLANT, config
    from trainers.loop import Trainer
    from trainers.tracking import MemoryTracker

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world_size)
    try:
        trainer = Trainer(config(adaptive=True, on_emergence="stop"), torch.device("cpu"), rank=rank, world_size=world_size)
        plant_from_step(trainer, K_PLANT)  # every rank: the ranks' weights stay alike
        tracker, checkpoints = MemoryTracker(), []
        trainer.fit(tracker, lambda step, metrics: checkpoints.append(step))
        out = {"step": trainer.step, "checkpoints": checkpoints, "tags": tracker.tags}
        Path(folder, f"rank{rank}.json").write_text(json.dumps(out))
    finally:
        dist.destroy_process_group()


def test_ranks_stop_together_on_emergence(tmp_path: Path) -> None:
    mp.spawn(rank_main, args=(2, str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["step"] == ranks[1]["step"] == 48  # confirmed at the second flagged regular probe
    assert ranks[0]["checkpoints"] == ranks[1]["checkpoints"] == [48]
    assert ranks[0]["tags"]["stopped_early.step"] == "48" and 21 <= int(ranks[0]["tags"]["emerged_at_step"]) < 23
    assert ranks[1]["tags"] == {}  # rank 0 measures and tags for all
