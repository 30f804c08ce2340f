"""What a cluster holds, without a cluster: node types from the shipped cluster configs, trials
at once at full size, the refusal of a trial no node type can hold, the concurrency limit that
follows the nodes that are up, the request to the autoscaler, and the process-group backend
that follows the devices the workers have. The slow tests on Ray's fake autoscaler
(tests/test_autoscaling.py) run the same pieces end to end."""

from __future__ import annotations

import pickle
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from orchestrator.launch.autoscaler_request import AutoscalerRequest
from orchestrator.launch.autoscaling import monitor_command_lines, monitor_config, present_nodes_shape
from orchestrator.launch.concurrency import ClusterConcurrencyLimiter, PlanSearcher
from orchestrator.spec.cluster import (
    check_cluster_holds,
    load_cluster_file,
    shape_from_cluster_config,
    trials_at_full_size,
    trials_that_fit,
    worker_bundle,
)
from orchestrator.spec.errors import SpecError
from orchestrator.spec.plan import format_plan, make_plan
from orchestrator.spec.schema import Resources, load_spec
from orchestrator.sweep import main
from orchestrator.trials.grid_search import GridCellSearcher

ROOT = Path(__file__).resolve().parents[1]
AWS, KUBERAY = ROOT / "infra" / "aws" / "cluster.yaml", ROOT / "infra" / "kuberay" / "raycluster.yaml"
DEIT3 = Resources(workers=8, gpu_per_worker=1, cpu_per_worker=10)  # sweeps/deit3_registers.yaml
ONE_GPU = Resources(cpu=8, gpu=1)  # sweeps/num_registers.yaml


def fake_config(gpu_nodes: int = 2, node: dict[str, float] | None = None) -> dict[str, Any]:
    """The shape of tests/test_autoscaling.py's fake cluster: a head without GPU, GPU nodes from zero."""
    return {
        "max_workers": gpu_nodes,
        "head_node_type": "ray.head.default",
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 1}, "max_workers": 0},
            "gpu_worker": {"resources": node or {"CPU": 2, "GPU": 2}, "min_workers": 0, "max_workers": gpu_nodes},
        },
    }


# ------------------------------------------------------------------ the arithmetic


def test_a_trial_fits_where_every_process_finds_a_node() -> None:
    assert worker_bundle(DEIT3) == {"CPU": 10, "GPU": 1}
    assert worker_bundle(Resources(cpu=1)) == {"CPU": 1}  # no GPU key when none is asked
    eight_gpu_node = {"CPU": 96, "GPU": 8}
    assert trials_that_fit([eight_gpu_node], DEIT3) == 1
    assert trials_that_fit([eight_gpu_node, {"CPU": 8, "GPU": 1}], DEIT3) == 1  # 10 CPUs per rank: not on a g5
    assert trials_that_fit([{"CPU": 2, "GPU": 2}] * 3, Resources(workers=2, gpu_per_worker=1, cpu_per_worker=1)) == 3
    # Ranks may sit on different nodes (Ray Train packs them softly): 2 one-GPU nodes hold a 2-rank trial.
    assert trials_that_fit([{"CPU": 1, "GPU": 1}] * 2, Resources(workers=2, gpu_per_worker=1, cpu_per_worker=1)) == 1
    assert trials_that_fit([{"CPU": 30, "GPU": 8}], Resources(workers=4, gpu_per_worker=1, cpu_per_worker=30)) == 0
    assert trials_that_fit([], DEIT3) == 0  # an autoscaling cluster before its first GPU node


def test_shipped_clusters_at_full_size() -> None:
    aws, kuberay = load_cluster_file(AWS), load_cluster_file(KUBERAY)
    assert aws.autoscaling and aws.head == "head.cpu" and aws.max_workers == 16
    # DeiT-III's 8 x 10-CPU ranks fit the p4d (2 nodes) and p5 (1 node) types, not the g5s.
    assert trials_at_full_size(aws, DEIT3, None, 100) == 3
    assert trials_at_full_size(kuberay, DEIT3, None, 100) == 2  # the gpu8 group, 2 pods
    # One GPU per trial: p4d 2x8 + p5 8 + g5 spot 8 + on-demand g5 4 (16 worker nodes at most).
    assert trials_at_full_size(aws, ONE_GPU, None, 100) == 36
    assert trials_at_full_size(aws, ONE_GPU, 5, 100) == 5 and trials_at_full_size(aws, ONE_GPU, None, 7) == 7
    check_cluster_holds(aws, DEIT3)
    check_cluster_holds(kuberay, ONE_GPU)


