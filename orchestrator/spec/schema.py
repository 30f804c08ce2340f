"""The sweep spec: a YAML file validated into typed models before anything runs.

A spec is a base training config (`train`, a trainers.config.TrainConfig) plus the axes
crossed over it (`grid`, `seeds`), an optional search inside each grid cell (`search`),
an optional early-stopping scheduler (`scheduler`), per-trial resources and where results
go. Every trial the grid produces is validated as a TrainConfig at load time, so a bad
value fails here with one line naming the key, before Ray starts or anything is written.
Reference of every key: docs/spec.md.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Annotated, Any, Mapping, Sequence

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from orchestrator.spec.cells import DEPTH_KEY, REGISTERS_KEY, distinct_cells
from orchestrator.spec.cost import CostConfig
from orchestrator.spec.dotted import get_dotted, set_dotted
from orchestrator.spec.errors import SpecError
from orchestrator.spec.metrics import metric_problem
from orchestrator.spec.overrides import (
    apply_overrides,
    first_problem,
    read_yaml,
    schema_path_problem,
)
from orchestrator.spec.search import (  # noqa: F401 (describe_param: plan.py imports it from here)
    Block,
    ChoiceParam,
    IntParam,
    SchedulerConfig,
    SearchConfig,
    describe_param,
)
from orchestrator.stores.s3 import has_credentials_in_url
from trainers.config import TrainConfig
from trainers.probes import names

SEED_AXIS = "seed"  # the seeds list is crossed with the grid as this axis (a path into train)
MAX_TRIALS = 10_000  # more grid trials than this is a typo in a list, not a study
USE_AWS_CHAIN = "remove them and use the standard AWS chain (AWS_PROFILE, AWS_* variables, an instance role)"
STORAGE_SCHEMES = ("s3",)  # besides a local directory: what the preflight checks and the tests cover


# ----------------------------------------------------------------------------- resources, tracking


class Resources(Block):
    """One process per trial (`cpu`, `gpu`; workers: 1), or `workers` data-parallel processes
    per trial, each with `cpu_per_worker` and `gpu_per_worker` (Ray Train inside Tune)."""

    cpu: float = Field(default=1, gt=0)
    gpu: float = Field(default=0, ge=0)
    workers: int = Field(default=1, ge=1, strict=True, description="data-parallel processes per trial")
    cpu_per_worker: float = Field(default=1, gt=0)
    gpu_per_worker: float = Field(default=0, ge=0)

    @field_validator("gpu")
    @classmethod
    def _whole_gpus_above_one(cls, gpu: float) -> float:
        if gpu > 1 and gpu != int(gpu):
            raise ValueError("a trial can share one GPU (a fraction up to 1) or use whole GPUs; above 1 it must be an integer")
        return gpu

    @field_validator("gpu_per_worker")
    @classmethod
    def _whole_gpus_per_worker(cls, gpu: float) -> float:
        if gpu != int(gpu):
            raise ValueError("each worker uses whole GPUs (NCCL cannot put two ranks on one GPU): 0, 1, 2, ...")
        return gpu

    @model_validator(mode="after")
    def _one_way_to_ask(self) -> "Resources":
        per_worker = {"cpu_per_worker", "gpu_per_worker"} & self.model_fields_set
        per_process = {"cpu", "gpu"} & self.model_fields_set
        if self.workers == 1 and per_worker:
            raise ValueError(f"{', '.join(sorted(per_worker))} needs workers > 1; a one-process trial asks with cpu and gpu")
        if self.workers > 1 and per_process:
            raise ValueError(
                f"with workers > 1 ask with cpu_per_worker and gpu_per_worker, not {' and '.join(sorted(per_process))}"
            )
        return self

    @property
    def distributed(self) -> bool:
        return self.workers > 1

    @property
    def cpu_per_trial(self) -> float:
        return self.cpu_per_worker * self.workers if self.distributed else self.cpu

    @property
    def gpu_per_trial(self) -> float:
        return self.gpu_per_worker * self.workers if self.distributed else self.gpu


class MlflowConfig(Block):
    experiment: str | None = Field(default=None, min_length=1, description="default: the sweep name")
    artifact_location: str | None = Field(
        default=None, min_length=1, description="artifact root of a new experiment, e.g. s3://bucket/mlflow"
    )

    @field_validator("artifact_location")
    @classmethod
    def _no_credentials(cls, location: str | None) -> str | None:
        if location and has_credentials_in_url(location):  # SpecError passes pydantic and does not echo the secret
            raise SpecError("mlflow.artifact_location", f"the URL holds credentials; {USE_AWS_CHAIN}")
        return location


# ----------------------------------------------------------------------------- the spec


class SweepSpec(Block):
    name: str
    train: TrainConfig = TrainConfig()
    seeds: list[Annotated[int, Field(ge=0, strict=True)]] = Field(default_factory=list)
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    search: SearchConfig | None = None
    scheduler: SchedulerConfig | None = None
    resources: Resources = Resources()
    max_failures: int = Field(default=2, ge=0)
    max_concurrent: int | None = Field(default=None, ge=1)
    mlflow: MlflowConfig = MlflowConfig()
    cost: CostConfig = CostConfig()  # the GPU and price --dry-run's time and money estimate assumes
    storage: str = Field(default="./ray_results", min_length=1)

    @field_validator("name")
    @classmethod
    def _plain_name(cls, name: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise ValueError("use only letters, digits, '_', '.' and '-' (the name is a directory and an experiment)")
        return name

    @property
    def experiment_name(self) -> str:
        return self.mlflow.experiment or self.name

    @property
    def axes(self) -> dict[str, list[Any]]:
        """Every crossed axis: the grid keys, then 'seed'. Each key is a dotted path into train."""
        return {**self.grid, SEED_AXIS: list(self.seeds)}

    @property
    def tune_metrics(self) -> tuple[str, ...]:
        """The metrics the search and the scheduler read from every report of every trial."""
        return tuple(dict.fromkeys(b.metric for b in (self.search, self.scheduler) if b is not None))

    @property
    def storage_path(self) -> str:
        """Tune's storage_path: a URL as written, or a local directory made absolute."""
        if "://" in self.storage:
            return self.storage
        return str(Path(self.storage).expanduser().resolve())

    def assignments(self) -> list[dict[str, Any]]:
        """The cross product of all axes, first axis slowest: one dict per grid cell. Cells that
        name the same model (a register depth without registers) are one cell (spec/cells.py)."""
        axes = self.axes
        cells = (dict(zip(axes, values)) for values in itertools.product(*axes.values()))
        return distinct_cells(cells, self.train.model.num_registers)

    def trial_config(self, assignment: Mapping[str, Any]) -> TrainConfig:
        """The base train config with dotted assignments applied, validated (SpecError if invalid)."""
        cfg, problem = _try_train(self.train, assignment)
        if cfg is None:
            raise SpecError("trial " + _describe(assignment), problem)
        return cfg

    @model_validator(mode="after")
    def _check_across_keys(self) -> "SweepSpec":
        # Raising SpecError (not ValueError) here is deliberate: pydantic lets it through,
        # so the message keeps the exact key and value instead of a generic location.
        if "seeds" not in self.model_fields_set:
            self.seeds = [self.train.seed]
        _check_seeds(self.seeds)
        _check_grid(self)
        if self.search is not None:
            _check_search(self, self.search)
            _check_reported(self, "search.metric", self.search.metric)
        if self.scheduler is not None:
            _check_scheduler(self, self.scheduler)
            _check_reported(self, "scheduler.metric", self.scheduler.metric)
        _check_storage(self.storage)
        return self


