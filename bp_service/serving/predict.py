"""``bp-predict``: score a CSV file with a trained model, chunk by chunk, in bounded memory.

::

    bp-predict model=runs:/<run id>/model input=rows.csv output=predictions.csv
    bp-predict model=models:/bp-digits/latest input=rows.csv output=out.csv chunk_size=100000 id_column=customer
    bp-predict model=outputs/digits/runs/<time>/checkpoints/best-epoch057-step1160.ckpt input=rows.csv output=out.csv
    bp-predict model=<run id> input='shards/*.csv' output=scored/

``model`` is an MLflow model URI (``runs:/``, ``models:/``, ``mlflow-artifacts:/``, ...), a bare run id (the one
bp-train prints: that run's ``runs:/<id>/model``), a local MLflow model
folder, a Lightning checkpoint (``.ckpt``) or a saved bundle (``model_bundle.pt``). Every kind ends in the same
bundle, read by :func:`bp_service.bundle.load_bundle` with ``torch.load(weights_only=True)``: for an MLflow
model only two files are fetched, its ``MLmodel`` description and the bundle that names, so no code from the
artifact store runs and nothing but tensors and plain data is unpickled.

The input's header must hold the model's training features (any order); a missing one is named. Every other
column (ids, text, the target of a labelled file) is copied, as written, to the output before ``prediction``, in
input order, so each output row lines up with its input row; ``passthrough=false`` drops them, keeping only the
id column (``id_column=NAME``, or a column literally named ``id``). ``keep_target=true`` moves the model's own target
column next to ``prediction``. For classifiers ``proba_<class>`` columns follow, one per class. Rows are read
``chunk_size`` at a time and written as they are predicted, to a temporary file in the output's folder that is
renamed at the end: an error or a kill never leaves a half-written output behind. The network runs on fixed blocks of
:data:`BLOCK_ROWS` rows (the last one padded): BLAS picks other kernels, and so other float32 rounding, for
other batch sizes, and fixed blocks make every row's prediction independent of ``chunk_size`` and of its
neighbours, so the output is byte for byte the same however the file is chunked.

``input`` may also be a folder (its ``.csv``/``.tsv`` files, compressed or not) or a glob (``'shards/*.csv'``):
``output`` is then a folder, and each input ``<name>.<ext>`` is scored into ``<output>/<name>.csv``, streamed as a
single file is. Outputs that exist already are refused unless ``overwrite=true``, every header is checked before
any row is scored, and the outputs appear together at the end: a failure leaves none of them.

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
import glob
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
from bp_service.tables import UNREADABLE, read_header, read_rows, shown, shown_names, sniff_separator

USAGE = (
    "usage: bp-predict model=<MLflow URI, run id or checkpoint> input=<csv, folder or glob> output=<csv or folder>"
    " [chunk_size=N] [id_column=NAME] [passthrough=false] [keep_target=true] [overwrite=true] [escape_formulas=false]"
)
HELP = f"""{USAGE}
       bp-predict --tracking-uri    print the MLflow store runs:/ and models:/ are looked up in

  model        MLflow model URI (runs:/<run id>/model, models:/<name>/<version or latest>, ...), a bare run id
               as bp-train prints it (that run's runs:/<id>/model), a local MLflow model folder, a Lightning
               checkpoint (.ckpt) or a bundle (model_bundle.pt)
  input        CSV with a header holding the model's feature columns, in any order; other columns (ids, text,
               the target) are carried to the output. Or a folder of .csv/.tsv files, or a glob ('data/*.csv'):
               each file is scored into output/<name>.csv
  output       CSV to write: [other columns, in input order,] prediction[, target][, proba_<class> ...];
               replaced only when complete. A folder when input is a folder or a glob
  chunk_size   rows read and predicted at a time (default 50000): memory stays bounded for any file size
  passthrough  true (default): copy every column the model does not use, as written, before prediction;
               false: only the id column
  id_column    with passthrough=false, the column still copied (default: a column named "id", if there is one)
  keep_target  true: put the model's target column, as written, right after prediction, for evaluation
  overwrite    true: replace outputs that already exist in an output folder (default false: refused;
               a single output file is always replaced)
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
    passthrough: bool = True  # copy the columns the model does not use (ids, text, target) to the output
    overwrite: bool = False  # replace existing outputs in an output folder (folder or glob input)


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


MLMODEL_MAX_BYTES = 1 << 20  # MLflow writes a few KiB; a larger one is not read into memory


