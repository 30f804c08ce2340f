"""Each rank reads only its share, and what a one-process trial equivalently sees.

The equivalence that holds (docs/architecture.md, "Data and the input pipeline"): rank r of n
gets rows [r * B/n, (r + 1) * B/n) of the batch one process draws for the step, crops and
augmentations included (bit for bit where images are decoded and cut on the CPU; with
data.decode gpu up to the float rounding of the batched cut), so with DDP the ranks follow the
one-process loss trajectory. What differs by design: Mixup/CutMix pairs images within a rank's
share (as DeiT does per GPU), so with mixing on the pairs are not one process's.
"""

from __future__ import annotations

import warnings
from itertools import islice
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

from test_data import write_image_tree
from test_image_text_data import _shards, _val_folder
from test_shards import write_jpeg_tree
from trainers.config import DataConfig, TrainConfig
from trainers.data import build_data, build_training_data
from trainers.data.crops import CropGroup, CropPlan
from trainers.data.shards import main as shards_main

CPU = torch.device("cpu")
DINO_PLAN = CropPlan((CropGroup(2, 16, (0.32, 1.0)), CropGroup(3, 8, (0.05, 0.32))))
REPEAT_PLAN = CropPlan.single(16, repeats=3)


def sharded(tmp_path: Path) -> str:
    write_jpeg_tree(tmp_path / "tree", per_class=6)
    shards_main(["write", str(tmp_path / "tree"), str(tmp_path / "shards"), "--shard-size", "5"])
    return str(tmp_path / "shards")


def rows_of(batch: Any, rank: int, ranks: int, copies: list[int]) -> list[torch.Tensor]:
    """Rank's rows of each crop-major view of a one-process batch."""
    n = len(batch) // ranks
    total = len(batch)
    out = []
    for view, c in zip(batch.views, copies):
        rows = [k * total + rank * n + j for k in range(c) for j in range(n)]
        out.append(view[rows])
    return out


def assert_share_is_rows(cfg: DataConfig, plan: CropPlan | None, step: int = 2, batch: int = 12, **extra: Any) -> None:
    whole = next(build_data(cfg, img_size=16, seed=4, device=CPU, crops=plan, **extra).train_batches(step, batch))
    copies = [g.copies for g in plan.groups] if plan else [1]
    for rank in (0, 1):
        share = next(build_data(cfg, img_size=16, seed=4, device=CPU, crops=plan, rank=rank, world_size=2, **extra)
                     .train_batches(step, batch))
        assert torch.equal(share.labels, whole.labels[6 * rank : 6 * (rank + 1)])
        if plan is None:
            assert torch.equal(share.images, whole.images[6 * rank : 6 * (rank + 1)])
            continue
        for got, expected in zip(share.views, rows_of(whole, rank, 2, copies)):
            assert torch.equal(got, expected)
        assert share.images is share.views[0]


@pytest.mark.parametrize("plan", [None, REPEAT_PLAN, DINO_PLAN], ids=["plain", "repeats", "dino"])
def test_shapes_share_is_the_one_process_rows(plan: CropPlan | None) -> None:
    assert_share_is_rows(DataConfig(name="shapes", num_classes=3, train_size=40, val_size=8), plan)


@pytest.mark.parametrize("plan", [REPEAT_PLAN, DINO_PLAN], ids=["repeats", "dino"])
def test_imagefolder_share_is_the_one_process_rows(tmp_path: Path, plan: CropPlan) -> None:
    write_image_tree(tmp_path, per_class=5)
    assert_share_is_rows(DataConfig(name="imagefolder", root=str(tmp_path), num_workers=0), plan)


@pytest.mark.parametrize("plan", [None, REPEAT_PLAN, DINO_PLAN], ids=["plain", "repeats", "dino"])
def test_shards_share_is_the_one_process_rows(tmp_path: Path, plan: CropPlan | None) -> None:
    assert_share_is_rows(DataConfig(name="shards", root=sharded(tmp_path), num_workers=0), plan)


def test_image_text_share_is_the_one_process_rows_with_tokens_from_the_workers(tmp_path: Path) -> None:
    from open_clip.tokenizer import SimpleTokenizer

    _shards(tmp_path / "shards", count=3, per_shard=5)
    cfg = DataConfig(name="webdataset", root=str(tmp_path / "shards"), val_root=str(_val_folder(tmp_path)), num_workers=0)
    assert_share_is_rows(cfg, DINO_PLAN, context_length=20)
    # CLIP: captions are tokenised in the loader's worker processes, not on the training thread.
    source = build_data(cfg.model_copy(update={"num_workers": 2}), img_size=16, seed=0, device=CPU, context_length=20)
    batch = next(source.train_batches(0, 6))
    assert torch.equal(batch.tokens, SimpleTokenizer(context_length=20)(batch.captions))
    assert source.collate.tokens._tokenizer is None  # the main process never built a tokenizer


def test_shapes_captions_come_with_their_tokens() -> None:
    from open_clip.tokenizer import SimpleTokenizer

    cfg = DataConfig(name="shapes", num_classes=3, train_size=40, val_size=8)
    source = build_data(cfg, img_size=16, seed=0, device=CPU, context_length=20, rank=1, world_size=2)
    for batch in islice(source.train_batches(0, 12), 2):
        assert len(batch) == 6 and torch.equal(batch.tokens, SimpleTokenizer(context_length=20)(batch.captions))


def test_image_text_shards_keep_a_bounded_number_of_files_open(tmp_path: Path) -> None:
    from trainers.data.image_text import ShardPairs
    from trainers.data.real import WHOLE_IMAGE

    _shards(tmp_path / "shards", count=5, per_shard=2)
    pairs = ShardPairs(sorted((tmp_path / "shards").glob("*.tar")), WHOLE_IMAGE)
    pairs.files.limit = 2
    captions = [pairs[i][1] for i in range(len(pairs))]
    assert len(pairs.files) == 2 and captions == [pairs[i][1] for i in range(len(pairs))]


