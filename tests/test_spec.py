"""Sweep spec validation: every bad spec fails with one line naming the file, key and value."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator.spec.dotted import set_dotted
from orchestrator.spec.errors import SpecError
from orchestrator.spec.overrides import apply_overrides
from orchestrator.spec.schema import SweepSpec, load_spec, parse_spec
from trainers.config import MODEL_SIZES, TrainConfig

REPO = Path(__file__).resolve().parents[1]
SWEEPS = REPO / "sweeps"

BASE: dict[str, Any] = {
    "name": "t",
    "train": {
        "model": {"size": "micro", "patch_size": 4, "img_size": 32, "num_registers": 0},
        "data": {"name": "shapes", "num_classes": 6},
        "optim": {"lr": 1.0e-3, "batch_size": 8},
        "steps": 100,
        "eval_every": 20,
    },
    "grid": {"model.num_registers": [0, 2]},
}


def spec_with(**changes: Any) -> dict[str, Any]:
    """BASE with dotted-path changes into it."""
    raw = copy.deepcopy(BASE)
    for path, value in changes.items():
        set_dotted(raw, path.replace("__", "."), value)
    return raw


def write(tmp_path: Path, content: dict[str, Any] | str, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content, sort_keys=False))
    return path


def error_of(path: Path, overrides: tuple[str, ...] = ()) -> str:
    with pytest.raises(SpecError) as info:
        load_spec(path, overrides)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    return message


# ----------------------------------------------------------------------------- file-level errors


def test_missing_file(tmp_path: Path) -> None:
    assert error_of(tmp_path / "nope.yaml").endswith("no such file")


def test_broken_yaml_names_the_line(tmp_path: Path) -> None:
    message = error_of(write(tmp_path, "name: x\ntrain:\n  steps: [1, 2\n  seed: 0\n"))
    assert "invalid YAML" in message and "line 3" in message


@pytest.mark.parametrize("text, kind", [("- a\n- b\n", "list"), ("just text\n", "str")])
def test_top_level_not_a_mapping(tmp_path: Path, text: str, kind: str) -> None:
    message = error_of(write(tmp_path, text))
    assert "must be a mapping" in message and kind in message


def test_empty_file(tmp_path: Path) -> None:
    assert "empty file" in error_of(write(tmp_path, ""))


def test_duplicate_key_is_refused(tmp_path: Path) -> None:
    message = error_of(write(tmp_path, "name: x\ngrid: {}\ngrid: {steps: [1]}\n"))
    assert "duplicate key 'grid'" in message and "line 3" in message and "first at line 2" in message


# ----------------------------------------------------------------------------- key-level errors

BAD_SPECS = [
    # (changes to BASE, fragments the message must contain)
    ({"train.optim.lrr": 0.1}, ["train.optim.lrr", "unknown key", "did you mean 'lr'", "(got 0.1)"]),
    ({"resources": {"gpus": 1}}, ["resources.gpus", "unknown key", "did you mean 'gpu'"]),
    ({"gird": {"steps": [1]}}, ["gird", "unknown key", "did you mean 'grid'"]),
    ({"train.model.sise": "micro"}, ["train.model.sise", "did you mean 'size'"]),
    ({"search": {"num_samples": 1, "metric": "val/loss", "mode": "min", "space": {"optim.lr": {"type": "uniform", "low": 0.1, "high": 1, "hgih": 2}}}},
     ["search.space.optim.lr.hgih", "unknown key", "did you mean 'high'"]),
    ({"train.steps": "many"}, ["train.steps", "valid integer", "(got 'many')"]),
    ({"train.optim.lr": "fast"}, ["train.optim.lr", "(got 'fast')"]),
    ({"train.model.num_registers": -1}, ["train.model.num_registers", "greater than or equal to 0", "(got -1)"]),
    ({"train.model.num_registers": 1.5}, ["train.model.num_registers", "valid integer", "(got 1.5)"]),
    ({"train.model.num_registers": "2"}, ["train.model.num_registers", "valid integer", "(got '2')"]),
    ({"grid": {"model.num_registers": [0, -1]}}, ["grid.model.num_registers: Input should be greater than or equal to 0 (got -1)"]),
    ({"grid": {"model.num_registers": [0, 1.5]}}, ["grid.model.num_registers", "valid integer", "(got 1.5)"]),
    ({"grid": {"model.num_registers": [0, "2"]}}, ["grid.model.num_registers", "valid integer", "(got '2')"]),
    ({"grid": {"model.num_registers": [0, True]}}, ["grid.model.num_registers", "valid integer", "(got True)"]),
    ({"train.model.size": "hugee"}, ["train.model", "unknown model size 'hugee'", ", ".join(MODEL_SIZES)]),
    ({"grid": {"model.size": ["micro", "hugee"]}}, ["grid.model.size", "unknown model size", "(got 'hugee')"]),
    ({"grid": {"model.size": []}}, ["grid.model.size", "empty list", "(got [])"]),
    ({"grid": {"steps": 50}}, ["grid.steps", "list of values", "(got 50)"]),
    ({"grid": {"model.num_regs": [1]}}, ["grid.model.num_regs", "not a path in train", "did you mean 'num_registers'"]),
    ({"grid": {"steps.value": [1]}}, ["grid.steps.value", "not a path in train", "steps holds a value"]),
    ({"grid": {"seed": [0, 1]}}, ["grid.seed", "seeds"]),
    ({"grid": {"model.num_registers": [0, 0]}}, ["grid.model.num_registers", "duplicate", "(got 0)"]),
    ({"train.optim.batch_size": 0}, ["train.optim.batch_size", "greater than 0", "(got 0)"]),
    ({"train.steps": 0}, ["train.steps", "greater than 0", "(got 0)"]),
    ({"grid": {"optim.batch_size": [8, 0]}}, ["grid.optim.batch_size", "greater than 0", "(got 0)"]),
    ({"grid": {"steps": [100, 10]}}, ["grid.steps", "eval_every (20) is larger than steps (10)", "(got 10)"]),
    ({"grid": {"model.img_size": [32, 36], "model.patch_size": [4, 8]}}, ["grid: the trial {model.img_size=36, model.patch_size=8", "not a multiple"]),
    ({"resources": {"gpu": 1.5}}, ["resources.gpu", "integer", "(got 1.5)"]),
    ({"resources": {"cpu": 0}}, ["resources.cpu", "(got 0)"]),
    ({"seeds": []}, ["seeds", "at least one", "(got [])"]),
    ({"seeds": [1, 1]}, ["seeds", "duplicate", "(got [1, 1])"]),
    ({"seeds": [0, -3]}, ["seeds[1]", "(got -3)"]),
    ({"name": "my sweep"}, ["name", "letters", "(got 'my sweep')"]),
    ({"storage": "s3://"}, ["storage", "bucket", "(got 's3://')"]),
    ({"storage": "ftp://host/x"}, ["storage: unsupported URL scheme 'ftp'", "local directory or s3://", "(got 'ftp://host/x')"]),
    ({"storage": "gs://bucket/x"}, ["storage: unsupported URL scheme 'gs'", "(got 'gs://bucket/x')"]),
    ({"storage": "S3://bucket/x"}, ["storage: unsupported URL scheme 'S3'", "(got 'S3://bucket/x')"]),
    ({"max_concurrent": 0}, ["max_concurrent", "(got 0)"]),
    ({"max_failures": -1}, ["max_failures", "(got -1)"]),
]


@pytest.mark.parametrize("changes, fragments", BAD_SPECS, ids=[str(list(c)[0]) + str(i) for i, (c, _) in enumerate(BAD_SPECS)])
def test_bad_spec_message_names_key_and_value(tmp_path: Path, changes: dict[str, Any], fragments: list[str]) -> None:
    raw = copy.deepcopy(BASE)
    for path, value in changes.items():
        if path in ("gird", "resources", "grid", "seeds", "name", "storage", "max_concurrent", "max_failures", "search"):
            raw[path] = value
        else:
            set_dotted(raw, path, value)
    message = error_of(write(tmp_path, raw))
    for fragment in fragments:
        assert fragment in message, (fragment, message)


SEARCH = {"num_samples": 2, "metric": "val/top1", "mode": "max", "space": {"optim.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2}}}
ASHA = {"type": "asha", "metric": "val/loss", "mode": "min", "grace_period": 20, "reduction_factor": 3}


def with_search(**search_changes: Any) -> dict[str, Any]:
    raw = copy.deepcopy(BASE)
    raw["search"] = copy.deepcopy(SEARCH)
    for path, value in search_changes.items():
        raw["search"][path] = value
    return raw


@pytest.mark.parametrize(
    "space, fragments",
    [
        ({"model.num_registers": {"type": "int", "low": 0, "high": 4}}, ["search.space.model.num_registers", "also a grid axis"]),
        ({"optim.lrr": {"type": "uniform", "low": 0, "high": 1}}, ["search.space.optim.lrr", "not a path in train", "did you mean 'lr'"]),
        ({"optim.lr": {"type": "loguniform", "low": 0, "high": 1}}, ["search.space.optim.lr.low", "greater than 0", "(got 0)"]),
        ({"optim.lr": {"type": "uniform", "low": 1, "high": 0.5}}, ["search.space.optim.lr", "high (0.5) must be greater than low (1.0)"]),
        ({"optim.lr": {"type": "gaussian", "low": 0, "high": 1}}, ["search.space.optim.lr.type", "'uniform', 'loguniform', 'int', 'choice'", "'gaussian'"]),
        ({"optim.lr": {"low": 0, "high": 1}}, ["search.space.optim.lr", "missing 'type'"]),
        ({"optim.weight_decay": {"type": "uniform", "low": -0.1, "high": 0.1}}, ["search.space.optim.weight_decay.low", "(got -0.1)"]),
        ({"optim.batch_size": {"type": "choice", "values": [8, 0]}}, ["search.space.optim.batch_size.values[1]", "(got 0)"]),
        ({"optim.batch_size": {"type": "choice", "values": []}}, ["search.space.optim.batch_size.values", "at least 1"]),
        ({}, ["search.space", "at least 1"]),
    ],
)
def test_bad_search_space(tmp_path: Path, space: dict[str, Any], fragments: list[str]) -> None:
    message = error_of(write(tmp_path, with_search(space=space)))
    for fragment in fragments:
        assert fragment in message, (fragment, message)


@pytest.mark.parametrize(
    "search_changes, fragments",
    [
        ({"num_samples": 0}, ["search.num_samples", "(got 0)"]),
        ({"metric": "accuracy"}, ["search.metric", "unknown metric", "val/top1", "(got 'accuracy')"]),
        ({"mode": "maximum"}, ["search.mode", "(got 'maximum')"]),
    ],
)
def test_bad_search_settings(tmp_path: Path, search_changes: dict[str, Any], fragments: list[str]) -> None:
    message = error_of(write(tmp_path, with_search(**search_changes)))
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_probe_metrics_are_accepted(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, with_search(metric="probe/outlier_frac/output")))
    assert spec.search is not None and spec.search.metric == "probe/outlier_frac/output"


@pytest.mark.parametrize(
    "changes, fragments",
    [
        # Logged every 50 steps, first reported at step 20: Tune would stop the sweep at that report.
        ({"search.metric": "train/loss", "search.mode": "min", "train.log_every": 50},
         ["search.metric: 'train/loss' is first logged at step 50", "at most 20"]),
        ({"search.metric": "val/loss", "train.objective": "dino"},
         ["search.metric: 'val/loss' is not measured by the dino objective's evaluation", "val/knn_top1"]),
        ({"search.metric": "val/knn_top1"}, ["not measured by the supervised objective's evaluation"]),
        # Exists only while the model has outlier tokens; the data have no masks for corloc.
        ({"search.metric": "probe/linear/class_acc/outlier"}, ["is not measured at every probe", "with 0 registers"]),
        ({"search.metric": "probe/corloc"}, ["is not measured at every probe"]),
        # Register 3 of a trial with 2 registers (the grid's other value) does not exist.
        ({"search.metric": "probe/norm_max/reg_02/output", "grid.model.num_registers": [4, 2]},
         ["probe/norm_max/reg_02/output", "with 2 registers", "model.num_registers=2"]),
        ({"search.metric": "probe/outlier_frac/block_04"}, ["is not measured at every probe of a micro ViT"]),
        ({"search.metric": "probe/outlier_frac/output", "train.probe.at_end": False}, ["the probes are off"]),
        ({"search.metric": "val/top1", "train.objective": "dino", "train.data": {"name": "webdataset", "root": "/d", "val_root": "/v"}},
         ["is never measured: a dino trial on webdataset data has no evaluation"]),
    ],
)
def test_a_metric_that_a_report_can_lack_is_refused_at_load(
    tmp_path: Path, changes: dict[str, Any], fragments: list[str]
) -> None:
    raw = with_search()
    for path, value in changes.items():
        if path.startswith("grid."):
            raw["grid"][path.removeprefix("grid.")] = value  # a grid key is one dotted name
        else:
            set_dotted(raw, path, value)
    message = error_of(write(tmp_path, raw))
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


@pytest.mark.parametrize(
    "metric",
    [
        "train/loss", "val/top1", "val/loss", "probe/outlier_frac/output", "probe/outlier_frac_abs/block_03",
        "probe/norm_max_over_median/patch/output", "probe/attn_entropy/cls", "probe/linear/class_acc/cls",
        "probe/norm_max/reg_01/output",
    ],
)
def test_metrics_every_report_carries_are_accepted(tmp_path: Path, metric: str) -> None:
    raw = with_search(metric=metric)
    raw["grid"] = {"model.num_registers": [2, 4]}
    spec = load_spec(write(tmp_path, raw))
    assert spec.search is not None and spec.search.metric == metric


def test_asha_with_steps_axis_is_refused_and_explains_why(tmp_path: Path) -> None:
    raw = spec_with(scheduler=copy.deepcopy(ASHA))
    raw["grid"]["steps"] = [50, 100]
    message = error_of(write(tmp_path, raw))
    assert message.startswith(f"{tmp_path / 'spec.yaml'}: scheduler: ")
    assert "different lengths" in message and "allow_steps_axis" in message
    raw["scheduler"]["allow_steps_axis"] = True
    assert load_spec(write(tmp_path, raw)).grid["steps"] == [50, 100]


@pytest.mark.parametrize(
    "changes, fragments",
    [
        ({"grace_period": 100}, ["scheduler.grace_period", "could never stop", "(got 100)"]),
        ({"grace_period": 0}, ["scheduler.grace_period", "(got 0)"]),
        ({"reduction_factor": 1}, ["scheduler.reduction_factor", "(got 1)"]),
        ({"type": "hyperband"}, ["scheduler.type", "(got 'hyperband')"]),
        ({"metric": "probe/outlier_frac/output"}, ["scheduler.metric", "train.probe.every is 0"]),
    ],
)
def test_bad_scheduler(tmp_path: Path, changes: dict[str, Any], fragments: list[str]) -> None:
    raw = spec_with(scheduler={**ASHA, **changes})
    message = error_of(write(tmp_path, raw))
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_asha_on_val_metric_needs_evaluation_during_training(tmp_path: Path) -> None:
    raw = spec_with(scheduler=copy.deepcopy(ASHA))
    raw["train"]["eval_every"] = 0
    assert "train.eval_every is 0" in error_of(write(tmp_path, raw))


@pytest.mark.parametrize("gpu", [0, 0.25, 1, 2])
def test_gpu_fractions_and_whole_gpus_are_fine(tmp_path: Path, gpu: float) -> None:
    assert load_spec(write(tmp_path, spec_with(resources={"cpu": 0.5, "gpu": gpu}))).resources.gpu == gpu


# ----------------------------------------------------------------------------- --set overrides


def test_overrides_apply_to_the_whole_spec(tmp_path: Path) -> None:
    raw = copy.deepcopy(BASE)
    raw["search"] = copy.deepcopy(SEARCH)
    path = write(tmp_path, raw)
    spec = load_spec(
        path,
        [
            "train.steps=50",
            "train.optim.weight_decay=0.1",  # not in the YAML, still a valid key
            "seeds=[0, 1]",
            "resources.cpu=2",
            "mlflow.experiment=other",
            "grid.model.num_registers=[0,4]",
            "grid.model.size=[micro, mini]",
            "search.space.optim.lr.low=1e-5",
            "storage=s3://bucket/prefix",
        ],
    )
    assert spec.train.steps == 50 and spec.train.optim.weight_decay == 0.1
    assert spec.seeds == [0, 1] and spec.resources.cpu == 2
    assert spec.experiment_name == "other"
    assert spec.grid == {"model.num_registers": [0, 4], "model.size": ["micro", "mini"]}
    assert spec.search is not None and spec.search.space["optim.lr"].low == 1e-5  # type: ignore[union-attr]
    assert spec.storage_path == "s3://bucket/prefix"


def test_override_null_removes_a_grid_axis_and_can_start_a_block(tmp_path: Path) -> None:
    path = write(tmp_path, BASE)
    spec = load_spec(path, ["grid.model.num_registers=null", "scheduler.metric=train/loss", "scheduler.mode=min", "scheduler.grace_period=10"])
    assert spec.grid == {} and spec.scheduler is not None and spec.scheduler.grace_period == 10


@pytest.mark.parametrize(
    "override, fragments",
    [
        ("train.optim.lrr=0.1", ["--set train.optim.lrr", "'lrr' is not a key of train.optim", "did you mean 'lr'"]),
        ("trian.steps=5", ["--set trian.steps", "did you mean 'train'"]),
        ("resources.gpus=1", ["--set resources.gpus", "did you mean 'gpu'"]),
        ("train.steps.x=1", ["--set train.steps.x", "holds a value"]),
        ("train.steps", ["expected key=value"]),
        ("train.steps=[1,", ["--set train.steps", "cannot parse the value as YAML", "(got '[1,')"]),
        ("train.steps=abc", ["train.steps", "valid integer", "(got 'abc')"]),
        ("grid.model.num_registers=[0, -4]", ["grid.model.num_registers", "(got -4)"]),
    ],
)
def test_bad_overrides(tmp_path: Path, override: str, fragments: list[str]) -> None:
    message = error_of(write(tmp_path, BASE), (override,))
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_apply_overrides_leaves_its_input_alone() -> None:
    raw = copy.deepcopy(BASE)
    result = apply_overrides(raw, ["train.steps=7", "grid.steps=[7]"], SweepSpec)
    assert raw == BASE
    assert result["train"]["steps"] == 7 and result["grid"]["steps"] == [7]


def test_set_dotted_creates_blocks_and_refuses_to_go_through_values() -> None:
    tree: dict[str, Any] = {"steps": 5}
    set_dotted(tree, "optim.lr", 0.1)
    assert tree == {"steps": 5, "optim": {"lr": 0.1}}
    with pytest.raises(KeyError, match="steps"):
        set_dotted(tree, "steps.x", 1)


# ----------------------------------------------------------------------------- good specs and semantics


def test_seeds_default_to_train_seed_and_cross_the_grid() -> None:
    spec = parse_spec(spec_with(**{"train.seed": 7}))
    assert spec.seeds == [7]
    assert spec.axes == {"model.num_registers": [0, 2], "seed": [7]}
    spec = parse_spec({**spec_with(), "seeds": [1, 2]})
    assert [a["seed"] for a in spec.assignments()] == [1, 2, 1, 2]


def test_grid_values_are_normalised_to_their_types() -> None:
    spec = parse_spec({**spec_with(), "grid": {"optim.lr": ["1e-3", 0.01]}})  # YAML reads 1e-3 as a string
    assert spec.grid["optim.lr"] == [0.001, 0.01]


def test_trial_config_applies_assignments_and_validates() -> None:
    spec = parse_spec(spec_with())
    cfg = spec.trial_config({"model.num_registers": 4, "seed": 3, "optim.lr": 0.01})
    assert isinstance(cfg, TrainConfig)
    assert (cfg.model.num_registers, cfg.seed, cfg.optim.lr, cfg.model.size) == (4, 3, 0.01, "micro")
    assert spec.train.model.num_registers == 0  # the base is untouched
    with pytest.raises(SpecError, match="model.num_registers"):
        spec.trial_config({"model.num_registers": -1})


def test_the_three_sweeps_load(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IMAGENET_ROOT", raising=False)  # only the data preflight needs it
    quick = load_spec(SWEEPS / "quickstart.yaml")
    assert quick.grid["model.num_registers"] == [0, 1, 2, 4, 8, 16]
    assert len(quick.grid["model.size"]) >= 2 and len(quick.grid["steps"]) >= 2
    assert quick.seeds == [0] and quick.resources.cpu == 1 and quick.resources.gpu == 0
    assert quick.train.data.name == "shapes"

    real = load_spec(SWEEPS / "num_registers.yaml")
    assert real.grid["model.num_registers"] == [0, 1, 2, 4, 8, 16]
    assert real.grid["model.size"] == ["small", "base", "large"] and len(real.grid["steps"]) >= 2
    assert real.train.data.name == "imagefolder" and real.train.data.root == "${IMAGENET_ROOT}"
    assert (real.resources.gpu, real.train.compile, real.max_failures) == (1, True, 3)
    assert (real.train.model.patch_size, real.train.model.img_size) == (16, 224)

    search = load_spec(SWEEPS / "search_lr.yaml")
    assert search.search is not None and search.scheduler is not None


def test_loading_does_not_start_ray_or_write_files(tmp_path: Path) -> None:
    bad = write(tmp_path, spec_with(**{"train.steps": 0}), "bad.yaml")
    script = (
        "import sys\n"
        "from orchestrator.spec.errors import SpecError\nfrom orchestrator.spec.schema import load_spec\n"
        f"load_spec({str(SWEEPS / 'quickstart.yaml')!r})\n"
        "try:\n"
        f"    load_spec({str(bad)!r})\n"
        "except SpecError as e:\n"
        "    print(e)\n"
        "print(sorted(m for m in ('ray', 'mlflow', 'torch') if m in sys.modules))\n"
    )
    before = sorted(p.name for p in tmp_path.iterdir())
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, check=True).stdout
    assert "train.steps" in out and out.strip().endswith("[]")
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_dry_run_refuses_a_storage_url_it_cannot_honour(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from orchestrator.sweep import main

    path = write(tmp_path, BASE)
    assert main([str(path), "--dry-run", "--set", "storage=ftp://host/x"]) == 2
    out, err = capsys.readouterr()
    assert out == ""  # no plan naming ftp:// as Tune's storage
    assert err.splitlines() == [
        f"error: {path}: storage: unsupported URL scheme 'ftp'; use a local directory or s3://bucket/prefix"
        " (got 'ftp://host/x')"
    ]
    assert main([str(path), "--dry-run", "--set", "storage=s3://bucket/sweeps"]) == 0
