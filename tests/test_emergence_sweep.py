"""A sweep whose trial grows a register neuron at step K (planted, test-only): the event is pinned
and tagged while it runs, the checkpoints either side of it are kept past pruning, and
`inspect run:ID@STEP` finds the neuron after K and nothing before it. Once as one process
(Tune's checkpoints, the driver's pruner) and once as 2 gloo workers (Ray Train's
checkpoints, rank 0's kept copies), as the shipped DeiT-III, DINOv2 and CLIP specs run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from planted_training import LAYER, PLANT_ENV, UNIT
from sweep_helpers import ROOT, run_sweep_cli, tiny_spec, write_spec
from trainers.emergence import keys
from trainers.probes import names

pytestmark = pytest.mark.slow

K_PLANT = 21
EVERY, STEPS = 16, 64  # regular probes at 16, 32, 48, 64; adaptive ones every 2 steps
CHECKPOINT_EVERY = 8


def planted_env() -> dict[str, str]:
    """The test-only hook (tests/plant_hook/sitecustomize.py) in the sweep's processes, Ray's workers included."""
    tests = ROOT / "tests"
    path = os.pathsep.join([str(tests / "plant_hook"), str(tests), str(ROOT), os.environ.get("PYTHONPATH", "")])
    return {"PYTHONPATH": path, PLANT_ENV: str(K_PLANT)}


@pytest.mark.parametrize("workers", [1, 2], ids=["one-process", "2-workers"])
def test_a_planted_neuron_is_pinned_kept_and_found(tmp_path: Path, workers: int) -> None:
    resources = {"workers": 2, "cpu_per_worker": 1} if workers > 1 else {"cpu": 1, "gpu": 0}
    spec = tiny_spec(tmp_path, name="emergence", resources=resources)
    spec["grid"] = {"model.num_registers": [0]}
    spec["train"].update(
        model={"size": "micro", "img_size": 32, "patch_size": 8, "num_registers": 0, "weight_init": "jax"},
        data={"name": "shapes", "num_classes": 6, "train_size": 256, "val_size": 32},
        probe={
            "every": EVERY, "batch_size": 16, "adaptive": True, "emergence_consecutive": 2,
            "on_emergence": "alert", "keep_checkpoints_at": [0.25, 0.5, 0.75],
        },
        steps=STEPS, eval_every=STEPS, checkpoint_every=CHECKPOINT_EVERY, log_every=8,
    )
    done = run_sweep_cli(tmp_path, str(write_spec(tmp_path, spec)), **planted_env())
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("emergence")
    (run,) = [r for r in client.search_runs([experiment.experiment_id]) if r.data.tags.get("sweep.role") == "trial"]
    tags, run_id = run.data.tags, run.info.run_id
    emerged = int(tags[keys.EMERGED_AT_STEP])
    assert K_PLANT <= emerged < K_PLANT + EVERY // 8, tags  # one adaptive interval
    assert tags[keys.STATUS] == keys.STATUS_EMERGED and tags[keys.ALERT] == "true"
    assert float(tags[keys.EMERGED_AT_FRACTION]) == pytest.approx(emerged / STEPS, abs=1e-4)
    # The monitor's stream in MLflow: the regular probes and the adaptive ones around the event.
    stream = [m.step for m in client.get_metric_history(run_id, keys.OUTLIER_FRAC)]
    assert {16, 32, 48, 64} <= set(stream) and emerged in stream and emerged - 2 in stream

    # The console said it as it happened, and at the end.
    out = done.stdout
    assert f"! artifacts emerged in t000-r0-seed0 at step {emerged}" in out
    assert f"artifacts emerged at step {emerged}" in out
    assert "Artifacts emerged? At what fraction of training" in out

    # Kept past pruning: the milestones and the two either side of the event, each tagged; the
    # newest two (for a resume) too; every other checkpoint was deleted.
    before, after = int(tags[keys.CHECKPOINT_BEFORE]), int(tags[keys.CHECKPOINT_AFTER])
    assert before < K_PLANT <= after and (before, after) == (16, 24)
    kept = {keys.kept_checkpoint_step(k): v for k, v in tags.items() if keys.kept_checkpoint_step(k) is not None}
    assert sorted(kept) == [16, 24, 32, 48]
    assert all(Path(location).is_dir() for location in kept.values())
    trial_dir = Path(kept[16]).parent
    on_disk = sorted(p.name for p in trial_dir.glob("checkpoint_*"))
    if workers == 1:  # Tune's checkpoints: 16, 24, 32, 48 and the newest two (56, 64), not 8 or 40
        assert len(on_disk) == 6, on_disk
    else:  # the copies beside Ray Train's newest two
        assert trial_dir.name == "kept_checkpoints" and len(on_disk) == 4, on_disk
        newest = sorted(p.name for p in (trial_dir.parent / "train").glob("checkpoint_0*"))
        assert newest == ["checkpoint_000000056", "checkpoint_000000064"], newest

    # inspect at the kept checkpoints: nothing before the plant, the planted neuron after it.
    inspected = inspect(tmp_path, run_id, before, after)
    assert inspected[(before, "as trained")]["metrics"][names.outlier_frac(names.OUTPUT)] == 0.0
    assert (before, "test-time register") not in inspected  # no outliers: no register neurons to move
    assert inspected[(after, "as trained")]["metrics"][names.outlier_frac(names.OUTPUT)] > 0.05
    moved = inspected[(after, "test-time register")]
    assert moved["metrics"][names.outlier_frac(names.OUTPUT)] == 0.0
    assert (moved["neurons"][0]["layer"], moved["neurons"][0]["unit"]) == (LAYER, UNIT)


def inspect(tmp_path: Path, run_id: str, *steps: int) -> dict[tuple[int, str], dict]:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    command = [
        sys.executable, "-m", "orchestrator.inspect", *(f"run:{run_id}@{s}" for s in steps), "--test-time-registers",
        "--images", "16", "--search-images", "16", "--tracking-uri", uri, "--experiment", "inspect-emergence",
        "--out", str(tmp_path / "inspect"),
    ]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("inspect-emergence")
    found: dict[tuple[int, str], dict] = {}
    for run in client.search_runs([experiment.experiment_id]):
        tags = run.data.tags
        if tags.get("sweep.role") != "inspection":
            continue
        entry: dict = {"metrics": run.data.metrics}
        if tags["inspect.variant"] == "test-time register":
            local = client.download_artifacts(run.info.run_id, "register_neurons.json", str(tmp_path))
            entry["neurons"] = json.loads(Path(local).read_text())["neurons"]
        found[(int(tags["inspect.trial_step"]), tags["inspect.variant"])] = entry
    return found
