"""Watch a Ray cluster from outside the test process: the nodes alive, once a second, to a file.

The test heads run with token authentication (tests/ray_head.py), and Ray caches its auth mode
and token per process: asking a head from the pytest process would need its token in this
process's environment, where other tests' in-process clusters would read it. So one small
process with the head's environment polls Ray's state API and appends a JSON line per poll;
the test reads the file.

    python tests/cluster_watch.py DASHBOARD_URL OUT_FILE      # until killed
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

POLL_S = 1.0


@dataclass(frozen=True)
class Sample:
    t: float  # time.time() of the poll
    nodes: dict[str, dict[str, Any]]  # alive node id -> {"resources": {...}, "ip": ...}

    def gpu_nodes(self) -> set[str]:
        return {node_id for node_id, node in self.nodes.items() if node["resources"].get("GPU", 0) > 0}


class Watch:
    def __init__(self, path: Path) -> None:
        self.path = path

    def samples(self) -> list[Sample]:
        if not self.path.exists():
            return []
        found = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # the line being written
            found.append(Sample(record["t"], record["nodes"]))
        return found

    def latest(self, after: float = 0.0) -> Sample | None:
        fresh = [s for s in self.samples() if s.t > after]
        return fresh[-1] if fresh else None

    def wait(self, condition: Any, what: str, timeout: float = 300) -> Sample:
        """The first fresh sample for which condition(sample) holds."""
        start = time.time()
        while time.time() - start < timeout:
            sample = self.latest(after=start)
            if sample is not None and condition(sample):
                return sample
            time.sleep(POLL_S)
        raise AssertionError(f"gave up waiting {timeout:.0f} s for {what}; last sample: {self.latest()}")

    def most_gpu_nodes(self, since: float = 0.0, until: float = float("inf"), lasting: int = 3) -> int:
        """The most GPU nodes alive together through `lasting` consecutive polls. Ray's autoscaler
        may launch a node beyond the request for a moment and terminate it within a poll or two
        (seen once with the fake provider); that is not the scale the sweep asked for."""
        window = [s.gpu_nodes() for s in self.samples() if since <= s.t <= until]
        runs = (set.intersection(*window[i : i + lasting]) for i in range(len(window) - lasting + 1))
        return max((len(nodes) for nodes in runs), default=0)

    def gpu_nodes_seen(self, since: float = 0.0, until: float = float("inf")) -> set[str]:
        seen: set[str] = set()
        for s in self.samples():
            if since <= s.t <= until:
                seen |= s.gpu_nodes()
        return seen


@contextmanager
def watching(dashboard_url: str, env: Mapping[str, str], path: Path, prefix: tuple[str, ...] = ()) -> Iterator[Watch]:
    """The watcher process (with the head's environment, so its token) for the duration."""
    process = subprocess.Popen(
        [*prefix, sys.executable, __file__, dashboard_url, str(path)],
        env=dict(env), stdout=subprocess.DEVNULL, stderr=open(path.with_suffix(".err"), "w"), start_new_session=True,
    )
    try:
        yield Watch(path)
    finally:
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        process.wait(timeout=30)


def poll(dashboard_url: str) -> dict[str, dict[str, Any]]:
    from ray.util.state import list_nodes

    nodes = list_nodes(address=dashboard_url, detail=True, raise_on_missing_output=False, timeout=10)
    return {
        n.node_id: {"resources": dict(n.resources_total), "ip": n.node_ip}
        for n in nodes
        if n.state == "ALIVE"
    }


def main(dashboard_url: str, out: str) -> None:
    with open(out, "a") as f:
        while True:
            started = time.time()
            try:
                nodes = poll(dashboard_url)
            except Exception as error:  # the dashboard busy or restarting: try again
                print(f"poll failed: {error}", file=sys.stderr, flush=True)
            else:
                f.write(json.dumps({"t": started, "nodes": nodes}) + "\n")
                f.flush()
            time.sleep(max(0.0, POLL_S - (time.time() - started)))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
