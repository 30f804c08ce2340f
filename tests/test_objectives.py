"""Every objective trains a few CPU steps with registers, and resumes on the same trajectory."""

from __future__ import annotations

import io
import math

import pytest
import torch

from trainers.config import ClipConfig, DataConfig, DinoConfig, ModelConfig, OptimConfig, ProbeConfig, TrainConfig
from trainers.loop import Trainer
from trainers.probes import names
from trainers.tracking import MemoryTracker

CPU = torch.device("cpu")
OBJECTIVES = ("supervised", "dino", "clip")


def tiny(objective: str, **overrides) -> TrainConfig:
    base = dict(
        objective=objective,
        model=ModelConfig(size="micro", img_size=32, patch_size=8, num_registers=4),
        data=DataConfig(name="shapes", num_classes=4, train_size=128, val_size=32),
        optim=OptimConfig(lr=1e-3, batch_size=8, warmup_steps=1),
        # Probes on, as the shipped specs run them: every half of the run and at the end.
        probe=ProbeConfig(every=4, batch_size=16),
        dino=DinoConfig(
            head_prototypes=64, head_hidden_dim=32, head_bottleneck_dim=16, local_crops=2, local_crop_size=16,
            knn_train_size=64, centering="momentum", freeze_last_layer=0.25,
        ),
        clip=ClipConfig(embed_dim=16, text_width=32, text_layers=1, text_heads=2, context_length=20),
        steps=8,
        log_every=2,
        eval_every=4,
        seed=5,
    )
    base.update(overrides)
    return TrainConfig(**base)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_a_few_steps_with_registers_log_the_objectives_metrics(objective: str) -> None:
    tracker = MemoryTracker()
    trainer = Trainer(tiny(objective), CPU)
    assert trainer.model.num_prefix_tokens == 1 + 4
    metrics = trainer.fit(tracker)
    assert trainer.step == 8
    assert all(math.isfinite(v) for _, v in tracker.history(names.TRAIN_LOSS))
    # val/top1 is the objective's own top-1 on the 32 validation images: a count of them, logged at 4 and 8.
    assert [s for s, _ in tracker.history(names.VAL_TOP1)] == [4, 8]
    assert tracker.history(names.VAL_TOP1)[-1][1] == metrics[names.VAL_TOP1]
    assert (metrics[names.VAL_TOP1] * 32) == pytest.approx(round(metrics[names.VAL_TOP1] * 32))
    own = {"supervised": names.VAL_TOP1, "dino": "val/knn_top1", "clip": "val/zeroshot_top1"}[objective]
    assert metrics[own] == metrics[names.VAL_TOP1]
    # The probes ran on the model the objective names (DINO: the teacher), at 4 and at the end.
    assert [s for s, _ in tracker.history(names.outlier_frac(names.OUTPUT))] == [4, 8]
    assert f"{names.artifact_dir(8)}/{names.NORM_HIST_FIGURE}" in tracker.files
    keys = {key for _, key, _ in tracker.metrics}
    expected = {
        "supervised": {names.VAL_LOSS},
        "dino": {"val/knn_top1", "train/dino_loss", "train/ibot_loss", "train/koleo_loss", "train/teacher_temp", "train/momentum"},
        "clip": {"val/zeroshot_top1", "train/logit_scale"},
    }[objective]
    assert expected <= keys


def test_dino_probes_read_the_teacher_and_the_teacher_follows_the_student() -> None:
    cfg = tiny("dino", eval_every=0)
    trainer = Trainer(cfg, CPU)
    objective = trainer.objective
    assert objective.probe_model is objective.teacher["backbone"] and trainer.model is objective.student["backbone"]
    before = [p.detach().clone() for p in objective.teacher.parameters()]
    prototypes = objective.student["dino_head"].last_layer.weight_v
    batches = trainer.data.train_batches(0, cfg.optim.batch_size)
    changed = []
    for _ in range(4):
        previous = prototypes.detach().clone()
        trainer.train_step(next(batches))
        trainer.step += 1
        changed.append(not torch.equal(previous, prototypes))
    # freeze_last_layer 0.25 of 8 steps: the prototypes stay as they were for two steps, then train.
    assert changed == [False, False, True, True]
    moved = [not torch.equal(a, b) for a, b in zip(before, objective.teacher.parameters())]
    assert any(moved)  # the EMA moved the teacher
    assert not any(p.requires_grad for p in objective.teacher.parameters())


