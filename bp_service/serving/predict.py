"""``bp-predict``: score a CSV file with a trained model, chunk by chunk, in bounded memory.

::

    bp-predict model=runs:/<run id>/model input=rows.csv output=predictions.csv
    bp-predict model=models:/bp-digits/latest input=rows.csv output=out.csv chunk_size=100000 id_column=customer
    bp-predict model=outputs/digits/runs/<time>/checkpoints/best-epoch057-step1160.ckpt input=rows.csv output=out.csv

``model`` is an MLflow model URI (``runs:/``, ``models:/``, ``mlflow-artifacts:/``, ...), a local MLflow model
folder, a Lightning checkpoint (``.ckpt``) or a saved bundle (``model_bundle.pt``). Every kind ends in the same
bundle, read by :func:`bp_service.bundle.load_bundle` with ``torch.load(weights_only=True)``: for an MLflow
model only two files are fetched, its ``MLmodel`` description and the bundle that names, so no code from the
artifact store runs and nothing but tensors and plain data is unpickled.

The input's header must hold exactly the model's training features (any order), plus optionally an id column
(``id_column=NAME``, or a column literally named ``id``) that is copied to the output, and the model's own target
column (a labelled file: ignored, or copied beside the prediction with ``keep_target=true``). The output has the id
column, ``prediction``, the target if kept and, for classifiers, ``proba_<class>`` per class. Rows are read
``chunk_size`` at a time and written as they are predicted, to a temporary file in the output's folder that is
renamed at the end: an error or a kill never leaves a half-written output behind. The network runs on fixed blocks of
:data:`BLOCK_ROWS` rows (the last one padded): BLAS picks other kernels, and so other float32 rounding, for
other batch sizes, and fixed blocks make every row's prediction independent of ``chunk_size`` and of its
neighbours, so the output is byte for byte the same however the file is chunked.

Text cells that a spreadsheet would run as formulas (``=``, ``+``, ``-``, ``@``, tab, carriage return at the start)
are written with a ``'`` before them unless ``escape_formulas=false``; an ``output=`` link to a file outside the
folder it was given in is refused.

``runs:/`` and ``models:/`` are looked up in the store bp-train records into, by the same rule
(:func:`bp_service.home.tracking_uri`: ``MLFLOW_TRACKING_URI``, else ``<home>/mlflow.db``), whatever the working
directory; an embedded store that does not exist is an error, never created by the lookup.
``bp-predict --tracking-uri`` prints that URI, for MLflow's own tools.

Errors are one line on stderr, ``bp-predict: error: ...``; exit status 2 for bad arguments or input, 1 for
anything else (an unreachable tracking server, an unwritable output). ``HYDRA_FULL_ERROR=1`` (or
``BP_SERVICE_FULL_ERROR=1``) shows the traceback instead.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

import numpy as np
import pandas as pd
import yaml
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from bp_service.bundle import BundleError, load_bundle, net_from_bundle, predict_frame
from bp_service.commands import (
    EXIT_FAILURE,
    EXIT_INTERRUPT,
    EXIT_SIGTERM,
    EXIT_USAGE,
    first_line,
    full_error_requested,
    sigterm_handler,
)
from bp_service.files import atomic_path
from bp_service.home import store_file, tracking_uri
from bp_service.serving.model import InputError, check_columns, features_matrix, target_column
from bp_service.tables import UNREADABLE, read_header, read_rows, shown_names

USAGE = (
    "usage: bp-predict model=<MLflow URI or checkpoint> input=<csv> output=<csv> [chunk_size=N] [id_column=NAME]"
    " [keep_target=true] [escape_formulas=false]"
)
HELP = f"""{USAGE}
       bp-predict --tracking-uri    print the MLflow store runs:/ and models:/ are looked up in

  model        MLflow model URI (runs:/<run id>/model, models:/<name>/<version or latest>, ...),
               a local MLflow model folder, a Lightning checkpoint (.ckpt) or a bundle (model_bundle.pt)
  input        CSV with a header: the model's feature columns, in any order, plus optionally an id column
               and the model's target column (a labelled file, e.g. a held-out set); other columns are refused
  output       CSV to write: [id column,] prediction[, target][, proba_<class> ...]; replaced only when complete
  chunk_size   rows read and predicted at a time (default 50000): memory stays bounded for any file size
  id_column    column copied to the output (default: a column named "id", if there is one)
  keep_target  true: copy the target column, as written, next to prediction, for evaluation
               (default false: the target column is ignored)
  escape_formulas  true (default): a text cell or column name that starts with = + - @, a tab or a carriage
               return is written with a ' before it, so a spreadsheet shows it instead of running it as a
               formula (numbers such as -1.5 are left alone); false: every cell exactly as read

