"""Training of a register ViT: the whole loop reads top to bottom in `fit`.

What the ViT learns from (labels, self-distillation, captions) is the objective's business
(trainers/objectives/): it builds the networks, computes the loss of a batch and names the
evaluation; this loop is the same for every objective. The loop is deterministic for a seed
and resumes exactly: the batch for step s is a pure function of (seed, s) (see
trainers/data/base.py) and a checkpoint holds the model, optimizer, schedule, the objective's
state (teacher, centres, temperature), every RNG state and the step.

Data parallel: Trainer(cfg, device, rank=r, world_size=n) in each of n processes that share
an initialised torch.distributed process group (the orchestrator's Ray Train workers set it
up; this package never imports Ray). Each rank reads, decodes and augments only its own
contiguous 1/n of the global batch of step s (trainers/data: rows [r * n, (r + 1) * n) of the
batch one process draws) and trains it through PyTorch DDP around the objective's trained
modules, which averages the gradients over the ranks before clipping: with equal shares that
is the gradient of the mean loss over the global batch, so the update equals one process's on
the whole global batch (DINO's KoLeo term aside, which DINOv2 computes per rank; the
objectives gather their batch statistics themselves). Rank 0 alone evaluates, probes and
measures; the caller saves checkpoints from rank 0 and every rank loads.

Randomness: every rank seeds alike before the networks are built (identical initial weights,
as DDP needs); each training step then reseeds torch from (seed, rank, step), so dropout and
drop path differ between ranks and a resumed run draws exactly the masks it would have drawn.
"""

from __future__ import annotations

import contextlib
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from trainers.checkpoint import load_checkpoint, restore_rng_state, rng_state
from trainers.compile import CompileMonitor, compiled, reset_compiler
from trainers.config import TrainConfig, data_parallel_problem
from trainers.data import build_training_data
from trainers.data.base import Batch
from trainers.data.sampling import derive_seed
from trainers.emergence.watch import EmergenceWatch
from trainers.objectives import build_objective
from trainers.probes import names
from trainers.schedule import warmup_cosine
from trainers.tracking import NullTracker, Tracker

CHECKPOINT_FILE = "trainer_state.pt"
OnCheckpoint = Callable[[int, dict[str, float]], None]


