"""What MLflow's dashboard opens on: the runs list with the metrics that matter, and each run's pictures.

MLflow's runs list shows no metric column until one is picked, and a run's pictures sit in its Artifacts tab.
Both are fixed with MLflow's own means, no UI code of ours:

- the runs list: a saved view, as the UI's *Views* menu saves one: the experiment tag
  ``mlflow.sharedViewState.<key>`` holding the view as JSON, listed under *Views* and opened by
  ``?viewStateShareKey=<key>`` in the experiment's URL (MLflow 3.17; checked in headless Chromium);
- the run's Overview page: its description, the tag ``mlflow.note.content``, markdown in which MLflow shows
  images, here those of the run's own artifacts.

Imports nothing heavy (MLflow's client only when it writes): ``bp-runs dashboard`` needs no torch.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from urllib.parse import quote

VIEW_KEY = "bp-service"
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_KEY}"
VIEW_NAME = "Training metrics (bp-service)"
NOTE_TAG = "mlflow.note.content"

# A column absent from an experiment (test/rmse in a classification one) is simply not shown.
METRICS = ("test/acc", "test/rmse", "val/acc", "val/rmse", "val/loss", "epoch")
PARAMS = ("model.net.hidden", "optimizer.lr")


def dashboard() -> str:
    """Where ``make ui`` serves the dashboard (its PORT defaults to 5000)."""
    return f"http://127.0.0.1:{os.environ.get('PORT', '5000')}"


def view_state() -> str:
    """The saved view: newest runs first; the headline metrics, then the two params sweeps vary, as columns."""
    columns = [f"metrics.`{m}`" for m in METRICS] + [f"params.`{p}`" for p in PARAMS] + ["attributes.`Models`"]
    # columnOrder puts the metrics before the attribute columns (Duration), which come first otherwise.
    state = {
        "orderByKey": "attributes.start_time",
        "orderByAsc": False,
        "selectedColumns": columns,
        "columnOrder": columns,
    }
    # The envelope of a view saved from the UI, which also lists it by name under "Views".
    now = int(time.time() * 1000)
    return json.dumps({"name": VIEW_NAME, "createdAt": now, "updatedAt": now, "state": json.dumps(state)})


def share_view(uri: str, experiment_id: str) -> None:
    """Give the experiment the view :func:`experiment_link` opens, unless it has one under that key already
    (one written there otherwise, through MLflow's API, is left as it is)."""
    from mlflow import MlflowClient

    with contextlib.suppress(Exception):  # a dashboard nicety never stops a run
        client = MlflowClient(uri)
        if VIEW_TAG not in client.get_experiment(experiment_id).tags:
            client.set_experiment_tag(experiment_id, VIEW_TAG, view_state())


def experiment_link(base: str, experiment_id: str) -> str:
    """The experiment's runs list in the training-runs view, opened on :func:`view_state`."""
    return f"{base}/#/experiments/{experiment_id}/runs?viewStateShareKey={VIEW_KEY}&workflowType=machine_learning"


def run_note(run_id: str, pictures: list[str]) -> str:
    """The run's description: a line of links to its pictures, then the pictures, on its Overview page.

    The Overview shows a description's first lines until *Show more*: the links come first so that every
    picture is one click away there. Links are relative to the page, so they hold wherever the UI is
    served (``make ui``, a tracking server, a path prefix).
    """
    src = {name: f"get-artifact?path={quote(name)}&run_uuid={run_id}" for name in pictures}
    links = " · ".join(f"[{name.rsplit('.', 1)[0].replace('_', ' ')}]({src[name]})" for name in pictures)
    return "\n\n".join(
        [f"**Pictures**: {links} (all in the Artifacts tab too)"] + [f"![{n}]({src[n]})" for n in pictures]
    )