def _bundle_path_in(mlmodel: Path, where: str) -> str:
    """The bundle's path relative to the model root, as the ``MLmodel`` file records it."""
    try:
        if mlmodel.stat().st_size > MLMODEL_MAX_BYTES:
            raise InputError(f"{where}: not a bp-service model (its MLmodel is over {MLMODEL_MAX_BYTES:,} bytes)")
        spec = yaml.safe_load(mlmodel.read_text(encoding="utf-8")) or {}
        rel = spec["flavors"]["python_function"]["artifacts"]["bundle"]["path"]
    except (yaml.YAMLError, KeyError, TypeError, UnicodeDecodeError, RecursionError):
        raise InputError(f"{where}: not a bp-service model (its MLmodel names no 'bundle' artifact)") from None
    if not isinstance(rel, str) or Path(rel).is_absolute() or ".." in Path(rel).parts:
        raise InputError(f"{where}: MLmodel gives an unsafe bundle path {shown(rel, 200)}")
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


def fetch_bundle(uri: str, workdir: Path, store: str, registry: str, absent: str | None = None) -> Path:
    """Download an MLflow model's ``MLmodel`` and its bundle file, nothing else.

    ``absent``: the message when MLflow finds no ``MLmodel`` there (instead of MLflow's own).
    """
    from mlflow.artifacts import download_artifacts

    base = uri.rstrip("/")
    stores = {"tracking_uri": store, "registry_uri": registry}
    try:
        try:
            mlmodel = Path(download_artifacts(f"{base}/MLmodel", dst_path=str(workdir / "mlmodel"), **stores))
        except Exception as exc:
            error = _mlflow_error(uri, exc)
            raise (InputError(absent) if absent and isinstance(error, InputError) else error) from None
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


RUN_ID = re.compile(r"[0-9a-f]{32}")  # what bp-train prints: an MLflow run id


def bare_run_id(model: str) -> str | None:
    """``model`` when it is a bare MLflow run id (and no file or folder of that name exists), else None."""
    return model if RUN_ID.fullmatch(model) and not Path(model).exists() else None


def check_run(run_id: str, store: str) -> str:
    """The run's status; a run id the store does not hold is an :class:`InputError` naming the store."""
    from mlflow.tracking import MlflowClient

    try:
        return MlflowClient(tracking_uri=store).get_run(run_id).info.status
    except Exception as exc:
        error = _mlflow_error(run_id, exc)
        if isinstance(error, InputError):
            raise InputError(f"model {run_id}: no run with this id in {store}") from None
        raise error from None


def load_model(model: str) -> dict[str, Any]:
    """The bundle (weights, architecture, preprocessing) of any model reference ``bp-predict`` accepts."""
    run_id = bare_run_id(model)
    if run_id or (is_mlflow_uri(model) and not Path(model).exists()):  # a file named "model:v2.ckpt" stays a file
        store = tracking_uri()  # bp-train's rule, so runs:/ finds its runs from any working directory
        registry = os.environ.get("MLFLOW_REGISTRY_URI") or store
        uri = f"runs:/{run_id}/model" if run_id else model
        check_store(uri, store, registry)
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
            absent = None
            if run_id:
                status = check_run(run_id, store)
                absent = (
                    f"model {run_id}: run {run_id} ({status.lower()}) has no model {uri} "
                    "(trained with tracking.log_model=false, or ended before logging one); "
                    "give its checkpoint (.ckpt) instead"
                )
            return load_bundle(fetch_bundle(uri, Path(tmp), store, registry, absent))
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


@dataclass
class CopiedColumns:
    """The input columns an output carries beside the prediction, by the names pandas reads them under."""

    carried: list[str]  # before prediction, in input order
    target: str | None  # right after prediction (keep_target=true)
    written: dict[str, str]  # the name in the output's header: as the input's header spells it ("" stays "")


def _exact_header(source: Path, read_as: list[str]) -> list[str]:
    """The header cells as written: pandas calls an empty one ``Unnamed: 3``, which would not round-trip."""
    try:
        row = pd.read_csv(source, sep=sniff_separator(source, InputError), header=None, nrows=1, dtype=str,
                          na_filter=False).iloc[0].tolist()  # fmt: skip
    except (pd.errors.EmptyDataError, *UNREADABLE):
        return read_as
    return [str(c) for c in row] if len(row) == len(read_as) else read_as


