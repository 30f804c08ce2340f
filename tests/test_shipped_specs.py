"""Every shipped spec, end to end, as users run it: one matrix for issue 27 (the suite runs
what users run) and issue 22 (GPU semantics on the CPU).

Each case is a `sweeps/*.yaml` run through `python -m orchestrator.sweep` with its own keys,
shrunk only through `--set` as a user would (a micro ViT, 32 px, a few steps, a small grid;
checkpoint, evaluation and probe cadences in the spec's own order: every GPU spec checkpoints
before it first evaluates), then `python -m orchestrator.analyze` on its launch. Probes stay
on. What the spec turns on stays on: its search and scheduler, its DataLoader workers
(data.num_workers), compile, the DeiT-III recipe, multi-crop and iBOT, captions, and 2 gloo
workers where the spec asks for workers. The GPU specs run as a GPU runs them: `precision:
auto` is bf16 on CUDA, so they run under `train.precision=bf16` (autocast on the CPU).

Shared, to keep CI time down: the data sets (a tiny ImageFolder and WebDataset shards in
their real formats, written once, local and on one loopback S3 server), one MLflow store,
and one Ray head that every case joins (RAY_ADDRESS) as on a cluster, whose node has its
own AWS credentials and data cache. The GPU specs read their data from s3:// where the
specs' comments put it (IMAGENET_ROOT, SHARDS_ROOT on the node), and keep storage and
checkpoints there; one DINO case reads a local ImageFolder. Ray started in-process (the
laptop's path) is covered by the other end-to-end tests (test_sweep_e2e.py, test_resume.py).

Compile: inductor needs minutes per trial on 2 cores, so the compiled specs run with
`train.compile_backend=aot_eager`, as a user checking a spec on a CPU would: the graphs,
guards and recompiles are dynamo's, the kernels are not inductor's.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest
from mlflow.tracking import MlflowClient

from ray_head import RayHead, ray_head
from real_data import upload_tree, write_image_text_shards, write_imagefolder
from s3_server import S3Endpoint, moto_s3_server
from sweep_helpers import ROOT, sweep_env
from trainers.probes import names

pytestmark = pytest.mark.slow

BUCKET = "shipped-specs"
# Where the GPU specs' ${IMAGENET_ROOT} and ${SHARDS_ROOT} point, on the driver and on the node.
DATA_ON_S3 = {"IMAGENET_ROOT": f"s3://{BUCKET}/imagenet", "SHARDS_ROOT": f"s3://{BUCKET}/shards"}



# As a GPU runs the GPU specs, shrunk to a CPU: resources of one CPU process, bf16 autocast,
# a micro ViT at 32 px with 8 px patches, batches of 8, a short warmup, a log point every 2 steps.
GPU_SPEC = (
    "resources={cpu: 1, gpu: 0}", "train.precision=bf16", "max_failures=0",
    "train.model.size=micro", "train.model.img_size=32", "train.model.patch_size=8",
    "train.optim.batch_size=8", "train.optim.warmup_steps=2", "train.log_every=2",
    "train.compile_backend=aot_eager",  # for the specs that compile: inductor takes minutes per trial here
)
DINO_SHRUNK = (
    "train.dino.head_prototypes=64", "train.dino.head_hidden_dim=32", "train.dino.head_bottleneck_dim=16",
    "train.dino.local_crop_size=16", "train.dino.knn_train_size=48",  # 8 local crops, iBOT and KoLeo as shipped
)
CLIP_SHRUNK = ("train.clip.embed_dim=16", "train.clip.text_width=32", "train.clip.text_layers=1", "train.clip.text_heads=2")
TWO_WORKERS = ("resources={workers: 2, cpu_per_worker: 1}",)


@dataclass(frozen=True)
class Case:
    spec: str  # file under sweeps/
    label: str
    overrides: tuple[str, ...]
    trials: int  # trial runs the launch makes
    precision: str = "auto"
    local_data: bool = False  # the ImageFolder from a local folder (--set train.data.root) instead of s3://

    @property
    def id(self) -> str:
        return f"{self.spec.removesuffix('.yaml')}-{self.label}"

    @property
    def reads_imagenet_from_s3(self) -> bool:
        return not self.local_data and self.spec in ("num_registers.yaml", "dinov2_registers.yaml", "deit3_registers.yaml")


CASES = (
    # The CPU specs as shipped (auto = fp32 on the CPU), grids and lengths shrunk.
    Case("quickstart.yaml", "as-shipped", (
        "grid.model.size=[micro]", "grid.model.num_registers=[0, 4]", "grid.steps=[4, 8]",
        "train.eval_every=4", "train.probe.every=2", "train.log_every=2",
    ), trials=4),
    Case("search_lr.yaml", "search-and-asha", (
        "train.steps=24", "train.eval_every=4", "train.optim.warmup_steps=2", "train.log_every=2",
        "search.num_samples=3", "scheduler.grace_period=8",
    ), trials=6),
    Case("families.yaml", "as-shipped", (
        "grid.model.num_registers=[4]", "train.steps=8", "train.eval_every=4", "train.probe.every=4",
        "train.log_every=2", "train.dino.knn_train_size=256",
    ), trials=3),
    Case("families.yaml", "bf16-supervised-clip", (
        "grid.objective=[supervised, clip]", "grid.model.num_registers=[4]", "train.precision=bf16",
        "train.steps=8", "train.eval_every=4", "train.probe.every=4", "train.log_every=2",
    ), trials=2, precision="bf16"),
    Case("families.yaml", "bf16-dino", (
        "grid.objective=[dino]", "grid.model.num_registers=[4]", "train.precision=bf16", "max_failures=0",
        "train.steps=8", "train.eval_every=4", "train.probe.every=4", "train.log_every=2",
        "train.dino.knn_train_size=256",
    ), trials=1, precision="bf16"),
    # The GPU specs, as on a cluster with data on S3, bf16.
    Case("num_registers.yaml", "bf16-compiled-s3", (
        *GPU_SPEC, "grid.model.size=[micro]", "grid.steps=[8, 16]", "grid.model.num_registers=[0, 4]",
        "train.eval_every=8", "train.checkpoint_every=2", "train.probe.every=4",
        f"storage=s3://{BUCKET}/ray_results",
    ), trials=4, precision="bf16"),
    Case("clip_registers.yaml", "bf16-shards-s3", (
        *GPU_SPEC, *CLIP_SHRUNK, "grid.model.size=[micro]", "grid.model.num_registers=[4]",
        "train.steps=8", "train.eval_every=4", "train.checkpoint_every=2", "train.probe.every=4",
        f"storage=s3://{BUCKET}/ray_results",
    ), trials=1, precision="bf16"),
    Case("dinov2_registers.yaml", "bf16", (
        *GPU_SPEC, *DINO_SHRUNK, "grid.model.size=[micro]", "grid.model.num_registers=[4]",
        "train.steps=8", "train.eval_every=4", "train.checkpoint_every=2", "train.probe.every=2",
    ), trials=1, precision="bf16"),
    Case("deit3_registers.yaml", "bf16-compiled-2-workers", (
        *GPU_SPEC, *TWO_WORKERS, "grid.model.num_registers=[4]",
        "train.steps=8", "train.eval_every=4", "train.checkpoint_every=2", "train.probe.every=8",
    ), trials=1, precision="bf16"),
    Case("deit3_registers.yaml", "bf16-compiled-1-process", (
        *GPU_SPEC, "grid.model.num_registers=[4]",
        "train.steps=8", "train.eval_every=4", "train.checkpoint_every=2", "train.probe.every=8",
    ), trials=1, precision="bf16"),
    Case("deit3_registers.yaml", "fp32-compiled-2-workers", (
        *GPU_SPEC, *TWO_WORKERS, "train.precision=auto", "grid.model.num_registers=[4]",
        "train.steps=8", "train.eval_every=4", "train.checkpoint_every=2", "train.probe.every=8",
    ), trials=1),
    # A local ImageFolder: the DINO recipe without bf16, as the spec runs on a CPU (auto = fp32).
    Case("dinov2_registers.yaml", "fp32-local", (
        *GPU_SPEC, *DINO_SHRUNK, "train.precision=auto", "grid.model.size=[micro]", "grid.model.num_registers=[0, 4]",
        "train.steps=8", "train.eval_every=4", "train.checkpoint_every=2", "train.probe.every=2",
    ), trials=2, local_data=True),
    # Data-parallel self-supervision, as a user scaling these specs out would ask for it.
    Case("dinov2_registers.yaml", "2-workers", (
        *GPU_SPEC, *DINO_SHRUNK, *TWO_WORKERS, "grid.model.size=[micro]", "grid.model.num_registers=[4]",
        "train.steps=8", "train.eval_every=4", "train.checkpoint_every=2", "train.probe.every=2",
    ), trials=1, precision="bf16"),
    Case("clip_registers.yaml", "2-workers", (
        *GPU_SPEC, *CLIP_SHRUNK, *TWO_WORKERS, "grid.model.size=[micro]", "grid.model.num_registers=[4]",
        "train.steps=8", "train.eval_every=4", "train.checkpoint_every=2", "train.probe.every=4",
    ), trials=1, precision="bf16"),
)


# ----------------------------------------------------------------------------- shared setup


@dataclass(frozen=True)
class Shared:
    folder: Path  # the MLflow store (mlflow.db) and local storage live here
    imagenet: Path
    s3: S3Endpoint
    head: RayHead
    auth_token: str

    def env(self) -> dict[str, str]:
        """The driver's environment: the cluster, the data's place, S3."""
        return {
            **self.s3.env(), **DATA_ON_S3, "VIT_DATA_CACHE": str(self.folder / "driver_cache"),
            "RAY_ADDRESS": self.head.gcs_address, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.auth_token,
        }


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shared]:
    import boto3

    folder = tmp_path_factory.mktemp("shipped")
    imagenet = write_imagefolder(folder / "imagenet")
    shards = write_image_text_shards(folder / "shards")
    with moto_s3_server() as s3:
        client = boto3.client("s3", endpoint_url=s3.url, **_keys(s3))
        upload_tree(client, imagenet, BUCKET, "imagenet")
        upload_tree(client, shards, BUCKET, "shards")
        token = secrets.token_hex(32)
        # The cluster's nodes: their own credentials and data cache, as instance roles and node disks would give them.
        node_env = {
            **s3.env(), **DATA_ON_S3, "VIT_DATA_CACHE": str(folder / "node_cache"),
            "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
        }
        with ray_head(num_cpus=2, env=node_env) as head:
            yield Shared(folder, imagenet, s3, head, token)


def _keys(s3: S3Endpoint) -> dict[str, str]:
    env = s3.env()
    return {"aws_access_key_id": env["AWS_ACCESS_KEY_ID"], "aws_secret_access_key": env["AWS_SECRET_ACCESS_KEY"],
            "region_name": env["AWS_DEFAULT_REGION"]}


def run_cli(
    shared: Shared, module: str, *args: str, timeout: float = 900, **extra_env: str
) -> subprocess.CompletedProcess[str]:
    env = sweep_env(shared.folder, **{**shared.env(), **extra_env})
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=shared.folder, env=env, capture_output=True, text=True, timeout=timeout
    )


def launch_runs(client: MlflowClient, launch: str) -> tuple[Any, list[Any]]:
    """The launch's parent run and its trial runs."""
    (parent,) = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], filter_string=f"tags.`sweep.launch` = '{launch}'"
    )
    trials = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' and tags.`sweep.role` = 'trial'",
    )
    return parent, trials


