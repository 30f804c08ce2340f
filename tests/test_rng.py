"""Random streams of a trial (issue 22, items 9 and 10): every rank starts from the same weights,
then draws its own dropout and drop-path masks, a resumed run draws the masks it would have
drawn, and a checkpoint restores on a node with another number of visible GPUs."""

from __future__ import annotations

from pathlib import Path

import torch

from test_objectives import _train_then_next_loss, tiny
from trainers.checkpoint import cuda_rng_state, restore_rng_state, rng_state
from trainers.config import ModelConfig
from trainers.loop import Trainer

CPU = torch.device("cpu")


def with_drop_path() -> object:
    return tiny("supervised", model=ModelConfig(size="micro", img_size=32, patch_size=8, num_registers=4, drop_path_rate=0.5))


def test_ranks_share_initial_weights_but_draw_their_own_drop_path_masks() -> None:
    cfg = with_drop_path()
    rank0, rank1, again = Trainer(cfg, CPU), Trainer(cfg, CPU), Trainer(cfg, CPU)
    rank1.rank = 1  # only the dropout stream reads the rank here (no process group needed)
    for a, b in zip(rank0.model.parameters(), rank1.model.parameters()):
        assert torch.equal(a, b)  # the seed before the networks are built: the same weights, as DDP needs
    batch = next(rank0.data.train_batches(0, cfg.optim.batch_size))
    first = rank0.train_step(batch)
    assert not torch.equal(first, rank1.train_step(batch))  # same weights and images, other masks
    assert torch.equal(first, again.train_step(batch))  # the masks of (rank 0, step 0) again


def test_a_resumed_run_draws_the_drop_path_masks_it_would_have_drawn(tmp_path: Path) -> None:
    uninterrupted, resumed = _train_then_next_loss(with_drop_path(), tmp_path, stop=3)
    assert resumed == uninterrupted


def test_checkpoints_hold_the_current_devices_cuda_state_and_old_lists_still_restore() -> None:
    assert rng_state(CPU)["cuda"] is None  # no per-GPU list, whatever this node has
    state = torch.ByteTensor(16)
    assert cuda_rng_state(state, 3) is state
    old = [torch.ByteTensor([i]) for i in range(2)]  # written on a node with 2 visible GPUs
    assert cuda_rng_state(old, 1) is old[1]
    assert cuda_rng_state(old, 5) is old[0]  # a retry on a node whose device index has no entry
    assert cuda_rng_state([], 0) is None and cuda_rng_state(None, 0) is None
    saved = rng_state(CPU)
    before = torch.rand(3)
    restore_rng_state({**saved, "cuda": old}, CPU)  # an old checkpoint's form loads
    restore_rng_state(saved, CPU)
    assert torch.equal(torch.rand(3), before)