def count_decodes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A list that grows by one for every image decoded, in the worker (CPU) or on the device."""
    import trainers.data.decode as decode
    import trainers.data.shards as shards

    calls: list[int] = []
    real_cpu, real_device = shards.decode_cpu, decode.decode_on_device

    def on_cpu(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real_cpu(*args, **kwargs)

    def on_device(data: Any, *args: Any, **kwargs: Any) -> Any:
        calls.extend([1] * len(data))
        return real_device(data, *args, **kwargs)

    monkeypatch.setattr(shards, "decode_cpu", on_cpu)
    monkeypatch.setattr(decode, "decode_on_device", on_device)
    return calls


@pytest.mark.parametrize("decode", ["cpu", "gpu"])
def test_each_rank_decodes_its_share_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, decode: str) -> None:
    """Global batch 12, 2 ranks, repeats 3: each rank trains 6 positions, i.e. 2 distinct images,
    and decodes those 2, once each (before: all ceil(12 / 3) = 4 of the step, on every rank)."""
    calls = count_decodes(monkeypatch)
    cfg = DataConfig(name="shards", root=sharded(tmp_path), num_workers=0, decode=decode)
    per_step = []
    for rank in (0, 1):
        batches = build_data(cfg, img_size=16, seed=4, device=CPU, crops=REPEAT_PLAN, rank=rank, world_size=2).train_batches(0, 12)
        for batch in islice(batches, 3):
            del calls[:]
            batch = next(batches)
            per_step.append(len(calls))
            assert len(batch) == 6
    assert per_step == [12 // 2 // 3] * 6


# ------------------------------------------------------------------ the Trainer, 2 gloo ranks against 1 process


def trainer_config(root: str, mixup: float = 0.0) -> TrainConfig:
    return TrainConfig.model_validate({
        "model": {"size": "micro", "img_size": 16, "patch_size": 4, "num_registers": 2},
        "data": {"name": "shards", "root": root, "num_workers": 0},
        "optim": {"batch_size": 12, "warmup_steps": 1, "lr": 1e-3},
        "augment": {"three_augment": True, "repeats": 3, "mixup": mixup, "loss": "bce"},
        "probe": {"every": 0, "at_end": False},  # probes run on rank 0 only; this test compares the ranks' inputs and losses
        "steps": 3, "log_every": 1, "eval_every": 3, "seed": 2,
    })


class Losses:
    def __init__(self) -> None:
        self.by_step: dict[int, float] = {}

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if "train/loss" in metrics:
            self.by_step[step] = metrics["train/loss"]

    def log_files(self, files: Any, artifact_dir: str) -> None:
        pass


def inputs_and_losses(trainer: Any, steps: int = 3) -> tuple[list[torch.Tensor], dict[int, float]]:
    batches = trainer.data.train_batches(0, trainer.cfg.optim.batch_size)
    inputs = [trainer.objective.inputs(next(batches), step)[0] for step in range(steps)]
    losses = Losses()
    trainer.fit(losses)
    return inputs, losses.by_step


def rank_main(rank: int, root: str, store: str, out: str) -> None:
    import torch.distributed as dist

    from trainers.loop import Trainer

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = Trainer(trainer_config(root), CPU, rank=rank, world_size=2)
            inputs, losses = inputs_and_losses(trainer)
        torch.save({"inputs": inputs, "losses": losses}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes, each importing torch and timm: minutes on 2 shared cores
def test_two_gloo_ranks_see_the_one_process_batches_and_follow_its_losses(tmp_path: Path) -> None:
    from trainers.loop import Trainer

    root = sharded(tmp_path)
    mp.start_processes(rank_main, args=(root, str(tmp_path / "store"), str(tmp_path)), nprocs=2, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    inputs, losses = inputs_and_losses(Trainer(trainer_config(root), CPU))
    for step in range(3):  # identical augmented images, row for row
        assert torch.equal(torch.cat([ranks[0]["inputs"][step], ranks[1]["inputs"][step]]), inputs[step])
    assert sorted(ranks[0]["losses"]) == sorted(losses) == [1, 2, 3]
    for step, loss in losses.items():  # rank 0 logs the global batch's mean loss, as one process does
        assert ranks[0]["losses"][step] == pytest.approx(loss, rel=1e-5, abs=1e-6)


def test_with_mixup_a_rank_pairs_within_its_share_with_the_steps_lambda(tmp_path: Path) -> None:
    """A rank mixes its share as timm's Mixup mixes a batch (with its flip: partners in the same
    share, as DeiT per GPU), with the draws of (seed, step): the same lambda on every rank."""
    from timm.data import Mixup

    from trainers.data.sampling import derive_seed
    from trainers.loop import Trainer
    from trainers.objectives.supervised import seeded_numpy

    cfg = trainer_config(sharded(tmp_path), mixup=0.8)
    objective = Trainer(cfg, CPU).objective
    for rank in (0, 1):
        batch = next(build_training_data(cfg, CPU, rank=rank, world_size=2).train_batches(1, 12))
        objective.share = (rank, 2)
        mixed, targets = objective.inputs(batch, 1)
        unmixed = objective.augment(batch.images, 1, (rank, 2))
        with seeded_numpy(derive_seed(cfg.seed, "mixup", 1)):
            expected, expected_targets = Mixup(mixup_alpha=0.8, label_smoothing=0.0, num_classes=3)(unmixed, batch.labels)
        assert torch.equal(mixed, expected) and torch.equal(targets, expected_targets)