MLflow URIs are looked up in the store bp-train records into: MLFLOW_TRACKING_URI, else the embedded
<home>/mlflow.db (home: BP_SERVICE_HOME, else the source checkout, else ~/.bp-service), whatever the
working directory. MLFLOW_TRACKING_USERNAME/PASSWORD serve a tracking server with basic auth."""
BLOCK_ROWS = 1024  # rows per network call: fixed, so predictions do not depend on chunk_size


@dataclass
class PredictConfig:
    """The command line of ``bp-predict``, as ``key=value`` pairs."""

    model: str = MISSING  # MLflow model URI, local MLflow model folder, .ckpt or bundle .pt
    input: str = MISSING  # CSV of raw features, with a header
    output: str = MISSING  # CSV to write (replaced atomically)
    chunk_size: int = 50_000  # rows read, predicted and written at a time
    id_column: str | None = None  # carried to the output; default: a column named "id", if any
    keep_target: bool = False  # copy the model's target column (labelled input) next to the prediction
    escape_formulas: bool = True  # ' before text cells a spreadsheet would run as formulas


class UsageError(ValueError):
    """The command line is wrong; the message says which argument."""


class ModelSourceError(RuntimeError):
    """The model's store could not be reached or read (not the user's input)."""


# --------------------------------------------------------------------------- command line
def parse_args(argv: Sequence[str]) -> PredictConfig:
    """``key=value`` arguments merged onto :class:`PredictConfig`: unknown keys and wrong types are errors.

    Each value is taken as the text it is, never parsed as YAML (a file named ``on``, ``1e5`` or ``...`` stays
    that name) nor resolved as an interpolation (``${oc.env:...}`` stays text); the schema converts
    ``chunk_size=N`` and ``keep_target=true`` to their types.
    """
    given: dict[str, str | None] = {}
    for arg in argv:
        key, sep, value = arg.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UsageError(f"expected key=value, got {arg!r}; {USAGE}")
        if key in ("model", "input", "output") and not value.strip():
            raise UsageError(f"{key}= must not be empty")
        # "${" escaped as OmegaConf reads it: the literal text, not an interpolation; empty: the default (null)
        given[key] = value.replace("${", "\\${") if value else None
    known = [f.name for f in fields(PredictConfig)]
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(PredictConfig), OmegaConf.create(given))
        missing = [k for k in known if k in OmegaConf.missing_keys(cfg)]
        if missing:
            raise UsageError(f"missing {', '.join(f'{k}=...' for k in missing)}; {USAGE}")
        parsed = PredictConfig(**OmegaConf.to_container(cfg, resolve=True))
    except ConfigKeyError as exc:
        raise UsageError(f"unknown argument {exc.full_key or exc.key!r} (known: {', '.join(known)})") from None
    except OmegaConfBaseException as exc:
        first = first_line(exc)
        where = f"{exc.full_key}: " if getattr(exc, "full_key", None) else ""
        raise UsageError(f"{where}{first}") from None
    if parsed.chunk_size < 1:
        raise UsageError(f"chunk_size must be at least 1, got {parsed.chunk_size}")
    for key in ("model", "input", "output"):
        if not str(getattr(parsed, key)).strip():
            raise UsageError(f"{key}= must not be empty")
    return parsed


# --------------------------------------------------------------------------- the model
def is_mlflow_uri(model: str) -> bool:
    """``runs:/...``, ``models:/...``, ``s3://...``: anything with a scheme but ``file:`` (or a drive letter)."""
    scheme = urlparse(model).scheme
    return len(scheme) > 1 and scheme != "file"