def _describe(assignment: Mapping[str, Any]) -> str:
    return "{" + ", ".join(f"{k}={v!r}" for k, v in assignment.items()) + "}"


def _try_train(base: TrainConfig, assignment: Mapping[str, Any]) -> tuple[TrainConfig | None, str]:
    """(config, "") or (None, problem) for the base config with the assignment applied."""
    raw = base.model_dump(exclude_unset=True)  # only what the user wrote, so defaults stay defaults
    try:
        for path, value in assignment.items():
            set_dotted(raw, path, value)
        return TrainConfig.model_validate(raw), ""
    except KeyError as err:
        return None, str(err.args[0])
    except ValidationError as err:
        where, problem = first_problem(err, TrainConfig)
        return None, f"{where}: {problem}" if where else problem


def _check_seeds(seeds: list[int]) -> None:
    if not seeds:
        raise SpecError("seeds", "needs at least one seed (leave it out to use train.seed)", seeds)
    if len(set(seeds)) != len(seeds):
        raise SpecError("seeds", "duplicate seeds would repeat identical trials", seeds)


def _alone(spec: SweepSpec, key: str, value: Any) -> dict[str, Any]:
    """The assignment that checks one axis value by itself. A register depth crossed with a register
    axis is checked as it is where it has registers (at least one): cells without registers keep
    no depth (spec/cells.py). Any other key alone."""
    counts = spec.grid.get(REGISTERS_KEY)
    if key == DEPTH_KEY and counts:
        return {key: value, REGISTERS_KEY: max(1, *counts)}
    return {key: value}


