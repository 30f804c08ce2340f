"""Fill an MLflow store with a sweep whose answers are known (no training).

The planted pattern:
- artifacts only in the larger size ('mini'), without registers: the outlier fraction is ~0
  before 40% of training and ~0.03 after, in blocks >= 3 and at the output; ~0 elsewhere;
- with registers the outlier fraction is ~0 everywhere;
- the dense metric (seg_miou) peaks at 4 registers, far beyond the noise; top-1 rises with registers
  (or, with learned=False, stays at chance: 1/6 with 6 classes);
- norms.npz and attention.npz for the seed-0 trials of a few settings;
- one RUNNING and one FAILED trial, which the analysis must skip and list.

With several `objectives`, every setting is planted once per objective (tag axis.objective) and
`artifacts` says which sizes grow artifacts under which objective.
"""

from __future__ import annotations

import itertools
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from trainers.config import MODEL_SIZES
from trainers.probes import names

SIZES = ("micro", "mini")
ARTIFACT_SIZE = "mini"  # the only size that grows artifacts
REGISTERS = (0, 1, 2, 4, 8, 16)
LENGTHS = (100, 200)
EMERGE_FRACTION = 0.4
EMERGE_BLOCK = 3
PROBE_FRACTIONS = tuple(round(0.1 * i, 1) for i in range(1, 11))
MIOU = {0: 0.50, 1: 0.54, 2: 0.56, 4: 0.62, 8: 0.57, 16: 0.55}
ARTIFACT_REGISTERS = (0, 4)  # settings with probe files (seed 0, longest length)
NUM_CLASSES = 6  # chance = 1/6


@dataclass
class PlantedSweep:
    experiment: str
    experiment_id: str
    parent_run_id: str
    trial_run_ids: list[str] = field(default_factory=list)
    running_run_id: str = ""
    failed_run_id: str = ""


def _outlier_frac(
    size: str, regs: int, location_block: int | None, fraction: float, rng: np.random.Generator,
    artifact_sizes: Sequence[str] = (ARTIFACT_SIZE,),
) -> float:
    deep = location_block is None or location_block >= EMERGE_BLOCK  # None = output
    if size in artifact_sizes and regs == 0 and deep and fraction >= EMERGE_FRACTION - 1e-9:
        return float(0.03 + rng.normal(0, 0.002))
    return float(abs(rng.normal(0, 0.0008)))


def _trial_metrics(
    size: str, regs: int, steps: int, rng: np.random.Generator, with_probes: bool = True,
    artifact_sizes: Sequence[str] = (ARTIFACT_SIZE,), learned: bool = True,
) -> list[Metric]:
    depth = MODEL_SIZES[size][1]
    metrics: list[Metric] = []
    for fraction in PROBE_FRACTIONS:
        step = int(round(fraction * steps))

        def put(key: str, value: float) -> None:
            metrics.append(Metric(key, value, 1_700_000_000_000 + step, step))

        put(names.TRAIN_LOSS, 2.0 - fraction + rng.normal(0, 0.01))
        if learned:
            put(names.VAL_TOP1, 0.60 + 0.01 * np.log2(1 + regs) + 0.1 * fraction + rng.normal(0, 0.002))
        else:  # stuck at chance (1 / NUM_CLASSES)
            put(names.VAL_TOP1, 1 / NUM_CLASSES + abs(rng.normal(0, 0.01)))
        if not with_probes:
            continue
        for b in range(depth):
            put(names.outlier_frac(names.block(b)), _outlier_frac(size, regs, b, fraction, rng, artifact_sizes))
        put(names.outlier_frac(names.OUTPUT), _outlier_frac(size, regs, None, fraction, rng, artifact_sizes))
        put(names.outlier_frac(names.OUTPUT, "abs"), 0.0)  # the other detector: must not be read as robust
        put(names.SEG_MIOU, MIOU[regs] * (0.5 + 0.5 * fraction) + rng.normal(0, 0.003))
        put(names.CORLOC, 0.4 + 0.02 * min(regs, 4) + rng.normal(0, 0.003))
        put(names.attn("entropy", "cls"), 4.0 - 0.2 * (regs > 0) + rng.normal(0, 0.01))
        put(names.attn("tv", "cls"), (0.6 if regs == 0 else 0.3) + rng.normal(0, 0.01))
    return metrics