def _copied_columns(
    source: Path, meta: dict[str, Any], id_column: str | None, keep_target: bool, passthrough: bool
) -> CopiedColumns:
    """What the output carries of ``source``'s columns, checked against the model and the output's own names.

    Names are the ones pandas reads (an empty header cell is ``Unnamed: <i>``, as training read it), so
    features match the model's whatever the header looks like.
    """
    read_header(source, InputError)  # a missing, empty or damaged file, repeated names: one line each
    try:
        header = [str(c) for c in read_rows(source, nrows=0).columns]
    except UNREADABLE as exc:
        raise InputError(f"{source}: not a readable CSV ({shown(first_line(exc), 200)})") from None
    id_col = _id_column(header, meta, id_column, source)
    target = _kept_target(header, meta, keep_target, source)
    if target is not None and target == id_col:
        raise InputError(f"{source}: column {target!r} is both the id column and the target; keep_target=false")
    check_columns(pd.DataFrame(columns=header), meta, source, id_col, extra_allowed=True)
    features = set(meta["feature_names"])
    if passthrough:
        carried = [c for c in header if c not in features and c != target]
    else:
        carried = [id_col] if id_col else []
    written = dict(zip(header, _exact_header(source, header), strict=True))
    outputs = ["prediction"] + ([f"proba_{c}" for c in meta["classes"]] if meta["task"] != "regression" else [])
    for name in [*carried, target]:
        if name is not None and written[name] in outputs:
            kind = "id" if name == id_col else "target" if name == target else "passed-through"
            hint = "; rename it, or leave it out with passthrough=false" if kind == "passed-through" else "; rename it"
            raise InputError(f"{source}: {kind} column {shown(written[name])!r} clashes with an output column{hint}")
    return CopiedColumns(carried, target, written)


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


def _write_predictions(
    target: Path, source: Path, net, meta: dict[str, Any], copied: CopiedColumns, chunk_size: int, escape: bool
) -> int:
    """Stream ``source``'s predictions into the file ``target``, ``chunk_size`` rows at a time; the row count."""
    rows = 0
    # open() creates with 0o666 less the umask (a NamedTemporaryFile would leave the output 0o600)
    with open(target, "w", newline="", encoding="utf-8") as fh:
        # copied columns travel as text, exactly as written (ids with leading zeros, labels)
        as_text = [c for c in (*copied.carried, copied.target) if c]
        reader = read_rows(source, chunksize=chunk_size, dtype=dict.fromkeys(as_text, str) or None)
        try:
            for chunk in reader:
                if chunk.empty:
                    continue
                pred = predict_rows(net, meta, features_matrix(chunk, meta, str(source), first_row=rows))
                if copied.target:
                    pred.insert(1, copied.written[copied.target], chunk[copied.target].to_numpy())
                for i, name in enumerate(copied.carried):
                    pred.insert(i, copied.written[name], chunk[name].to_numpy())
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


def predict_csv(
    bundle: dict[str, Any],
    input_path: str | Path,
    output_path: str | Path,
    chunk_size: int = 50_000,
    id_column: str | None = None,
    keep_target: bool = False,
    escape: bool = True,
    passthrough: bool = True,
) -> int:
    """Predict every row of ``input_path`` into ``output_path``; returns the number of rows.

    At most ``chunk_size`` rows (and their predictions) are in memory at a time. ``escape``: text cells that
    a spreadsheet would run as formulas are written with a ``'`` before them (:func:`escape_formulas`).
    ``passthrough``: the columns the model does not use are copied beside the prediction.
    """
    source, out = Path(input_path), Path(output_path)
    meta = bundle["meta"]
    copied = _copied_columns(source, meta, id_column, keep_target, passthrough)
    net = net_from_bundle(bundle)
    _check_output(source, out)
    # A regular file is replaced only when complete; /dev/null, a FIFO or a terminal is written in place.
    with atomic_path(out) as target:
        return _write_predictions(target, source, net, meta, copied, chunk_size, escape)


# --------------------------------------------------------------------------- folders and globs of inputs
TABLE_SUFFIXES = (".csv", ".tsv")
COMPRESSED = (".gz", ".bz2", ".xz", ".zst", ".zip")  # what pandas reads by the file's suffix


def _is_table(path: Path) -> bool:
    name = path.name.lower()
    for suffix in COMPRESSED:
        name = name.removesuffix(suffix)
    return name.endswith(TABLE_SUFFIXES)


def input_files(spec: str) -> list[Path] | None:
    """The files an ``input=`` folder or glob names, sorted; None when it names one file.

    A folder gives its own ``.csv``/``.tsv`` files (compressed or not; not its subfolders, not hidden files);
    a glob (``*``, ``?``, ``[``; ``**`` for subfolders) every file it matches. Either matching nothing is an error.
    """
    path = Path(spec)
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".") and _is_table(p))
        if not found:
            raise InputError(f"{path}: a folder without .csv or .tsv files (compressed ones count too)")
        return found
    if not glob.has_magic(spec) or path.exists():  # a file named "a[1].csv" is that file
        return None
    found = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
    if not found:
        raise InputError(f"input={spec}: the pattern matches no file")
    return found


