"""What the sweep's console says about artifacts: a live column, alert lines, the end table.

Everything comes from the numbers each checkpoint report carries (trainers/emergence/keys.py),
which Tune keeps as the trial's last result: the console reads no MLflow.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from trainers.emergence import keys

EMERGED_MARK = "*"  # artifacts emerged (confirmed)
SUSPECTED_MARK = "?"  # flagged probes, not yet confirmed
LEGEND = f"artifacts: output outlier share and max/median patch norm at the last probe; {EMERGED_MARK} emerged (at % of training), {SUSPECTED_MARK} flagged, unconfirmed"


def artifacts_cell(result: Mapping[str, Any]) -> str:
    """'0.0% 2.1x', '3.1% 11.4x ?' or '3.1% 11.4x *42%'; '-' before the first probe or with the watch off."""
    frac, ratio = result.get(keys.OUTLIER_FRAC), result.get(keys.MAX_OVER_MEDIAN)
    if frac is None or ratio is None:
        return "-"
    text = f"{100 * frac:.1f}% {ratio:.1f}x"
    emerged = result.get(keys.EMERGED_AT_FRACTION_VALUE)
    if emerged is not None:
        return f"{text} {EMERGED_MARK}{100 * emerged:.0f}%"
    return f"{text} {SUSPECTED_MARK}" if result.get(keys.SUSPECTED) else text


def emergence_words(result: Mapping[str, Any]) -> str:
    """For the one line per finished trial: 'artifacts emerged at step 126 (42%)', 'no artifacts', ''."""
    step = result.get(keys.EMERGED_AT_STEP_VALUE)
    if step is not None:
        return f"artifacts emerged at step {int(step)} ({100 * result[keys.EMERGED_AT_FRACTION_VALUE]:.0f}%)"
    if result.get(keys.OUTLIER_FRAC) is None:
        return ""
    return "artifacts flagged, unconfirmed" if result.get(keys.SUSPECTED) else "no artifacts"


def alert_line(label: str, result: Mapping[str, Any]) -> str | None:
    """The one line printed when a trial with probe.on_emergence: alert (or stop) sees artifacts emerge."""
    step = result.get(keys.EMERGED_AT_STEP_VALUE)
    if step is None or not (result.get(keys.ALERT_VALUE) or result.get(keys.STOPPED_VALUE)):
        return None
    share = 100 * result[keys.EMERGED_AT_FRACTION_VALUE]
    then = "stopped there" if result.get(keys.STOPPED_VALUE) else "training goes on"
    return f"! artifacts emerged in {label} at step {int(step)} ({share:.0f}% of training); {then}"


def stopped(result: Mapping[str, Any]) -> bool:
    return bool(result.get(keys.STOPPED_VALUE))


# ---------------------------------------------------------------- end of sweep

# size label, steps, (registers, register depth), emerged at (fraction of training), watched
EmergenceRow = tuple[str, int, tuple[int, int], float | None, bool]


def emergence_row(
    size: str, steps: int, registers: int, metrics: Mapping[str, Any] | None, probes_in_training: bool = True,
    register_depth: int = 0,
) -> EmergenceRow:
    """probes_in_training: the trial probed during training (probe.every > 0, the watch on); a final
    probe alone can flag artifacts but never confirm them, so such a trial says nothing here."""
    metrics = metrics or {}
    watched = probes_in_training and keys.OUTLIER_FRAC in metrics
    return size, steps, (registers, register_depth), metrics.get(keys.EMERGED_AT_FRACTION_VALUE), watched


def emergence_table(rows: Sequence[EmergenceRow], size_order: Any = None) -> list[str]:
    """Whether and when artifacts emerged, per (size, training length) and register setting (rN, or
    rN@k for N registers entering before block k, as the results table).

    A cell is 'no' (no trial emerged), the mean fraction of training where they emerged when every
    seed's did ('0.42'), or 'k/n@0.42' when k of n seeds did; '-' when no trial watched (no probes
    during training). Empty when no trial of the sweep watched."""
    cells: dict[tuple[str, int], dict[tuple[int, int], list[float | None]]] = {}
    settings: set[tuple[int, int]] = set()
    for size, steps, setting, emerged, watched in rows:
        settings.add(setting)
        if watched:
            cells.setdefault((size, steps), {}).setdefault(setting, []).append(emerged)
    if not cells:
        return []
    columns = sorted(settings)
    order = sorted(cells, key=lambda key: ((size_order or (lambda s: (s, 0)))(key[0]), key[1]))
    headers = ["size", "steps", *(f"r{c}@{d}" if d else f"r{c}" for c, d in columns)]
    body = [[size, str(steps), *(_cell(cells[(size, steps)].get(c, [])) for c in columns)] for size, steps in order]
    widths = [max(len(h), *(len(row[i]) for row in body)) for i, h in enumerate(headers)]
    what = "registers (rN; rN@k: entering before block k)" if any(d for _, d in columns) else "registers (rN)"
    lines = [f"Artifacts emerged? At what fraction of training, by model size, training length and {what}:"]
    lines.append("  " + " ".join(h.rjust(w) for h, w in zip(headers, widths)))
    lines += ["  " + " ".join(c.rjust(w) for c, w in zip(row, widths)) for row in body]
    return lines


def _cell(values: list[float | None]) -> str:
    if not values:
        return "-"
    emerged = [v for v in values if v is not None]
    if not emerged:
        return "no"
    mean = f"{sum(emerged) / len(emerged):.2f}"
    return mean if len(emerged) == len(values) else f"{len(emerged)}/{len(values)}@{mean}"
