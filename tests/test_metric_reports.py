"""Every metric a spec lets a search or scheduler name is in every report a trial makes.

orchestrator/spec/metrics.py lists, without torch, what each trial measures for sure; these
tests hold that list to what the objectives and probes really measure, and run the trial's
reporting (orchestrator/trials/reporting.py) on a real Trainer whose first checkpoint comes
before its first evaluation and probe, as in every GPU spec.
"""

from __future__ import annotations

import pytest
import torch

from orchestrator.spec import metrics
from orchestrator.trials.records import RecordBuffer, TrialRecords
from orchestrator.trials.reporting import LatestMetrics, measure_missing
from trainers.config import ClipConfig, DataConfig, DinoConfig, ModelConfig, OptimConfig, ProbeConfig, TrainConfig
from trainers.loop import Trainer
from trainers.objectives.clip import VAL_ZEROSHOT_TOP1
from trainers.objectives.dino import VAL_KNN_TOP1
from trainers.probes import linear, names, norms
from trainers.probes.report import run_probes

CPU = torch.device("cpu")
# Probe scalars that exist only for some weights or data: the spec refuses them.
CONDITIONAL = ("/outlier", "/normal_matched", names.SEG_MIOU, names.CORLOC)


def tiny(objective: str = "supervised", registers: int = 2, **overrides) -> TrainConfig:
    base = dict(
        objective=objective,
        model=ModelConfig(size="micro", img_size=32, patch_size=8, num_registers=registers),
        data=DataConfig(name="shapes", num_classes=4, train_size=128, val_size=32),
        optim=OptimConfig(lr=1e-3, batch_size=8, warmup_steps=1),
        probe=ProbeConfig(every=0, at_end=False, batch_size=16, figures="off"),
        dino=DinoConfig(head_prototypes=64, head_hidden_dim=32, head_bottleneck_dim=16, local_crops=2,
                        local_crop_size=16, knn_train_size=64),
        clip=ClipConfig(embed_dim=16, text_width=32, text_layers=1, text_heads=2, context_length=20),
        steps=6, log_every=1, eval_every=4, seed=3,
    )
    base.update(overrides)
    return TrainConfig(**base)


def test_the_lists_copy_the_probes_own_constants() -> None:
    assert metrics.NORM_STATS == norms.STAT_NAMES
    assert metrics.BLOCK_PATCH_STATS == norms.COMPACT_PATCH_STATS
    assert metrics.LINEAR_PROBE_MIN_IMAGES == linear.MIN_IMAGES
    assert metrics.VAL_KNN_TOP1 == VAL_KNN_TOP1 and metrics.VAL_ZEROSHOT_TOP1 == VAL_ZEROSHOT_TOP1


# Registers entering at a later block, where the model config has that key (model.register_depth).
LATE = [(3, 2)] if "register_depth" in ModelConfig.model_fields else []


@pytest.mark.parametrize("registers, enter", [(0, 0), (3, 0), *LATE])
def test_every_probe_measures_the_listed_metrics_and_only_conditional_ones_besides(registers: int, enter: int) -> None:
    cfg = tiny(registers=registers)
    if enter:
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"register_depth": enter})})
    trainer = Trainer(cfg, CPU)
    batches = trainer.data.train_batches(0, cfg.optim.batch_size)
    listed = metrics.probe_metrics(cfg)
    for _ in range(2):  # untrained and after a few steps: the list holds for any weights
        measured = set(run_probes(trainer.model, trainer.data.probe_batch(16), cfg.probe).scalars)
        assert listed <= measured, sorted(listed - measured)
        assert all(any(c in key for c in CONDITIONAL) for key in measured - listed), sorted(measured - listed)
        for _ in range(3):
            trainer.train_step(next(batches))


@pytest.mark.parametrize("objective", ["supervised", "dino", "clip"])
def test_each_objective_evaluates_to_the_listed_metrics(objective: str) -> None:
    cfg = tiny(objective)
    assert set(Trainer(cfg, CPU).evaluate()) == set(metrics.evaluation_metrics(cfg))


@pytest.mark.parametrize(
    "needed",
    [
        (names.VAL_TOP1, names.TRAIN_LOSS),
        (names.VAL_LOSS, names.outlier_frac(names.OUTPUT)),
        (names.attn("entropy", "reg_01"),),
    ],
)
def test_every_report_carries_what_the_search_and_scheduler_need(needed: tuple[str, ...]) -> None:
    # Checkpoints every 2 steps, evaluation every 4, probes at 6 only: reports at 2 and 4 come
    # before the first probe, the one at 2 before the first evaluation too.
    cfg = tiny(checkpoint_every=2, eval_every=4, probe=ProbeConfig(every=6, at_end=True, batch_size=16, figures="off"))
    for metric in needed:
        assert metrics.metric_problem(cfg, metric) is None
    trainer = Trainer(cfg, CPU)
    buffer = RecordBuffer()
    tracker = LatestMetrics(buffer)
    reports: list[tuple[int, dict[str, float]]] = []

    def on_checkpoint(step: int, _: dict[str, float]) -> None:
        measure_missing(trainer, tracker, needed)
        reports.append((step, dict(tracker.latest)))

    trainer.fit(tracker, on_checkpoint)
    assert [step for step, _ in reports] == [2, 4, 6]
    for step, report in reports:
        assert set(needed) <= set(report), (step, sorted(set(needed) - set(report)))
    # A measurement made for a report is a real one: it is logged at that step like any other.
    logged = {(key, step) for key, _, _, step in TrialRecords.from_report(buffer.take()).metrics}
    for metric in needed:
        assert (metric, 2) in logged
    # Nothing is measured twice: the evaluation at 4 and the probe at 6 are the loop's own.
    assert sum(1 for key, step in logged if key == names.VAL_TOP1 and step == 4) == 1


def test_nothing_extra_is_measured_when_no_search_or_scheduler_needs_it() -> None:
    cfg = tiny(checkpoint_every=2, eval_every=4)
    trainer = Trainer(cfg, CPU)
    tracker = LatestMetrics(RecordBuffer())
    first_reports: list[set[str]] = []

    def on_checkpoint(step: int, _: dict[str, float]) -> None:
        measure_missing(trainer, tracker, ())
        first_reports.append(set(tracker.latest))

    trainer.fit(tracker, on_checkpoint)
    assert names.VAL_TOP1 not in first_reports[0] and names.TRAIN_LOSS in first_reports[0]


def test_a_restored_trial_carries_the_metrics_saved_with_its_checkpoint(tmp_path) -> None:
    tracker = LatestMetrics(RecordBuffer(), {names.VAL_TOP1: 0.5})
    tracker.log_metrics({names.TRAIN_LOSS: 1.25}, 3)
    tracker.save(tmp_path)
    assert LatestMetrics.saved(tmp_path) == {names.VAL_TOP1: 0.5, names.TRAIN_LOSS: 1.25}
    assert LatestMetrics.saved(tmp_path / "older_checkpoint") == {}


def test_the_reporting_tracker_passes_the_emergence_watch_tags_on() -> None:
    """The watch tags through any tracker that has set_tags (trainers/emergence/watch.py); the
    trial's tracker must have it, or the event's tags never reach the run."""
    from trainers.emergence import keys
    from trainers.emergence.watch import set_tags

    buffer = RecordBuffer()
    set_tags(LatestMetrics(buffer), {keys.EMERGED_AT_STEP: "22"})
    assert TrialRecords.from_report(buffer.take()).tags == {keys.EMERGED_AT_STEP: "22"}
