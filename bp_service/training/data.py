"""Datasets, splits, scaling and in-memory batching.

Every dataset ships with scikit-learn or is generated: nothing is downloaded. Splits are seeded and
stratified; scaling is fitted on the training split only and travels with the model (``Prepared.meta``)
so that predictions are made from raw features.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import torch
from sklearn import datasets as skd
from sklearn.impute import SimpleImputer
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import LabelEncoder, StandardScaler
from torch import Tensor

from bp_service.tables import (
    DataError,
    check_scaling,
    missing_cells,
    numeric_matrix,
    read_feature_frame,
    shown_names,
    text_columns,
)
from bp_service.training.loader import InMemoryLoader

__all__ = ["DATASETS", "MISSING", "TASKS", "BPDataModule", "DataError", "Prepared", "prepare"]


# --------------------------------------------------------------------------- raw datasets
def _blog(n: int, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Three inputs in [0, 1], labelled by a fixed 3-2-1 sigmoid 'teacher' network (the worked example's shape)."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 1, size=(n, 3))
    w1 = np.array([[6.0, -4.0, 2.0], [-3.0, 5.0, -4.0]])
    w2 = np.array([8.0, -8.0])
    hidden = 1 / (1 + np.exp(-(x @ w1.T - 1.0)))
    score = hidden @ w2 + rng.normal(0, noise, size=n)
    return x, (score > np.median(score)).astype(int), ["x1", "x2", "x3"]


def _xor(n: int, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    corners = rng.integers(0, 2, size=(n, 2))
    x = corners + rng.normal(0, noise, size=(n, 2))
    return x, corners[:, 0] ^ corners[:, 1], ["x1", "x2"]


def _moons(n: int, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    x, y = skd.make_moons(n_samples=n, noise=noise, random_state=seed)
    return x, y, ["x1", "x2"]


def _sklearn(loader) -> tuple[np.ndarray, np.ndarray, list[str]]:
    bunch = loader()
    names = [str(n) for n in getattr(bunch, "feature_names", [])] or [f"x{i}" for i in range(bunch.data.shape[1])]
    return np.asarray(bunch.data, dtype=np.float64), np.asarray(bunch.target), names


SKLEARN_LOADERS = {
    "digits": skd.load_digits,
    "breast_cancer": skd.load_breast_cancer,
    "iris": skd.load_iris,
    "wine": skd.load_wine,
    "diabetes": skd.load_diabetes,
}
GENERATED = {"blog": _blog, "xor": _xor, "moons": _moons}
REGRESSION_DATASETS = {"diabetes"}
# Every data= option, the one list (conf/data/ has a file for each).
DATASETS = (*GENERATED, "synthetic", *SKLEARN_LOADERS, "csv")
TASKS = ("auto", "classification", "regression")
MISSING = ("error", "drop", "mean")  # data.missing: what a CSV's empty cells do


def _synthetic(cfg, seed: int, task: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """scikit-learn's ``make_classification`` / ``make_regression``, sized by ``n_samples`` x ``n_features``.

    Features come back as float32: at 1M x 128 that is 0.5 GB instead of scikit-learn's 1 GB of float64,
    before the splits copy it. ``shuffle=False`` and no redundant features skip two full passes over the
    matrix (about 6 s instead of 15 s at 1M x 128 on one core); the split shuffles the rows anyway.
    Classification: ``noise`` is the fraction of labels assigned at random (``flip_y``). Regression:
    ``noise`` is the standard deviation of the Gaussian noise added to the target.
    """
    common = {
        "n_samples": cfg.n_samples,
        "n_features": cfg.n_features,
        "n_informative": synthetic_informative(cfg),
        "shuffle": False,
        "random_state": seed,
    }
    if task == "regression":
        x, y = skd.make_regression(**common, noise=cfg.noise)
    else:
        x, y = skd.make_classification(**common, n_classes=cfg.n_classes, n_redundant=0, flip_y=cfg.noise)
    return x.astype(np.float32), y, [f"x{i}" for i in range(cfg.n_features)]


def synthetic_informative(cfg) -> int:
    """``data.n_informative``, or by default half the features (at least enough for the classes' clusters)."""
    if cfg.n_informative is not None:
        return cfg.n_informative
    needed = math.ceil(math.log2(2 * cfg.n_classes))  # make_classification: 2 clusters per class on a hypercube
    return min(cfg.n_features, max(cfg.n_features // 2, needed))


def _csv(cfg) -> tuple[np.ndarray, np.ndarray, list[str], str]:
    """Features (NaN where a cell is missing and ``data.missing=mean``), targets, feature names and task."""
    frame, source = read_feature_frame(cfg.path), str(cfg.path)
    if cfg.target not in frame.columns:
        raise DataError(
            f"{source}: target column {cfg.target!r} not found (columns: {shown_names(list(frame.columns))})"
        )
    features = _csv_features(cfg, frame, source)
    x = numeric_matrix(frame, features, source, fill=[np.nan] * len(features))  # names inf cells by row
    target = frame[cfg.target]
    _check_empty_columns(cfg, features, x, target, source)
    empty = np.isnan(x).any(axis=1) | target.isna().to_numpy()
    if empty.any() and cfg.missing == "error":
        raise DataError(
            f"{source}: missing values: {'; '.join(missing_cells(frame, [*features, cfg.target]))}; "
            "data.missing=drop leaves those rows out, data.missing=mean fills a missing feature with its mean "
            "on the training split (rows without a target are left out)"
        )
    keep = ~empty if cfg.missing == "drop" else target.notna().to_numpy()
    x, target = x[keep], target[keep]
    if len(target) == 0:
        raise DataError(f"{source}: no rows left once rows with missing values are left out (data.missing=drop)")
    task = cfg.task
    if task == "auto":
        numeric = pd.to_numeric(target, errors="coerce")
        is_small_int = numeric.notna().all() and np.allclose(numeric, np.round(numeric)) and numeric.nunique() <= 20
        task = "classification" if (numeric.isna().any() or is_small_int) else "regression"
    if task == "regression":
        y = numeric_matrix(frame, [cfg.target], source, fill=[np.nan])[keep, 0]  # missing ones are not kept
    else:
        y = target.astype(str).to_numpy() if target.dtype == object else target.to_numpy()
    return x, y, features, task


def _check_empty_columns(cfg, features: list[str], x: np.ndarray, target: pd.Series, source: str) -> None:
    """A column without a single value, named: neither leaving rows out nor filling gaps in can make one up."""
    if target.isna().all():
        raise DataError(f"{source}: target column {cfg.target!r} is empty in every row: there is nothing to learn")
    if cfg.missing != "drop":  # data.missing=mean fills an empty feature with 0 (keep_empty_features)
        return
    blank = [name for name, none in zip(features, np.isnan(x).all(axis=0), strict=True) if none]
    if blank:
        rest = ",".join(_override_item(name) for name in features if name not in blank)
        them = "it" if len(blank) == 1 else "them"
        way_on = f"leave {them} out with 'data.features=[{rest}]'" if rest else "no feature column has a value"
        columns = f"column {blank[0]!r} is" if len(blank) == 1 else f"columns {', '.join(map(repr, blank))} are"
        raise DataError(f"{source}: {columns} empty in every row, so data.missing=drop would leave no row; {way_on}")


def _csv_features(cfg, frame: pd.DataFrame, source: str) -> list[str]:
    """``data.features``, or every column but the target and the id; text columns named with a way on."""
    excluded = {cfg.target, cfg.id_column}
    features = list(cfg.features) if cfg.features else [c for c in frame.columns if c not in excluded]
    absent = [c for c in features if c not in frame.columns]
    if absent:
        raise DataError(f"{source}: feature column(s) not found: {', '.join(absent)}")
    if not features:
        raise DataError(f"{source}: no feature columns besides the target {cfg.target!r}")
    text = text_columns(frame, features)
    if text:
        numeric = [c for c in features if c not in text]
        named = ", ".join(f"{c!r} ({where})" for c, where in text.items())
        way_on = (
            f"train on the numeric ones with 'data.features=[{','.join(map(_override_item, numeric))}]'"
            if numeric
            else "no numeric feature column is left; encode the text as numbers first"
        )
        raise DataError(f"{source}: not numeric: column(s) {named}; {way_on}")
    return features


def _override_item(name: str) -> str:
    """A column name as an item of a Hydra list override: bare when it can be, else double-quoted."""
    return name if re.fullmatch(r"[A-Za-z_][\w.\-]*", name) else '"' + name.replace('"', '\\"') + '"'


# --------------------------------------------------------------------------- prepared splits
@dataclass
class Prepared:
    """Scaled tensors for each split, and what a model needs to predict from raw features."""

    task: str  # classification | regression
    feature_names: list[str]
    classes: list[Any] | None  # original labels, in output order (classification)
    x: dict[str, Tensor] = field(default_factory=dict)  # split -> (N, H_in) scaled features
    y: dict[str, Tensor] = field(default_factory=dict)  # split -> (N, H_out) loss targets
    scaler_mean: list[float] = field(default_factory=list)
    scaler_scale: list[float] = field(default_factory=list)
    target_mean: float = 0.0  # regression targets are standardised too
    target_scale: float = 1.0
    target: str = "target"  # the target column's name (data=csv: data.target; scikit-learn's frames say "target")
    impute_mean: list[float] | None = None  # data.missing=mean: each feature's training-split mean fills its gaps
    raw_test: np.ndarray | None = None  # unscaled test features, for examples and signatures

    @property
    def n_features(self) -> int:
        return len(self.feature_names)

    @property
    def n_outputs(self) -> int:
        return self.y["train"].shape[1]

    def raw_example(self, rows: int = 5) -> pd.DataFrame:
        """A few raw test rows, as a model user would send them."""
        return pd.DataFrame(self.raw_test[:rows], columns=self.feature_names)

    @property
    def meta(self) -> dict[str, Any]:
        """Plain-Python description of the preprocessing (safe for ``torch.load(weights_only=True)``)."""
        classes = None if self.classes is None else [c.item() if hasattr(c, "item") else c for c in self.classes]
        return {
            "task": self.task,
            "feature_names": list(self.feature_names),
            "classes": classes,
            "scaler_mean": list(self.scaler_mean),
            "scaler_scale": list(self.scaler_scale),
            "target_mean": self.target_mean,
            "target_scale": self.target_scale,
            "target": self.target,
            "impute_mean": None if self.impute_mean is None else list(self.impute_mean),
        }


def _encode_targets(y: np.ndarray, n_classes: int) -> np.ndarray:
    """Binary: one sigmoid output holding 0/1, as in the worked example. K > 2 classes: one-hot."""
    if n_classes == 2:
        return y.reshape(-1, 1).astype(np.float64)
    return np.eye(n_classes)[y]


def load_raw(cfg, seed: int) -> tuple[np.ndarray, np.ndarray, list[str], str]:
    """Features, targets, feature names and task for ``cfg`` (the ``data`` config node)."""
    if cfg.name == "csv":
        return _csv(cfg)
    if cfg.name == "synthetic":
        task = "regression" if cfg.task == "regression" else "classification"
        return (*_synthetic(cfg, seed, task), task)
    if cfg.name in GENERATED:
        x, y, names = GENERATED[cfg.name](cfg.n_samples, cfg.noise, seed)
    else:
        x, y, names = _sklearn(SKLEARN_LOADERS[cfg.name])
    task = cfg.task if cfg.task != "auto" else ("regression" if cfg.name in REGRESSION_DATASETS else "classification")
    return x, y, names, task


def prepare(cfg, seed: int) -> Prepared:
    """Load, split (seeded, stratified), and scale on the training split only."""
    x, y, names, task = load_raw(cfg, seed)
    source = cfg.path if cfg.name == "csv" else f"data={cfg.name}"
    classes = None
    if task == "classification":
        y, classes = _encode_labels(y, source, cfg.target)
    splits = _split(x, y, classes, cfg, seed, source)
    impute_mean = _impute(splits) if cfg.name == "csv" and cfg.missing == "mean" else None
    scaler = StandardScaler().fit(splits["train"][0])
    check_scaling(names, scaler.mean_, scaler.scale_, source)
    prepared = Prepared(
        task=task,
        feature_names=names,
        classes=classes,
        scaler_mean=scaler.mean_.tolist(),
        scaler_scale=scaler.scale_.tolist(),
        raw_test=splits["test"][0],
        target=str(cfg.target) if cfg.name == "csv" else "target",
        impute_mean=impute_mean,
    )
    if task == "regression":
        y_train = splits["train"][1]
        prepared.target_mean, prepared.target_scale = float(y_train.mean()), float(y_train.std() or 1.0)
        check_scaling([cfg.target or "target"], prepared.target_mean, prepared.target_scale, source)
    for split, (xs, ys) in splits.items():
        if task == "regression":
            targets = ((ys - prepared.target_mean) / prepared.target_scale).reshape(-1, 1)
        else:
            targets = _encode_targets(ys, len(classes))
        prepared.x[split] = torch.as_tensor(scaler.transform(xs), dtype=torch.float32)
        prepared.y[split] = torch.as_tensor(targets, dtype=torch.float32)
    return prepared


def _impute(splits: dict[str, tuple[np.ndarray, np.ndarray]]) -> list[float]:
    """Fill missing features (NaN) in every split with the column's mean on the training split only, in place.

    Returns the means (one per feature; 0.0 for a column empty in training) for ``meta``: bp-predict fills the
    same gaps with the same numbers.
    """
    imputer = SimpleImputer(strategy="mean", keep_empty_features=True).fit(splits["train"][0])
    for split, (xs, ys) in splits.items():
        splits[split] = (imputer.transform(xs), ys)
    return [float(v) for v in imputer.statistics_]


def _encode_labels(y: np.ndarray, source: str, target: str | None) -> tuple[np.ndarray, list[Any]]:
    """Labels as 0..K-1, and the original labels in that order."""
    encoder = LabelEncoder().fit(y)
    classes = list(encoder.classes_)
    if len(classes) < 2:
        only = classes[0].item() if isinstance(classes[0], np.generic) else classes[0]  # 1, not np.int64(1)
        raise DataError(f"{source}: target {target or 'y'!r} has a single class ({only!r}); need at least 2")
    return encoder.transform(y), classes


def _split(x, y, classes, cfg, seed: int, source: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """train / val / test, seeded, and stratified by class for classification."""
    n = len(x)
    n_test, n_val = math.ceil(n * cfg.test_size), math.ceil(n * cfg.val_size)
    min_rows = 3 if classes is None else 3 * len(classes)
    if n - n_test - n_val < 1 or n < min_rows:
        raise DataError(f"{source}: {n} rows are too few for a train/val/test split (need at least {max(min_rows, 3)})")
    stratify = y if classes is not None and np.bincount(y).min() >= 3 else None
    if classes is not None and stratify is None:
        raise DataError(
            f"{source}: every class needs at least 3 rows for a stratified split; counts {np.bincount(y).tolist()}"
        )
    x_rest, x_test, y_rest, y_test = train_test_split(x, y, test_size=n_test, random_state=seed, stratify=stratify)
    strat_rest = y_rest if stratify is not None else None
    x_train, x_val, y_train, y_val = train_test_split(
        x_rest, y_rest, test_size=n_val, random_state=seed, stratify=strat_rest
    )
    return {"train": (x_train, y_train), "val": (x_val, y_val), "test": (x_test, y_test)}


class BPDataModule(pl.LightningDataModule):
    """Wraps :func:`prepare` for Lightning; evaluation splits are small, so they go in large batches."""

    def __init__(self, cfg, seed: int) -> None:
        super().__init__()
        self.cfg, self.seed = cfg, seed
        self.data: Prepared | None = None
        self._train: InMemoryLoader | None = None
        self._resident: dict[tuple[str, str], tuple[Tensor, Tensor]] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.data is None:
            self.data = prepare(self.cfg, self.seed)

    def split(self, name: str) -> tuple[Tensor, Tensor]:
        """The split's ``(x, y)``: on a CUDA training device a copy kept there (``data.on_device``), else ``data``'s.

        One copy per run instead of one host-to-device copy (and a CPU gather) per batch: at 1M x 128
        that is 0.5 GB of GPU memory, and a step no longer waits on the host. ``data`` stays on the CPU.
        """
        x, y = self.data.x[name], self.data.y[name]
        device = self.trainer.strategy.root_device if self.trainer else None
        if device is None or device.type != "cuda" or not self.cfg.get("on_device", True):
            return x, y
        key = (name, str(device))
        if key not in self._resident:
            self._resident[key] = (x.to(device), y.to(device))
        return self._resident[key]

    def train_dataloader(self) -> InMemoryLoader:
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)

        def position() -> tuple[int, int]:
            return self.trainer.current_epoch, self.trainer.fit_loop.epoch_loop.batch_progress.current.ready

        self._train = InMemoryLoader(
            *self.split("train"),
            self.cfg.batch_size,
            shuffle=True,
            seed=self.seed,
            rank=rank,
            world_size=world,
            steps_per_execution=self.cfg.steps_per_execution,
            position=position if self.trainer else None,
        )
        return self._train

    def _eval_loader(self, split: str) -> InMemoryLoader:
        return InMemoryLoader(*self.split(split), batch_size=4096)

    def val_dataloader(self) -> InMemoryLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> InMemoryLoader:
        return self._eval_loader("test")
