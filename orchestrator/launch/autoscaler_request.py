"""What the sweep asks of the autoscaler: the resources of the trials it wants running.

`AutoscalerRequest` is a Tune callback. On each step it asks for one bundle per worker of
min(max_concurrent, trials not yet finished) trials, lowers the request as trials finish and
cancels it when the sweep ends (also when it fails or is interrupted), so the autoscaler's idle
timeout takes the nodes away. Multi-worker trials need it most: their Tune driver holds no
resources, so Tune shows the autoscaler no demand for a trial that has not started, and on a
cluster with no GPU node yet no trial can start (orchestrator/launch/concurrency.py).

The request goes through Ray's AutoscalingCoordinator, not straight to
`ray.autoscaler.sdk.request_resources`. In Ray 2.60 every Ray Train run registers its workers'
resources with that coordinator (a detached actor), which merges all requests and sends them
with `request_resources` every 20 s: a request sent beside it would be overwritten within
20 s. So the sweep is one more requester: its request is for the trials not yet running (a
running multi-worker trial's Train run asks for its own workers; one-process trials hold their
resources, and `request_resources` counts the cluster's whole size, so theirs are all asked
for). Requests expire after EXPIRE_S unless renewed (every REFRESH_S here): a driver killed with
-9 leaves nothing behind for longer than that. The coordinator is created by the first
requester on that requester's node; the sweep asks first, from its driver on the head, so that
the detached actor never pins a GPU node (a node with a live actor is never idle, and the
autoscaler would never remove it). Where the coordinator cannot be imported (another Ray), the
request goes to `request_resources` directly.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Mapping, Protocol

from ray.tune import Callback

logger = logging.getLogger(__name__)

REFRESH_S = 20.0  # as often as Ray Train renews its own requests
EXPIRE_S = 180.0  # as long as Ray Train's requests live unrenewed
CALL_TIMEOUT_S = 5.0


class Channel(Protocol):
    def send(self, bundles: list[dict[str, float]]) -> None: ...

    def cancel(self) -> None: ...


class CoordinatorChannel:
    """The sweep as one requester of Ray's AutoscalingCoordinator (module docstring)."""

    def __init__(self, requester_id: str) -> None:
        self.requester_id = requester_id

    def coordinator(self) -> Any:
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            get_or_create_autoscaling_coordinator,
        )

        return get_or_create_autoscaling_coordinator()

    def send(self, bundles: list[dict[str, float]]) -> None:
        import ray

        try:
            coordinator = self.coordinator()
        except ImportError:
            from ray.autoscaler.sdk import request_resources

            request_resources(bundles=bundles)
            return
        ray.get(
            coordinator.request_resources.remote(requester_id=self.requester_id, resources=bundles, expire_after_s=EXPIRE_S),
            timeout=CALL_TIMEOUT_S,
        )

    def cancel(self) -> None:
        import ray

        try:
            coordinator = self.coordinator()
        except ImportError:
            from ray.autoscaler.sdk import request_resources

            request_resources(bundles=[])
            return
        ray.get(coordinator.cancel_request.remote(requester_id=self.requester_id), timeout=CALL_TIMEOUT_S)


def cancel_request(requester: str) -> None:
    """Withdraw the sweep's request (the end of fit, however it ends); never raises."""
    try:
        CoordinatorChannel(requester).cancel()
    except Exception as error:  # Ray already down, the coordinator gone: it expires by itself
        logger.warning("could not withdraw the request to the autoscaler (it expires in %.0f s): %s", EXPIRE_S, error)


def requester_id(launch_name: str) -> str:
    return f"sweep-{launch_name}"


class AutoscalerRequest(Callback):
    """Asks the autoscaler for the resources of the trials the sweep wants running (module docstring)."""

    def __init__(
        self,
        requester: str,
        bundle: Mapping[str, float],
        workers: int,
        trials: int,
        max_concurrent: int | None,
        channel: Callable[[str], Channel] = CoordinatorChannel,
    ) -> None:
        self.requester = requester
        self.bundle = dict(bundle)
        self.workers = workers
        self.trials = trials
        self.max_concurrent = max_concurrent
        self.channel = channel
        self.asked: int | None = None  # bundles last asked for, by this process
        self.asked_at = float("-inf")

    def __getstate__(self) -> dict[str, Any]:
        # Saved with Tune's state: a resumed sweep asks again, whatever was asked before.
        return {**self.__dict__, "asked": None, "asked_at": float("-inf")}

    def bundles_wanted(self, trials: list[Any]) -> int:
        finished = sum(1 for t in trials if t.is_finished())
        left = max(self.trials - finished, 0)
        wanted = left if self.max_concurrent is None else min(self.max_concurrent, left)
        if self.workers > 1:
            # A running multi-worker trial's Train run asks for its own workers.
            wanted -= sum(1 for t in trials if t.status == "RUNNING")
        return max(wanted, 0) * self.workers

    def on_step_begin(self, iteration: int, trials: list[Any], **info: Any) -> None:
        bundles = self.bundles_wanted(trials)
        if bundles == self.asked and time.monotonic() - self.asked_at < REFRESH_S:
            return
        try:
            self.channel(self.requester).send([dict(self.bundle) for _ in range(bundles)])
        except Exception as error:  # a hint to the autoscaler must never stop the sweep
            logger.warning("could not ask the autoscaler for %d workers' resources: %s", bundles, error)
        self.asked, self.asked_at = bundles, time.monotonic()

    def on_experiment_end(self, trials: list[Any], **info: Any) -> None:
        try:
            self.channel(self.requester).cancel()
        except Exception as error:  # it expires by itself
            logger.warning("could not withdraw the request to the autoscaler (it expires in %.0f s): %s", EXPIRE_S, error)
        self.asked = 0
