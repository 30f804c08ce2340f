"""Will each trial fit its GPU? The plan's memory column and its warnings, before anything starts.

The bytes come from trainers/memory.py (per process: a data-parallel worker trains its share
of the global batch). A trial's processes run under its precision: `auto` is bf16 autocast
(fp32 master weights) where the trial has a GPU, fp32 where it has none. A process may use
USABLE_SHARE of its GPU's memory (of the share it asks for, with a fractional GPU): the rest is
the CUDA context, cuBLAS/cuDNN workspaces and the caching allocator's fragmentation, which the
estimate does not count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from orchestrator.spec.schema import Resources
from trainers.config import TrainConfig
from trainers.memory import GB, MemoryEstimate, estimate_memory, largest_fitting_batch

USABLE_SHARE = 0.9


@dataclass(frozen=True)
class Fix:
    """What would make a trial fit: grad checkpointing, a per-worker batch, or a bigger GPU."""

    checkpointed_bytes: int | None  # the estimate with train.grad_checkpointing on (None: it is on)
    checkpointing_fits: bool
    max_batch: int  # the largest per-worker batch that fits (0: none does)
    max_batch_needs_checkpointing: bool
    workers_needed: int  # data-parallel workers that keep the global batch at max_batch each
    one_image_bytes: int  # with checkpointing and one image per worker, when no batch fits


@dataclass(frozen=True)
class TrialMemory:
    estimate: MemoryEstimate
    budget_bytes: float | None  # what one process may use of its GPU; None: no GPU, or its memory is unknown
    fix: Fix | None = None  # when it does not fit

    @property
    def fits(self) -> bool:
        return self.budget_bytes is None or self.estimate.total <= self.budget_bytes


def uses_bf16(cfg: TrainConfig, resources: Resources) -> bool:
    """The trial's precision as trainers/loop.py picks it: auto is bf16 on a GPU."""
    gpu = resources.gpu_per_worker if resources.distributed else resources.gpu
    return cfg.precision == "bf16" or (cfg.precision == "auto" and gpu > 0)


def process_budget(resources: Resources, memory_gb: float | None) -> float | None:
    """Bytes one process of a trial may fill: its share of one GPU, less the margin."""
    gpu = resources.gpu_per_worker if resources.distributed else resources.gpu
    if gpu <= 0 or memory_gb is None:
        return None
    return USABLE_SHARE * memory_gb * GB * min(1.0, gpu)


def workers_for(batch: int, most: int) -> int:
    """The fewest workers that split `batch` evenly with at most `most` images each."""
    workers = math.ceil(batch / most)
    while batch % workers:
        workers += 1
    return workers


def how_to_fit(cfg: TrainConfig, classes: int, resources: Resources, bf16: bool, budget: float) -> Fix:
    workers = resources.workers
    checkpointed = cfg.model_copy(update={"grad_checkpointing": True})
    ckpt_bytes = None if cfg.grad_checkpointing else estimate_memory(checkpointed, classes, workers=workers, bf16=bf16).total
    most, needs_ckpt = largest_fitting_batch(cfg, classes, budget, workers=workers, bf16=bf16), False
    if most == 0 and not cfg.grad_checkpointing:
        most, needs_ckpt = largest_fitting_batch(checkpointed, classes, budget, workers=workers, bf16=bf16), True
    one = estimate_memory(checkpointed, classes, workers=workers, bf16=bf16, batch=1).total
    return Fix(
        checkpointed_bytes=ckpt_bytes,
        checkpointing_fits=ckpt_bytes is not None and ckpt_bytes <= budget,
        max_batch=most,
        max_batch_needs_checkpointing=needs_ckpt,
        workers_needed=workers_for(cfg.optim.batch_size, most) if most else 0,
        one_image_bytes=one,
    )


def trial_memory(cfg: TrainConfig, classes: int, resources: Resources, memory_gb: float | None) -> TrialMemory:
    bf16 = uses_bf16(cfg, resources)
    estimate = estimate_memory(cfg, classes, workers=resources.workers, bf16=bf16)
    budget = process_budget(resources, memory_gb)
    memory = TrialMemory(estimate, budget)
    if memory.fits:
        return memory
    assert budget is not None
    return TrialMemory(estimate, budget, how_to_fit(cfg, classes, resources, bf16, budget))


def format_gb(value: float) -> str:
    """Bytes as GB: one decimal from 1 GB, two below (host-sized trials), '<0.01' under 10 MB."""
    gb = value / GB
    return f"{gb:.1f}" if gb >= 1 else (f"{gb:.2f}" if gb >= 0.01 else "<0.01")


def _gb_span(values: list[float]) -> str:
    low, high = format_gb(min(values)), format_gb(max(values))
    return low if low == high else f"{low} to {high}"


def breakdown(estimates: list[MemoryEstimate]) -> str:
    parts = [
        ("activations", "activations"), ("weights, gradients and optimizer state", "model_state"),
        ("inputs", "inputs"), ("working set", "transient"),
    ]
    return ", ".join(f"{name} {_gb_span([getattr(e, key) for e in estimates])}" for name, key in parts)


