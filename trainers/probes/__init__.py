"""Artifact probes: pure functions that measure high-norm tokens, registers and attention.

`run_probes` and `ProbeReport` are loaded on first use, so importing `trainers.probes.names`
stays light (no timm or matplotlib import just to spell a metric name).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from trainers.probes.report import ProbeReport, run_probes

__all__ = ["ProbeReport", "run_probes"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from trainers.probes import report

        return getattr(report, name)
    raise AttributeError(f"module 'trainers.probes' has no attribute {name!r}")
