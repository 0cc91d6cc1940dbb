"""The model bundle: the one format a trained network travels in, written and read only here.

A bundle is a plain dict, loadable with ``torch.load(weights_only=True)``::

    {"state_dict": {...}, "architecture": MLP.config, "meta": {...}}

``architecture`` holds the network's constructor arguments (:attr:`bp_service.layers.MLP.config`), so
:func:`build_net` rebuilds it exactly; ``meta`` the preprocessing and labels (see
``bp_service.training.data.Prepared.meta``), so :func:`predict_frame` predicts from raw features.
Lightning checkpoints of ``BPModule`` carry the same two descriptions under ``"bp_service"``
(:func:`checkpoint_entry`), and the MLflow model ships a bundle file (:func:`save_bundle`).
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from bp_service.commands import first_line
from bp_service.files import atomic_path
from bp_service.layers import MLP


class BundleError(ValueError):
    """A model file cannot be used: missing, unsafe, damaged, or not this network; the message names it."""


def network_args(architecture: dict[str, Any]) -> dict[str, Any]:
    """``MLP(**network_args(...))``: the recorded constructor arguments.

    Bundles written before the network recorded them hold ``activations`` (one per layer) instead.
    """
    if "activations" not in architecture:
        return dict(architecture)
    acts = architecture["activations"]
    return {
        "sizes": list(architecture["sizes"]),
        "activation": acts[0] if len(acts) > 1 else "sigmoid",
        "output_activation": acts[-1],
        "fused": architecture["fused"],
        "bias": architecture["bias"],
    }


def build_net(architecture: dict[str, Any]) -> MLP:
    """The network a bundle or checkpoint describes, with fresh weights."""
    return MLP(**network_args(architecture))


def net_from_bundle(bundle: dict[str, Any]) -> MLP:
    """The bundle's network with its trained weights, in eval mode."""
    net = build_net(bundle["architecture"])
    net.load_state_dict(bundle["state_dict"])
    return net.eval()


def checkpoint_entry(net: MLP, meta: dict[str, Any]) -> dict[str, Any]:
    """What a Lightning checkpoint carries beside its weights (plain values only: ``weights_only`` loads it)."""
    return {"meta": meta, "architecture": dict(net.config)}


def save_bundle(net: MLP, meta: dict[str, Any], path: str | Path) -> None:
    """Write the bundle of ``net`` to ``path``: complete or not at all."""
    bundle = {"state_dict": net.state_dict(), **checkpoint_entry(net, meta)}
    with atomic_path(path) as tmp:
        torch.save(bundle, tmp)


def load_bundle(path: str | Path) -> dict[str, Any]:
    """A bundle from a Lightning checkpoint or a saved bundle, never unpickling arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise BundleError(f"{path}: checkpoint not found")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a pickled object, a truncated file, not a torch file at all
        if "GLOBAL" in str(exc):  # it names a class or function; torch then suggests weights_only=False: never here
            raise BundleError(
                f"{path}: refused: holds objects other than tensors and plain containers (read with weights_only=True)"
            ) from None
        raise BundleError(f"{path}: not a loadable bp-service checkpoint ({first_line(exc)})") from None
    if not isinstance(raw, dict):
        raise BundleError(f"{path}: not a bp-service checkpoint (no model description inside)")
    if "bp_service" in raw:  # a Lightning checkpoint of BPModule: weights are under "net."
        state = {k.removeprefix("net."): v for k, v in raw["state_dict"].items() if k.startswith("net.")}
        bundle = {"state_dict": state, **raw["bp_service"]}
    elif {"state_dict", "meta", "architecture"} <= raw.keys():
        bundle = raw
    else:
        raise BundleError(f"{path}: not a bp-service checkpoint (no model description inside)")
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
        raise BundleError(f"{where}: not a bp-service checkpoint (its architecture is unreadable)") from None
    expected = {}
    for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
        expected[f"layers.{i}.weight"] = (n_out, n_in)
        if bias:
            expected[f"layers.{i}.bias"] = (n_out,)
    found = {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}
    if found != expected:
        wrong = sorted(set(expected) ^ set(found)) or [k for k in expected if expected[k] != found[k]]
        key = wrong[0]
        raise BundleError(
            f"{where}: weights do not match the architecture it declares (sizes {sizes}): "
            f"{key} is {found.get(key, 'missing')}, expected {expected.get(key, 'no such parameter')}"
        )
    for key, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise BundleError(
                f"{where}: weights are not finite ({key} holds NaN or inf); retrain or use another checkpoint"
            )


def check_resumable(bundle: dict[str, Any], net: MLP, meta: dict[str, Any], where: str) -> None:
    """A checkpoint to resume must hold this config's network, trained on data of the same shape and meaning.

    Checked before the run is opened: a mismatch found by Lightning deep inside ``fit`` would fail (and
    rewrite) the run the checkpoint belongs to, with an error that names no file.
    """
    theirs = build_net(bundle["architecture"])
    for key in ("sizes", "activations", "fused"):
        if getattr(theirs, key) != getattr(net, key):
            raise BundleError(
                f"{where}: a checkpoint of another network ({key} {getattr(theirs, key)}, this config builds "
                f"{getattr(net, key)}); resume with the model settings it was trained with"
            )
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in bundle["state_dict"].items() if hasattr(v, "shape")}
    if shapes != found:
        diff = sorted(set(shapes.items()) ^ set(found.items()))[0][0]
        raise BundleError(f"{where}: a checkpoint of another network (parameter {diff!r} differs from this config's)")
    old = bundle.get("meta") or {}
    for key in ("task", "feature_names", "classes"):
        if key in old and old[key] != meta.get(key):
            shown = old[key] if not isinstance(old[key], list) or len(old[key]) <= 8 else [*old[key][:8], "..."]
            raise BundleError(
                f"{where}: trained on other data ({key} was {shown}, this data's differs); "
                "resume on the data it was trained on, or start a new run"
            )
    for key in ("scaler_mean", "scaler_scale"):  # same columns, other rows: another data set, split or seed
        if key in old and not np.allclose(old[key], meta.get(key, []), rtol=1e-6, atol=0):
            raise BundleError(
                f"{where}: trained on other data (the features' {key.removeprefix('scaler_')} differs: another "
                "data set, split or seed); resume on the data it was trained on, or start a new run"
            )


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
