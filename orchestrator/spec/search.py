"""The search and scheduler blocks of a sweep spec, and the searched keys' value types.

Whether every trial reports the metric they name is checked across the spec's keys
(orchestrator/spec/schema.py with orchestrator/spec/metrics.py).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from orchestrator.spec.metrics import EXAMPLES
from trainers.probes import names


class Block(BaseModel):
    model_config = ConfigDict(extra="forbid")


METRIC_PREFIXES = ("train/", "val/", f"{names.PREFIX}/")


def check_metric(metric: str) -> str:
    """The metric's family; whether every trial reports it is checked across keys (spec/metrics.py)."""
    if metric.startswith(METRIC_PREFIXES):
        return metric
    raise ValueError(f"unknown metric; use e.g. {EXAMPLES}")


class _Range(Block):
    @model_validator(mode="after")
    def _ordered(self) -> "_Range":
        if self.high <= self.low:  # type: ignore[attr-defined]
            raise ValueError(f"high ({self.high}) must be greater than low ({self.low})")  # type: ignore[attr-defined]
        return self


class UniformParam(_Range):
    type: Literal["uniform"]
    low: float
    high: float


class LogUniformParam(_Range):
    type: Literal["loguniform"]
    low: float = Field(gt=0)
    high: float


class IntParam(_Range):
    """Integers from low to high, both included (the launcher asks Tune for randint(low, high + 1))."""

    type: Literal["int"]
    low: int
    high: int


class ChoiceParam(Block):
    type: Literal["choice"]
    values: list[Any] = Field(min_length=1)


SearchParam = Annotated[Union[UniformParam, LogUniformParam, IntParam, ChoiceParam], Field(discriminator="type")]
SEARCH_PARAM_TYPES: dict[str, type[BaseModel]] = {
    "uniform": UniformParam, "loguniform": LogUniformParam, "int": IntParam, "choice": ChoiceParam,
}


def describe_param(param: BaseModel) -> str:
    """'loguniform[0.0001, 0.003]', 'int[1, 8]', 'choice{a, b}': how a searched key shows in a plan."""
    if isinstance(param, ChoiceParam):
        return "choice{" + ", ".join(str(v) for v in param.values) + "}"
    if isinstance(param, IntParam):
        return f"int[{param.low}, {param.high}]"
    return f"{param.type}[{param.low:g}, {param.high:g}]"  # type: ignore[attr-defined]


class SearchConfig(Block):
    num_samples: int = Field(ge=1, description="trials per grid cell")
    metric: str
    mode: Literal["min", "max"]
    space: dict[str, SearchParam] = Field(min_length=1)

    _metric = field_validator("metric")(check_metric)


class SchedulerConfig(Block):
    type: Literal["asha"] = "asha"
    metric: str
    mode: Literal["min", "max"]
    grace_period: int = Field(ge=1, description="training steps before a trial can be stopped")
    reduction_factor: float = Field(default=3, gt=1)
    allow_steps_axis: bool = False

    _metric = field_validator("metric")(check_metric)
