"""`python -m orchestrator.inspect` offline: local files through timm's own loading path, hub names
from the local cache or failing fast, trials by run id, one MLflow run per model, the report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from mlflow.tracking import MlflowClient
from planted_neuron import planted_trial_checkpoint
from safetensors.torch import save_file

from orchestrator.inspect.__main__ import main
from trainers.config import DataConfig, ModelConfig, ProbeConfig, TrainConfig
from trainers.pretrained import WeightsError, load_timm
from trainers.probes import names

ROOT = Path(__file__).resolve().parents[1]
TINY = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"
DINO_REG = "vit_small_patch14_reg4_dinov2.lvd142m"
OUTPUT_FRAC = names.outlier_frac(names.OUTPUT)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, Path]:
    """Random-init timm models saved as a safetensors file and as a plain torch state dict."""
    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    tiny = timm.create_model(TINY, pretrained=False)
    save_file(tiny.state_dict(), folder / "tiny.safetensors")
    reg = timm.create_model(DINO_REG, pretrained=False)
    torch.save(reg.state_dict(), folder / "dino_reg4.pth")
    return {"tiny": folder / "tiny.safetensors", "reg": folder / "dino_reg4.pth"}


def store_runs(uri: str, experiment: str = "inspect") -> list:
    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id]) if found else []


def test_a_local_file_takes_the_hub_path_and_loads_exactly(weights, monkeypatch):
    calls = []
    real = timm.create_model

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(timm, "create_model", spy)
    loaded = load_timm(TINY, weights["tiny"])
    (name,), kwargs = calls[0]
    assert name == TINY and kwargs["pretrained"] is True
    assert kwargs["pretrained_cfg_overlay"]["file"] == str(weights["tiny"])
    from safetensors.torch import load_file

    saved = load_file(weights["tiny"])
    state = loaded.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.items())
    assert (loaded.img_size, loaded.num_registers, loaded.mean) == (224, 0, (0.5, 0.5, 0.5))


def test_a_plain_state_dict_with_registers_at_another_size(weights):
    loaded = load_timm(DINO_REG, weights["reg"], img_size=112)  # timm's filter resamples the position embedding
    assert loaded.num_registers == 4 and loaded.model.num_prefix_tokens == 5
    assert tuple(loaded.model.patch_embed.grid_size) == (8, 8)
    with pytest.raises(WeightsError, match="cannot load"):
        load_timm(TINY, weights["reg"])  # the wrong architecture's weights: one line, not a traceback


def test_a_head_of_another_size_loads_with_its_head_and_a_note(tmp_path):
    """A file fine-tuned on 10 classes (or saved without a head) loads exactly: the probes do not use the head."""
    torch.manual_seed(0)
    ten = timm.create_model("vit_tiny_patch16_224", num_classes=10).state_dict()
    torch.save(ten, tmp_path / "ten.pth")
    loaded = load_timm("vit_tiny_patch16_224", tmp_path / "ten.pth")
    assert loaded.model.num_classes == 10 and "10-class classifier head" in loaded.note
    assert all(torch.equal(loaded.model.state_dict()[k], v) for k, v in ten.items())
    headless = timm.create_model("vit_tiny_patch16_224", num_classes=0).state_dict()
    save_file(headless, tmp_path / "headless.safetensors")
    loaded = load_timm("vit_tiny_patch16_224", tmp_path / "headless.safetensors")
    assert loaded.model.num_classes == 0 and "no classifier head" in loaded.note
    same = load_timm(TINY, tmp_path / "ten.pth").note, load_timm("vit_tiny_patch16_224", tmp_path / "ten.pth").note
    assert all(same)


def test_a_file_that_does_not_load_says_why_and_writes_nothing(tmp_path, monkeypatch, capsys):
    """torch's error puts its reasons below a header line; the one line shown keeps them."""
    monkeypatch.chdir(tmp_path)
    state = timm.create_model("vit_tiny_patch16_224").state_dict()
    state["blocks.0.attn.qkv.weight"] = torch.zeros(5, 5)
    torch.save(state, tmp_path / "broken.pth")
    assert main(["vit_tiny_patch16_224=broken.pth", "--images", "4", "--search-images", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "Error(s) in loading state_dict for VisionTransformer: size mismatch for blocks.0.attn.qkv.weight" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.pth"]  # no MLflow store, no report


def test_inspect_a_ten_class_file_end_to_end(tmp_path, monkeypatch, capsys):
    """The issue's reproduction: `python -m orchestrator.inspect vit_tiny_patch16_224=FILE` on a 10-class file."""
    monkeypatch.chdir(tmp_path)
    torch.save(timm.create_model("vit_tiny_patch16_224", num_classes=10).state_dict(), tmp_path / "ten.pth")
    code = main(["vit_tiny_patch16_224=ten.pth", "--img-size", "112", "--images", "4", "--search-images", "4"])
    out = capsys.readouterr().out
    assert code == 0
    notes = [line for line in out.splitlines() if "10-class classifier head" in line]
    assert len(notes) == 1 and "built with num_classes=10" in notes[0]
    run = next(r for r in store_runs(f"sqlite:///{tmp_path / 'mlflow.db'}") if r.data.tags["sweep.role"] == "inspection")
    assert "10-class" in run.data.tags["inspect.weights_note"]
    assert "10-class classifier head" in (tmp_path / "inspect_out" / "report.md").read_text()


def test_inspect_two_local_models_one_run_each_and_a_report(weights, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    start = time.perf_counter()
    code = main([
        f"{TINY}={weights['tiny']}", f"{DINO_REG}={weights['reg']}", "--img-size", "112",
        "--images", "8", "--search-images", "8", "--tracking-uri", uri, "--out", str(tmp_path / "out"),
    ])
    seconds = time.perf_counter() - start
    assert code == 0, capsys.readouterr().err
    runs = {r.data.tags["inspect.model"]: r for r in store_runs(uri) if r.data.tags["sweep.role"] == "inspection"}
    assert set(runs) == {TINY, DINO_REG}
    assert runs[DINO_REG].data.tags["num_registers"] == "4" and runs[TINY].data.tags["num_registers"] == "0"
    assert {r.data.tags["inspect.source"] for r in runs.values()} == {"file"}
    for run in runs.values():
        assert OUTPUT_FRAC in run.data.metrics and names.attn("entropy", "cls") in run.data.metrics
        listed = {a.path for a in MlflowClient(uri).list_artifacts(run.info.run_id, names.artifact_dir(0))}
        assert {f"{names.artifact_dir(0)}/{f}" for f in (names.NORMS_FILE, names.ATTENTION_FILE, names.NORM_HIST_FIGURE)} <= listed
    assert runs[DINO_REG].data.metrics[names.norm_stat("mean", "reg_03", names.OUTPUT)] > 0
    report = (tmp_path / "out" / "report.md").read_text()
    for model in (TINY, DINO_REG):
        assert f"| {model} (" in report
    for figure in ("norm_hist.png", "outliers_by_block.png", "attention.png"):
        assert (tmp_path / "out" / "figures" / figure).stat().st_size > 1000
    assert "112px, patch 14 (8x8)" in report and "112px, patch 16 (7x7)" in report
    assert [r for r in store_runs(uri) if r.data.tags["sweep.role"] == "inspection-report"]
    print(f"inspect of two random-init models: {seconds:.1f} s")


def test_a_hub_name_from_the_local_cache_works_offline(weights, tmp_path, monkeypatch):
    from huggingface_hub import constants

    snapshot = tmp_path / "hub" / f"models--timm--{TINY}" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").symlink_to(weights["tiny"])
    (tmp_path / "hub" / f"models--timm--{TINY}" / "refs").mkdir()
    (tmp_path / "hub" / f"models--timm--{TINY}" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from trainers.pretrained import hub_weights

    assert hub_weights(TINY) == snapshot / "model.safetensors"


def _run_cli(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    return subprocess.run([sys.executable, "-m", "orchestrator.inspect", *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.parametrize("offline", [True, False], ids=["HF_HUB_OFFLINE", "hub-unreachable"])
def test_a_hub_name_without_network_fails_fast_with_one_line(tmp_path, offline):
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": "http://127.0.0.1:9", "TORCH_HOME": str(tmp_path / "torch")}
    env["HF_HUB_OFFLINE"] = "1" if offline else "0"
    work = tmp_path / "work"
    work.mkdir()
    start = time.perf_counter()
    done = _run_cli(["vit_small_patch14_dinov2.lvd142m", "--test-time-registers"], work, env)
    seconds = time.perf_counter() - start
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: vit_small_patch14_dinov2.lvd142m: weights are not in the local Hugging Face cache")
    assert "pass it as vit_small_patch14_dinov2.lvd142m=/path/to/model.safetensors" in lines[0]
    assert list(work.iterdir()) == []  # no mlflow.db, no inspect_out
    print(f"exit 2 after {seconds:.1f} s, Python's start-up included")


@pytest.mark.parametrize("offline", [True, False], ids=["HF_HUB_OFFLINE", "hub-unreachable"])
def test_the_hub_lookup_fails_in_seconds_not_after_retries(tmp_path, monkeypatch, offline):
    # huggingface_hub by itself retries five times (about 25 s) before it gives up; the command
    # must not wait for that. Timed in-process: the subprocess above also pays torch's import.
    from huggingface_hub import constants

    from trainers.pretrained import hub_weights

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1" if offline else "0")
    start = time.perf_counter()
    with pytest.raises(WeightsError, match="HF_HUB_OFFLINE is set" if offline else "cannot be reached"):
        hub_weights("vit_small_patch14_dinov2.lvd142m")
    assert time.perf_counter() - start < 5


@pytest.mark.parametrize(
    "model, message",
    [
        ("vit_nonexistent_model", "not a timm model name"),
        ("vit_small_patch14_dinov2.nosuchtag", "no pretrained tag"),
        ("eva02_tiny_patch14_224.mim_in22k", "need a timm VisionTransformer"),
        ("vit_small_patch14_dinov2.lvd142m=/no/such/file.safetensors", "no file at"),
        ("run:123", "32 hex digits"),
        ("run:0123456789abcdef0123456789abcdef@last", "run:RUN_ID@STEP"),
    ],
)
def test_bad_models_exit_2_and_write_nothing(tmp_path, monkeypatch, capsys, model, message):
    monkeypatch.chdir(tmp_path)
    assert main([model]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert list(tmp_path.iterdir()) == []


def test_missing_data_exits_2_and_writes_nothing(weights, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main([f"{TINY}={weights['tiny']}", "--data", str(tmp_path / "nope")]) == 2
    assert "no such folder or tar file" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def trial_store(tmp_path_factory):
    """An MLflow store with one finished no-register trial whose checkpoint has a planted register neuron."""
    folder = tmp_path_factory.mktemp("trial")
    cfg = TrainConfig(
        model=ModelConfig(size="micro", patch_size=4, img_size=32), data=DataConfig(name="shapes", val_size=64),
        probe=ProbeConfig(batch_size=32), steps=10, eval_every=0,
    )
    checkpoint = planted_trial_checkpoint(folder / "checkpoint_000000", cfg)
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("sweep")
    run = client.create_run(experiment, tags={"sweep.role": "trial", "checkpoint_uri": str(checkpoint.parent), "mlflow.runName": "micro-r0"})
    client.set_terminated(run.info.run_id, "FINISHED")
    return uri, run.info.run_id


def test_a_trial_by_run_id_with_a_test_time_register(trial_store, tmp_path, capsys):
    uri, run_id = trial_store
    assert main([f"run:{run_id}", "--test-time-registers", "--tracking-uri", uri, "--out", str(tmp_path / "out")]) == 0, capsys.readouterr().err
    runs = {r.data.tags["inspect.variant"]: r for r in store_runs(uri) if r.data.tags["sweep.role"] == "inspection"}
    assert set(runs) == {"as trained", "test-time register"}
    trained, moved = runs["as trained"].data, runs["test-time register"].data
    assert trained.tags["inspect.source"] == "trial" and trained.tags["inspect.trial_run"] == run_id
    assert trained.metrics[OUTPUT_FRAC] == pytest.approx(1 / 8)  # every eighth patch carries the planted neuron
    assert moved.metrics[OUTPUT_FRAC] == 0.0
    assert moved.metrics[names.norm_stat("mean", "reg_00", names.OUTPUT)] > 10 * moved.metrics[names.norm_stat("median", "patch", names.OUTPUT)]
    assert names.VAL_TOP1 in trained.metrics and names.VAL_TOP1 in moved.metrics
    assert moved.tags["num_registers"] == "0" and moved.tags["inspect.test_time_register"] == "1"
    local = MlflowClient(uri).download_artifacts(runs["test-time register"].info.run_id, "register_neurons.json", str(tmp_path))
    neurons = json.loads(Path(local).read_text())["neurons"]
    assert (neurons[0]["layer"], neurons[0]["unit"]) == (1, 7)
    report = (tmp_path / "out" / "report.md").read_text()
    assert "trial micro-r0 + test-time register" in report and "## Test-time registers" in report
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [s["variant"] for s in summary] == ["as trained", "test-time register"]


@pytest.fixture(scope="module")
def kept_store(tmp_path_factory):
    """A finished trial that kept a clean checkpoint at step 5 (tagged by the checkpoint pruner) and
    whose final checkpoint, at step 10, carries a planted register neuron."""
    from trainers.emergence.keys import kept_checkpoint_tag
    from trainers.model import build_model

    folder = tmp_path_factory.mktemp("kept")
    cfg = TrainConfig(
        model=ModelConfig(size="micro", patch_size=4, img_size=32), data=DataConfig(name="shapes", val_size=64),
        probe=ProbeConfig(batch_size=32), steps=10, eval_every=0,
    )
    final = planted_trial_checkpoint(folder / "checkpoint_000001", cfg)
    torch.manual_seed(0)
    clean = folder / "checkpoint_000000"
    clean.mkdir()
    torch.save({"step": 5, "model": build_model(cfg.model, cfg.data.num_classes).state_dict(), "config": cfg.model_dump()}, clean / "trainer_state.pt")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("sweep")
    tags = {"sweep.role": "trial", "checkpoint_uri": str(final.parent), "mlflow.runName": "micro-r0", kept_checkpoint_tag(5): str(clean)}
    run = client.create_run(experiment, tags=tags)
    client.set_terminated(run.info.run_id, "FINISHED")
    return uri, run.info.run_id


def test_a_trial_at_a_kept_step_and_at_its_final_step(kept_store, tmp_path, capsys):
    uri, run_id = kept_store
    args = ["--test-time-registers", "--images", "16", "--search-images", "16", "--tracking-uri", uri, "--out", str(tmp_path / "out")]
    assert main([f"run:{run_id}@5", f"run:{run_id}@10", *args]) == 0, capsys.readouterr().err
    runs = [r for r in store_runs(uri) if r.data.tags.get("sweep.role") == "inspection"]
    by_step = {(r.data.tags["inspect.trial_step"], r.data.tags["inspect.variant"]): r.data for r in runs}
    assert set(by_step) == {("5", "as trained"), ("10", "as trained"), ("10", "test-time register")}
    assert by_step[("5", "as trained")].metrics[OUTPUT_FRAC] == 0.0  # nothing before the neuron was planted
    assert by_step[("10", "as trained")].metrics[OUTPUT_FRAC] == pytest.approx(1 / 8)
    assert by_step[("10", "test-time register")].metrics[OUTPUT_FRAC] == 0.0
    printed = capsys.readouterr().out
    assert "trial micro-r0 @ step 5" in printed and "no outlier patches" in printed


def test_a_step_the_trial_did_not_keep_is_one_line_naming_what_it_kept(kept_store, tmp_path, monkeypatch, capsys):
    uri, run_id = kept_store
    monkeypatch.chdir(tmp_path)
    assert main([f"run:{run_id}@7", "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: run {run_id} keeps no checkpoint at step 7; it keeps steps 5 and its final checkpoint (step 10)"]
    assert list(tmp_path.iterdir()) == []


def test_an_image_folder_and_a_tar_shard(weights, tmp_path):
    from PIL import Image

    from trainers.data.images import load_images

    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / "folder" / cls).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(tmp_path / "folder" / cls / f"{i}.png")
    import tarfile

    with tarfile.open(tmp_path / "shard.tar", "w") as tar:
        for i, path in enumerate(sorted((tmp_path / "folder").rglob("*.png"))):
            tar.add(path, arcname=f"{i:04d}.png")
            (tmp_path / f"{i:04d}.cls").write_text(str(i % 3))
            tar.add(tmp_path / f"{i:04d}.cls", arcname=f"{i:04d}.cls")
    for source, classes in ((tmp_path / "folder", {0, 1}), (tmp_path / "shard.tar", {0, 1, 2})):
        images = load_images(str(source), img_size=28, mean=(0.5,) * 3, std=(0.5,) * 3, probe_size=6, search_size=4)
        assert images.probe.images.shape == (6, 3, 28, 28) and images.search.shape == (4, 3, 28, 28)
        assert set(images.probe.labels.tolist()) <= classes


@pytest.mark.slow  # ~20 s on 2 busy cores: a ViT-Ti at 224 probed twice, plus the figures
def test_a_planted_timm_file_with_a_test_time_register(tmp_path, monkeypatch, capsys):
    """The whole command on a timm model: a register neuron planted at every eighth patch
    position of a random-init ViT-Ti/16, saved as a file, found and moved with the generic defaults."""
    from planted_neuron import plant_register_neuron

    torch.manual_seed(0)
    model = timm.create_model(TINY, pretrained=False).eval()
    plant_register_neuron(model, layer=3, unit=11, by="position", positions=list(range(0, 196, 8)))
    save_file(model.state_dict(), tmp_path / "planted.safetensors")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [f"{TINY}={tmp_path / 'planted.safetensors'}", "--test-time-registers", "--images", "8", "--search-images", "8"]
    assert main([*args, "--tracking-uri", uri, "--out", str(tmp_path / "out")]) == 0, capsys.readouterr().err
    runs = {r.data.tags["inspect.variant"]: r.data for r in store_runs(uri) if r.data.tags["sweep.role"] == "inspection"}
    assert runs["as trained"].metrics[OUTPUT_FRAC] == pytest.approx(25 / 196)
    assert runs["test-time register"].metrics[OUTPUT_FRAC] == 0.0
    assert runs["test-time register"].params["ttr.detector"] == "robust" and runs["test-time register"].params["ttr.max_layer"] == "7"
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    neurons = summary[1]["search"]["neurons"]
    assert (neurons[0]["layer"], neurons[0]["unit"]) == (3, 11)
