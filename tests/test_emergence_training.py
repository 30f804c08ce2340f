"""The emergence watch in real training: a register neuron planted at step K (tests/planted_training.py)
is found, pinned to the adaptive resolution, acted on, and the trajectory never changes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from planted_training import plant_from_step
from trainers.config import DataConfig, ModelConfig, OptimConfig, ProbeConfig, TrainConfig
from trainers.emergence import keys
from trainers.loop import Trainer
from trainers.probes import names
from trainers.tracking import MemoryTracker

CPU = torch.device("cpu")
K_PLANT = 21  # the model carries the planted neuron from step 21 on
EVERY = 16  # regular probes at 16, 32, 48, 64; adaptive ones every 2 steps
FINE = EVERY // 8
STEPS = 64
MILESTONES = [0.25, 0.5, 0.75]  # steps 16, 32, 48


def config(**probe) -> TrainConfig:
    return TrainConfig(
        model=ModelConfig(size="micro", img_size=32, patch_size=8, num_registers=0, weight_init="jax"),
        data=DataConfig(name="shapes", num_classes=6, train_size=256, val_size=32),
        optim=OptimConfig(lr=2e-3, batch_size=8, warmup_steps=5),
        probe=ProbeConfig(
            every=EVERY, batch_size=16, figures="off", emergence_consecutive=2, **probe
        ),
        steps=STEPS,
        log_every=4,
        eval_every=STEPS,
        seed=0,
    )


class Run:
    def __init__(self, cfg: TrainConfig, folder: Path | None = None, resume_from: Path | None = None) -> None:
        self.tracker = MemoryTracker()
        self.checkpoints: list[tuple[int, dict[str, float]]] = []
        self.trainer = Trainer(cfg, CPU)
        plant_from_step(self.trainer, K_PLANT)
        if resume_from is not None:
            self.trainer.load(resume_from)
        self.folder = folder

        def on_checkpoint(step: int, metrics: dict[str, float]) -> None:
            self.checkpoints.append((step, dict(metrics)))
            if self.folder is not None:
                self.trainer.save(self.folder / f"step_{step}")

        self.trainer.fit(self.tracker, on_checkpoint)

    @property
    def losses(self) -> list[tuple[int, float]]:
        return self.tracker.history(names.TRAIN_LOSS)

    @property
    def emerged_at(self) -> int | None:
        value = self.tracker.tags.get(keys.EMERGED_AT_STEP)
        return None if value is None else int(value)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """A micro ViT gains nothing from intra-op threads, and on a busy 2-core machine they cost 10x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, one_thread) -> dict[str, Run]:
    folder = tmp_path_factory.mktemp("emergence")
    return {
        "off": Run(config(monitor=False)),
        "coarse": Run(config(on_emergence="alert")),
        "adaptive": Run(config(adaptive=True, keep_checkpoints_at=MILESTONES), folder),
        "stop": Run(config(adaptive=True, on_emergence="stop")),
        "folder": folder,  # type: ignore[dict-item]
    }


def test_probes_and_snapshots_leave_the_trajectory_alone(runs) -> None:
    """Loss history, weights and the data read are the same with the watch off, on, and adaptive."""
    reference = runs["off"].losses
    assert len(reference) == STEPS // 4
    assert runs["coarse"].losses == reference
    assert runs["adaptive"].losses == reference
    stop = runs["stop"].trainer.step
    assert runs["stop"].losses == [(s, v) for s, v in reference if s <= stop]
    for name in ("coarse", "adaptive"):
        for (key, a), b in zip(runs["off"].trainer.model.state_dict().items(), runs[name].trainer.model.state_dict().values()):
            assert torch.equal(a, b), (name, key)
    assert runs["adaptive"].trainer.watch.adaptive_probes > 0 and runs["adaptive"].trainer.watch.snapshots_taken > 0