# ----------------------------------------------------------------------------- the matrix


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_shipped_spec_runs_end_to_end(shared: Shared, case: Case) -> None:
    launch = case.id
    storage = () if any(o.startswith("storage=") for o in case.overrides) else (f"storage={shared.folder / 'ray_results'}",)
    sets = [arg for override in (*case.overrides, *storage) for arg in ("--set", override)]
    sets += ["--set", f"train.data.root={shared.imagenet}"] if case.local_data else []
    done = run_cli(shared, "orchestrator.sweep", str(ROOT / "sweeps" / case.spec), "--launch", launch, *sets)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-6000:]

    client = MlflowClient(f"sqlite:///{shared.folder / 'mlflow.db'}")
    parent, trials = launch_runs(client, launch)
    assert parent.info.status == "FINISHED" and len(trials) == case.trials
    stopped = [r for r in trials if "stopped_early.step" in r.data.tags]
    for run in trials:
        run_id, tags, params = run.info.run_id, run.data.tags, run.data.params
        assert run.info.status == "FINISHED", (run.info.run_name, tags.get("failure_reason"))
        assert params["precision"] == case.precision
        # The run names the code it ran: this checkout's commit or its sources' digest, never the empty digest.
        assert tags["git_commit"] == parent.data.tags["git_commit"] != "src-da39a3ee5e6b"
        last = int(tags.get("stopped_early.step", tags["axis.steps"]))
        assert [m.step for m in client.get_metric_history(run_id, names.TRAIN_LOSS)][-1] == last
        assert client.get_metric_history(run_id, names.VAL_TOP1)
        if run in stopped:
            continue  # stopped before its end: no final probe (search_lr probes only at the end)
        # Probes ran at the spec's cadence and at the end, with their tables and the final figures.
        probe_steps = [m.step for m in client.get_metric_history(run_id, names.outlier_frac(names.OUTPUT))]
        assert probe_steps and probe_steps[-1] == last, probe_steps
        files = {a.path.rsplit("/", 1)[-1] for a in client.list_artifacts(run_id, names.artifact_dir(last))}
        assert {names.NORMS_FILE, names.ATTENTION_FILE, names.NORM_HIST_FIGURE} <= files, files
        assert tags["checkpoint_uri"]
        if "s3://" in " ".join(case.overrides):
            assert tags["checkpoint_uri"].startswith(f"s3://{BUCKET}/ray_results/")

    if case.reads_imagenet_from_s3:
        # The ImageFolder on s3:// was synced by the trials, on their node, through AWS_ENDPOINT_URL;
        # the driver only checked that it exists.
        assert (shared.folder / "node_cache" / BUCKET / "imagenet" / "train").is_dir()
        assert not (shared.folder / "driver_cache" / BUCKET / "imagenet" / "train").exists()

    experiment = client.get_experiment(parent.info.experiment_id).name
    # The analysis reads images for its test-time registers: a cache of its own, so that the
    # driver's stays empty as long as no sweep syncs a data set there.
    analysis = run_cli(shared, "orchestrator.analyze", "--experiment", experiment,
                       "--parent-run", parent.info.run_id, "--out", str(shared.folder / "analysis" / launch),
                       VIT_DATA_CACHE=str(shared.folder / "analysis_cache"))
    assert analysis.returncode == 0, analysis.stdout[-3000:] + analysis.stderr[-3000:]
    analysed = case.trials - len(stopped)
    assert f"trials: {analysed} analysed" in analysis.stdout, analysis.stdout
    assert (shared.folder / "analysis" / launch / "report.md").is_file()
    if case.spec == "search_lr.yaml":
        check_scheduler_stops(stopped, analysis.stdout)


