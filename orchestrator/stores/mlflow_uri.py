"""Where MLflow writes when MLFLOW_TRACKING_URI is not set.

Apart from orchestrator/stores/mlflow_runs.py so that the sweep driver can name the store without
importing MLflow: that import runs in a thread beside Ray's start (orchestrator/launch/run.py).
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_STORE_FILE = "mlflow.db"
DEFAULT_TRACKING_URI = f"sqlite:///{DEFAULT_STORE_FILE}"


def default_tracking_uri(cwd: str | Path | None = None) -> str:
    """MLFLOW_TRACKING_URI if set, else a SQLite file in the working directory (absolute, as
    trials in other processes and directories must find the same file)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{Path(cwd or os.getcwd()).resolve() / DEFAULT_STORE_FILE}"
