"""The side-by-side report of an inspection: report.md, summary.csv, table1.csv, summary.json, figures/."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from orchestrator.analyze.report import markdown_table
from orchestrator.inspect.figures import draw_all, load_npz
from orchestrator.inspect.probe import TEST_TIME, Inspection
from trainers.probes import names

SEPARATION_FRACTION = 0.01  # "outliers separate at block b": every block from b on has more than 1% outlier patches

FIGURE_TITLES = {
    "norm_hist": "Output token norms per model (paper Fig. 3)",
    "outliers_by_block": "Outlier patches by block (paper Fig. 4)",
    "attention": "[CLS] and register attention (paper Fig. 1)",
}
TABLE1 = [  # (column, task, token); "normal" is the outlier-matched sample where there are outliers
    ("position acc., outlier", "position_acc", "outlier"),
    ("position acc., normal", "position_acc", "normal"),
    ("pixel MSE, outlier", "pixel_mse", "outlier"),
    ("pixel MSE, normal", "pixel_mse", "normal"),
    ("class acc., outlier", "class_acc", "outlier"),
    ("class acc., normal", "class_acc", "normal"),
    ("class acc., [CLS]", "class_acc", "cls"),
]


def separation_block(fractions: np.ndarray, threshold: float = SEPARATION_FRACTION) -> int | None:
    """First block from which every later block has more than `threshold` outlier patches; None if the output has not."""
    above = np.asarray(fractions) > threshold
    if not above[-1]:
        return None
    block = len(above) - 1
    while block > 0 and above[block - 1]:
        block -= 1
    return block


def _get(scalars: dict[str, float], key: str) -> float:
    return scalars.get(key, float("nan"))


def summary_frame(inspections: Sequence[Inspection]) -> pd.DataFrame:
    rows = []
    for item in inspections:
        s = item.scalars
        norms = load_npz(item.files.get(names.NORMS_FILE))
        separation = separation_block(norms["outlier_frac_robust"]) if norms is not None else None
        grid = item.img_size // item.patch_size
        rows.append({
            "model": item.column,
            "source": item.kind,
            "trained registers": item.num_registers if not item.register_depth else f"{item.num_registers} from block {item.register_depth}",
            "input": f"{item.img_size}px, patch {item.patch_size} ({grid}x{grid})",
            "blocks": item.depth,
            "outlier frac. (robust)": _get(s, names.outlier_frac(names.OUTPUT)),
            "outlier frac. (cutoff)": _get(s, names.outlier_frac(names.OUTPUT, "abs")),
            "separate from block": "none" if separation is None else f"{separation} of {item.depth}",
            "patch norm median": _get(s, names.norm_stat("median", "patch", names.OUTPUT)),
            "patch norm max/median": _get(s, names.norm_stat("max_over_median", "patch", names.OUTPUT)),
            "register norm mean": _get(s, names.norm_stat("mean", "reg", names.OUTPUT)),
            "[CLS] attn entropy": _get(s, names.attn("entropy", "cls")),
            "[CLS] attn TV": _get(s, names.attn("tv", "cls")),
            "[CLS] attn on outliers": _get(s, names.attn("outlier_mass", "cls")),
            "corloc": _get(s, names.CORLOC),
            "seg mIoU": _get(s, names.SEG_MIOU),
            "top-1": _get(s, names.VAL_TOP1),
            "run": item.run_id or "",
        })
    frame = pd.DataFrame(rows)
    return frame.loc[:, [c for c in frame.columns if not frame[c].isna().all()]]


def table1_frame(inspections: Sequence[Inspection]) -> pd.DataFrame:
    def value(scalars: dict[str, float], task: str, token: str) -> float:
        if token == "normal" and names.linear_probe(task, "normal_matched") in scalars:
            token = "normal_matched"  # the fair comparison to `outlier` (same sample count)
        return _get(scalars, names.linear_probe(task, token))

    rows = [{"model": i.column, **{col: value(i.scalars, task, token) for col, task, token in TABLE1}} for i in inspections]
    return pd.DataFrame(rows)


def _pct(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{100 * value:.2f}%"


def findings(inspections: Sequence[Inspection], frame: pd.DataFrame) -> list[str]:
    lines = []
    by_column = frame.set_index("model")
    for item in inspections:
        row = by_column.loc[item.column]
        robust, absolute = row["outlier frac. (robust)"], row.get("outlier frac. (cutoff)", float("nan"))
        where = row["separate from block"]
        if item.variant == TEST_TIME:
            reg = row.get("register norm mean", float("nan"))
            lines.append(
                f"- **{item.column}**: outlier patches {_pct(robust)} (cutoff: {_pct(absolute)}); the registers' mean output "
                f"norm is {reg:.4g}, {reg / row['patch norm median']:.1f}x the median patch."
            )
            continue
        sentence = f"- **{item.column}**: {_pct(robust)} of output patch tokens are high-norm outliers (scale-free detector), {_pct(absolute)} above the absolute cutoff"
        if where != "none":
            sentence += f"; every block from {where} on has more than 1% of them."
        else:
            sentence += "; the output has no more than 1% of them."
        lines.append(sentence)
        for note in (item.weights_note, item.note):
            if note:
                lines.append(f"  {note[0].upper() + note[1:]}.")
    return lines


def _search_lines(inspections: Sequence[Inspection]) -> list[str]:
    lines = []
    for item in inspections:
        if item.variant != TEST_TIME or not item.search:
            continue
        s = item.search
        neurons = s["neurons"]
        shown = ", ".join(f"{n['layer']}:{n['unit']} ({n['score']:.3g})" for n in neurons[:12])  # type: ignore[index]
        more = f" and {len(neurons) - 12} more" if len(neurons) > 12 else ""  # type: ignore[arg-type]
        lines.append(
            f"- **{item.label}**: outliers marked at block {s['detect_layer']} by the {s['detector']} detector (norm > "
            f"{float(s['threshold']):.4g}: {_pct(float(s['outlier_fraction']))} of the search images' patches, "  # type: ignore[arg-type]
            f"{s['images_with_outliers']} of {s['images']} images); top {len(neurons)} units in blocks 0-{s['max_layer']} "  # type: ignore[arg-type]
            f"(block:unit (mean activation)): {shown}{more}."
        )
    return lines


def write_report(inspections: Sequence[Inspection], out: Path, *, experiment: str, tracking_uri: str, cutoffs: Sequence[float]) -> Path:
    """Write everything into `out`; returns the path of report.md."""
    out.mkdir(parents=True, exist_ok=True)
    figures = draw_all([i.column for i in inspections], [i.files for i in inspections], cutoffs, out / "figures")
    frame, table1 = summary_frame(inspections), table1_frame(inspections)
    frame.to_csv(out / "summary.csv", index=False)
    table1.to_csv(out / "table1.csv", index=False)
    (out / "summary.json").write_text(json.dumps([
        {"model": i.column, "label": i.label, "source": i.kind, "variant": i.variant, "run_id": i.run_id,
         "num_registers": i.num_registers, "data": i.data, "seconds": i.seconds, "note": i.note, "search": i.search}
        for i in inspections
    ], indent=2, default=str) + "\n")
    data = sorted({f"{i.label}: {i.data}" for i in inspections})
    lines = [
        "# Inspection: artifact tokens in pretrained models",
        "",
        f"MLflow experiment `{experiment}` at `{tracking_uri}`; one run per model below (column `run`).",
        (
            "Outliers: the probes' scale-free detector on output patch norms (docs/probes.md); the absolute cutoff "
            f"per model: {', '.join(f'{c:g}' for c in sorted(set(cutoffs)))}."
        ),
        "",
        "## Findings",
        "",
        *findings(inspections, frame),
        "",
        "## Side by side",
        "",
        markdown_table(frame),
        "",
        *[f"![{FIGURE_TITLES[name]}]({path.relative_to(out).as_posix()})\n" for name, path in figures.items()],
        "## What outliers hold (paper Table 1)",
        "",
        (
            "Held-out linear probes on one output token: patch position and pixels (local information), image class "
            "(global information). `outlier` vs `normal` (normal patches drawn to the outliers' count where a model "
            "has outliers, else up to 2048 normal patches); the outlier columns are empty where a model has too few "
            "outliers."
        ),
        "",
        markdown_table(table1),
        "",
    ]
    search = _search_lines(inspections)
    if search:
        lines += ["## Test-time registers (Jiang et al., arXiv 2506.08010)", "", *search, ""]
    lines += ["## Data", "", *[f"- {d}" for d in data], ""]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report