def test_a_trial_no_node_type_can_hold_is_refused_naming_the_node_types() -> None:
    shape = shape_from_cluster_config(fake_config(), "fake.yaml")
    with pytest.raises(SpecError) as refused:
        check_cluster_holds(shape, Resources(workers=2, gpu_per_worker=3, cpu_per_worker=1))
    message = str(refused.value)
    assert message.startswith("resources: one of the trial's 2 workers needs {CPU: 1, GPU: 3}")
    assert "ray.head.default {CPU: 1}, gpu_worker {CPU: 2, GPU: 2} x2" in message and "\n" not in message
    # Each worker fits a node, but all of them never fit the cluster at its largest.
    with pytest.raises(SpecError, match=r"resources.workers: one trial needs 8 workers of \{CPU: 1, GPU: 1\}, but the cluster at its largest holds 4"):
        check_cluster_holds(shape, Resources(workers=8, gpu_per_worker=1, cpu_per_worker=1))
    check_cluster_holds(shape, Resources(workers=2, gpu_per_worker=1, cpu_per_worker=1))


def test_node_types_without_resources_are_assumed_and_said() -> None:
    config = fake_config()
    config["available_node_types"]["gpu_worker"]["resources"] = {}  # detected from the instance type
    shape = shape_from_cluster_config(config, "bare.yaml")
    check_cluster_holds(shape, ONE_GPU)  # may hold it: not refused
    assert any("gpu_worker gives no resources" in note for note in shape.notes)


