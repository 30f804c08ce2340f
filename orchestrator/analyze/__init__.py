"""Read a sweep back from MLflow: when artifact tokens emerge, and which register count is best.

Entry points: `python -m orchestrator.analyze --experiment NAME --out DIR` (see __main__.py)
and `run_analysis` for notebooks and tests.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from orchestrator.analyze.errors import AnalysisError

if TYPE_CHECKING:
    from orchestrator.analyze.pipeline import AnalysisResult, analyse_sweep, run_analysis

__all__ = ["AnalysisError", "AnalysisResult", "analyse_sweep", "run_analysis"]


def __getattr__(name: str) -> Any:
    # Lazy: `python -m orchestrator.analyze` imports this package first, and the CLI should report
    # input errors before matplotlib and the figure code are loaded.
    if name in ("AnalysisResult", "analyse_sweep", "run_analysis"):
        from orchestrator.analyze import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
