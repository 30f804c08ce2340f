"""Two network namespaces joined by a veth pair: two machines on one host, for a real Ray link.

Each namespace has its own loopback and one end of the pair, with an address that exists only
inside it (10.X.Y.1/30 and 10.X.Y.2/30, X and Y drawn at random): traffic between the head's
and the node's processes crosses the veth link and nothing else, and `ip link set ... down`
on it is a network partition. Names are unique per test (pid and a random tag), and the
namespaces, the link and every process inside them are removed when the block ends, also on
failure. Needs root (CAP_NET_ADMIN) and iproute2; `netns_unavailable()` says why not.
"""

from __future__ import annotations

import os
import random
import secrets
import signal
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

IP = "ip"


@dataclass(frozen=True)
class Namespace:
    name: str
    address: str  # this namespace's end of the link
    device: str  # its veth device

    @property
    def prefix(self) -> tuple[str, ...]:
        """Run a command inside: (*ns.prefix, "python", ...)."""
        return (IP, "netns", "exec", self.name)


@dataclass(frozen=True)
class Link:
    head: Namespace
    node: Namespace

    def set(self, up: bool) -> None:
        """The link between the two, from the head's side (down: a partition)."""
        run(IP, "-n", self.head.name, "link", "set", self.head.device, "up" if up else "down")


def run(*command: str) -> None:
    done = subprocess.run(command, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)}: {done.stderr.strip()}")


def netns_unavailable() -> str | None:
    """Why namespaces cannot be made here (None: they can): tried, not guessed."""
    name = f"probe{os.getpid()}{secrets.token_hex(2)}"
    try:
        run(IP, "netns", "add", name)
    except FileNotFoundError:
        return "iproute2's `ip` is not installed"
    except (RuntimeError, subprocess.TimeoutExpired) as error:
        return f"cannot create a network namespace (root with CAP_NET_ADMIN is needed): {error}"
    run(IP, "netns", "del", name)
    return None


def pids_in(namespace: str) -> list[int]:
    done = subprocess.run([IP, "netns", "pids", namespace], capture_output=True, text=True, timeout=30)
    return [int(p) for p in done.stdout.split()]


def end_processes_in(namespace: str, grace_s: float = 15) -> None:
    """SIGTERM everything still running inside, then SIGKILL what is left."""
    deadline = time.monotonic() + grace_s
    sig = signal.SIGTERM
    while pids := pids_in(namespace):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        if time.monotonic() > deadline:
            sig = signal.SIGKILL
        time.sleep(0.5)
        if time.monotonic() > deadline + 15:
            break


@contextmanager
def linked_namespaces() -> Iterator[Link]:
    tag = f"{os.getpid() % 100000}{secrets.token_hex(2)}"
    x, y = random.randint(200, 250), random.randint(0, 255)
    head = Namespace(f"rayh{tag}", f"10.{x}.{y}.1", f"vh{tag}")
    node = Namespace(f"rayn{tag}", f"10.{x}.{y}.2", f"vn{tag}")
    made: list[str] = []
    try:
        for ns in (head, node):
            run(IP, "netns", "add", ns.name)
            made.append(ns.name)
        run(IP, "link", "add", head.device, "type", "veth", "peer", "name", node.device)
        for ns in (head, node):
            run(IP, "link", "set", ns.device, "netns", ns.name)
            run(IP, "-n", ns.name, "addr", "add", f"{ns.address}/30", "dev", ns.device)
            run(IP, "-n", ns.name, "link", "set", ns.device, "up")
            run(IP, "-n", ns.name, "link", "set", "lo", "up")
        yield Link(head, node)
    finally:
        for name in reversed(made):
            end_processes_in(name)
            # Deleting a namespace deletes the veth end inside it, and with it its peer.
            subprocess.run([IP, "netns", "del", name], capture_output=True, timeout=30)
        subprocess.run([IP, "link", "del", head.device], capture_output=True, timeout=30)  # if never moved
