"""How many trials run at once, re-read from the cluster while the sweep runs.

Tune's own `max_concurrent_trials` is a number fixed at launch. A multi-worker trial's Tune
driver holds no resources of its own (its Ray Train workers ask for theirs once it runs), so
Tune would start every trial at once and the extra ones would wait for GPUs forever
(ray#38505); a cap read once from `ray.cluster_resources()` is 0 on an autoscaling cluster
that starts with no GPU node. `ClusterConcurrencyLimiter` is Tune's ConcurrencyLimiter with a
limit that follows the cluster: on each suggestion it counts the trials whose workers the nodes
that are up now hold (orchestrator/spec/cluster.py, `trials_that_fit`), never above
max_concurrent. As the autoscaler adds nodes (orchestrator/launch/autoscaling.py asks it to),
more trials start; when nodes go, fewer new ones do.

A limiter needs a Searcher. Grid sweeps have none in Tune (its BasicVariantGenerator takes only
a fixed max_concurrent), so `PlanSearcher` hands out the plan's trials in order; searched
sweeps use GridCellSearcher (orchestrator/trials/grid_search.py). Both are wrapped alike.
One-process trials hold their own resources, so Tune already starts only what fits and
the autoscaler sees their waiting trials: for them the limit is max_concurrent alone.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping, Sequence

from ray.tune.search import ConcurrencyLimiter, Searcher

from orchestrator.launch.autoscaling import alive_node_resources
from orchestrator.spec.cluster import trials_that_fit
from orchestrator.spec.schema import Resources
from orchestrator.trials.grid_search import FiniteSearcher

REREAD_S = 2.0  # the cluster's nodes are read at most this often (suggest runs every Tune step)


class PlanSearcher(FiniteSearcher):
    """The grid's trials, in plan order, as a Searcher (what a ConcurrencyLimiter wraps)."""

    def __init__(self, trials: Sequence[Mapping[str, Any]]) -> None:
        super().__init__()
        self.trials = [dict(t) for t in trials]
        self.issued = 0

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        return True  # nothing is searched

    @property
    def exhausted(self) -> bool:
        return self.issued >= len(self.trials)

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        if self.exhausted:
            return Searcher.FINISHED
        trial = self.trials[self.issued]
        self.issued += 1
        return {"trial": trial}

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        pass


class ClusterConcurrencyLimiter(ConcurrencyLimiter):
    """A ConcurrencyLimiter whose limit is re-read from the cluster (module docstring).

    `max_concurrent` (Tune reads it for how many trials may wait to start) is the upper bound:
    the spec's max_concurrent, else every trial of the sweep."""

    def __init__(
        self,
        searcher: FiniteSearcher,
        resources: Resources,
        upper: int,
        nodes: Callable[[], list[dict[str, float]]] = alive_node_resources,
    ) -> None:
        super().__init__(searcher, max_concurrent=max(upper, 1))
        self.resources = resources
        self.nodes = nodes
        self.limit_read_at = float("-inf")
        self.limit = 0

    def __getstate__(self) -> dict[str, Any]:
        # Tune saves this object with its state: read the cluster anew after a resume.
        return {**self.__dict__, "limit_read_at": float("-inf")}

    def current_limit(self) -> int:
        if not self.resources.distributed:
            return self.max_concurrent
        now = time.monotonic()
        if now - self.limit_read_at >= REREAD_S:
            self.limit = min(self.max_concurrent, trials_that_fit(self.nodes(), self.resources))
            self.limit_read_at = now
        return self.limit

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        if self.searcher.exhausted:
            # Finished as soon as the plan is handed out, also at the limit: Tune waits up to 10
            # minutes for a suggestion from a search that is not finished whenever it counts no
            # running trial (seen after a resume), holding the running trial's reports meanwhile.
            return Searcher.FINISHED
        if len(self.live_trials) >= self.current_limit():
            return None
        return super().suggest(trial_id)