def test_dry_run_says_trials_at_once_on_the_cluster_and_refuses_what_it_cannot_hold(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([str(ROOT / "sweeps" / "deit3_registers.yaml"), "--dry-run", "--cluster", str(AWS)]) == 0
    out = capsys.readouterr().out
    assert "on the cluster at full size: 3 trials at once (" in out and "gpu.a100.spot {CPU: 96, GPU: 8} x2" in out
    cluster = tmp_path / "small.yaml"
    cluster.write_text(
        "max_workers: 4\nhead_node_type: head\navailable_node_types:\n"
        "  head: {resources: {CPU: 0}, max_workers: 0}\n  g5: {resources: {CPU: 8, GPU: 1}, max_workers: 4}\n"
    )
    assert main([str(ROOT / "sweeps" / "deit3_registers.yaml"), "--dry-run", "--cluster", str(cluster)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # refused before the plan
    (line,) = captured.err.splitlines()
    assert line.startswith("error: resources: one of the trial's 8 workers needs {CPU: 10, GPU: 1}") and "g5 {CPU: 8, GPU: 1} x4" in line


def test_plan_without_a_cluster_says_how_the_limit_is_found() -> None:
    text = format_plan(make_plan(load_spec(ROOT / "sweeps" / "deit3_registers.yaml")))
    assert "the limit follows the nodes that are up" in text and "--cluster CONFIG" in text


# ------------------------------------------------------------------ the running cluster


def test_the_monitor_of_this_cluster_names_its_autoscaling_config(tmp_path: Path) -> None:
    for pid, argv in {
        "101": ["python", "-u", "/x/ray/autoscaler/_private/monitor.py", "--gcs-address=10.0.0.1:6379", "--autoscaling-config=~/ray_bootstrap_config.yaml"],
        "102": ["python", "-u", "/x/ray/autoscaler/_private/monitor.py", "--gcs-address=127.0.0.1:7000"],
        "103": ["python", "something_else.py", "--gcs-address=10.0.0.2:6379"],
    }.items():
        (tmp_path / pid).mkdir()
        (tmp_path / pid / "cmdline").write_bytes("\0".join(argv).encode() + b"\0")
    lines = monitor_command_lines(tmp_path)
    assert len(lines) == 2
    found, path = monitor_config("10.0.0.1:6379", lines)
    assert found and path == str(Path.home() / "ray_bootstrap_config.yaml")
    assert monitor_config("127.0.0.1:7000", lines) == (True, None)  # a fixed cluster: no autoscaler config
    assert monitor_config("10.0.0.2:6379", lines) == (False, None)
    shape = present_nodes_shape([{"CPU": 2.0, "node:127.0.0.1": 1.0}, {"CPU": 2.0}], "two nodes")
    assert not shape.autoscaling and [(t.resources, t.max_nodes) for t in shape.node_types] == [({"CPU": 2.0}, 2)]


class Nodes:
    """The nodes a limiter sees, changed by the test as an autoscaler would change them."""

    def __init__(self) -> None:
        self.up: list[dict[str, float]] = [{"CPU": 1}]  # the head only

    def __call__(self) -> list[dict[str, float]]:
        return self.up


def test_concurrency_follows_the_nodes_that_are_up_and_never_passes_max_concurrent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("orchestrator.launch.concurrency.REREAD_S", 0.0)
    two_ranks = Resources(workers=2, gpu_per_worker=1, cpu_per_worker=1)
    nodes = Nodes()
    trials = [{"index": i, "axes": {}} for i in range(5)]
    limiter = ClusterConcurrencyLimiter(PlanSearcher(trials), two_ranks, upper=3, nodes=nodes)
    assert limiter.suggest("a") is None  # no GPU node yet: nothing starts (and nothing is refused)
    nodes.up = [{"CPU": 1}, {"CPU": 2, "GPU": 2}]
    assert limiter.suggest("a") == {"trial": trials[0]}
    assert limiter.suggest("b") is None  # one node holds one 2-rank trial
    nodes.up += [{"CPU": 2, "GPU": 2}] * 3
    assert limiter.suggest("b") == {"trial": trials[1]} and limiter.suggest("c") == {"trial": trials[2]}
    assert limiter.suggest("d") is None  # 4 trials fit, max_concurrent is 3
    nodes.up = [{"CPU": 1}]  # the nodes went away: running trials go on, no new one starts
    limiter.on_trial_complete("a")
    assert limiter.suggest("d") is None
    restored = pickle.loads(pickle.dumps(limiter))  # as Tune saves it: the cluster is read anew
    assert restored.live_trials == {"b", "c"} and restored.limit_read_at == float("-inf")
    # One-process trials hold their own resources: Tune starts what fits, the cap is max_concurrent.
    one = ClusterConcurrencyLimiter(PlanSearcher(trials), Resources(cpu=1, gpu=1), upper=2, nodes=nodes)
    assert one.suggest("a") and one.suggest("b") and one.suggest("c") is None


def test_the_search_is_finished_once_the_plan_is_handed_out_even_at_the_limit() -> None:
    """Tune waits up to 10 minutes for a suggestion from an unfinished search whenever it counts
    no running trial (a resumed s3 sweep sat there in CI): the limiter says FINISHED as soon as
    its searcher has nothing left, though the last trials still hold the limit."""
    trials = [{"index": i, "axes": {}} for i in range(2)]
    limiter = ClusterConcurrencyLimiter(PlanSearcher(trials), Resources(cpu=1, gpu=0), upper=1)
    assert limiter.suggest("a") == {"trial": trials[0]}
    assert limiter.suggest("b") is None  # at the limit, trial 1 still to come
    limiter.on_trial_complete("a")
    assert limiter.suggest("b") == {"trial": trials[1]}
    assert limiter.suggest("c") == "FINISHED"  # "b" still runs and holds the limit
    searched = GridCellSearcher([{}], {"optim.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2}}, 1, "val/top1", "max")
    assert not searched.exhausted and searched.suggest("x") != "FINISHED" and searched.exhausted


def test_plan_searcher_hands_out_the_grid_once_and_resumes(tmp_path: Path) -> None:
    searcher = PlanSearcher([{"index": 0, "axes": {"seed": 0}}, {"index": 1, "axes": {"seed": 1}}])
    assert searcher.suggest("a") == {"trial": {"index": 0, "axes": {"seed": 0}}}
    searcher.save(str(tmp_path / "state"))
    again = PlanSearcher([])
    again.restore(str(tmp_path / "state"))
    assert again.suggest("b") == {"trial": {"index": 1, "axes": {"seed": 1}}} and again.suggest("c") == "FINISHED"


class Requests:
    """Stands in for Ray's AutoscalingCoordinator: what each requester asked for, and cancelled."""

    sent: list[tuple[str, int]] = []

    def __init__(self, requester: str) -> None:
        self.requester = requester

    def send(self, bundles: list[dict[str, float]]) -> None:
        Requests.sent.append((self.requester, len(bundles)))

    def cancel(self) -> None:
        Requests.sent.append((self.requester, -1))


def trials(finished: int, running: int, total: int = 5) -> list[Any]:
    status = ["TERMINATED"] * finished + ["RUNNING"] * running + ["PENDING"] * (total - finished - running)
    return [SimpleNamespace(status=s, is_finished=lambda s=s: s in ("TERMINATED", "ERROR")) for s in status]


def test_the_autoscaler_is_asked_for_the_trials_not_yet_running_then_less_then_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    Requests.sent = []
    request = AutoscalerRequest("sweep-x", {"CPU": 1, "GPU": 1}, workers=2, trials=5, max_concurrent=2, channel=Requests)
    # 2-rank trials: min(max_concurrent, left) trials, less those running (their Train runs ask
    # for their own workers), one bundle per worker; sent again on a change only (or to renew).
    for finished, running in ((0, 0), (0, 0), (0, 1), (0, 2), (3, 1), (4, 1)):
        request.on_step_begin(0, trials(finished, running))
    request.on_experiment_end(trials(5, 0))
    assert Requests.sent == [("sweep-x", 4), ("sweep-x", 2), ("sweep-x", 0), ("sweep-x", 2), ("sweep-x", 0), ("sweep-x", -1)]
    monkeypatch.setattr("orchestrator.launch.autoscaler_request.REFRESH_S", 0.0)
    request.on_step_begin(0, trials(4, 1))
    assert Requests.sent[-1] == ("sweep-x", 0)  # renewed before it expires
    restored = pickle.loads(pickle.dumps(request))  # as Tune saves it: a resumed sweep asks again
    assert restored.asked is None
    # One-process trials hold their own resources; request_resources counts the whole cluster.
    one = AutoscalerRequest("sweep-y", {"CPU": 8, "GPU": 1}, workers=1, trials=3, max_concurrent=None, channel=Requests)
    one.on_step_begin(0, trials(0, 2, total=3))
    assert Requests.sent[-1] == ("sweep-y", 3)


def test_the_process_group_follows_the_devices_the_workers_have(monkeypatch: pytest.MonkeyPatch) -> None:
    from ray.train.torch.config import _TorchBackend

    from orchestrator.trials.process_group import DeviceFollowingBackend, DeviceTorchConfig

    chosen: list[str] = []
    monkeypatch.setattr(_TorchBackend, "on_start", lambda self, group, config: chosen.append(config.backend))

    class Workers:
        def __init__(self, cuda: list[bool]) -> None:
            self.cuda = cuda

        def execute(self, fn: Any) -> list[bool]:
            fn()  # runs here, where there is no CUDA
            return self.cuda

    config = DeviceTorchConfig()
    assert config.backend == "auto" and config.backend_cls is DeviceFollowingBackend
    DeviceFollowingBackend().on_start(Workers([False, False]), config)  # fake GPUs (resource labels)
    DeviceFollowingBackend().on_start(Workers([True, False]), config)
    DeviceFollowingBackend().on_start(Workers([True, True]), config)
    DeviceFollowingBackend().on_start(Workers([True]), DeviceTorchConfig(backend="gloo"))  # an explicit choice stays
    assert chosen == ["gloo", "gloo", "nccl", "gloo"]
