"""A trained network as something that predicts from raw features: the MLflow pyfunc model and
the shared ``predict_frame`` that ``bp-predict`` uses too.

A model bundle is a plain dict, loadable with ``torch.load(weights_only=True)``:
``{"state_dict": {...}, "meta": {...}, "architecture": {...}}`` (see ``BPModule.on_save_checkpoint``).
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch

from bp_service.layers import MLP
from bp_service.tables import DataError, numeric_matrix


class InputError(ValueError):
    """Input rows do not fit the model; the message names the column or the row."""


def build_net(architecture: dict[str, Any]) -> MLP:
    """Rebuild the network a bundle or checkpoint describes."""
    acts = architecture["activations"]
    return MLP(
        architecture["sizes"],
        activation=acts[0] if len(acts) > 1 else "sigmoid",
        output_activation=acts[-1],
        fused=architecture["fused"],
        bias=architecture["bias"],
    )


def load_bundle(path: str | Path) -> dict[str, Any]:
    """A bundle from a Lightning checkpoint or a saved bundle, never unpickling arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: checkpoint not found")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a pickled object, a truncated file, not a torch file at all
        if "GLOBAL" in str(exc):  # it names a class or function; torch then suggests weights_only=False: never here
            raise InputError(
                f"{path}: refused: holds objects other than tensors and plain containers (read with weights_only=True)"
            ) from None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{path}: not a loadable bp-service checkpoint ({first})") from None
    if not isinstance(raw, dict):
        raise InputError(f"{path}: not a bp-service checkpoint (no model description inside)")
    if "bp_service" in raw:  # a Lightning checkpoint of BPModule: weights are under "net."
        state = {k.removeprefix("net."): v for k, v in raw["state_dict"].items() if k.startswith("net.")}
        bundle = {"state_dict": state, **raw["bp_service"]}
    elif {"state_dict", "meta", "architecture"} <= raw.keys():
        bundle = raw
    else:
        raise InputError(f"{path}: not a bp-service checkpoint (no model description inside)")
    check_weights(bundle, str(path))
    return bundle


def check_weights(bundle: dict[str, Any], where: str) -> None:
    """The weights are those the architecture describes, and finite: checked before any network is built.

    A small file declaring a huge architecture must not make us allocate it; a shape mismatch is named here
    rather than by ``load_state_dict``; NaN weights would predict NaN without a word.
    """
    try:
        sizes = [int(s) for s in bundle["architecture"]["sizes"]]
        bias = bool(bundle["architecture"].get("bias", True))
        state = bundle["state_dict"]
    except (KeyError, TypeError, ValueError):
        raise InputError(f"{where}: not a bp-service checkpoint (its architecture is unreadable)") from None
    expected = {}
    for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
        expected[f"layers.{i}.weight"] = (n_out, n_in)
        if bias:
            expected[f"layers.{i}.bias"] = (n_out,)
    found = {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}
    if found != expected:
        wrong = sorted(set(expected) ^ set(found)) or [k for k in expected if expected[k] != found[k]]
        key = wrong[0]
        raise InputError(
            f"{where}: weights do not match the architecture it declares (sizes {sizes}): "
            f"{key} is {found.get(key, 'missing')}, expected {expected.get(key, 'no such parameter')}"
        )
    for key, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise InputError(
                f"{where}: weights are not finite ({key} holds NaN or inf); retrain or use another checkpoint"
            )


def check_resumable(bundle: dict[str, Any], net: MLP, meta: dict[str, Any], where: str) -> None:
    """A checkpoint to resume must hold this config's network, trained on data of the same shape and meaning.

    Checked before the run is opened: a mismatch found by Lightning deep inside ``fit`` would fail (and
    rewrite) the run the checkpoint belongs to, with an error that names no file.
    """
    arch = bundle.get("architecture") or {}
    mine = {"sizes": list(net.sizes), "activations": list(net.activations), "fused": net.fused}
    for key, value in mine.items():
        theirs = arch.get(key, value)
        if (list(theirs) if isinstance(theirs, list | tuple) else theirs) != value:
            raise InputError(
                f"{where}: a checkpoint of another network ({key} {arch[key]}, this config builds {value}); "
                "resume with the model settings it was trained with"
            )
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in bundle["state_dict"].items() if hasattr(v, "shape")}
    if shapes != found:
        diff = sorted(set(shapes.items()) ^ set(found.items()))[0][0]
        raise InputError(f"{where}: a checkpoint of another network (parameter {diff!r} differs from this config's)")
    old = bundle.get("meta") or {}
    for key in ("task", "feature_names", "classes"):
        if key in old and old[key] != meta.get(key):
            shown = old[key] if not isinstance(old[key], list) or len(old[key]) <= 8 else [*old[key][:8], "..."]
            raise InputError(
                f"{where}: trained on other data ({key} was {shown}, this data's differs); "
                "resume on the data it was trained on, or start a new run"
            )
    for key in ("scaler_mean", "scaler_scale"):  # same columns, other rows: another data set, split or seed
        if key in old and not np.allclose(old[key], meta.get(key, []), rtol=1e-6, atol=0):
            raise InputError(
                f"{where}: trained on other data (the features' {key.removeprefix('scaler_')} differs: another "
                "data set, split or seed); resume on the data it was trained on, or start a new run"
            )


