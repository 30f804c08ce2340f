"""AnalysisResult: everything one analysis found, handed from the pipeline to the report
writer and the MLflow publisher (its own module so that neither imports the pipeline)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from orchestrator.analyze import catalog as cat
from orchestrator.analyze.emergence import EmergencePoint
from orchestrator.analyze.learning import LearningCheck
from orchestrator.analyze.load import Sweep
from orchestrator.analyze.registers import BestCount, Recommendation
from orchestrator.analyze.test_time import TestTimeComparison


@dataclass
class AnalysisResult:
    sweep: Sweep
    out_dir: Path
    threshold: float
    parent_run: str | None
    emergence: list[EmergencePoint]
    stats: pd.DataFrame
    best: list[BestCount]
    recommendation: Recommendation
    learning: list[LearningCheck] = field(default_factory=list)
    test_time: TestTimeComparison | None = None  # test-time registers on the no-register trials (None: not run)
    figures: dict[str, Path] = field(default_factory=dict)
    caveats: list[str] = field(default_factory=list)
    report_path: Path | None = None
    analysis_run_id: str | None = None

    def point_label(self, point: EmergencePoint) -> str:
        """The size, or objective/size when the sweep crossed several objectives."""
        several = len({p.objective for p in self.emergence}) > 1
        return cat.group_label(point.objective, point.model_size, several)

    @property
    def sizes_with_artifacts(self) -> list[str]:
        return sorted({self.point_label(p) for p in self.emergence if p.status == "emerged"}, key=cat.group_sort_key)
