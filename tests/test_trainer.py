"""The training loop on CPU: it learns, it is deterministic, it resumes exactly, it fails fast."""

import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from trainers.checkpoint import CheckpointError
from trainers.config import DataConfig, ModelConfig, OptimConfig, ProbeConfig, TrainConfig
from trainers.loop import CHECKPOINT_FILE, NonFiniteLossError, Trainer
from trainers.probes import names
from trainers.tracking import MemoryTracker

CPU = torch.device("cpu")


def tiny_config(**overrides) -> TrainConfig:
    base = dict(
        model=ModelConfig(size="micro", img_size=32, patch_size=8, num_registers=2),
        data=DataConfig(name="shapes", num_classes=4, train_size=256, val_size=64),
        optim=OptimConfig(lr=2e-3, batch_size=16, warmup_steps=2),
        probe=ProbeConfig(every=0, at_end=False),
        steps=6,
        log_every=2,
        eval_every=3,
        seed=3,
    )
    base.update(overrides)
    return TrainConfig(**base)


def test_a_few_steps_log_train_and_val_metrics() -> None:
    tracker = MemoryTracker()
    checkpoints: list[int] = []
    trainer = Trainer(tiny_config(), CPU)
    metrics = trainer.fit(tracker, on_checkpoint=lambda step, m: checkpoints.append(step))
    assert trainer.step == 6
    assert [s for s, _ in tracker.history(names.TRAIN_LOSS)] == [2, 4, 6]
    assert [s for s, _ in tracker.history(names.VAL_TOP1)] == [3, 6]
    assert checkpoints == [3, 6]
    # The returned metrics are the last evaluation's: top-1 a count of the 64 validation images.
    assert metrics == {key: tracker.history(key)[-1][1] for key in (names.VAL_TOP1, names.VAL_LOSS)}
    assert metrics[names.VAL_TOP1] * 64 == round(metrics[names.VAL_TOP1] * 64)
    assert math.isfinite(metrics[names.VAL_LOSS]) and metrics[names.VAL_LOSS] > 0
    # Warmup then cosine: the learning rate rises over warmup and decays at the end.
    lrs = [v for _, v in tracker.history(names.TRAIN_LR)]
    assert lrs[-1] < max(lrs)


def test_same_seed_same_losses() -> None:
    runs = []
    for _ in range(2):
        tracker = MemoryTracker()
        Trainer(tiny_config(), CPU).fit(tracker)
        runs.append(tracker.history(names.TRAIN_LOSS))
    assert runs[0] == runs[1]
    other = MemoryTracker()
    Trainer(tiny_config(seed=4), CPU).fit(other)
    assert other.history(names.TRAIN_LOSS) != runs[0]


def test_checkpoint_round_trip_gives_identical_next_step_loss(tmp_path) -> None:
    cfg = tiny_config()
    original = Trainer(cfg, CPU)
    batches = original.data.train_batches(0, cfg.optim.batch_size)
    for _ in range(3):
        original.train_step(next(batches))
    original.step = 3
    original.save(tmp_path)
    expected = original.train_step(next(batches))

    restored = Trainer(cfg.model_copy(update={"seed": cfg.seed}), CPU)
    restored.load(tmp_path)
    assert restored.step == 3
    resumed_batch = next(restored.data.train_batches(restored.step, cfg.optim.batch_size))
    assert torch.equal(restored.train_step(resumed_batch), expected)


