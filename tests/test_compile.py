"""torch.compile stays compiled across the trials of a reused Tune actor (issue 22, item 6).

Dynamo's recompile limit (8 per code object) is process-wide. Without a reset per trial, a
process that trains a few register counts one after the other hits it, and every later trial
runs eagerly without a word. The trainer resets dynamo when it is built and logs what dynamo did
(compile/frames, compile/recompiles, compile/fallbacks). The CPU runs the eager backend here
(dynamo traces and guards exactly as with inductor, without inductor's code generation); the
slow sweep uses aot_eager, which also traces the backward pass.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from crash_helpers import store_client, trial_runs
from sweep_helpers import run_sweep_cli, tiny_spec, write_spec
from trainers.compile import COMPILE_FALLBACKS, COMPILE_FRAMES, COMPILE_RECOMPILES
from trainers.config import TrainConfig
from trainers.loop import Trainer
from trainers.tracking import MemoryTracker

CPU = torch.device("cpu")
REGISTERS = [0, 1, 2, 4, 8, 16, 0, 1, 2, 4]  # ten trials, as a sweep's grid sends them to one actor


def compiled_trial(registers: int, kept: list[Trainer] | None = None) -> dict[str, float]:
    """One trial as a reused actor runs it: build, train 2 steps, evaluate; its last compile counts."""
    train = tiny_spec(Path("."))["train"]
    train["model"]["num_registers"] = registers
    cfg = TrainConfig.model_validate({**train, "steps": 2, "eval_every": 2, "compile": True, "compile_backend": "eager"})
    tracker = MemoryTracker()
    trainer = Trainer(cfg, CPU)
    trainer.fit(tracker)
    if kept is not None:
        kept.append(trainer)
    return {key: tracker.history(key)[-1][1] for key in (COMPILE_FRAMES, COMPILE_RECOMPILES, COMPILE_FALLBACKS)}


def test_ten_trials_in_one_process_stay_compiled() -> None:
    with torch._dynamo.config.patch(recompile_limit=8):  # dynamo's default (see below)
        counts = [compiled_trial(registers) for registers in REGISTERS]
    print("per trial (frames, recompiles, fallbacks):", [tuple(c.values()) for c in counts])
    assert all(c[COMPILE_FALLBACKS] == 0 for c in counts), counts
    assert all(c[COMPILE_FRAMES] > 0 for c in counts), counts  # each trial compiled its own graphs
    assert all(c[COMPILE_RECOMPILES] == 1 for c in counts), counts  # evaluation's eval mode, once per trial


def test_without_the_reset_a_later_trial_runs_eagerly(monkeypatch: pytest.MonkeyPatch) -> None:
    # The control: what the reset prevents. Some trial falls back, and the ones after it compile
    # nothing. The earlier trials' models are kept alive here: dynamo drops a model's cache
    # entries when the model is garbage-collected, which in a long-lived actor may or may not
    # have happened (in this test process it depends on when the collector runs).
    torch._dynamo.reset()
    monkeypatch.setattr("trainers.loop.reset_compiler", lambda: None)
    counts: list[dict[str, float]] = []
    kept: list[Trainer] = []
    # Dynamo's default limit; importing timm.optim (LAMB, in other tests) sets it to 1,000,000 process-wide.
    with torch._dynamo.config.patch(recompile_limit=8):
        for registers in REGISTERS:
            counts.append(compiled_trial(registers, kept))
            if counts[-1][COMPILE_FALLBACKS]:
                break
        assert counts[-1][COMPILE_FALLBACKS] > 0, counts
        assert compiled_trial(REGISTERS[0], kept)[COMPILE_FRAMES] == 0  # silently eager from here on
    torch._dynamo.reset()


@pytest.mark.slow
def test_a_sweep_of_ten_compiled_trials_in_one_reused_actor_never_falls_back(tmp_path: Path) -> None:
    spec: dict[str, Any] = tiny_spec(tmp_path, name="compiled", max_concurrent=1)
    spec["train"].update(compile=True, compile_backend="aot_eager", steps=4, eval_every=2, log_every=2)
    spec["grid"] = {"model.num_registers": [0, 1, 2, 4, 8, 16]}
    spec["seeds"] = [0, 1]  # 12 trials
    done = run_sweep_cli(tmp_path, str(write_spec(tmp_path, spec)), timeout=1200)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    client = store_client(tmp_path)
    runs = trial_runs(client, "compiled")
    assert len(runs) == 12 and all(run.info.status == "FINISHED" for run in runs)
    assert len({run.data.tags["worker.pid"] for run in runs}) == 1  # one reused actor ran them all
    for run in runs:
        metrics = run.data.metrics
        assert metrics[COMPILE_FALLBACKS] == 0 and metrics[COMPILE_FRAMES] > 0, (run.info.run_name, metrics)
    print("recompiles per trial:", sorted(int(run.data.metrics[COMPILE_RECOMPILES]) for run in runs))


def test_compile_is_refused_where_it_would_silently_run_eagerly() -> None:
    """The trainer compiles the supervised forward only: DINO or CLIP with compile on says so."""
    import pydantic

    base = TrainConfig().model_dump()
    with pytest.raises(pydantic.ValidationError, match="compiles objective supervised only"):
        TrainConfig.model_validate({**base, "objective": "dino", "compile": True})