def _bundle_path_in(mlmodel: Path, where: str) -> str:
    """The bundle's path relative to the model root, as the ``MLmodel`` file records it."""
    try:
        spec = yaml.safe_load(mlmodel.read_text()) or {}
        rel = spec["flavors"]["python_function"]["artifacts"]["bundle"]["path"]
    except (yaml.YAMLError, KeyError, TypeError):
        raise InputError(f"{where}: not a bp-service model (its MLmodel names no 'bundle' artifact)") from None
    if not isinstance(rel, str) or Path(rel).is_absolute() or ".." in Path(rel).parts:
        raise InputError(f"{where}: MLmodel gives an unsafe bundle path {rel!r}")
    return rel


def _mlflow_error(uri: str, exc: Exception) -> Exception:
    from mlflow.exceptions import MlflowException

    first = first_line(exc)[:300]
    code = getattr(exc, "error_code", "")
    if isinstance(exc, MlflowException) and code in (
        "RESOURCE_DOES_NOT_EXIST",
        "INVALID_PARAMETER_VALUE",
        "NOT_FOUND",
        "BAD_REQUEST",
    ):
        return InputError(f"model {uri}: {first}")
    return ModelSourceError(f"model {uri}: could not fetch it from MLflow ({first})")


def check_store(model: str, store: str, registry: str) -> None:
    """A ``runs:/`` or ``models:/`` lookup in an SQLite store that does not exist fails here, creating nothing.

    MLflow would create (and migrate) an empty database at that path, then report the run as not found.
    """
    needed = {"runs": [store], "models": [store, registry]}.get(urlparse(model).scheme, [])
    for uri in needed:
        db = store_file(uri)
        if db is not None and not db.is_file():
            raise InputError(
                f"model {model}: no MLflow store at {db} (nothing was tracked there; bp-train records into "
                "MLFLOW_TRACKING_URI, else <BP_SERVICE_HOME>/mlflow.db: set the one that holds the run)"
            )


def fetch_bundle(uri: str, workdir: Path, store: str, registry: str) -> Path:
    """Download an MLflow model's ``MLmodel`` and its bundle file, nothing else."""
    from mlflow.artifacts import download_artifacts

    base = uri.rstrip("/")
    stores = {"tracking_uri": store, "registry_uri": registry}
    try:
        mlmodel = Path(download_artifacts(f"{base}/MLmodel", dst_path=str(workdir / "mlmodel"), **stores))
        rel = _bundle_path_in(mlmodel, uri)
        return Path(download_artifacts(f"{base}/{rel}", dst_path=str(workdir / "bundle"), **stores))
    except InputError:
        raise
    except Exception as exc:
        raise _mlflow_error(uri, exc) from None


@contextlib.contextmanager
def _env_defaults(**defaults: str) -> Iterator[None]:
    """Set environment variables the user has not set, for the duration of the block."""
    added = [k for k in defaults if k not in os.environ]
    os.environ.update({k: defaults[k] for k in added})
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def load_model(model: str) -> dict[str, Any]:
    """The bundle (weights, architecture, preprocessing) of any model reference ``bp-predict`` accepts."""
    if is_mlflow_uri(model) and not Path(model).exists():  # a file named "model:v2.ckpt" stays a file
        store = tracking_uri()  # bp-train's rule, so runs:/ finds its runs from any working directory
        registry = os.environ.get("MLFLOW_REGISTRY_URI") or store
        check_store(model, store, registry)
        with (
            # no progress bars in batch logs; an unreachable server fails in seconds, not minutes of retries;
            # the store also for the MLflow code paths that read the environment rather than their arguments
            _env_defaults(
                MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false",
                MLFLOW_HTTP_REQUEST_MAX_RETRIES="3",
                MLFLOW_TRACKING_URI=store,
                MLFLOW_REGISTRY_URI=registry,
            ),
            tempfile.TemporaryDirectory(prefix="bp-predict-") as tmp,
        ):
            return load_bundle(fetch_bundle(model, Path(tmp), store, registry))
    path = Path(url2pathname(urlparse(model).path)) if model.startswith("file:") else Path(model)
    if path.is_dir():  # a downloaded MLflow model folder
        if not (path / "MLmodel").is_file():
            raise InputError(f"{path}: a folder, but not an MLflow model (no MLmodel file)")
        return load_bundle(path / _bundle_path_in(path / "MLmodel", str(path)))
    return load_bundle(path)