def test_resumed_fit_matches_uninterrupted_fit(tmp_path) -> None:
    # Checkpoints on log points, so the logged windows line up; probes at a checkpoint and at
    # the end, as the shipped specs run them: a probe must not change what training draws next.
    cfg = tiny_config(eval_every=2, probe=ProbeConfig(every=2, batch_size=8))
    straight = MemoryTracker()
    Trainer(cfg, CPU).fit(straight)

    first = Trainer(cfg, CPU)
    first_log = MemoryTracker()

    class Stop(Exception):
        pass

    def stop_after_first_checkpoint(step: int, metrics: dict) -> None:
        first.save(tmp_path)
        raise Stop

    with pytest.raises(Stop):
        first.fit(first_log, stop_after_first_checkpoint)
    second = Trainer(cfg, CPU)
    second.load(tmp_path)
    second_log = MemoryTracker()
    second.fit(second_log)
    stitched = first_log.history(names.TRAIN_LOSS) + second_log.history(names.TRAIN_LOSS)
    assert stitched == straight.history(names.TRAIN_LOSS)
    for key in (names.VAL_LOSS, names.outlier_frac(names.OUTPUT), names.attn("entropy", "cls")):
        assert first_log.history(key) + second_log.history(key) == straight.history(key), key


def draws() -> tuple[float, float, list[float]]:
    return random.random(), float(np.random.random()), torch.rand(3).tolist()


def test_checkpoint_restores_every_rng_and_loads_without_unpickling(tmp_path) -> None:
    cfg = tiny_config()
    Trainer(cfg, CPU).save(tmp_path)
    expected = draws()  # what each generator gives next, right after the save
    state = torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)  # plain tensors and values only
    assert set(state["rng"]) == {"python", "numpy", "torch", "cuda"}

    restored = Trainer(cfg.model_copy(update={"seed": 99}), CPU)  # reseeds every generator
    assert draws() != expected
    restored.load(tmp_path)
    assert draws() == expected


def _touch(path: str) -> str:
    Path(path).write_text("code ran while loading")
    return path


class Payload:
    """Unpickles by calling _touch: what a tampered checkpoint would run on each worker."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (_touch, (self.marker,))


def test_a_checkpoint_carrying_a_pickled_object_is_refused_naming_the_file(tmp_path) -> None:
    cfg = tiny_config()
    trainer = Trainer(cfg, CPU)
    state = trainer.state_dict()
    marker = tmp_path / "marker"
    state["rng"]["python"] = Payload(marker)
    folder = tmp_path / "checkpoint_000001"
    folder.mkdir()
    torch.save(state, folder / CHECKPOINT_FILE)

    with pytest.raises(CheckpointError) as refused:
        Trainer(cfg, CPU).load(folder)
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(f"checkpoint {folder / CHECKPOINT_FILE} refused: it holds a pickled object (")
    assert "_touch" in message and "weights_only=True" in message
    assert not marker.exists()
    torch.load(folder / CHECKPOINT_FILE, weights_only=False)  # the old way runs the payload
    assert marker.read_text() == "code ran while loading"


def test_non_finite_loss_fails_fast_naming_the_step() -> None:
    trainer = Trainer(tiny_config(log_every=1), CPU)
    original = trainer.train_step

    def poisoned(batch):
        loss = original(batch)
        return loss * float("nan") if trainer.step == 2 else loss

    trainer.train_step = poisoned  # type: ignore[method-assign]
    with pytest.raises(NonFiniteLossError, match="step 3"):
        trainer.fit(MemoryTracker())
    assert trainer.step == 3  # stopped at the first log point after the bad step


def test_probes_run_at_their_cadence_and_draw_figures_at_the_end_only() -> None:
    tracker = MemoryTracker()
    Trainer(tiny_config(probe=ProbeConfig(every=3, batch_size=8)), CPU).fit(tracker)
    assert [s for s, _ in tracker.history(names.outlier_frac(names.OUTPUT))] == [3, 6]
    middle, end = names.artifact_dir(3), names.artifact_dir(6)
    assert f"{middle}/{names.NORMS_FILE}" in tracker.files and f"{end}/{names.NORMS_FILE}" in tracker.files
    assert not any(k.startswith(middle) and k.endswith(".png") for k in tracker.files)
    assert any(k.startswith(end) and k.endswith(".png") for k in tracker.files)
