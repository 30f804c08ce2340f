"""torch.compile for a trial: a fresh dynamo per trial, the backend by name, and counts of what fell back.

Dynamo's caches and its recompile limit (`torch._dynamo.config.recompile_limit`, 8 per code
object) are process-wide. A Tune actor reused for several trials (reuse_actors) compiles
`VisionTransformer.forward` again for every register count, batch shape and train/eval mode;
after a handful of trials the limit is hit and dynamo silently runs the code eagerly for the
rest of the process. So every compiled trial starts with `torch._dynamo.reset()`, and the
trainer logs what dynamo did (`CompileCounts`), so that a trial that fell back says so in its
run instead of just being slow. (Importing `timm.optim`, as the LAMB recipe does, sets
`torch._dynamo.config.cache_size_limit` to 1,000,000 for the whole process: after a LAMB trial
the limit no longer stops anything, and without the reset every trial's graphs would pile up.)

Backends: `inductor` (the default, and what a GPU trial wants), `aot_eager` (traces forward and
backward like inductor but runs the traced ops: checks the same graphs in seconds on a CPU) and
`eager` (dynamo only).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

COMPILE_RECOMPILES = "compile/recompiles"
COMPILE_FALLBACKS = "compile/fallbacks"
COMPILE_FRAMES = "compile/frames"


def reset_compiler() -> None:
    """Forget every graph and guard this process compiled: the trial starts below the recompile limit."""
    torch._dynamo.reset()


def compiled(module: Callable[..., Any], backend: str) -> Callable[..., Any]:
    return torch.compile(module, backend=backend)


def _frames() -> tuple[int, int]:
    from torch._dynamo.utils import counters

    return int(counters["frames"]["total"]), int(counters["frames"]["ok"])


def _recompiles() -> int:
    # Compiles of a frame beyond its first: dynamo numbers them per frame ("[0/8]" is frame 0's
    # ninth compile, the one its log shows when the limit of 8 is hit). Cleared by reset.
    from torch._dynamo.convert_frame import FRAME_COMPILE_COUNTER

    return sum(count - 1 for count in FRAME_COMPILE_COUNTER.values() if count > 1)


@dataclass(frozen=True)
class CompileCounts:
    frames: int  # frames dynamo tried to compile (first compiles and recompiles)
    recompiles: int  # frames compiled again for a code object seen before (a guard failed: shape, mode, module)
    fallbacks: int  # frames dynamo gave up on and ran eagerly (the recompile limit among the reasons)

    def as_metrics(self) -> dict[str, float]:
        return {COMPILE_FRAMES: self.frames, COMPILE_RECOMPILES: self.recompiles, COMPILE_FALLBACKS: self.fallbacks}


class CompileMonitor:
    """What dynamo did since this trial reset it. Counters are process-wide and never cleared
    by reset, so frames are counted from a snapshot taken at the start."""

    def __init__(self) -> None:
        self._total, self._ok = _frames()
        self._recompiles = _recompiles()

    def counts(self) -> CompileCounts:
        total, ok = _frames()
        frames, compiled_ok = total - self._total, ok - self._ok
        recompiles = _recompiles() - self._recompiles
        return CompileCounts(frames=frames, recompiles=recompiles, fallbacks=frames - compiled_ok)
