"""Optuna (TPE) search inside each grid cell, in one Tuner.

Tune's OptunaSearch cannot take grid axes, and one Tuner per cell would run the cells
one after another. This searcher keeps one OptunaSearch per grid cell and deals out
suggestions cell by cell, so all cells run concurrently and each cell's TPE only learns
from its own trials (a learning rate that is best for 16 registers says little about 0).
"""

from __future__ import annotations

import pickle
from typing import Any, Mapping, Sequence

import optuna
from ray import tune
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch


def tune_domain(entry: Mapping[str, Any]) -> Any:
    """A spec search-space entry ({type: loguniform, low:, high:} ...) as a Tune domain."""
    kind = entry["type"]
    if kind == "uniform":
        return tune.uniform(entry["low"], entry["high"])
    if kind == "loguniform":
        return tune.loguniform(entry["low"], entry["high"])
    if kind == "int":
        return tune.randint(entry["low"], entry["high"] + 1)
    if kind == "choice":
        return tune.choice(list(entry["values"]))
    raise ValueError(f"unknown search space type {kind!r}")


class FiniteSearcher(Searcher):
    """A searcher with a fixed number of trials to hand out, whose whole state is its attributes
    (saved and restored with Tune's state). `exhausted` says when all are handed out: the
    concurrency limiter (orchestrator/launch/concurrency.py) then reports the search finished."""

    @property
    def exhausted(self) -> bool:
        raise NotImplementedError

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__dict__, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.__dict__.update(pickle.load(f))


class GridCellSearcher(FiniteSearcher):
    def __init__(
        self,
        cells: Sequence[Mapping[str, Any]],
        space: Mapping[str, Mapping[str, Any]],
        samples_per_cell: int,
        metric: str,
        mode: str,
        seed: int = 0,
    ) -> None:
        super().__init__(metric=metric, mode=mode)
        self.cells = [dict(cell) for cell in cells]
        self.samples_per_cell = samples_per_cell
        domains = {key: tune_domain(entry) for key, entry in space.items()}
        self.searchers = [
            OptunaSearch(
                space=dict(domains), metric=metric, mode=mode, sampler=optuna.samplers.TPESampler(seed=seed + i)
            )
            for i in range(len(self.cells))
        ]
        self.issued = [0] * len(self.cells)
        self.cell_of_trial: dict[str, int] = {}

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        return True  # metric, mode and space are fixed by the sweep spec

    @property
    def exhausted(self) -> bool:
        """Every cell has had its samples."""
        return all(n >= self.samples_per_cell for n in self.issued)

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        # Deal cells round-robin so that every cell makes progress at the same pace.
        open_cells = [i for i, n in enumerate(self.issued) if n < self.samples_per_cell]
        if not open_cells:
            return Searcher.FINISHED
        cell = min(open_cells, key=lambda i: (self.issued[i], i))
        suggestion = self.searchers[cell].suggest(trial_id)
        if suggestion is None or suggestion == Searcher.FINISHED:
            return suggestion
        index = cell * self.samples_per_cell + self.issued[cell]
        self.issued[cell] += 1
        self.cell_of_trial[trial_id] = cell
        return {"trial": {"index": index, "axes": {**self.cells[cell], **suggestion}}}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self.cell_of_trial:
            self.searchers[self.cell_of_trial[trial_id]].on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        cell = self.cell_of_trial.get(trial_id)
        if cell is not None:
            self.searchers[cell].on_trial_complete(trial_id, result=result, error=error)
