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
import math
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from bp_service.commands import first_line, shown_value
from bp_service.files import atomic_path
from bp_service.layers import ACTIVATIONS, MLP, OUTPUT_ACTIVATIONS


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
    """A bundle from a Lightning checkpoint or a saved bundle, never unpickling arbitrary objects.

    Everything in it is checked before any network is built: the archive, the architecture, the weights
    and the meta (:func:`check_bundle`), each error one line naming the file and the field.
    """
    path = Path(path)
    if not path.is_file():
        raise BundleError(f"{path}: checkpoint not found")
    check_archive(path)
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
        entry, state = raw["bp_service"], raw.get("state_dict")
        if not isinstance(entry, dict) or not isinstance(state, dict):
            raise BundleError(f"{path}: not a bp-service checkpoint (its model description is unreadable)")
        others = [k for k in state if not (isinstance(k, str) and k.startswith("net."))]
        if others:  # BPModule holds the network and nothing else: Lightning would refuse it inside fit
            raise BundleError(f"{path}: state_dict: {shown_value(others[0])} is not a weight of the network")
        state = {k.removeprefix("net."): v for k, v in state.items()}
        bundle = {"state_dict": state, **entry}
    elif {"state_dict", "meta", "architecture"} <= raw.keys():
        bundle = raw
    else:
        raise BundleError(f"{path}: not a bp-service checkpoint (no model description inside)")
    check_bundle(bundle, str(path), path.stat().st_size)
    return bundle


