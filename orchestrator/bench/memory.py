"""The memory estimate (trainers/memory.py) against what autograd really saves, on the CPU.

`python -m orchestrator.bench memory [--json]` builds each objective at two small sizes as the
Trainer builds it and measures two things, under bf16 autocast and in fp32, with and without
grad checkpointing:

- saved: one training forward pass (the objective's loss) inside
  `torch.autograd.graph.saved_tensors_hooks`, adding up the bytes of every distinct storage
  autograd saves for the backward pass and still holds when the loss is formed (parameters and
  buffers excluded: the estimate counts them apart). tests/test_memory.py asserts the estimate's activations within TOLERANCE.
- peak: the most bytes of tensors alive at once during a whole training step (the second one,
  so that the optimizer's state and the previous gradients exist), followed op by op with a
  TorchDispatchMode that also sees every storage free. The optimizer is fused AdamW, as the
  Trainer builds it on a GPU (on a CPU it builds the foreach one, whose temporaries a GPU never
  holds). The estimate's total is an upper bound of it (PEAK_BOUND).

The CPU runs the same SDPA contract as a GPU (q, k, v, output and log-sum-exp saved, no T x T
matrix), so the bytes carry over; what the CPU cannot show is the CUDA context, cuBLAS
workspaces and the caching allocator's fragmentation, which the plan leaves a margin for.

Grad checkpointing is the Trainer's own (train.grad_checkpointing: timm's `checkpoint_seq`
through trainers/model.py's run_blocks for every ViT, open_clip's for CLIP's text tower), so
what is measured is what a trial runs.
"""

from __future__ import annotations

import contextlib
import gc
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from trainers.config import TrainConfig
from trainers.memory import estimate_memory, trained_and_frozen_params

TOLERANCE = 0.05  # |estimate / measured - 1| of the saved bytes that the test accepts
# Estimated total / measured peak under bf16 (a GPU's precision): never under, at most 30% over at
# these tiny sizes, where one block's recomputation under grad checkpointing weighs most.
PEAK_BOUND = (1.0, 1.3)
BATCH = 8


@dataclass(frozen=True)
class Measurement:
    saved_bytes: int
    trained_params: int
    frozen_params: int


def calibration_config(objective: str, size: str, *, recipe: bool = False, batch: int = BATCH) -> TrainConfig:
    """A small config of `objective` on 32 px 'shapes' images (4 px patches, 2 registers).
    recipe: supervised with DeiT-III's recipe (LayerScale, uniform drop path, 3-Augment, Mixup/CutMix, BCE)."""
    raw: dict[str, Any] = {
        "objective": objective,
        "model": {"size": size, "img_size": 32, "patch_size": 4, "num_registers": 2},
        "data": {"name": "shapes", "num_classes": 4, "train_size": 64, "val_size": 16},
        "optim": {"batch_size": batch},
        "steps": 10,
    }
    if objective == "dino":
        raw["dino"] = {"head_prototypes": 1024, "head_hidden_dim": 128, "head_bottleneck_dim": 32,
                       "local_crops": 2, "local_crop_size": 16}
    if objective == "clip":
        raw["clip"] = {"embed_dim": 32, "text_width": 64, "text_layers": 2, "text_heads": 2, "context_length": 16}
    if recipe:
        raw["model"].update(layer_scale=1e-4, drop_path_rate=0.1, drop_path_mode="uniform")
        raw["augment"] = {"three_augment": True, "mixup": 0.8, "cutmix": 1.0, "loss": "bce"}
    return TrainConfig.model_validate(raw)


def calibration_cases() -> list[tuple[str, TrainConfig]]:
    """Every objective at two sizes (and two batches): micro (64 wide, 4 deep) and mini (96, 6)."""
    cases = []
    for size, batch in (("micro", BATCH), ("mini", BATCH + 4)):
        cases.append((f"supervised {size}", calibration_config("supervised", size, batch=batch)))
        cases.append((f"supervised+recipe {size}", calibration_config("supervised", size, recipe=True, batch=batch)))
        cases.append((f"dino {size}", calibration_config("dino", size, batch=batch)))
        cases.append((f"clip {size}", calibration_config("clip", size, batch=batch)))
    return cases


def _objective(cfg: TrainConfig) -> tuple[Any, Any]:
    """The objective and one training batch, built by the Trainer itself (its data source, its
    grad checkpointing), so that the measurement follows whatever the Trainer builds."""
    from trainers.loop import Trainer

    torch.manual_seed(cfg.seed)
    trainer = Trainer(cfg.model_copy(update={"precision": "fp32"}), torch.device("cpu"))  # measure() sets autocast
    objective = trainer.objective
    return objective, next(trainer.data.train_batches(0, cfg.optim.batch_size))  # the global batch, as the loop asks