def _norms_npz(size: str, regs: int, fraction: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    depth = MODEL_SIZES[size][1]
    edges = names.NORM_BIN_EDGES
    centers = np.sqrt(edges[:-1] * edges[1:])
    n_tokens = 4 * 64

    def hist(mean: float, n: int) -> np.ndarray:
        norms = np.exp(rng.normal(np.log(mean), 0.15, size=n))
        return np.histogram(norms, bins=edges)[0]

    hist_patch = []
    for row in range(depth + 1):  # blocks, then the output
        block = row if row < depth else None
        frac = _outlier_frac(size, regs, block, fraction, rng)
        n_out = int(round(max(frac, 0) * n_tokens)) if frac > 0.01 else 0
        hist_patch.append(hist(5.0 + row, n_tokens - n_out) + hist(80.0, n_out))
    hist_reg = np.stack([np.stack([hist(60.0, 4) for _ in range(regs)]) if regs else np.zeros((0, len(centers)), int) for _ in range(depth + 1)])
    hist_cls = np.stack([hist(30.0, 4) for _ in range(depth + 1)])
    return {"bin_edges": edges, "hist_patch": np.stack(hist_patch), "hist_reg": hist_reg, "hist_cls": hist_cls}


def _attention_npz(regs: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    n, grid = 3, 8
    images = rng.integers(0, 255, size=(n, 32, 32, 3), dtype=np.uint8)
    cls_attn = rng.random((n, grid, grid)).astype(np.float32)
    reg_attn = rng.random((n, regs, grid, grid)).astype(np.float32)
    outlier_mask = np.zeros((n, grid, grid), dtype=bool)
    return {"images": images, "cls_attn": cls_attn, "reg_attn": reg_attn, "outlier_mask": outlier_mask}


def _log_probe_files(client: MlflowClient, run_id: str, size: str, regs: int, steps: int, rng: np.random.Generator) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for fraction in (0.2, 0.5, 1.0):
            step = int(round(fraction * steps))
            folder = Path(tmp) / names.artifact_dir(step)
            folder.mkdir(parents=True)
            np.savez(folder / names.NORMS_FILE, **_norms_npz(size, regs, fraction, rng))
            np.savez(folder / names.ATTENTION_FILE, **_attention_npz(regs, rng))
        client.log_artifacts(run_id, str(Path(tmp) / "probes"), "probes")


def _planted_checkpoint(folder: Path, size: str, steps: int, seed: int) -> Path:
    from planted_neuron import planted_trial_checkpoint
    from trainers.config import DataConfig, ModelConfig, ProbeConfig, TrainConfig

    cfg = TrainConfig(
        model=ModelConfig(size=size, patch_size=4, img_size=32),
        data=DataConfig(name="shapes", val_size=64),
        probe=ProbeConfig(batch_size=32),
        steps=steps,
        seed=seed,
    )
    return planted_trial_checkpoint(folder, cfg, seed=seed).parent


def _trial_tags(
    parent: str, sweep: str, size: str, regs: int, steps: int, seed: int, objective: str = "supervised"
) -> dict[str, str]:
    return {
        "mlflow.parentRunId": parent,
        "sweep.role": "trial",
        "sweep.name": sweep,
        "trial_id": f"{objective}_{size}_r{regs}_s{steps}_seed{seed}",
        "axis.objective": objective,
        "git_commit": "0" * 40,
        "axis.model_size": size,
        "axis.num_registers": str(regs),
        "axis.steps": str(steps),
        "axis.seed": str(seed),
        "data.num_classes": str(NUM_CLASSES),
    }


def plant_sweep(
    tracking_uri: str,
    experiment: str = "planted",
    *,
    sizes: Sequence[str] = SIZES,
    registers: Sequence[int] = REGISTERS,
    lengths: Sequence[int] = LENGTHS,
    seeds: Sequence[int] = (0, 1, 2),
    probe_files: bool = True,
    probe_metrics: bool = True,
    unfinished: bool = True,
    learned: bool = True,
    checkpoints: Path | None = None,
    objectives: Sequence[str] = ("supervised",),
    artifacts: Mapping[str, Sequence[str]] | None = None,
    emergence_tags: Mapping[tuple[str, int], int | None] | None = None,
) -> PlantedSweep:
    """Write the planted sweep into `tracking_uri` and return the run ids.

    checkpoints: a folder for real final checkpoints of the no-register trials (tagged
    checkpoint_uri, as the sweep driver does): random-init models of each size with a
    register neuron planted at every eighth patch position (tests/planted_neuron.py), so a
    test-time register has artifacts to move.

    emergence_tags: what each trial's own emergence watch tagged, by (size, seed): the step its
    artifacts emerged at (the run gets emergence.status=emerged and emerged_at_step), or None
    (emergence.status=none). Trials of other (size, seed) pairs carry no such tags.
    """
    client = MlflowClient(tracking_uri=tracking_uri)
    experiment_id = client.create_experiment(experiment)
    parent = client.create_run(experiment_id, tags={"sweep.role": "parent", "sweep.name": experiment}, run_name="launch")
    planted = PlantedSweep(experiment, experiment_id, parent.info.run_id)
    rng = np.random.default_rng(1234)
    for objective, size, regs, steps, seed in itertools.product(objectives, sizes, registers, lengths, seeds):
        artifact_sizes = (artifacts or {}).get(objective, (ARTIFACT_SIZE,))
        tags = _trial_tags(planted.parent_run_id, experiment, size, regs, steps, seed, objective)
        run = client.create_run(experiment_id, tags=tags)
        run_id = run.info.run_id
        params = {"model.size": size, "model.num_registers": str(regs), "steps": str(steps), "seed": str(seed), "optim.lr": "0.001"}
        client.log_batch(
            run_id,
            metrics=_trial_metrics(size, regs, steps, rng, probe_metrics, artifact_sizes, learned),
            params=[Param(k, v) for k, v in params.items()],
            tags=[RunTag("mlflow.runName", f"{size}-r{regs}-s{steps}-seed{seed}")],
        )
        if emergence_tags is not None and (size, seed) in emergence_tags:
            emerged = emergence_tags[(size, seed)]
            watch = {"emergence.status": "none"} if emerged is None else {"emergence.status": "emerged", "emerged_at_step": str(emerged)}
            client.log_batch(run_id, tags=[RunTag(k, v) for k, v in watch.items()])
        if checkpoints is not None and regs == 0:
            folder = _planted_checkpoint(checkpoints / run_id, size, steps, seed)
            client.set_tag(run_id, "checkpoint_uri", str(folder))
        if probe_files and seed == seeds[0] and steps == max(lengths) and regs in ARTIFACT_REGISTERS:
            _log_probe_files(client, run_id, size, regs, steps, rng)
        client.set_terminated(run_id, "FINISHED")
        planted.trial_run_ids.append(run_id)
    if unfinished:
        size = sizes[-1]
        running = client.create_run(experiment_id, tags=_trial_tags(planted.parent_run_id, experiment, size, 4, max(lengths), 99))
        client.log_batch(running.info.run_id, metrics=_trial_metrics(size, 4, max(lengths), rng)[:20])
        planted.running_run_id = running.info.run_id  # left RUNNING
        failed = client.create_run(experiment_id, tags=_trial_tags(planted.parent_run_id, experiment, size, 0, max(lengths), 98))
        # A failed trial with artifact-like numbers that would change the answers if it were counted.
        client.log_batch(failed.info.run_id, metrics=[Metric(names.SEG_MIOU, 0.99, 0, max(lengths))])
        client.set_terminated(failed.info.run_id, "FAILED")
        planted.failed_run_id = failed.info.run_id
    client.set_terminated(planted.parent_run_id, "FINISHED")
    return planted
