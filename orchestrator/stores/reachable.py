"""Is an MLflow store there to be read? Asked before a reader opens it: MLflow would otherwise
retry an unreachable server for minutes, or create a new, empty store where a file is missing.
Used by the analysis and by the inspection of trial checkpoints; each raises its own error."""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path

from orchestrator.stores.mlflow_store import sqlite_file

SQL_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")


def is_sql(uri: str) -> bool:
    return uri.split(":", 1)[0].split("+", 1)[0] in SQL_SCHEMES


def store_problem(uri: str) -> str | None:
    """One line naming the store and what is wrong with it, or None when it can be read."""
    scheme = uri.split(":", 1)[0]
    if scheme == "sqlite":
        path = sqlite_file(uri)
        if path is not None and not path.exists():
            return f"no MLflow store at {path} (tracking URI {uri}); set MLFLOW_TRACKING_URI"
    elif scheme in ("http", "https"):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5):
                pass
        except (urllib.error.URLError, OSError) as exc:
            return f"cannot reach the MLflow tracking server at {uri}: {exc}"
    elif is_sql(uri):
        import sqlalchemy as sa

        try:
            with sa.create_engine(uri).connect():
                pass
        except Exception as exc:  # driver errors differ per database
            return f"cannot reach the MLflow database at {uri}: {exc.__class__.__name__}"
    elif scheme in ("file", "") or "://" not in uri:
        path = uri[len("file://") :] if uri.startswith("file://") else uri
        if not Path(path).exists():
            return f"no MLflow store at {path} (tracking URI {uri}); set MLFLOW_TRACKING_URI"
    return None