def fix_text(fixes: list[Fix], batch: int, workers: int) -> str:
    """One sentence for trials that share the kind of fix; figures are the worst trial's."""
    texts = []
    ckpt = [f.checkpointed_bytes for f in fixes if f.checkpointed_bytes is not None]
    if ckpt:
        enough = "" if all(f.checkpointing_fits for f in fixes) else ", not enough alone"
        texts.append(f"train.grad_checkpointing: true ({_gb_span(ckpt)} GB{enough})")
    most = min(f.max_batch for f in fixes)
    if most:
        needed = max(f.workers_needed for f in fixes)
        with_ckpt = " with grad checkpointing" if fixes[0].max_batch_needs_checkpointing else ""
        texts.append(
            f"at most {most} images per worker{with_ckpt}: resources.workers: {needed} (gpu_per_worker: 1) keeps the"
            f" global batch of {batch}, or optim.batch_size <= {most * workers}"
        )
    else:
        texts.append(
            f"a GPU with more memory (cost.gpu_type): one image per worker with grad checkpointing needs"
            f" {_gb_span([f.one_image_bytes for f in fixes])} GB"
        )
    return "; or ".join(texts)


def _fix_kind(fix: Fix | None) -> tuple[object, ...]:
    if fix is None:
        return ()
    return (fix.checkpointed_bytes is None, fix.checkpointing_fits, fix.max_batch > 0, fix.max_batch_needs_checkpointing)


# Trials that differ only in these axes share one warning: the register count changes the memory by a few percent.
SHARED_WARNING_AXES = ("model.num_registers", "seed")


def _same_but_registers(a: dict[str, object], b: dict[str, object]) -> bool:
    return {k: v for k, v in a.items() if k not in SHARED_WARNING_AXES} == {
        k: v for k, v in b.items() if k not in SHARED_WARNING_AXES
    }


def trial_group_name(indices: list[int], axes: list[dict[str, object]]) -> str:
    """'trials 6-11 (model.size=base, model.num_registers=0/1/2/4/8/16)', or 'trial 3 (...)'."""
    label = f"trial {indices[0]}" if len(indices) == 1 else f"trials {indices[0]}-{indices[-1]}"
    keys = [k for k in axes[0] if k != "seed" or len({str(a[k]) for a in axes}) > 1]
    named = []
    for key in keys:
        values = list(dict.fromkeys(str(a[key]) for a in axes))
        named.append(f"{key}={'/'.join(values)}")
    return f"{label} ({', '.join(named)})" if named else label


def memory_lines(trials: list[tuple[int, dict[str, object], TrialMemory]], resources: Resources, gpu: str,
                 memory_gb: float | None, batch: int) -> list[str]:
    """The plan's memory summary, then a warning for each run of trials that will not fit, with the fix.
    trials: (index, the trial's axis values, its memory)."""
    estimates = [m.estimate for _, _, m in trials]
    batches = sorted({e.batch for e in estimates})
    precisions = sorted({e.precision for e in estimates})
    how = "bf16 autocast, fp32 master weights" if precisions == ["bf16"] else "/".join(precisions)
    ckpt = tuple(sorted({e.checkpointing for e in estimates}))
    ckpt_text = {(False,): "no grad checkpointing", (True,): "grad checkpointing"}.get(ckpt, "grad checkpointing on and off")
    per = "per-worker batch" if resources.distributed else "batch"
    gpu_count = resources.gpu_per_worker if resources.distributed else resources.gpu
    where = "GPU" if gpu_count > 0 else "process"
    host = "" if gpu_count > 0 else "; the trials ask for no GPU, so this is host memory"
    lines = [
        f"Memory per {where} (estimate, trainers/memory.py; {how}, {ckpt_text}, {per}"
        f" {'/'.join(map(str, batches))}{host}): {_gb_span([e.total for e in estimates])} GB per trial"
    ]
    budget = process_budget(resources, memory_gb)
    if budget is None:
        if gpu_count > 0:
            lines.append(f"  ({gpu}'s memory is not in the table: set cost.gpu_memory_gb to check that the trials fit)")
        return lines
    too_big = [(i, axes, m) for i, axes, m in trials if not m.fits]
    share = f" ({gpu_count:g} of it)" if gpu_count < 1 else ""
    lines.append(
        f"  ({gpu}: {memory_gb:g} GB{share}, of which a process may use {budget / GB:.1f} GB, the rest left to"
        f" the CUDA context and the allocator; " + (f"{len(too_big)} of {len(trials)} trials do not fit)" if too_big else "every trial fits)")
    )
    groups: list[list[tuple[int, dict[str, object], TrialMemory]]] = []
    for item in too_big:
        last = groups[-1][-1] if groups else None
        if (last is not None and last[0] + 1 == item[0] and _fix_kind(last[2].fix) == _fix_kind(item[2].fix)
                and _same_but_registers(last[1], item[1])):
            groups[-1].append(item)
        else:
            groups.append([item])
    for group in groups:
        name = trial_group_name([i for i, _, _ in group], [axes for _, axes, _ in group])
        group_estimates = [m.estimate for _, _, m in group]
        fixes = [m.fix for _, _, m in group if m.fix is not None]
        need = "needs" if len(group) == 1 else "need"
        lines.append(
            f"WARNING: {name} {need} {_gb_span([e.total for e in group_estimates])} GB per GPU"
            f" ({breakdown(group_estimates)}) and will not fit {gpu}'s {budget / GB:.1f} GB."
            f" Fix: {fix_text(fixes, batch, resources.workers)}"
        )
    return lines