def output_name(source: Path) -> str:
    """``rows.csv``, ``rows.tsv`` and ``rows.csv.gz`` are all scored into ``rows.csv``."""
    name = source.name
    for suffix in COMPRESSED:
        name = name.removesuffix(suffix).removesuffix(suffix.upper())
    stem, dot, ext = name.rpartition(".")
    return f"{stem if dot and '.' + ext.lower() in TABLE_SUFFIXES else name}.csv"


def predict_files(
    bundle: dict[str, Any],
    inputs: Sequence[Path],
    output_dir: str | Path,
    chunk_size: int = 50_000,
    id_column: str | None = None,
    keep_target: bool = False,
    escape: bool = True,
    passthrough: bool = True,
    overwrite: bool = False,
) -> list[tuple[Path, Path, int]]:
    """Score each of ``inputs`` into ``output_dir/<name>.csv``: ``(input, output, rows)`` per file.

    All or nothing: every header is checked before any row is scored, and the outputs are renamed into
    place together at the end; a failure (a bad cell in the third file) leaves none of them, and any
    output that existed untouched.
    """
    folder = Path(output_dir)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{folder}: output is a file, but the input names several; give a folder")
    pairs = [(src, folder / output_name(src)) for src in inputs]
    written: dict[Path, Path] = {}
    for src, out in pairs:
        if out in written:
            raise InputError(f"{written[out]} and {src} would both be written to {out}; score them separately")
        written[out] = src
    sources = {src.resolve() for src in inputs}
    for _, out in pairs:
        if out.resolve() in sources:
            raise InputError(f"{out}: output would overwrite an input; give another output folder")
    existing = [out for _, out in pairs if os.path.lexists(out)]
    if existing and not overwrite:
        raise InputError(
            f"{existing[0]}: already exists ({len(existing)} of the {len(pairs)} outputs do); "
            "give another output folder, or overwrite=true to replace them"
        )
    meta = bundle["meta"]
    copied = [_copied_columns(src, meta, id_column, keep_target, passthrough) for src in inputs]
    for src, out in pairs:
        _check_output(src, out)
    net = net_from_bundle(bundle)
    created = not folder.exists()
    try:
        with contextlib.ExitStack() as stack:
            targets = [stack.enter_context(atomic_path(out)) for _, out in pairs]
            counts = [
                _write_predictions(target, src, net, meta, columns, chunk_size, escape)
                for target, (src, _), columns in zip(targets, pairs, copied, strict=True)
            ]
    except BaseException:
        if created:  # the folder this run made, if nothing else has been put there meanwhile
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    return [(src, out, n) for (src, out), n in zip(pairs, counts, strict=True)]


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
    inputs = input_files(cfg.input)
    if inputs is not None:
        return run_many(cfg, inputs)
    if cfg.output.endswith(("/", os.sep)) or Path(cfg.output).is_dir():
        folder = cfg.output.rstrip("/")
        raise UsageError(f"output={cfg.output} names a folder; give a file name such as {folder}/predictions.csv")
    started = time.perf_counter()
    read_header(cfg.input, InputError)  # a missing or empty input fails before any model is fetched
    bundle = load_model(cfg.model)
    rows = predict_csv(
        bundle,
        cfg.input,
        cfg.output,
        cfg.chunk_size,
        cfg.id_column,
        cfg.keep_target,
        cfg.escape_formulas,
        cfg.passthrough,
    )
    print(f"bp-predict: {rows} rows -> {cfg.output} ({time.perf_counter() - started:.1f} s, model {cfg.model})")
    return 0


def run_many(cfg: PredictConfig, inputs: list[Path]) -> int:
    """``input=`` a folder or a glob: one output per input file, in the folder ``output=`` names."""
    folder = Path(cfg.output)
    if not folder.is_dir() and (folder.exists() or _is_table(folder)):
        raise UsageError(
            f"output={cfg.output}: input={cfg.input} names {len(inputs)} file(s), so output= is the folder "
            f"their outputs go to, e.g. output={folder.with_suffix('')}/"
        )
    started = time.perf_counter()
    for src in inputs:  # a missing or empty input fails before any model is fetched
        read_header(src, InputError)
    bundle = load_model(cfg.model)
    done = predict_files(
        bundle,
        inputs,
        folder,
        cfg.chunk_size,
        cfg.id_column,
        cfg.keep_target,
        cfg.escape_formulas,
        cfg.passthrough,
        cfg.overwrite,
    )
    for src, out, rows in done:
        print(f"  {src} -> {out} ({rows} rows)")
    total = sum(rows for _, _, rows in done)
    seconds = time.perf_counter() - started
    print(f"bp-predict: {len(done)} files, {total} rows -> {folder} ({seconds:.1f} s, model {cfg.model})")
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