# --------------------------------------------------------------------------- the rows
def predict_rows(net, meta: dict[str, Any], raw: np.ndarray) -> pd.DataFrame:
    """:func:`~bp_service.serving.predict_frame` over fixed blocks of ``BLOCK_ROWS`` rows, the last padded."""
    frames = []
    for start in range(0, len(raw), BLOCK_ROWS):
        block = raw[start : start + BLOCK_ROWS]
        n = len(block)
        if n < BLOCK_ROWS:
            block = np.pad(block, ((0, BLOCK_ROWS - n), (0, 0)), mode="edge")
        frames.append(predict_frame(net, meta, block).iloc[:n])
    return pd.concat(frames, ignore_index=True)


def _id_column(header: list[str], meta: dict[str, Any], wanted: str | None, source: str) -> str | None:
    if wanted is not None:
        if wanted not in header:
            raise InputError(f"{source}: id column {wanted!r} not found (columns: {shown_names(header)})")
        return wanted
    return "id" if "id" in header and "id" not in meta["feature_names"] else None


def _kept_target(header: list[str], meta: dict[str, Any], keep: bool, source: str) -> str | None:
    if not keep:
        return None
    target = target_column(meta)
    if target is None:
        raise InputError("keep_target=true: this model does not record its target column (an older bp-train made it)")
    if target not in header:
        raise InputError(f"{source}: keep_target=true, but there is no column {target!r} (the model's target)")
    return target


def _copied_columns(
    header: list[str], meta: dict[str, Any], source: str, id_column: str | None, keep_target: bool
) -> tuple[str | None, str | None]:
    """The id column and the kept target column (each None when absent), checked against the output's names."""
    id_col = _id_column(header, meta, id_column, source)
    target = _kept_target(header, meta, keep_target, source)
    outputs = ["prediction"] + ([f"proba_{c}" for c in meta["classes"]] if meta["task"] != "regression" else [])
    for kind, name in (("id", id_col), ("target", target)):
        if name in outputs:
            raise InputError(f"{source}: {kind} column {name!r} clashes with an output column; rename it")
    if target is not None and target == id_col:
        raise InputError(f"{source}: column {target!r} is both the id column and the target; keep_target=false")
    check_columns(pd.DataFrame(columns=header), meta, source, id_col)
    return id_col, target


# A cell starting with one of these is run as a formula by spreadsheets (OWASP, "CSV Injection").
FORMULA_STARTS = r"[=+\-@\t\r]"
PLAIN_NUMBER = r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?"


def escape_formula(text: str) -> str:
    """``text`` with a ``'`` before it when a spreadsheet would run it as a formula; a plain number stays."""
    if re.match(FORMULA_STARTS, text) and not re.fullmatch(PLAIN_NUMBER, text):
        return "'" + text
    return text


def escape_formulas(frame: pd.DataFrame) -> pd.DataFrame:
    """Every text cell and column name through :func:`escape_formula`; numeric columns are not text."""
    frame.columns = [escape_formula(str(c)) for c in frame.columns]
    for j in range(frame.shape[1]):
        values = frame.iloc[:, j]
        if values.dtype != object and not isinstance(values.dtype, pd.StringDtype):
            continue
        text = values.astype(object).where(values.notna(), "").astype(str)
        risky = text.str.match(FORMULA_STARTS) & ~text.str.fullmatch(PLAIN_NUMBER)
        if risky.any():
            frame.iloc[:, j] = values.astype(object).where(~risky, "'" + text)
    return frame


def check_output_link(out: Path) -> None:
    """An output that is a symbolic link to a file must stay in the folder it was given in (or below it).

    A link planted in a shared folder would otherwise have the predictions written (and a file replaced or
    created) wherever it points. Links to devices and pipes (``/dev/stdout``) are written in place, not replaced.
    """
    if not out.is_symlink():
        return
    with contextlib.suppress(OSError):
        if not stat.S_ISREG(os.stat(out).st_mode):
            return
    real, folder = Path(os.path.realpath(out)), Path(os.path.realpath(out.parent))
    if not real.is_relative_to(folder):
        raise InputError(
            f"{out}: output is a symbolic link to {real}, outside {out.parent}; "
            f"if that file is meant, give it as output={real}"
        )


def _check_output(source: Path, out: Path) -> None:
    if out.is_dir():
        raise InputError(f"{out}: output is a folder; give a file name")
    check_output_link(out)
    if out.resolve() == source.resolve():
        raise InputError(f"{out}: output would overwrite the input; give another file name")


