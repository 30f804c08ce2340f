"""Shard reads from s3:// at a region's latency: one ranged GET at a time against many in flight.

    python -m orchestrator.bench.s3_reads [--delay-ms 30] [--images 512] [--batch 64] [--json]

Starts moto's S3 server on loopback in a child process, with every request held `--delay-ms`
before it is answered (a WSGI wrapper around moto's app: the latency of a real region, which
loopback lacks), writes synthetic JPEG shards there, and reads the same random batches of
members (as a training step asks for them) two ways, in one process as one loader worker:

  one_get    S3Shards.read per member, one blocking ranged GET after the other (the reader
             every loader worker used before);
  in_flight  S3Shards.read_many per batch: coalesced ranged GETs on READ_THREADS threads.

Both must return the same bytes. Needs moto[server] (the project's dev extra).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import socket
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def serve(port: int, delay_s: float, ready: Any) -> None:
    """moto's S3 on 127.0.0.1:port; every request waits delay_s first (threaded: waits overlap)."""
    import logging

    from moto.moto_server import threaded_moto_server
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    dispatcher = threaded_moto_server.DomainDispatcherApplication

    def delayed(*args: Any) -> Any:
        app = dispatcher(*args)

        def handle(environ: dict[str, Any], start_response: Any) -> Any:
            time.sleep(delay_s)
            return app(environ, start_response)

        return handle

    threaded_moto_server.DomainDispatcherApplication = delayed
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    ready.set()
    while True:
        time.sleep(3600)


@contextmanager
def delayed_s3(delay_ms: float) -> Iterator[dict[str, str]]:
    """A loopback S3 endpoint with the delay, and the environment that reaches it; stopped after."""
    port = free_port()
    context = multiprocessing.get_context("spawn")
    ready = context.Event()
    process = context.Process(target=serve, args=(port, delay_ms / 1000, ready), daemon=True)
    process.start()
    try:
        if not ready.wait(120):
            raise RuntimeError("the loopback S3 server did not start within 120 s")
        env = {
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1",
            "AWS_CONFIG_FILE": "/nonexistent/aws-config", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
        }
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            yield env
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
    finally:
        process.terminate()
        process.join(10)


def upload_shards(images: int, shard_size: int, tmp: Path) -> str:
    import boto3

    from orchestrator.bench.data import write_synthetic_tree
    from trainers.data.shard_writer import write_shards

    tree = tmp / "tree"
    write_synthetic_tree(tree, images, 160, 120)
    write_shards(tree, tmp / "shards", shard_size)
    client = boto3.client("s3")
    client.create_bucket(Bucket="bench")
    for path in sorted((tmp / "shards").rglob("*")):
        if path.is_file():
            client.upload_file(str(path), "bench", f"shards/{path.relative_to(tmp / 'shards')}")
    return "s3://bench/shards"


def run_s3_bench(delay_ms: float, images: int, batch: int, batches: int, shard_size: int) -> dict[str, Any]:
    from trainers.data.shard_store import READ_THREADS, S3Shards
    from trainers.data.shards import ShardImages
    from trainers.data.crops import CropPlan

    with tempfile.TemporaryDirectory(prefix="bench-s3-") as tmp, delayed_s3(delay_ms):
        root = upload_shards(images, shard_size, Path(tmp))
        data = ShardImages(S3Shards(f"{root}/train"), img_size=16, plan=CropPlan.single(16), decode_on_device=True)
        order = np.random.default_rng(0).permutation(len(data))
        requests = [(data.names[data.items[i][0]], data.items[i][1]) for i in order[: batch * batches].tolist()]
        steps = [requests[s : s + batch] for s in range(0, len(requests), batch)]
        reader = data.shards
        reader.read_many(steps[0][:2])  # connections and threads up, outside the timing

        start = time.perf_counter()
        one = [[reader.read(name, member) for name, member in step] for step in steps]
        one_get_s = time.perf_counter() - start
        gets_before = reader.gets
        start = time.perf_counter()
        many = [reader.read_many(step) for step in steps]
        in_flight_s = time.perf_counter() - start
        if one != many:
            raise AssertionError("read_many returned other bytes than one GET per member")
    count = len(requests)
    return {
        "benchmark": "s3_reads",
        "delay_ms": delay_ms,
        "images": count,
        "batch": batch,
        "threads": READ_THREADS,
        "gets_in_flight_reader": reader.gets - gets_before,
        "one_get_imgs_per_s": count / one_get_s,
        "in_flight_imgs_per_s": count / in_flight_s,
        "speedup": one_get_s / in_flight_s,
    }


def format_s3_result(r: dict[str, Any]) -> str:
    return "\n".join([
        f"server      moto S3 on loopback, {r['delay_ms']:.0f} ms added to every request",
        f"reads       {r['images']} images in batches of {r['batch']}, random order; {r['threads']} threads",
        f"one_get     {r['one_get_imgs_per_s']:10.1f} img/s   (one blocking ranged GET per image)",
        f"in_flight   {r['in_flight_imgs_per_s']:10.1f} img/s   ({r['gets_in_flight_reader']} coalesced ranged GETs)",
        f"speedup     {r['speedup']:10.1f}x",
    ])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.bench.s3_reads", description=__doc__.split("\n\n")[0])
    parser.add_argument("--delay-ms", type=float, default=30.0, help="added to every S3 request (default 30)")
    parser.add_argument("--images", type=int, default=512, help="synthetic training images (default 512)")
    parser.add_argument("--batch", type=int, default=64, help="members per read_many, as one worker's batch (default 64)")
    parser.add_argument("--batches", type=int, default=4, help="timed batches (default 4)")
    parser.add_argument("--shard-size", type=int, default=64, help="images per shard (default 64)")
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    args = parser.parse_args(argv)
    result = run_s3_bench(args.delay_ms, args.images, args.batch, args.batches, args.shard_size)
    print(format_s3_result(result))
    if args.json:
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
