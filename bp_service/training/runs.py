"""``bp-runs``: the runs in the MLflow store every command uses, listed and kept tidy.

Run housekeeping has its own command, next to the jobs that make runs (``bp-train``) and use them
(``bp-predict``): ``uri`` prints the store, ``list`` the newest runs, ``stale`` those left RUNNING by a
killed process (``--close`` closes the ones proven dead). An argparse command, like ``bp-explain`` and
``bp-bench``: it takes options and subcommands, not a configuration. The store is ``MLFLOW_TRACKING_URI``,
else the embedded one of the home (:func:`bp_service.home.tracking_uri`).
"""

from __future__ import annotations

import argparse
import datetime
import sys
from collections.abc import Sequence

from bp_service.commands import EXIT_USAGE, columns, first_line
from bp_service.home import store_file, tracking_uri

# A run's headline metric: what its summary led with.
HEADLINES = ("test/acc", "test/rmse", "val/acc", "val/loss")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bp-runs",
        description="The runs in the MLflow store every bp-service command uses (MLFLOW_TRACKING_URI, else the "
        "home's mlflow.db).",
    )
    sub = p.add_subparsers(dest="action", required=True, metavar="{uri,list,stale,dashboard}")
    sub.add_parser("uri", help="print the store's URI (for mlflow ui, MLflow's own tools, scripts)")
    sub.add_parser("dashboard", help="each experiment's runs list in the dashboard `make ui` serves, metrics shown")
    listing = sub.add_parser("list", help="the newest runs: id, start, status, experiment, name, headline metric")
    listing.add_argument("--experiment", help="only this experiment (its name)")
    listing.add_argument("--status", choices=("RUNNING", "FINISHED", "FAILED", "KILLED"), help="only runs in it")
    listing.add_argument("-n", "--max", type=int, default=20, help="at most this many runs (default 20)")
    stale = sub.add_parser("stale", help="runs left RUNNING by a process that is gone (kill -9, a lost machine)")
    stale.add_argument(
        "--close", action="store_true", help="mark KILLED the runs whose process is proven gone (never others)"
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    uri = tracking_uri()
    if args.action == "uri":
        print(uri)
        return 0
    if args.action == "list" and args.max < 1:
        print(f"bp-runs: error: --max must be at least 1, got {args.max}", file=sys.stderr)
        return EXIT_USAGE
    db = store_file(uri)
    if db is not None and not db.is_file():  # never create a store to say it is empty
        print(f"no store at {db}: no runs")
        return 0
    from bp_service.training.store import quick_http

    try:
        with quick_http():
            if args.action == "dashboard":
                return dashboard_links(uri)
            return list_runs(uri, args) if args.action == "list" else report_stale(uri, close=args.close)
    except Exception as exc:  # an unreachable server, a store of another version: one line
        print(f"bp-runs: error: {uri}: {first_line(exc)}", file=sys.stderr)
        return 1


def list_runs(uri: str, args: argparse.Namespace) -> int:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    experiments = {e.experiment_id: e.name for e in client.search_experiments()}
    if args.experiment is not None:
        experiments = {i: n for i, n in experiments.items() if n == args.experiment}
        if not experiments:
            print(f"bp-runs: error: no experiment named {args.experiment!r} in {uri}", file=sys.stderr)
            return EXIT_USAGE
    where = f"attributes.status = '{args.status}'" if args.status else ""
    runs = client.search_runs(list(experiments), where, max_results=args.max, order_by=["attributes.start_time DESC"])
    rows = [("run", "started", "status", "experiment", "name", "metric")]
    for run in runs:
        started = datetime.datetime.fromtimestamp(run.info.start_time / 1000).strftime("%Y-%m-%d %H:%M:%S")
        metric = next((f"{k} {run.data.metrics[k]:.4f}" for k in HEADLINES if k in run.data.metrics), "")
        name = (run.info.run_name or "")[:40]
        rows.append((run.info.run_id, started, run.info.status, experiments[run.info.experiment_id], name, metric))
    print("\n".join(columns(rows)))
    print(f"{len(runs)} run(s) in {uri}")
    return 0


def dashboard_links(uri: str) -> int:
    """The link to each experiment, newest first, opened on the view bp-train gives it (given here to an
    experiment of an older bp-train, which has none)."""
    from mlflow import MlflowClient

    from bp_service.training.tracking.dashboard import dashboard, experiment_link, share_view

    base = uri.rstrip("/") if uri.startswith(("http:", "https:")) else dashboard()
    client = MlflowClient(uri)
    found = [e for e in client.search_experiments(order_by=["last_update_time DESC"]) if e.name != "Default"]
    for experiment in found:
        share_view(uri, experiment.experiment_id)
        print(f"{experiment.name:<20} {experiment_link(base, experiment.experiment_id)}")
    if not found:
        print(f"no experiments yet in {uri}")
    return 0


# What `stale` says of the runs it leaves alone, by the state of their process (store.owner_state).
_LEFT = {
    "alive": "running ({}): left as it is",
    "elsewhere": "{}: left as it is",
    "cannot tell": "cannot tell ({}): left as it is",
}


def report_stale(uri: str, close: bool) -> int:
    """List the RUNNING runs with the state of their process; with ``close``, mark KILLED those proven gone.

    Proven gone (:func:`bp_service.training.store.owner_state`): recorded on this host, in this boot and PID
    namespace, and its pid no longer runs (or now belongs to a process started later); or recorded in an
    earlier boot of this host. Runs of other hosts, and those it cannot tell, are listed, never touched.
    """
    from mlflow import MlflowClient

    from bp_service.training.store import close_stale, stale_runs

    found = stale_runs(uri)
    closed = 0
    for run, state, why in found:
        name = run.info.run_name or ""
        where = f"{run.data.tags.get('bp.host', '?')} pid {run.data.tags.get('bp.pid', '?')}"
        if state == "gone" and close:
            status = close_stale(MlflowClient(uri), run, why)
            closed += 1
            line = f"closed {status} ({why})" if status == "KILLED" else f"closed: back to {status}, as it was ({why})"
        elif state == "gone":
            line = f"stale ({why}): close with --close"
        else:
            line = _LEFT[state].format(why)
        print(f"{run.info.run_id}  {name[:40]:<40}  {where:<28}  {line}")
    untold = sum(state == "cannot tell" for _, state, _ in found)
    print(f"{len(found)} RUNNING run(s) in {uri}; {closed} closed; {untold} cannot tell")
    return 0