def check_scheduler_stops(stopped: list[Any], analysed: str) -> None:
    """ASHA stopped some trials: each says at which step and why, and the analysis left them out."""
    assert stopped, "ASHA stopped no trial; the case no longer shows what it is for"
    for run in stopped:
        tags = run.data.tags
        step = int(tags["stopped_early.step"])
        assert step < int(tags["axis.steps"])
        assert f"at step {step} of {tags['axis.steps']}" in tags["stopped_early.reason"]
        assert "ASHA on val/loss (min" in tags["stopped_early.reason"]
    assert f"{len(stopped)} stopped early" in analysed, analysed


# ----------------------------------------------------------------------------- what a search or scheduler reads


def test_a_scheduler_on_train_loss_and_a_search_before_the_first_evaluation(shared: Shared) -> None:
    """Issue 27's crash: ASHA on train/loss (no report carried it), and a search on val/top1 in a
    sweep that checkpoints before it first evaluates (as every GPU spec does)."""
    launch = "search_lr-train-loss"
    sets = [
        "scheduler.metric=train/loss", "search.num_samples=2", "train.steps=24", "scheduler.grace_period=8",
        "train.eval_every=8", "train.checkpoint_every=4", "train.log_every=2", "train.optim.warmup_steps=2",
        f"storage={shared.folder / 'ray_results'}",
    ]
    done = run_cli(shared, "orchestrator.sweep", str(ROOT / "sweeps" / "search_lr.yaml"), "--launch", launch,
                   *[arg for s in sets for arg in ("--set", s)])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{shared.folder / 'mlflow.db'}")
    parent, trials = launch_runs(client, launch)
    assert parent.info.status == "FINISHED" and len(trials) == 4
    for run in trials:
        assert run.info.status == "FINISHED"
        # The report at step 4 needed val/top1 for the search: it was measured there, and logged.
        assert [m.step for m in client.get_metric_history(run.info.run_id, names.VAL_TOP1)][:1] == [4]
    trial_dirs = (shared.folder / "ray_results" / launch).glob("trial_*/result.json")
    for result_file in trial_dirs:
        reports = [json.loads(line) for line in result_file.read_text().splitlines()]
        assert reports and all(names.TRAIN_LOSS in r and names.VAL_TOP1 in r for r in reports)