def check_archive(path: Path) -> None:
    """The file is a zip archive as ``torch.save`` writes it: entries stored, never compressed.

    ``torch.load`` unpacks compressed entries too, so a small file could unpack to gigabytes before any
    other check runs; stored entries cannot hold more than the file's own size.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise BundleError(
            f"{path}: not a loadable bp-service checkpoint (not a torch.save zip archive: {first_line(exc)})"
        ) from None
    packed = [e.filename for e in entries if e.compress_type != zipfile.ZIP_STORED]
    if packed:
        raise BundleError(
            f"{path}: refused: holds compressed entries ({packed[0]}); torch.save never compresses, and a small "
            "file could unpack to gigabytes"
        )
    if sum(e.file_size for e in entries) > path.stat().st_size:
        raise BundleError(f"{path}: refused: its entries declare more bytes than the file holds (a damaged archive)")


BUNDLE_KEYS = {"state_dict", "meta", "architecture"}
# What an architecture may say: MLP's constructor arguments; "activations" (one per layer) in older bundles.
ARCHITECTURE_KEYS = {"sizes", "activation", "output_activation", "fused", "bias", "activations"}


def check_bundle(bundle: dict[str, Any], where: str, file_size: int | None = None) -> None:
    """The architecture, weights and meta are those of a bp-service network, and agree with each other.

    ``file_size``: the declared parameters must fit in the file (at 2 bytes each, the smallest float). Weights
    that pass :func:`check_weights` are backed by data in the file, but several may share one stored tensor:
    ten layers viewing one 64 MB storage would allocate 640 MB. Checked before any network is built.
    """
    missing, extra = sorted(BUNDLE_KEYS - set(bundle)), sorted(shown_value(k) for k in bundle if k not in BUNDLE_KEYS)
    if missing or extra:
        problem = f"no {missing[0]!r}" if missing else f"unknown key {extra[0]}"
        raise BundleError(f"{where}: not a bp-service bundle ({problem})")
    sizes = check_architecture(bundle["architecture"], where)
    check_weights(bundle, where)
    if file_size is not None:
        bias = bool(bundle["architecture"].get("bias", True))
        declared = sum(n_in * n_out + (n_out if bias else 0) for n_in, n_out in itertools.pairwise(sizes))
        if declared * 2 > file_size:
            raise BundleError(
                f"{where}: refused: its architecture (sizes {shown_sizes(sizes)}) declares {declared:,} weights, "
                f"more than its {file_size:,} bytes can hold"
            )
    check_meta(bundle["meta"], sizes, where)


def shown_sizes(sizes: list[int]) -> str:
    return str(sizes) if len(sizes) <= 8 else f"[{', '.join(map(str, sizes[:8]))}, ...] ({len(sizes)} layers)"


def check_architecture(arch: Any, where: str) -> list[int]:
    """The layer widths of a readable architecture: known keys, positive widths, known activations."""
    if not isinstance(arch, dict):
        raise BundleError(f"{where}: not a bp-service checkpoint (its architecture is unreadable)")
    unknown = sorted(shown_value(k) for k in arch if k not in ARCHITECTURE_KEYS)
    if unknown:
        raise BundleError(f"{where}: architecture: unknown key {unknown[0]} (a newer or foreign file?)")
    sizes = arch.get("sizes")
    if not isinstance(sizes, list | tuple) or len(sizes) < 2 or not all(_is_int(s) and s > 0 for s in sizes):
        raise BundleError(
            f"{where}: architecture: sizes must be two or more positive widths, got {shown_value(sizes, 80)}"
        )
    names = arch["activations"] if "activations" in arch else [arch.get("activation", "sigmoid")]
    names = [*names, arch.get("output_activation")] if "activations" not in arch else names
    if not isinstance(names, list) or len(names) < 1 or ("activations" in arch and len(names) != len(sizes) - 1):
        raise BundleError(f"{where}: architecture: activations must be one name per layer")
    for i, name in enumerate(names):
        known = OUTPUT_ACTIVATIONS if i == len(names) - 1 else ACTIVATIONS  # softmax: the output layer only
        if name is not None and (not isinstance(name, str) or name not in known):
            raise BundleError(
                f"{where}: architecture: unknown activation {shown_value(name)} (known: {', '.join(known)})"
            )
    for key in ("fused", "bias"):
        if not isinstance(arch.get(key, True), bool):
            raise BundleError(f"{where}: architecture: {key} must be true or false, got {shown_value(arch[key])}")
    return [int(s) for s in sizes]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_weights(bundle: dict[str, Any], where: str) -> None:
    """The weights are those the architecture describes, and finite: checked before any network is built.

    A small file declaring a huge architecture must not make us allocate it; a shape mismatch is named here
    rather than by ``load_state_dict``; NaN weights would predict NaN without a word. Each tensor must be a
    dense float tensor backed by a storage of its own size: an ``expand()`` view (stride 0) declares a layer
    of any size in a few bytes, and copying it into the network would allocate the whole layer.
    """
    try:
        sizes = [int(s) for s in bundle["architecture"]["sizes"]]
        bias = bool(bundle["architecture"].get("bias", True))
        state = bundle["state_dict"]
        items = list(state.items())
    except (KeyError, TypeError, ValueError, AttributeError):
        raise BundleError(f"{where}: not a bp-service checkpoint (its architecture is unreadable)") from None
    for key, tensor in items:
        _check_tensor(key, tensor, where)
    expected = {}
    for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
        expected[f"layers.{i}.weight"] = (n_out, n_in)
        if bias:
            expected[f"layers.{i}.bias"] = (n_out,)
    found = {k: tuple(v.shape) for k, v in items}
    if found != expected:
        wrong = sorted(set(expected) ^ set(found)) or [k for k in expected if expected[k] != found[k]]
        key = wrong[0]
        name = shown_value(key)[1:-1]
        raise BundleError(
            f"{where}: weights do not match the architecture it declares (sizes {shown_sizes(sizes)}): "
            f"{name} is {found.get(key, 'missing')}, expected {expected.get(key, 'no such parameter')}"
        )
    for key, tensor in items:
        if not bool(torch.isfinite(tensor).all()):
            raise BundleError(
                f"{where}: weights are not finite ({key} holds NaN or inf); retrain or use another checkpoint"
            )


def _check_tensor(key: object, tensor: Any, where: str) -> None:
    if not isinstance(key, str):
        raise BundleError(f"{where}: weights: a key that is not a name ({shown_value(key)})")
    name = shown_value(key)[1:-1]
    if not isinstance(tensor, torch.Tensor):
        raise BundleError(f"{where}: weights: {name} is not a tensor ({type(tensor).__name__})")
    if not tensor.is_floating_point() or tensor.layout != torch.strided:
        raise BundleError(f"{where}: weights: {name} is not a dense floating-point tensor ({tensor.dtype})")
    if not stored_whole(tensor):
        raise BundleError(
            f"{where}: weights: {name} is not a contiguous tensor backed by its own data (shape "
            f"{tuple(tensor.shape)}, {tensor.untyped_storage().nbytes()} bytes stored): refused"
        )


def stored_whole(tensor: torch.Tensor) -> bool:
    """A dense, contiguous tensor whose storage holds every element it declares. An ``expand()`` view (stride 0)
    loads with ``weights_only=True`` and declares a tensor of any size in a few bytes of a file; copying or
    reading it out would allocate all of it."""
    needed = (tensor.storage_offset() + tensor.numel()) * tensor.element_size()
    return tensor.layout == torch.strided and tensor.is_contiguous() and tensor.untyped_storage().nbytes() >= needed


def stored_table(value: Any, columns: int) -> list[list[float]] | None:
    """The rows of a ``(rows, columns)`` float64 tensor stored whole (:func:`stored_whole`), as a checkpoint's
    callbacks keep their records; None for anything else."""
    if not (
        isinstance(value, torch.Tensor)
        and value.dtype == torch.float64
        and value.dim() == 2
        and value.shape[1] == columns
        and stored_whole(value)
    ):
        return None
    return value.tolist()


META_KEYS = {"task", "feature_names", "classes", "scaler_mean", "scaler_scale", "target_mean", "target_scale"}
# Bundles older than these lack them; a checkpoint records the MLflow run that wrote it. A key not listed here
# may be preprocessing this version cannot apply, and is refused rather than ignored.
OPTIONAL_META_KEYS = {"target", "impute_mean", "mlflow_run_id"}


def check_meta(meta: Any, sizes: list[int], where: str) -> None:
    """The preprocessing beside the weights: every field present, of its type, finite, and the size of the network.

    A zero or NaN scale, or more class labels than the network has outputs, would otherwise predict
    garbage (or fail deep inside pandas) with no word about the file.
    """
    if not isinstance(meta, dict):
        raise BundleError(f"{where}: meta: not a dictionary ({type(meta).__name__}); not a bp-service model")
    missing = sorted(META_KEYS - set(meta))
    if missing:
        raise BundleError(f"{where}: meta: {missing[0]} is missing (not a bp-service model, or a damaged one)")
    unknown = sorted(shown_value(k) for k in meta if k not in META_KEYS | OPTIONAL_META_KEYS)
    if unknown:
        raise BundleError(f"{where}: meta: unknown key {unknown[0]} (preprocessing this version cannot apply?)")
    if meta["task"] not in ("classification", "regression"):
        raise BundleError(f"{where}: meta: task must be classification or regression, got {shown_value(meta['task'])}")
    names = meta["feature_names"]
    named = isinstance(names, list) and all(isinstance(n, str) for n in names)
    if not named or len(names) != sizes[0] or len(set(names)) != len(names):
        raise BundleError(
            f"{where}: meta: feature_names must be {sizes[0]} distinct column names (the network's input width)"
        )
    _check_numbers(meta, "scaler_mean", sizes[0], where)
    _check_numbers(meta, "scaler_scale", sizes[0], where, positive=True)
    if meta.get("impute_mean") is not None:
        _check_numbers(meta, "impute_mean", sizes[0], where)
    _check_numbers(meta, "target_mean", None, where)
    _check_numbers(meta, "target_scale", None, where, positive=True)
    if meta.get("target") is not None and not isinstance(meta["target"], str):
        raise BundleError(f"{where}: meta: target must be a column name, got {type(meta['target']).__name__}")
    run_id = meta.get("mlflow_run_id")
    if run_id is not None and not (isinstance(run_id, str) and run_id.isalnum() and len(run_id) <= 64):
        raise BundleError(f"{where}: meta: mlflow_run_id must be an MLflow run id, got {shown_value(run_id)}")
    _check_classes(meta, sizes[-1], where)


def _check_numbers(meta: dict[str, Any], key: str, length: int | None, where: str, positive: bool = False) -> None:
    """``meta[key]``: finite numbers (``length`` of them, or one number when None), above zero if ``positive``."""
    value = meta[key]
    values = [value] if length is None else value
    kind = "a number" if length is None else f"{length} numbers (one per feature)"
    if not isinstance(values, list) or len(values) != (length or 1):
        raise BundleError(f"{where}: meta: {key} must be {kind}")
    for v in values:
        if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v) or (positive and v <= 0):
            need = "finite and above zero" if positive else "finite"
            raise BundleError(f"{where}: meta: {key} holds {shown_value(v)}; every value must be {need}")


def _check_classes(meta: dict[str, Any], n_out: int, where: str) -> None:
    """Regression: no classes and one output. Classification: distinct labels, one output each (or one for two)."""
    classes = meta["classes"]
    if meta["task"] == "regression":
        if classes is not None or n_out != 1:
            raise BundleError(f"{where}: meta: a regression model has no classes and one output (it has {n_out})")
        return
    labels = (str, int, float, bool)
    if not isinstance(classes, list) or len(classes) < 2 or not all(isinstance(c, labels) for c in classes):
        raise BundleError(f"{where}: meta: classes must be a list of two or more labels")
    finite = all(math.isfinite(c) for c in classes if isinstance(c, float))
    if len(set(map(repr, classes))) != len(classes) or not finite:
        raise BundleError(f"{where}: meta: classes must be distinct, finite labels")
    if n_out != len(classes) and not (len(classes) == 2 and n_out == 1):
        raise BundleError(
            f"{where}: meta: classes lists {len(classes)} labels but the network has {n_out} output(s) "
            f"(expected {'1 or 2' if n_out <= 2 else n_out} labels)"
        )


def check_resumable(bundle: dict[str, Any], net: MLP, meta: dict[str, Any], where: str) -> None:
    """A checkpoint to resume must hold this config's network, trained on data of the same shape and meaning.

    Checked before the run is opened: a mismatch found by Lightning deep inside ``fit`` would fail (and
    rewrite) the run the checkpoint belongs to, with an error that names no file.
    """
    theirs = build_net(bundle["architecture"])
    for key in ("sizes", "activations", "fused"):
        if getattr(theirs, key) != getattr(net, key):
            hint = "resume with the model settings it was trained with"
            if key == "activations" and (theirs.activations[-1], net.activations[-1]) == ("sigmoid", "softmax"):
                hint += " (model.loss=mse keeps the sigmoid outputs classification had before cross_entropy)"
            raise BundleError(
                f"{where}: a checkpoint of another network ({key} {getattr(theirs, key)}, this config builds "
                f"{getattr(net, key)}); {hint}"
            )
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in bundle["state_dict"].items() if hasattr(v, "shape")}
    if shapes != found:
        diff = sorted(set(shapes.items()) ^ set(found.items()))[0][0]
        raise BundleError(f"{where}: a checkpoint of another network (parameter {diff!r} differs from this config's)")
    old = bundle.get("meta") or {}
    for key in ("task", "feature_names", "classes"):
        if key in old and old[key] != meta.get(key):
            raise BundleError(
                f"{where}: trained on other data ({key} was {shown_value(old[key], 200)}, this data's differs); "
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
    else:  # softmax outputs are probabilities already (this only removes float32 rounding from their sum);
        # sigmoid outputs (MSE-trained models, and every model before softmax) are independent scores: normalised
        proba = out / np.clip(out.sum(axis=1, keepdims=True), 1e-12, None)
    frame = pd.DataFrame({"prediction": np.asarray(classes, dtype=object)[proba.argmax(axis=1)]})
    for k, label in enumerate(classes):
        frame[f"proba_{label}"] = proba[:, k]
    if all(isinstance(c, bool | np.bool_) for c in classes):  # True/False labels stay True/False, not 1/0
        frame["prediction"] = frame["prediction"].astype(bool)
    elif all(isinstance(c, int | np.integer) for c in classes):
        frame["prediction"] = frame["prediction"].astype(np.int64)
    return frame