class NonFiniteLossError(FloatingPointError):
    """Training diverged. The message names the first step whose loss was not finite."""


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    def __init__(
        self, cfg: TrainConfig, device: torch.device | None = None, *, rank: int = 0, world_size: int = 1
    ) -> None:
        self.cfg = cfg
        self.device = device or default_device()
        self.rank, self.world_size = rank, world_size
        if world_size > 1:
            if not torch.distributed.is_initialized():
                raise RuntimeError("world_size > 1 needs an initialised torch.distributed process group")
            problem = data_parallel_problem(cfg, world_size)
            if problem:
                raise ValueError(problem)
        # Dynamo's caches and recompile limit are process-wide: a reused Tune actor's earlier
        # trials would push this one over the limit, and it would silently run eagerly.
        self.compile_monitor = None
        if cfg.compile:
            reset_compiler()
            self.compile_monitor = CompileMonitor()
        # Every rank seeds alike: the same initial weights everywhere, as DDP needs.
        seed_everything(cfg.seed)
        # This rank's share of each batch, with the objective's crops (3-Augment, DINO) cut by the loader.
        self.data = build_training_data(cfg, self.device, rank=rank, world_size=world_size)
        self.objective = build_objective(cfg, self.data, self.device)
        self.objective.share = (rank, world_size)
        self.model = self.objective.model  # the trained ViT (classifier, DINO student, CLIP image tower)
        # Watches the probes for the emergence of artifacts (rank 0 measures; trainers/emergence/watch.py).
        self.watch = EmergenceWatch(
            cfg, lambda: self.objective.probe_model, lambda: self.data.probe_batch(cfg.probe.batch_size).images,
            rank=rank, world_size=world_size, device=self.device,
        )
        if cfg.grad_checkpointing:
            self.objective.set_grad_checkpointing(True)
        if world_size > 1:
            # PyTorch DDP: the objective's step runs its trained modules through the wrapper,
            # whose backward averages the gradients over the ranks (in buckets, overlapped with
            # the backward pass). self.model and the objective's modules stay bare: checkpoints,
            # evaluation and probes see the same modules and state_dict keys as in one process.
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" and self.device.index is not None else None
            ddp = DistributedDataParallel(
                self.objective.trainable(), device_ids=ids, broadcast_buffers=False,
                find_unused_parameters=self.objective.unused_parameters,
            )
            # train.compile is for the supervised objective only (TrainConfig refuses it for DINO and CLIP).
            self.objective.forward = compiled(ddp, cfg.compile_backend) if cfg.compile else ddp
        self.optimizer = self._build_optimizer()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: warmup_cosine(
                s, total_steps=cfg.steps, warmup_steps=cfg.optim.warmup_steps, min_ratio=cfg.optim.min_lr_ratio
            ),
        )
        self.step = 0
        # bf16 autocast where the hardware does it natively; fp32 on CPU unless asked.
        use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and self.device.type == "cuda")
        self.autocast_dtype = torch.bfloat16 if use_bf16 else None
        if self.device.type == "cuda":
            # fp32 matmuls (fp32 runs, and what autocast leaves in fp32) on tensor cores as TF32.
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

    def _build_optimizer(self) -> torch.optim.Optimizer:
        # No weight decay on norms, biases, position embeddings, [CLS] and registers (objectives/base.py).
        # The peak lr is optim.lr scaled linearly from optim.lr_ref_batch to the global batch.
        o = self.cfg.optim
        if o.name == "lamb":
            from timm.optim import Lamb  # DeiT-III's optimizer; its own global-norm clip is off, grad_clip acts

            return Lamb(self.objective.param_groups(), lr=o.scaled_lr, betas=(o.beta1, o.beta2), max_grad_norm=None)
        fused = self.device.type == "cuda"
        return torch.optim.AdamW(self.objective.param_groups(), lr=o.scaled_lr, betas=(o.beta1, o.beta2), fused=fused)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    # ---------------------------------------------------------------- training

    def train_step(self, batch: Batch) -> torch.Tensor:
        """One optimisation step. Returns the loss as a device tensor (no host sync)."""
        self.objective.train()
        # Dropout and drop path of (rank, step): other masks on each rank, the same after a resume.
        torch.manual_seed(derive_seed(self.cfg.seed, "dropout", self.rank, self.step))
        with self._autocast():
            loss = self.objective.loss(batch, self.step)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # under DDP every rank now holds the gradients averaged over the ranks
        self.objective.before_optimizer_step(self.step, self.optimizer)
        if self.cfg.optim.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(list(self.objective.parameters()), self.cfg.optim.grad_clip, foreach=True)
        self.optimizer.step()
        self.scheduler.step()
        self.objective.after_optimizer_step(self.step)
        return loss.detach()

    @staticmethod
    def _first_bad_step_of_all(first_bad_step: torch.Tensor) -> torch.Tensor:
        none = torch.iinfo(torch.long).max
        step = torch.where(first_bad_step < 0, none, first_bad_step)
        torch.distributed.all_reduce(step, op=torch.distributed.ReduceOp.MIN)
        return torch.where(step == none, -1, step)

    def fit(self, tracker: Tracker | None = None, on_checkpoint: OnCheckpoint | None = None) -> dict[str, float]:
        """Train from self.step to cfg.steps. Returns the last validation metrics.

        on_checkpoint(step, metrics) is called at every checkpoint point (each evaluation,
        every checkpoint_every steps, and the end): the orchestrator saves state and
        reports to Tune there. Metrics go to the tracker as they are measured.
        """
        cfg, tracker = self.cfg, tracker or NullTracker()
        if self.rank != 0:
            tracker = NullTracker()  # rank 0 measures for all
        # This rank's share of each step's global batch (with repeats, the loader repeats the images).
        batches: Iterator[Batch] = self.data.train_batches(self.step, cfg.optim.batch_size)
        loss_sum = torch.zeros((), device=self.device)
        first_bad_step = torch.full((), -1, dtype=torch.long, device=self.device)
        losses_in_window = 0
        metrics: dict[str, float] = {}
        while self.step < cfg.steps and not self.watch.stopped:  # stopped: on emergence (probe.on_emergence)
            batch = next(batches)
            loss = self.train_step(batch)
            # Remember the first non-finite step on the device; checked at the next log point.
            bad = ~torch.isfinite(loss) & (first_bad_step < 0)
            # The step goes in as a Python scalar: torch.tensor(step, device=cuda) would be a
            # blocking host-to-device copy, i.e. a host sync on every step.
            first_bad_step = torch.where(bad, self.step, first_bad_step)
            loss_sum += loss
            losses_in_window += 1
            self.step += 1
            done = self.step == cfg.steps

            log_now = self.step % cfg.log_every == 0 or done
            if log_now:
                # The only host sync in the hot loop, once per log window.
                if self.world_size > 1:
                    # The logged loss is the global batch's mean, as in one process, and every
                    # rank stops at the same first non-finite step (no rank left waiting in a collective).
                    torch.distributed.all_reduce(loss_sum)
                    loss_sum /= self.world_size
                    first_bad_step = self._first_bad_step_of_all(first_bad_step)
                if int(first_bad_step) >= 0:
                    raise NonFiniteLossError(f"loss became non-finite at step {int(first_bad_step) + 1}")
                tracker.log_metrics(
                    {
                        names.TRAIN_LOSS: float(loss_sum) / losses_in_window,
                        names.TRAIN_LR: self.scheduler.get_last_lr()[0],
                        **self.objective.log_values(),  # loss terms and schedules of the last step
                    },
                    self.step,
                )
                loss_sum.zero_()
                losses_in_window = 0
            probe_due = self._due(cfg.probe.every, done and cfg.probe.at_end)
            if probe_due and self.rank == 0:
                self.probe(tracker, final=done)
            # Adaptive probes and weight snapshots; a checkpoint at a kept fraction or on emergence.
            watch = self.watch.after_step(self.step, tracker, done=done, probed=probe_due)
            evaluate = self._due(cfg.eval_every, done)
            if evaluate and self.rank == 0:
                metrics = self.evaluate()
                tracker.log_metrics(metrics, self.step)
            if log_now and self.compile_monitor is not None:
                # What dynamo did so far, evaluation included: a trial that fell back to eager says so in its run.
                tracker.log_metrics(self.compile_monitor.counts().as_metrics(), self.step)
            if on_checkpoint is not None and (evaluate or self._due(cfg.checkpoint_every, done) or watch.checkpoint):
                on_checkpoint(self.step, {**metrics, **self.watch.report_values()})
            if watch.stop:
                break
        return metrics

    def _due(self, every: int, at_end: bool) -> bool:
        return at_end or (every > 0 and self.step % every == 0)

    # -------------------------------------------------------------- measuring

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """The objective's evaluation: val loss and top-1, k-NN top-1 (dino), zero-shot top-1 (clip)."""
        with self._autocast():
            return self.objective.evaluate(self.cfg.optim.batch_size)

    def probe(self, tracker: Tracker, final: bool = False) -> float:
        """Run the artifact probes on the fixed probe batch; returns their wall time in seconds."""
        from trainers.probes.report import run_probes  # heavy (matplotlib), only when probing

        # Figures cost more than the measurements: by default only the final probe draws them.
        figures = self.cfg.probe.figures == "every" or (self.cfg.probe.figures == "end" and final)
        batch = self.data.probe_batch(self.cfg.probe.batch_size)
        # DINO's probes read the teacher (the network DINOv2 releases), the others the trained ViT.
        report = run_probes(self.objective.probe_model, batch, self.cfg.probe, figures=figures)
        tracker.log_metrics(report.scalars, self.step)  # includes probe/seconds
        if report.files:
            tracker.log_files(report.files, names.artifact_dir(self.step))
        self.watch.regular_probe(self.step, report.scalars, tracker)
        return report.seconds

    # ------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            # Teacher, heads, centres, text tower, temperature: tensors and numbers only.
            "objective": self.objective.state_dict(),
            "rng": rng_state(self.device),  # tensors and plain values: the file loads with weights_only=True
            "emergence": self.watch.state_dict(),  # the probes seen so far: a resumed watch goes on
            "config": self.cfg.model_dump(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.objective.load_state_dict(state.get("objective", {}))
        self.watch.load_state_dict(state.get("emergence", {}))
        self.step = int(state["step"])
        restore_rng_state(state["rng"], self.device)

    def save(self, directory: str | Path) -> Path:
        """Write the checkpoint atomically (temp file + rename): a crash never leaves half a file."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        target = directory / CHECKPOINT_FILE
        with tempfile.NamedTemporaryFile(dir=directory, delete=False, suffix=".tmp") as tmp:
            torch.save(self.state_dict(), tmp)
        os.replace(tmp.name, target)
        return target

    def load(self, directory: str | Path) -> None:
        # Never unpickles code: a checkpoint holding anything but tensors and plain values is refused.
        state = load_checkpoint(Path(directory) / CHECKPOINT_FILE, map_location=self.device)
        self.load_state_dict(state)


def train(cfg: TrainConfig, tracker: Tracker | None = None) -> dict[str, float]:
    """Notebook entry point: build a trainer and run it to the end."""
    start = time.perf_counter()
    trainer = Trainer(cfg)
    metrics = trainer.fit(tracker)
    return {**metrics, "seconds": time.perf_counter() - start}
