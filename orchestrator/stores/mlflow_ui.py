"""A link to a sweep's runs in MLflow's UI that shows the axes and the key metrics as columns.

MLflow 3.17's experiment page keeps its chosen columns in the browser (local storage), not in
the URL. What a URL can name is a saved view: an experiment tag
`mlflow.sharedViewState.<key>` whose value is `{"name", "createdAt", "updatedAt", "state"}`,
`state` being the JSON of the page's search facets and UI state (`selectedColumns`, ...), with
columns named like tags.`axis.num_registers` and metrics.`val/top1`.
`<ui>/#/experiments/<id>/runs?viewStateShareKey=<key>` opens it, and the page's view menu lists it
by name. (Read from the UI bundle of mlflow 3.17; tests/test_mlflow_ui.py opens the link in a
real browser.) The page ignores a saved view when the URL also carries search parameters
(searchFilter, orderByKey, ...), so the link carries none: any filter or order goes in the state.
"""

from __future__ import annotations

import json
import time
from typing import Iterable

from mlflow.tracking import MlflowClient

from orchestrator.stores.axes import STUDY_AXES, axis_tag
from trainers.emergence import keys as emergence
from trainers.probes import names

VIEW_TAG_PREFIX = "mlflow.sharedViewState."
VIEW_URL_PARAM = "viewStateShareKey"
VIEW_KEY = "sweep-axes-metrics"  # one view per experiment (= per sweep), rewritten by each launch
VIEW_NAME = "Sweep: axes and key metrics"
KEY_METRICS = (names.VAL_TOP1, names.TRAIN_LOSS, names.outlier_frac(names.OUTPUT), names.SEG_MIOU)
# Whether and when artifacts emerged, and the last probe's outlier share and max/median norm
# (trainers/emergence/keys.py): after the axes and the first two metrics.
EMERGENCE_COLUMNS = (
    *(f"tags.`{tag}`" for tag in (emergence.STATUS, emergence.EMERGED_AT_STEP, emergence.EMERGED_AT_FRACTION)),
    *(f"metrics.`{key}`" for key in (emergence.OUTLIER_FRAC, emergence.MAX_OVER_MEDIAN)),
)
RUN_NAME_COLUMN = "attributes.`Run Name`"
LOCAL_UI_URL = "http://127.0.0.1:5000"  # where `mlflow ui` serves a local store by default


def view_columns(swept: Iterable[str] = (), metrics: Iterable[str] = KEY_METRICS) -> list[str]:
    """Column ids of the view: the study axes, any other swept config path, the first two metrics
    (val/top1, train/loss), emergence, then the other metrics. The grid draws only the columns
    in sight, so what a person looks at first sits within a laptop screen's width."""
    tags = list(STUDY_AXES.values())
    tags += [axis_tag(path) for path in swept if axis_tag(path) not in tags]
    metric_columns = [f"metrics.`{metric}`" for metric in metrics]
    return [f"tags.`{tag}`" for tag in tags] + metric_columns[:2] + list(EMERGENCE_COLUMNS) + metric_columns[2:]


def save_runs_view(client: MlflowClient, experiment_id: str, swept: Iterable[str] = ()) -> str:
    """Write (or rewrite) the experiment's saved view and return its key."""
    columns = view_columns(swept)
    # Each column wide enough for its header (the UI's default cuts 'axis.num_registers' short),
    # and the run name for a trial's name; widths apply to the columns named in columnOrder.
    widths = {RUN_NAME_COLUMN: 300, **{column: max(90, 7 * len(column.split("`")[1]) + 28) for column in columns}}
    state = {"selectedColumns": columns, "columnOrder": [RUN_NAME_COLUMN, *columns], "columnWidths": widths}
    now = int(time.time() * 1000)
    key = f"{VIEW_TAG_PREFIX}{VIEW_KEY}"
    old = client.get_experiment(experiment_id).tags.get(key)
    created = _created_at(old) or now
    envelope = {"name": VIEW_NAME, "createdAt": created, "updatedAt": now, "state": json.dumps(state)}
    client.set_experiment_tag(experiment_id, key, json.dumps(envelope))
    return VIEW_KEY


def _created_at(envelope: str | None) -> int | None:
    try:
        return int(json.loads(envelope)["createdAt"]) if envelope else None
    except (ValueError, KeyError, TypeError):
        return None


def ui_url(tracking_uri: str) -> str:
    """The UI of a tracking server is the server itself; a local store's is `mlflow ui`'s default."""
    if tracking_uri.startswith(("http://", "https://")):
        return tracking_uri.rstrip("/")
    return LOCAL_UI_URL


def runs_view_url(tracking_uri: str, experiment_id: str, swept: Iterable[str] = (), *, ui: str | None = None) -> str:
    """Save the experiment's view (the axes, `swept` config paths beyond the study axes, and the
    key metrics as columns) and return the URL that opens it, e.g.
    http://127.0.0.1:5000/#/experiments/1/runs?viewStateShareKey=sweep-axes-metrics."""
    key = save_runs_view(MlflowClient(tracking_uri), experiment_id, swept)
    return f"{(ui or ui_url(tracking_uri)).rstrip('/')}/#/experiments/{experiment_id}/runs?{VIEW_URL_PARAM}={key}"