def _train_then_next_loss(cfg: TrainConfig, tmp_path, stop: int) -> tuple[float, float]:
    """(loss of step stop + 1 without interruption, loss of that step after a save and load)."""
    original = Trainer(cfg, CPU)
    batches = original.data.train_batches(0, cfg.optim.batch_size)
    for _ in range(stop):
        original.train_step(next(batches))
        original.step += 1
    original.save(tmp_path)
    uninterrupted = float(original.train_step(next(batches)))
    restored = Trainer(cfg, CPU)
    restored.load(tmp_path)
    assert restored.step == stop
    resumed = float(restored.train_step(next(restored.data.train_batches(stop, cfg.optim.batch_size))))
    return uninterrupted, resumed


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_checkpoint_round_trip_gives_the_identical_next_loss(objective: str, tmp_path) -> None:
    uninterrupted, resumed = _train_then_next_loss(tiny(objective), tmp_path, stop=3)
    assert resumed == uninterrupted


def test_dino_round_trip_with_sinkhorn_and_a_separate_ibot_head(tmp_path) -> None:
    cfg = tiny("dino")
    cfg.dino = cfg.dino.model_copy(update={"centering": "sinkhorn_knopp", "ibot_separate_head": True})
    uninterrupted, resumed = _train_then_next_loss(cfg, tmp_path, stop=3)
    assert resumed == uninterrupted


@pytest.mark.parametrize("objective", ("dino", "clip"))
def test_objective_state_is_plain_tensors_and_numbers(objective: str) -> None:
    """What an objective adds to the checkpoint loads with torch.load(weights_only=True) (issue 19)."""
    trainer = Trainer(tiny(objective, steps=2, eval_every=0), CPU)
    trainer.fit()
    buffer = io.BytesIO()
    torch.save(trainer.objective.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    fresh = Trainer(tiny(objective, steps=2, eval_every=0), CPU)
    fresh.objective.load_state_dict(state)
    if objective == "dino":
        assert torch.equal(fresh.objective.teacher["dino_head"].last_layer.weight_v,
                           trainer.objective.teacher["dino_head"].last_layer.weight_v)
        assert set(state["schedule"]) == {"teacher_temp", "momentum", "weight_decay"}
    else:
        assert torch.equal(fresh.objective.towers.logit_scale, trainer.objective.towers.logit_scale)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_bf16_autocast_trains_and_evaluates_every_objective(objective: str) -> None:
    """precision: bf16 is CPU autocast here, as on a GPU: an autocast result written into an fp32
    tensor fails on both (DINO's k-NN votes did, issue 22). Train steps, evaluation (k-NN, zero-shot)
    and the probes of the shipped specs all run under it."""
    tracker = MemoryTracker()
    cfg = tiny(objective, precision="bf16", steps=4, eval_every=2, probe=ProbeConfig(every=2, batch_size=8))
    trainer = Trainer(cfg, CPU)
    assert trainer.autocast_dtype == torch.bfloat16
    metrics = trainer.fit(tracker)
    assert all(math.isfinite(v) for _, v in tracker.history(names.TRAIN_LOSS))
    assert [step for step, _ in tracker.history(names.VAL_TOP1)] == [2, 4] and 0.0 <= metrics[names.VAL_TOP1] <= 1.0
    assert [step for step, _ in tracker.history(names.PROBE_SECONDS)] == [2, 4]
    for param in trainer.objective.parameters():
        assert param.dtype == torch.float32  # autocast computes in bf16; the weights stay fp32


def test_knn_votes_in_fp32_under_autocast() -> None:
    from trainers.objectives.knn import knn_predict

    torch.manual_seed(0)
    bank = torch.nn.functional.normalize(torch.randn(50, 8), dim=-1)
    labels = torch.randint(0, 3, (50,))
    queries = torch.nn.functional.normalize(torch.randn(7, 8), dim=-1)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 features, as a bf16 backbone gives them
        mixed = knn_predict(bank.bfloat16(), labels, queries.bfloat16(), 3, 5, 0.07)
    # Raised "scatter(): Expected self.dtype to be equal to src.dtype" before; now the votes are fp32
    # and, on features that bf16 represents exactly, the same as without autocast.
    exact_bank, exact_queries = bank.bfloat16().float(), queries.bfloat16().float()
    assert torch.equal(mixed, knn_predict(exact_bank, labels, exact_queries, 3, 5, 0.07))