def test_emerged_at_step_has_the_resolution_of_the_probes(runs) -> None:
    coarse, adaptive = runs["coarse"].emerged_at, runs["adaptive"].emerged_at
    assert coarse is not None and adaptive is not None
    # The first probe that sees the planted model: at or after K_PLANT, within one interval.
    assert K_PLANT <= adaptive < K_PLANT + FINE
    assert K_PLANT <= coarse < K_PLANT + EVERY
    print(f"\nemerged_at_step - planted step: adaptive {adaptive - K_PLANT} (interval {FINE}), "
          f"regular probes only {coarse - K_PLANT} (interval {EVERY})")
    assert runs["adaptive"].tracker.tags[keys.EMERGED_AT_FRACTION] == f"{round(adaptive / STEPS, 4):g}"
    assert runs["off"].emerged_at is None and keys.STATUS not in runs["off"].tracker.tags
    # The monitor's stream: every regular probe, and adaptive ones in the window and after it.
    steps = [s for s, _ in runs["adaptive"].tracker.history(keys.OUTLIER_FRAC)]
    assert {16, 32, 48, 64} <= set(steps)
    assert set(range(K_PLANT - K_PLANT % FINE + FINE, 32, FINE)) <= set(steps)  # the window, from snapshots


def test_the_event_is_tagged_at_once_and_reported_with_a_checkpoint(runs) -> None:
    adaptive = runs["adaptive"]
    confirmed = 48  # the second flagged regular probe (K = 2)
    steps = [s for s, _ in adaptive.checkpoints]
    assert steps == [16, 32, 48, 64]  # the milestones (48 is also where it was confirmed) and the end
    at_confirmation = dict(adaptive.checkpoints)[confirmed]
    assert at_confirmation[keys.EMERGED_AT_STEP_VALUE] == adaptive.emerged_at
    assert at_confirmation[keys.LAST_CLEAN_STEP] < adaptive.emerged_at
    assert dict(adaptive.checkpoints)[32][keys.SUSPECTED] == 1.0  # flagged, not yet confirmed
    assert adaptive.tracker.tags[keys.STATUS] == keys.STATUS_EMERGED
    coarse = runs["coarse"]
    assert [s for s, _ in coarse.checkpoints] == [48, 64]  # no milestones: the confirmation and the end
    assert coarse.tracker.tags[keys.ALERT] == "true" and dict(coarse.checkpoints)[48][keys.ALERT_VALUE] == 1.0


def test_stop_on_emergence_ends_the_trial_and_says_why(runs) -> None:
    stop = runs["stop"]
    assert stop.trainer.step == 48 and [s for s, _ in stop.checkpoints] == [48]
    tags = stop.tracker.tags
    assert tags[keys.STOPPED_AT_STEP] == "48"
    assert f"emerged at step {stop.emerged_at}" in tags[keys.STOP_REASON]
    assert stop.checkpoints[-1][1][keys.STOPPED_VALUE] == 1.0


def test_a_resumed_trial_keeps_what_its_watch_saw(runs) -> None:
    """From the milestone checkpoint at 32 (a suspicion open): the same event and the same losses."""
    resumed = Run(config(adaptive=True, keep_checkpoints_at=MILESTONES), resume_from=runs["folder"] / "step_32")
    assert resumed.emerged_at == runs["adaptive"].emerged_at
    assert resumed.losses == [(s, v) for s, v in runs["adaptive"].losses if s > 32]


def test_the_planted_neuron_is_in_the_checkpoints_after_its_step_only(runs) -> None:
    from trainers.emergence.measure import output_artifacts
    from trainers.pretrained import load_trial_checkpoint

    images = runs["adaptive"].trainer.data.probe_batch(16).images
    before = load_trial_checkpoint(runs["folder"] / "step_16" / "trainer_state.pt")
    after = load_trial_checkpoint(runs["folder"] / "step_32" / "trainer_state.pt")
    assert output_artifacts(before.model, images)[0] == 0.0
    assert output_artifacts(after.model, images)[0] > 0.05