def predict_csv(
    bundle: dict[str, Any],
    input_path: str | Path,
    output_path: str | Path,
    chunk_size: int = 50_000,
    id_column: str | None = None,
    keep_target: bool = False,
    escape: bool = True,
) -> int:
    """Predict every row of ``input_path`` into ``output_path``; returns the number of rows.

    At most ``chunk_size`` rows (and their predictions) are in memory at a time. ``escape``: text cells that
    a spreadsheet would run as formulas are written with a ``'`` before them (:func:`escape_formulas`).
    """
    source, out = Path(input_path), Path(output_path)
    meta = bundle["meta"]
    header = read_header(source, InputError)
    id_col, kept = _copied_columns(header, meta, str(source), id_column, keep_target)
    net = net_from_bundle(bundle)
    _check_output(source, out)
    rows = 0
    # A regular file is replaced only when complete; /dev/null, a FIFO or a terminal is written in place.
    with atomic_path(out) as target:
        # open() creates with 0o666 less the umask (a NamedTemporaryFile would leave the output 0o600)
        with open(target, "w", newline="", encoding="utf-8") as fh:
            # copied columns travel as text, exactly as written (ids with leading zeros, labels)
            copied = [c for c in (id_col, kept) if c]
            reader = read_rows(source, chunksize=chunk_size, dtype=dict.fromkeys(copied, str) or None)
            try:
                for chunk in reader:
                    if chunk.empty:
                        continue
                    pred = predict_rows(net, meta, features_matrix(chunk, meta, str(source), first_row=rows))
                    if kept:
                        pred.insert(1, kept, chunk[kept].to_numpy())
                    if id_col:
                        pred.insert(0, id_col, chunk[id_col].to_numpy())
                    (escape_formulas(pred) if escape else pred).to_csv(fh, header=rows == 0, index=False)
                    rows += len(chunk)
            except UNREADABLE as exc:  # a damaged file (or compressed stream) found part way through
                if isinstance(exc, OSError) and exc.errno is not None:  # a write failed (full disk): not the input
                    raise
                raise InputError(f"{source}: not a readable CSV after row {rows + 1} ({first_line(exc)})") from None
            finally:
                reader.close()
        if rows == 0:
            raise InputError(f"{source}: has a header but no data rows")
    return rows


# --------------------------------------------------------------------------- entry point
def _sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(EXIT_SIGTERM)  # unwinds through predict_csv, which removes its temporary file


def run(argv: Sequence[str]) -> int:
    if any(a in ("-h", "--help", "help") for a in argv):
        print(HELP)
        return 0
    if "--tracking-uri" in argv:  # for MLflow's own tools: export MLFLOW_TRACKING_URI=$(bp-predict --tracking-uri)
        if len(argv) > 1:
            raise UsageError("--tracking-uri takes no other argument")
        print(tracking_uri())
        return 0
    cfg = parse_args(argv)
    if cfg.output.endswith(("/", os.sep)) or Path(cfg.output).is_dir():
        folder = cfg.output.rstrip("/")
        raise UsageError(f"output={cfg.output} names a folder; give a file name such as {folder}/predictions.csv")
    started = time.perf_counter()
    read_header(cfg.input, InputError)  # a missing or empty input fails before any model is fetched
    bundle = load_model(cfg.model)
    rows = predict_csv(
        bundle, cfg.input, cfg.output, cfg.chunk_size, cfg.id_column, cfg.keep_target, cfg.escape_formulas
    )
    print(f"bp-predict: {rows} rows -> {cfg.output} ({time.perf_counter() - started:.1f} s, model {cfg.model})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns (and, run as a script, exits with) the status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        with sigterm_handler(_sigterm):
            return run(argv)
    except (UsageError, InputError, BundleError) as exc:
        if full_error_requested():
            raise
        print(f"bp-predict: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("bp-predict: interrupted", file=sys.stderr)
        return EXIT_INTERRUPT
    except Exception as exc:
        if full_error_requested():
            raise
        if isinstance(exc, OSError) and exc.strerror:
            message = f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
        else:
            message = first_line(exc)
        print(f"bp-predict: error: {message}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    raise SystemExit(main())