def net_from_bundle(bundle: dict[str, Any]) -> MLP:
    net = build_net(bundle["architecture"])
    net.load_state_dict(bundle["state_dict"])
    return net.eval()


def check_columns(frame: pd.DataFrame, meta: dict[str, Any], source: str, id_column: str | None = None) -> None:
    """Name every missing and every unexpected column."""
    expected = list(meta["feature_names"])
    present = [str(c) for c in frame.columns]
    missing = [c for c in expected if c not in present]
    extra = [c for c in present if c not in expected and c != id_column]
    if missing or extra:
        shown = ", ".join(expected[:8]) + (f", ... ({len(expected)} in all)" if len(expected) > 8 else "")
        parts = [
            f"missing column(s) {', '.join(missing)}" if missing else "",
            f"unexpected column(s) {', '.join(extra)}" if extra else "",
        ]
        raise InputError(f"{source}: {'; '.join(p for p in parts if p)} (the model expects: {shown})")


def features_matrix(frame: pd.DataFrame, meta: dict[str, Any], source: str, first_row: int = 0) -> np.ndarray:
    """Raw feature columns, in the model's order, as float64; bad cells named by row and column."""
    try:
        return numeric_matrix(frame, list(meta["feature_names"]), source, first_row)
    except DataError as exc:
        raise InputError(str(exc)) from None


def predict_frame(net: MLP, meta: dict[str, Any], raw: np.ndarray) -> pd.DataFrame:
    """Scale raw features as at training time, run the network, and name the outputs.

    Classification: ``prediction`` (the original label) and ``proba_<label>`` per class.
    Regression: ``prediction`` in the target's original units.
    """
    scaled = (raw - np.asarray(meta["scaler_mean"])) / np.asarray(meta["scaler_scale"])
    with torch.no_grad():
        dtype = next(net.parameters()).dtype
        out = net(torch.as_tensor(scaled, dtype=dtype)).double().numpy()  # (N, H_out)
    if meta["task"] == "regression":
        return pd.DataFrame({"prediction": out[:, 0] * meta["target_scale"] + meta["target_mean"]})
    classes = meta["classes"]
    if out.shape[1] == 1:  # one sigmoid output: P(second class)
        proba = np.concatenate([1 - out, out], axis=1)
    else:  # sigmoid outputs are independent scores: normalise them to sum to one
        proba = out / np.clip(out.sum(axis=1, keepdims=True), 1e-12, None)
    frame = pd.DataFrame({"prediction": np.asarray(classes, dtype=object)[proba.argmax(axis=1)]})
    for k, label in enumerate(classes):
        frame[f"proba_{label}"] = proba[:, k]
    if all(isinstance(c, bool | np.bool_) for c in classes):  # True/False labels stay True/False, not 1/0
        frame["prediction"] = frame["prediction"].astype(bool)
    elif all(isinstance(c, int | np.integer) for c in classes):
        frame["prediction"] = frame["prediction"].astype(np.int64)
    return frame


class BPServiceModel(mlflow.pyfunc.PythonModel):
    """MLflow pyfunc flavour: ``predict(DataFrame of raw features) -> DataFrame of predictions``."""

    def load_context(self, context) -> None:
        self.bundle = load_bundle(context.artifacts["bundle"])
        self.net = net_from_bundle(self.bundle)

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        meta = self.bundle["meta"]
        frame = pd.DataFrame(model_input)
        check_columns(frame, meta, "model input")
        return predict_frame(self.net, meta, features_matrix(frame, meta, "model input"))
