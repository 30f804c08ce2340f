"""`python -m orchestrator.bench {trainer,data,memory,gpu,overhead,store,startup,emergence} [--json] [options]`

trainer   images/s of our Trainer and of a plain PyTorch loop on the same ViT, the speedup, MFU on a GPU.
data      per rank: images/s of one rank's input pipeline beside one worker's trainer: is a trial input-bound?
memory    the plan's memory estimate against the bytes autograd saves and the step's peak, on the CPU.
gpu       the acceptance run for a first GPU (8 minutes on one H100): trainer, input pipeline, objectives, DDP.
overhead  wall time of N trainings through `orchestrator.sweep` against the same trainings in a bare pool.
store     for a finished sweep in MLflow: the probes' share of trial time and what each trial stores.
startup   what opening MLflow beside Ray's start saves per launch, against one after the other.
emergence what the emergence watch and adaptive probing cost on a spec's trials (the quickstart's).

With --json the last line of stdout is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.bench", description=__doc__.split("\n\n")[1])
    sub = parser.add_subparsers(dest="bench", required=True)

    trainer = sub.add_parser("trainer", help="trainer throughput against a plain loop")
    trainer.add_argument("--size", help="model size (micro, mini, tiny, small, base, ...)")
    trainer.add_argument("--img", type=int, help="image size in pixels")
    trainer.add_argument("--patch", type=int, help="patch size in pixels")
    trainer.add_argument("--registers", type=int, help="number of register tokens")
    trainer.add_argument("--batch", type=int, help="batch size")
    trainer.add_argument("--steps", type=int, help="timed steps")
    trainer.add_argument("--warmup", type=int, help="untimed steps first (compilation, autotuning)")
    trainer.add_argument("--compile", action="store_true", default=None, help="torch.compile our model")
    trainer.add_argument("--copies", type=int, help="also run K copies of our trainer at once on one GPU")
    trainer.add_argument("--device", help="cpu or cuda[:i] (default: cuda if there is one)")
    trainer.add_argument("--json", action="store_true", help="end with one JSON line")

    data = sub.add_parser("data", help="input pipeline images/s beside trainer images/s")
    data.add_argument("--root", help="real data (local or s3://); default: a synthetic JPEG set in a temp folder")
    data.add_argument("--data", choices=("shards", "imagefolder"), help="data set format (default shards)")
    data.add_argument("--images", type=positive_int, help="synthetic set: training images")
    data.add_argument("--size", help="model size (micro, mini, tiny, small, base, ...)")
    data.add_argument("--img", type=int, help="image size in pixels")
    data.add_argument("--patch", type=int, help="patch size in pixels")
    data.add_argument("--batch", type=positive_int, help="batch size")
    data.add_argument("--steps", type=positive_int, help="timed steps")
    data.add_argument("--warmup", type=int, help="untimed steps first")
    data.add_argument("--workers", type=int, help="DataLoader workers")
    data.add_argument("--decode", choices=("auto", "cpu", "gpu"), help="where JPEGs are decoded (shards)")
    data.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    data.add_argument("--ranks", type=positive_int, help="data-parallel workers of the trial: rank 0's pipeline, one worker's trainer")
    data.add_argument("--spec", help="sweep spec: its first trial's model, objective, recipe, global batch and workers")
    data.add_argument("--device", help="cpu or cuda[:i] (default: cuda if there is one)")
    data.add_argument("--json", action="store_true", help="end with one JSON line")

    memory = sub.add_parser("memory", help="memory estimate against measured saved bytes and step peaks (CPU)")
    memory.add_argument("--no-peak", action="store_true", help="saved bytes only (the step peaks take longer)")
    memory.add_argument("--json", action="store_true", help="end with one JSON line")

    gpu = sub.add_parser("gpu", help="acceptance run for a first GPU; a reduced form on the CPU")
    gpu.add_argument("--device", help="cuda[:i] or cpu (default: cuda if there is one)")
    gpu.add_argument("--reduced", action="store_true", default=None, help="tiny sizes and few steps (the default on a CPU)")
    gpu.add_argument("--budget-s", type=float, help="total seconds for all parts (default 480; reduced: 420, a ceiling for busy CI machines)")
    gpu.add_argument("--ddp-backend", choices=("nccl", "gloo"), help="the 2-worker step's backend (default: nccl with 2+ GPUs, else skipped)")
    gpu.add_argument("--json", action="store_true", help="end with one JSON line")

    overhead = sub.add_parser("overhead", help="sweep wall time against bare trainings")
    overhead.add_argument("--trials", type=int, default=8, help="number of identical trainings")
    overhead.add_argument("--seconds", type=float, default=15.0, help="target length of one training")
    overhead.add_argument("--steps", type=int, help="training steps (default: calibrated to --seconds)")
    overhead.add_argument("--parallel", type=int, help="trainings at a time (default: one per CPU core)")
    overhead.add_argument(
        "--repeat", type=positive_int, default=1,
        help="measure N pairs, alternating which side goes first; report every pair and the one with the median ratio",
    )
    overhead.add_argument("--profile", action="store_true", help="also time imports and Ray start-up alone")
    overhead.add_argument("--keep", action="store_true", help="keep the temporary sweep folder and print it")
    overhead.add_argument("--json", action="store_true", help="end with one JSON line")

    store = sub.add_parser("store", help="probe cost and store size of a finished sweep")
    store.add_argument("--experiment", required=True, help="MLflow experiment (the sweep name)")
    store.add_argument("--tracking-uri", default=None, help="default: MLFLOW_TRACKING_URI or ./mlflow.db")
    store.add_argument("--json", action="store_true", help="end with one JSON line")
    startup = sub.add_parser("startup", help="Ray's start and MLflow's store, together against one after the other")
    startup.add_argument("--repeat", type=positive_int, default=5, help="pairs to measure, alternating which goes first")
    startup.add_argument("--json", action="store_true", help="end with one JSON line")
    emergence = sub.add_parser("emergence", help="the emergence watch's and adaptive probing's overhead on a spec's trials")
    emergence.add_argument("--spec", type=Path, default=None, help="sweep spec (default: sweeps/quickstart.yaml)")
    emergence.add_argument(
        "--trials", choices=("longest", "all"), default="longest",
        help="longest: each size at the longest length with the fewest and most registers (default); all: every trial",
    )
    emergence.add_argument("--repeat", type=positive_int, default=1, help="rounds over the trials")
    emergence.add_argument("--json", action="store_true", help="end with one JSON line")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    result: dict[str, Any]
    if args.bench == "trainer":
        from orchestrator.bench.devices import bench_device
        from orchestrator.bench.trainer import (
            TrainerBenchSettings, format_trainer_result, run_trainer_bench, with_overrides,
        )

        device = bench_device(args.device)
        settings = with_overrides(
            TrainerBenchSettings.defaults(device),
            size=args.size, img=args.img, patch=args.patch, registers=args.registers, batch=args.batch,
            steps=args.steps, warmup=args.warmup, compile=args.compile, copies=args.copies,
        )
        result = run_trainer_bench(settings, device)
        print(format_trainer_result(result))
    elif args.bench == "data":
        from orchestrator.bench.data import DataBenchSettings, format_data_result, run_data_bench
        from orchestrator.bench.data import with_overrides as data_overrides
        from orchestrator.bench.devices import bench_device

        device = bench_device(args.device)
        settings_d = data_overrides(
            DataBenchSettings.defaults(device),
            root=args.root, data=args.data, images=args.images, size=args.size, img=args.img, patch=args.patch,
            batch=args.batch, steps=args.steps, warmup=args.warmup, workers=args.workers, decode=args.decode,
            compile=args.compile, ranks=args.ranks, spec=args.spec,
        )
        result = run_data_bench(settings_d, device)
        print(format_data_result(result))
    elif args.bench == "memory":
        from orchestrator.bench.memory import format_memory_result, run_memory_bench

        result = run_memory_bench(peak=not args.no_peak)
        print(format_memory_result(result))
    elif args.bench == "gpu":
        from orchestrator.bench.gpu import format_gpu_result, main_gpu

        result = main_gpu(args.device, args.reduced, args.budget_s, args.ddp_backend)
        print(format_gpu_result(result))
    elif args.bench == "startup":
        from orchestrator.bench.startup import format_startup_result, run_startup_bench

        result = run_startup_bench(args.repeat)
        print(format_startup_result(result))
    elif args.bench == "emergence":
        from orchestrator.bench.emergence import DEFAULT_SPEC, format_emergence_result, run_emergence_bench

        result = run_emergence_bench(args.spec or DEFAULT_SPEC, args.trials, args.repeat)
        print(format_emergence_result(result))
    elif args.bench == "store":
        from orchestrator.bench.store import format_store_result, measure_store

        result = measure_store(args.experiment, args.tracking_uri)
        print(format_store_result(result))
    else:
        from orchestrator.bench.overhead import OverheadSettings, format_overhead_result, run_overhead_bench

        settings_o = OverheadSettings(
            trials=args.trials, seconds=args.seconds, steps=args.steps, parallel=args.parallel, repeat=args.repeat,
            profile=args.profile, keep=args.keep,
        )
        result = run_overhead_bench(settings_o)
        print(format_overhead_result(result))
    if args.json:
        print(json.dumps(result, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