def measure(cfg: TrainConfig, bf16: bool) -> Measurement:
    """Bytes autograd saves in one training forward pass of cfg's objective, and its parameter counts."""
    objective, batch = _objective(cfg)
    kept: set[int] = set()
    modules = [m for m in vars(objective).values() if isinstance(m, nn.Module)]
    for module in modules:
        kept.update(t.untyped_storage().data_ptr() for t in [*module.parameters(), *module.buffers()])
    storages: dict[int, tuple[int, weakref.ref[torch.UntypedStorage]]] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in kept:
            storages[storage.data_ptr()] = storage.nbytes(), weakref.ref(storage)
        return tensor

    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    objective.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), autocast:
        loss = objective.loss(batch, 0)
    gc.collect()
    # Only what is still alive: a branch that does not reach the loss (KoLeo's similarity matrix,
    # used for an argmax) frees what it saved, and its memory may be reused by a later saved tensor.
    saved = sum(size for size, alive in storages.values() if alive() is not None)
    trainable = {id(p) for p in objective.parameters()}
    everything: dict[int, torch.Tensor] = {}
    for module in modules:
        everything.update((id(p), p) for p in module.parameters())
    trained = sum(p.numel() for i, p in everything.items() if i in trainable)
    frozen = sum(p.numel() for i, p in everything.items() if i not in trainable)
    del loss
    return Measurement(saved, trained, frozen)


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of tensor storage alive at once: each storage an op creates counts until it is freed."""

    def __init__(self) -> None:
        super().__init__()
        self.current = self.peak = 0
        self._sizes: dict[int, int] = {}

    def track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key and key not in self._sizes:
            self._sizes[key] = storage.nbytes()
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.current -= self._sizes.pop(key)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for item in tree_flatten(out)[0]:
            if isinstance(item, torch.Tensor):
                self.track(item)
        return out


@contextlib.contextmanager
def fused_adamw() -> Any:
    """Build AdamW fused, as the Trainer does on a GPU."""
    plain = torch.optim.AdamW
    torch.optim.AdamW = lambda *args, **kwargs: plain(*args, **{**kwargs, "fused": True})  # type: ignore[misc]
    try:
        yield
    finally:
        torch.optim.AdamW = plain  # type: ignore[misc]


def measure_peak(cfg: TrainConfig, bf16: bool) -> int:
    """Most bytes of tensors alive at once during the second training step of cfg (weights, gradients,
    optimizer state and the batch included)."""
    from trainers.loop import Trainer

    cfg = cfg.model_copy(update={"precision": "bf16" if bf16 else "fp32"})
    with fused_adamw():
        trainer = Trainer(cfg, torch.device("cpu"))
    objective = trainer.objective
    batches = trainer.data.train_batches(0, cfg.optim.batch_size)
    trainer.train_step(next(batches))
    batch = next(batches)
    gc.collect()
    live = LiveTensorBytes()
    for module in [m for m in vars(objective).values() if isinstance(m, nn.Module)]:
        for tensor in [*module.parameters(), *module.buffers()]:
            live.track(tensor)
            if tensor.grad is not None:
                live.track(tensor.grad)
    for state in trainer.optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                live.track(value)
    for tensor in [batch.images, batch.labels, *(batch.views or ()), *([] if batch.tokens is None else [batch.tokens])]:
        live.track(tensor)  # the batch on the device: images, and the loader's crops (DINO's local crops too)
    with live:
        trainer.train_step(batch)
    return live.peak


def run_memory_bench(peak: bool = True) -> dict[str, Any]:
    """Every calibration case under bf16 and fp32, grad checkpointing off and on: saved bytes
    (and, with peak, the step's peak) against the estimate."""
    rows = []
    for name, base in calibration_cases():
        for bf16 in (True, False):
            for ckpt in (False, True):
                cfg = base.model_copy(update={"grad_checkpointing": ckpt})
                got = measure(cfg, bf16)
                classes = cfg.data.num_classes
                estimate = estimate_memory(cfg, classes, bf16=bf16)
                trained, frozen = trained_and_frozen_params(cfg, classes)
                row = {
                    "case": name, "precision": "bf16" if bf16 else "fp32", "grad_checkpointing": ckpt,
                    "batch": cfg.optim.batch_size, "measured_bytes": got.saved_bytes,
                    "estimated_bytes": estimate.activations, "ratio": estimate.activations / got.saved_bytes,
                    "params_match": (trained, frozen) == (got.trained_params, got.frozen_params),
                }
                if peak:
                    measured_peak = measure_peak(cfg, bf16)
                    row.update(peak_bytes=measured_peak, estimated_total=estimate.total,
                               peak_ratio=estimate.total / measured_peak)
                rows.append(row)
    result: dict[str, Any] = {
        "benchmark": "memory", "tolerance": TOLERANCE, "rows": rows,
        "worst_deviation": max(abs(r["ratio"] - 1) for r in rows),
    }
    if peak:
        result["peak_bound"] = PEAK_BOUND
        for precision in ("bf16", "fp32"):
            ratios = [r["peak_ratio"] for r in rows if r["precision"] == precision]
            result[f"peak_ratio_range_{precision}"] = [min(ratios), max(ratios)]
    return result


def format_memory_result(result: dict[str, Any]) -> str:
    peak = "peak_bound" in result
    header = f"{'case':24s} {'prec':4s} {'ckpt':4s} {'batch':>5s} {'saved KB':>9s} {'estimate':>9s} {'est/meas':>8s}"
    lines = [header + (f" {'peak KB':>9s} {'est total':>9s} {'est/peak':>8s}" if peak else "")]
    for r in result["rows"]:
        line = (
            f"{r['case']:24s} {r['precision']:4s} {'on' if r['grad_checkpointing'] else 'off':4s} {r['batch']:5d}"
            f" {r['measured_bytes'] / 1e3:9.1f} {r['estimated_bytes'] / 1e3:9.1f} {r['ratio']:8.3f}"
        )
        if peak:
            line += f" {r['peak_bytes'] / 1e3:9.1f} {r['estimated_total'] / 1e3:9.1f} {r['peak_ratio']:8.3f}"
        lines.append(line + ("" if r["params_match"] else "   parameter count differs"))
    lines.append(f"saved bytes: worst deviation {100 * result['worst_deviation']:.1f}% (tolerance {100 * result['tolerance']:.0f}%)")
    if peak:
        (low, high), (low32, high32) = result["peak_ratio_range_bf16"], result["peak_ratio_range_fp32"]
        lines.append(
            f"step peak: estimated total / measured peak {low:.2f} to {high:.2f} under bf16 (bound {result['peak_bound']}),"
            f" {low32:.2f} to {high32:.2f} in fp32"
        )
    return "\n".join(lines)
