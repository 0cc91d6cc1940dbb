"""Where bp-service keeps its runs, and the one rule every command uses to find the MLflow store (stdlib only).

The store is ``MLFLOW_TRACKING_URI`` when set (as MLflow users expect), else the embedded SQLite file
``<home>/mlflow.db``, where home is ``$BP_SERVICE_HOME``, else the source checkout, else
``~/.bp-service``: absolute paths, so nothing depends on the working directory.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import unquote


def project_root() -> str:
    """Stable home of mlflow.db, artifacts and outputs, whatever the working directory."""
    if os.environ.get("BP_SERVICE_HOME"):
        return str(Path(os.environ["BP_SERVICE_HOME"]).resolve())
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "pyproject.toml").is_file() and (checkout / "conf").is_dir():
        return str(checkout)
    return str(Path.home() / ".bp-service")


def default_uri(root_dir: str | Path) -> str:
    """The embedded store of a home folder."""
    return f"sqlite:///{Path(root_dir).resolve() / 'mlflow.db'}"


def tracking_uri(configured: str | None = None, root_dir: str | Path | None = None) -> str:
    """``MLFLOW_TRACKING_URI``, else ``configured`` (``tracking.uri``), else the embedded store of ``root_dir``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or configured or default_uri(root_dir or project_root())


def store_file(uri: str) -> Path | None:
    """The database file of a ``sqlite:`` URI, resolved as SQLAlchemy does; None for other stores and ``:memory:``.

    ``sqlite:////abs/mlflow.db`` is absolute, ``sqlite:///mlflow.db`` relative to the working directory.
    """
    if not uri.startswith("sqlite:"):
        return None
    database = unquote(uri.partition("://")[2].partition("/")[2].partition("?")[0])  # as SQLAlchemy's make_url
    return Path(database).resolve() if database and database != ":memory:" else None
