"""The saved runs view behind the sweep's MLflow UI link (the browser side is in test_mlflow_ui.py)."""

from __future__ import annotations

import json
from pathlib import Path

from mlflow.tracking import MlflowClient

from orchestrator.stores.mlflow_ui import VIEW_NAME, runs_view_url, ui_url


def test_link_names_a_saved_view_with_the_axes_and_key_metrics(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment_id = client.create_experiment("lr-sweep")
    url = runs_view_url(uri, experiment_id, ["model.num_registers", "optim.lr"])
    assert url == f"http://127.0.0.1:5000/#/experiments/{experiment_id}/runs?viewStateShareKey=sweep-axes-metrics"

    envelope = json.loads(client.get_experiment(experiment_id).tags["mlflow.sharedViewState.sweep-axes-metrics"])
    assert envelope["name"] == VIEW_NAME and isinstance(envelope["createdAt"], int)
    state = json.loads(envelope["state"])
    assert state["selectedColumns"] == [
        "tags.`axis.model_size`", "tags.`axis.num_registers`", "tags.`axis.steps`", "tags.`axis.seed`", "tags.`axis.objective`",
        "tags.`axis.optim.lr`",  # a swept key beyond the study axes; model.num_registers is not repeated
        "metrics.`val/top1`", "metrics.`train/loss`",  # within a laptop screen's width
        # Whether and when artifacts emerged, and the last probe's outlier share and max/median norm.
        "tags.`emergence.status`", "tags.`emerged_at_step`", "tags.`emerged_at_fraction`",
        "metrics.`emergence/outlier_frac`", "metrics.`emergence/max_over_median`",
        "metrics.`probe/outlier_frac/output`", "metrics.`probe/seg_miou`",
    ]
    assert set(state["columnWidths"]) == {"attributes.`Run Name`", *state["selectedColumns"]}

    # A later launch rewrites the one view and keeps its creation time.
    runs_view_url(uri, experiment_id)
    again = json.loads(client.get_experiment(experiment_id).tags["mlflow.sharedViewState.sweep-axes-metrics"])
    assert again["createdAt"] == envelope["createdAt"]
    assert "tags.`axis.optim.lr`" not in json.loads(again["state"])["selectedColumns"]


def test_a_tracking_server_is_its_own_ui() -> None:
    assert ui_url("http://mlflow.internal:5000/") == "http://mlflow.internal:5000"
    assert ui_url("sqlite:////data/mlflow.db") == "http://127.0.0.1:5000"