def _check_grid(spec: SweepSpec) -> None:
    for key, values in spec.grid.items():
        where = f"grid.{key}"
        if key == SEED_AXIS:
            raise SpecError(where, "seeds are an axis already; list them in the top-level 'seeds'")
        problem = schema_path_problem(TrainConfig, key)
        if problem:
            raise SpecError(where, f"not a path in train: {problem}")
        if not values:
            raise SpecError(where, "empty list; an axis needs at least one value", values)
        for i, value in enumerate(values):
            if value in values[:i]:
                raise SpecError(where, "duplicate value would repeat identical trials", value)
            # Alone, a depth with the base's 0 registers would be refused: the grid may cross it with counts.
            cfg, problem = _try_train(spec.train, _alone(spec, key, value))
            if cfg is None:
                raise SpecError(where, _strip_own_key(problem, key), value)
            canonical = get_dotted(cfg.model_dump(), key)
            if not isinstance(canonical, dict):  # '1e-3' -> 0.001; whole blocks stay as written
                values[i] = canonical
    count = 1
    for values in spec.axes.values():
        count *= len(values)
    if count > MAX_TRIALS:
        raise SpecError("grid", f"{count} trials is more than {MAX_TRIALS}; check the axis lists")
    for assignment in spec.assignments():  # values pass alone; combinations can still clash
        cfg, problem = _try_train(spec.train, assignment)
        if cfg is None:
            raise SpecError("grid", f"the trial {_describe(assignment)} is invalid: {problem}")


def _strip_own_key(problem: str, key: str) -> str:
    """'model.num_registers: too small' -> 'too small' when the grid key already says where
    (also for 'model: ...' from a whole-block check, as 'model' contains the key)."""
    where, sep, rest = problem.partition(": ")
    if sep and (key == where or key.startswith(where + ".")):
        return rest
    return problem


def _check_search(spec: SweepSpec, search: SearchConfig) -> None:
    for key, param in search.space.items():
        where = f"search.space.{key}"
        problem = schema_path_problem(TrainConfig, key)
        if problem:
            raise SpecError(where, f"not a path in train: {problem}")
        if key in spec.grid or key == SEED_AXIS:
            raise SpecError(where, "is also a grid axis (or the seed); a key is either searched or gridded, not both")
        if isinstance(param, ChoiceParam):
            probes = {f"values[{i}]": v for i, v in enumerate(param.values)}
        elif isinstance(param, IntParam):
            probes = {"low": param.low, "high": param.high}
        else:  # floats: Tune samples floats even when the bounds are written as integers
            probes = {"low": float(param.low), "high": float(param.high)}  # type: ignore[attr-defined]
        for field, value in probes.items():
            # Alone, a depth with the base's 0 registers would be refused: the grid may cross it with counts.
            cfg, problem = _try_train(spec.train, _alone(spec, key, value))
            if cfg is None:
                raise SpecError(f"{where}.{field}", _strip_own_key(problem, key), value)


def _metric_cadence(train: TrainConfig, metric: str) -> tuple[str, int]:
    if metric.startswith("val/"):
        return "train.eval_every", train.eval_every
    if metric.startswith(f"{names.PREFIX}/"):
        return "train.probe.every", train.probe.every
    return "train.log_every", train.log_every


