"""Figures drawn from probe artifacts: the output norm histogram with and without registers
(paper Fig. 3, 7), norm distributions against block, training step and model size (Fig. 4 a-c),
and [CLS] and register attention maps side by side (Fig. 1, 9).

Each figure is drawn from whatever artifacts exist; what is missing is returned as a note.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402

from orchestrator.analyze import catalog as cat  # noqa: E402
from orchestrator.analyze.artifacts import ArtifactReader, pick_trial  # noqa: E402
from orchestrator.analyze.figures import save  # noqa: E402
from orchestrator.analyze.load import Trial  # noqa: E402
from trainers.probes import names  # noqa: E402

MAX_STEPS_SHOWN = 12
MAX_REGISTER_MAPS = 4
MAX_IMAGES = 3


def probe_figures(
    reader: ArtifactReader, trials: list[Trial], out_dir: Path, prefer_registers: int | None, prefer_depth: int | None = None
) -> tuple[dict[str, Path], list[str]]:
    """Draw every probe figure the artifacts allow. Returns {figure name: path} and notes on what is missing."""
    figures: dict[str, Path] = {}
    notes: list[str] = []
    base = pick_trial(reader, trials, registers=0)
    regs = pick_trial(
        reader, trials, registers=None, size=base.model_size if base else None, prefer_registers=prefer_registers,
        prefer_depth=prefer_depth,
    )
    if base is None and regs is None:
        notes.append("No trial has probe artifacts (probes/step_*/): the norm and attention figures are missing.")
        return figures, notes
    base_norms = reader.latest(base.run_id, names.NORMS_FILE) if base else None
    reg_norms = reader.latest(regs.run_id, names.NORMS_FILE) if regs else None
    if base_norms or reg_norms:
        figures["norm_hist_output"] = _norm_hist(base, base_norms, regs, reg_norms, out_dir / "norm_hist_output.png")
    else:
        notes.append(f"No {names.NORMS_FILE} found: the norm histogram figures are missing.")
    if base is not None and base_norms is not None:
        figures["norm_distributions"] = _norm_distributions(reader, trials, base, base_norms, out_dir / "norm_distributions.png")
    elif base is None:
        notes.append("No trial without registers has probe artifacts: Fig. 4 (norms by block/step/size) is missing.")
    base_attn = reader.latest(base.run_id, names.ATTENTION_FILE) if base else None
    reg_attn = reader.latest(regs.run_id, names.ATTENTION_FILE) if regs else None
    if base_attn or reg_attn:
        figures["attention_maps"] = _attention(base, base_attn, regs, reg_attn, out_dir / "attention_maps.png")
    else:
        notes.append(f"No {names.ATTENTION_FILE} found: the attention map figure is missing.")
    return figures, notes


def _describe(trial: Trial, step: int) -> str:
    family = "" if trial.objective == cat.DEFAULT_OBJECTIVE else f"{trial.objective} "
    registers = f"{trial.num_registers} reg." + (f" from block {trial.register_depth}" if trial.register_depth else "")
    return f"{family}{trial.model_size}, {registers}, step {step}/{trial.steps}, seed {trial.seed}"


def _norm_hist(base, base_norms, regs, reg_norms, out: Path) -> Path:
    """Paper Fig. 3/7: histogram of output token norms, log counts; bimodal when artifacts are present."""
    panels = [(t, n) for t, n in ((base, base_norms), (regs, reg_norms)) if n is not None]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.6), squeeze=False, sharey=True)
    for ax, (trial, (step, data)) in zip(axes[0], panels):
        edges = data["bin_edges"]
        ax.stairs(data["hist_patch"][-1], edges, label="patch tokens", fill=True, alpha=0.6)
        if "hist_cls" in data and data["hist_cls"].size:
            ax.stairs(data["hist_cls"][-1], edges, label="[CLS]", linewidth=1.5)
        if "hist_reg" in data and data["hist_reg"].ndim == 3 and data["hist_reg"].shape[1] > 0:
            ax.stairs(data["hist_reg"][-1].sum(axis=0), edges, label="registers", linewidth=1.5)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("L2 norm of output token")
        ax.set_title(("without" if trial.num_registers == 0 else "with") + " registers\n" + _describe(trial, step), fontsize=9)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("tokens (log)")
    fig.tight_layout()
    return save(fig, out)


def _density_rows(rows: list[np.ndarray]) -> np.ndarray:
    counts = np.stack(rows).astype(float)
    totals = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)


def _density_panel(ax, rows: list[np.ndarray], edges: np.ndarray, labels: list[str], title: str, ylabel: str) -> None:
    density = _density_rows(rows)
    masked = np.ma.masked_less_equal(density, 0)
    ax.pcolormesh(edges, np.arange(len(rows) + 1), masked, cmap="viridis", norm=LogNorm(vmin=1e-4, vmax=1))
    ax.set_xscale("log")
    ax.set_yticks(np.arange(len(rows)) + 0.5, labels, fontsize=7)
    ax.set_xlabel("L2 norm of patch tokens")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)


def _norm_distributions(reader: ArtifactReader, trials: list[Trial], base: Trial, base_norms, out: Path) -> Path:
    """Paper Fig. 4 a-c: patch-norm distribution against block, training step and model size (no registers)."""
    step, data = base_norms
    edges = data["bin_edges"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    depth = data["hist_patch"].shape[0]
    labels = [f"block {i}" for i in range(depth - 1)] + ["output"]
    _density_panel(axes[0], list(data["hist_patch"]), edges, labels, f"(a) by block\n{_describe(base, step)}", "location")
    steps = reader.probe_steps(base.run_id)
    if len(steps) > MAX_STEPS_SHOWN:  # evenly spaced subset, always with the last step
        steps = [steps[int(i)] for i in np.linspace(0, len(steps) - 1, MAX_STEPS_SHOWN).round()]
    by_step = [(s, reader.load(base.run_id, s, names.NORMS_FILE)) for s in steps]
    by_step = [(s, d) for s, d in by_step if d is not None]
    _density_panel(
        axes[1], [d["hist_patch"][-1] for _, d in by_step], edges, [str(s) for s, _ in by_step],
        f"(b) output by training step\n{base.model_size}, seed {base.seed}", "training step",
    )
    by_size = []
    for size in sorted({t.model_size for t in trials}, key=cat.size_sort_key):
        trial = pick_trial(reader, trials, registers=0, size=size)
        found = reader.latest(trial.run_id, names.NORMS_FILE) if trial else None
        if found is not None:
            by_size.append((size, found[1]["hist_patch"][-1]))
    _density_panel(
        axes[2], [h for _, h in by_size], edges, [s for s, _ in by_size], "(c) output by model size\n(last probe step)", "model size"
    )
    fig.suptitle("Distribution of patch-token norms without registers (colour: fraction of tokens, log)")
    fig.tight_layout()
    return save(fig, out)


def _attention(base, base_attn, regs, reg_attn, out: Path) -> Path:
    """Paper Fig. 1/9: input, [CLS] attention without and with registers, and each register's attention."""
    images = (reg_attn or base_attn)[1]["images"][:MAX_IMAGES]
    n_reg = 0
    if reg_attn is not None and reg_attn[1]["reg_attn"].ndim == 4:
        n_reg = min(reg_attn[1]["reg_attn"].shape[1], MAX_REGISTER_MAPS)
    columns: list[tuple[str, object]] = [("input", None)]
    if base_attn is not None:
        columns.append((f"[CLS], no registers\n{base.model_size}, step {base_attn[0]}", base_attn[1]["cls_attn"]))
    if reg_attn is not None:
        late = f" from block {regs.register_depth}" if regs.register_depth else ""
        columns.append((f"[CLS], {regs.num_registers} registers{late}\nstep {reg_attn[0]}", reg_attn[1]["cls_attn"]))
        columns.extend((f"register {r}", reg_attn[1]["reg_attn"][:, r]) for r in range(n_reg))
    fig, axes = plt.subplots(len(images), len(columns), figsize=(2.2 * len(columns), 2.3 * len(images)), squeeze=False)
    for row, image in enumerate(images):
        for col, (title, maps) in enumerate(columns):
            ax = axes[row][col]
            if maps is None:
                ax.imshow(image)
            elif row < len(maps):
                ax.imshow(maps[row], cmap="inferno")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(title, fontsize=8)
    fig.suptitle("Last-block attention maps", fontsize=10)
    fig.tight_layout()
    return save(fig, out)