def test_a_sweep_that_tune_stops_closes_its_runs_failed(shared: Shared) -> None:
    """Should Tune itself stop (here: reports without the search's metric, as before the fix,
    brought back by not telling the trials what the search reads), no run stays RUNNING."""
    launch = "search_lr-tune-stops"
    script = (
        "import sys\n"
        "from orchestrator.spec.schema import SweepSpec\n"
        "SweepSpec.tune_metrics = property(lambda self: ())\n"
        "from orchestrator.sweep import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    sets = ["search.num_samples=1", "train.steps=8", "train.eval_every=4", "train.checkpoint_every=2",
            "scheduler=null", "train.log_every=2", f"storage={shared.folder / 'ray_results'}"]
    env = sweep_env(shared.folder, **shared.env())
    done = subprocess.run(
        [sys.executable, "-c", script, str(ROOT / "sweeps" / "search_lr.yaml"), "--launch", launch,
         *[arg for s in sets for arg in ("--set", s)]],
        cwd=shared.folder, env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode != 0
    assert "did not include the specified metric(s) `val/top1`" in done.stderr, done.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{shared.folder / 'mlflow.db'}")
    parent, trials = launch_runs(client, launch)
    assert parent.info.status == "FAILED" and "val/top1" in parent.data.tags["failure_reason"]
    assert trials and all(r.info.status in ("FAILED", "FINISHED") for r in trials), [r.info.status for r in trials]
    assert any(r.data.tags.get("failure_reason", "").startswith("the sweep stopped: ValueError") for r in trials)