def _check_scheduler(spec: SweepSpec, scheduler: SchedulerConfig) -> None:
    swept_steps = "steps" in spec.grid or (spec.search is not None and "steps" in spec.search.space)
    if swept_steps and not scheduler.allow_steps_axis:
        raise SpecError(
            "scheduler",
            "ASHA with 'steps' as an axis compares trials of different lengths at the same step, where the"
            " shorter cosine schedule has already decayed and looks better, so it would stop the long runs"
            " for the wrong reason; sweep steps without a scheduler, or set scheduler.allow_steps_axis: true",
        )
    steps = max(cfg.steps for cfg in (spec.trial_config(a) for a in spec.assignments()))
    if scheduler.grace_period >= steps:
        raise SpecError(
            "scheduler.grace_period",
            f"is not below the trial length ({steps} steps), so ASHA could never stop a trial",
            scheduler.grace_period,
        )
    key, every = _metric_cadence(spec.train, scheduler.metric)
    if every == 0:
        raise SpecError(
            "scheduler.metric",
            f"is only reported at the end because {key} is 0; set {key} to at most grace_period"
            f" ({scheduler.grace_period}) so ASHA can compare trials while they run",
            scheduler.metric,
        )


def _check_reported(spec: SweepSpec, where: str, metric: str) -> None:
    """Tune stops the whole sweep at a report without the metric: refuse it here instead, for
    every trial the grid makes and every value the search may give a key."""
    searched = [{}] if spec.search is None else [{}] + [
        {key: value} for key, param in spec.search.space.items() for value in _searched_values(param)
    ]
    for assignment in spec.assignments():
        for values in searched:
            trial = {**assignment, **values}
            problem = metric_problem(spec.trial_config(trial), metric)
            if problem:
                raise SpecError(where, f"{metric!r} {problem}, in the trial {_describe(trial)}")


def _searched_values(param: BaseModel) -> list[Any]:
    if isinstance(param, ChoiceParam):
        return list(param.values)
    if isinstance(param, IntParam):
        return [param.low, param.high]
    return []  # a float range changes no metric name


def _check_storage(storage: str) -> None:
    if has_credentials_in_url(storage):  # the value is not echoed: it holds a secret
        raise SpecError("storage", f"the URL holds credentials; {USE_AWS_CHAIN}")
    scheme, sep, rest = storage.partition("://")
    if not sep:
        return  # a local directory
    if scheme not in STORAGE_SCHEMES:
        # pyarrow would accept some (gs://, hdfs://) and fail on others (ftp://) only once Tune
        # starts; neither is checked by the preflight nor tested here.
        raise SpecError(
            "storage", f"unsupported URL scheme {scheme!r}; use a local directory or s3://bucket/prefix", storage
        )
    if not rest.strip("/"):
        raise SpecError("storage", f"the URL needs a bucket, e.g. {scheme}://my-bucket/ray_results", storage)


# ----------------------------------------------------------------------------- loading


def parse_spec(raw: Mapping[str, Any]) -> SweepSpec:
    """Validate a raw spec mapping; SpecError (one line, no file name) when it is wrong."""
    try:
        return SweepSpec.model_validate(raw)
    except ValidationError as err:
        where, problem = first_problem(err, SweepSpec)
        got = _first_input(err)
        raise SpecError(where, problem) if got is _NO_INPUT else SpecError(where, problem, got) from None


_NO_INPUT = object()


def _first_input(err: ValidationError) -> Any:
    value = err.errors()[0].get("input", _NO_INPUT)
    return _NO_INPUT if isinstance(value, dict) else value  # a whole block is noise, its key says enough


def load_spec(path: str | Path, overrides: Sequence[str] = ()) -> SweepSpec:
    """Read, override (`--set key=value`) and validate a spec file. SpecError names the file and key."""
    try:
        raw = read_yaml(Path(path))
        return parse_spec(apply_overrides(raw, overrides, SweepSpec))
    except SpecError as err:
        raise err.with_file(str(path)) from None
