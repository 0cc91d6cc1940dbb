"""Splits and scaling, the same for every source: seeded, stratified, fitted on the training split only.

Scaling travels with the model (``Prepared.meta``) so that predictions are made from raw features.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig
from sklearn.impute import SimpleImputer
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import LabelEncoder, StandardScaler
from torch import Tensor

from bp_service.tables import DataError, check_scaling
from bp_service.training.data.sources import SETTINGS, build_source  # noqa: F401 (their names here before)


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
    source: str = ""  # how messages name the data: data=<name>, or the CSV's path (not part of meta)

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


def prepare(cfg: DictConfig, seed: int) -> Prepared:
    """Load the ``data`` node's source, split (seeded, stratified), and scale on the training split only."""
    source = build_source(cfg)
    raw = source.load(seed)
    x, y, names, task, label = raw.x, raw.y, raw.feature_names, raw.task, source.label
    classes = None
    if task == "classification":
        y, classes = _encode_labels(y, label, raw.target)
    splits = _split(x, y, classes, cfg, seed, label)
    impute_mean = _impute(splits) if raw.impute else None
    scaler = StandardScaler().fit(splits["train"][0])
    check_scaling(names, scaler.mean_, scaler.scale_, label)
    prepared = Prepared(
        task=task,
        feature_names=names,
        classes=classes,
        scaler_mean=scaler.mean_.tolist(),
        scaler_scale=scaler.scale_.tolist(),
        raw_test=splits["test"][0],
        target=raw.target or "target",
        impute_mean=impute_mean,
        source=label,
    )
    if task == "regression":
        y_train = splits["train"][1]
        prepared.target_mean, prepared.target_scale = float(y_train.mean()), float(y_train.std() or 1.0)
        check_scaling([raw.target or "target"], prepared.target_mean, prepared.target_scale, label)
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
    if classes is not None and min(n_test, n_val) < len(classes):  # each split holds a row of every class
        need = math.ceil(len(classes) / min(cfg.test_size, cfg.val_size))
        raise DataError(
            f"{source}: {n} rows are too few for a stratified split of {len(classes)} classes: the test and "
            f"validation splits each need a row of every class (at least {need} rows at these split sizes)"
        )
    x_rest, x_test, y_rest, y_test = train_test_split(x, y, test_size=n_test, random_state=seed, stratify=stratify)
    strat_rest = y_rest if stratify is not None else None
    x_train, x_val, y_train, y_val = train_test_split(
        x_rest, y_rest, test_size=n_val, random_state=seed, stratify=strat_rest
    )
    return {"train": (x_train, y_train), "val": (x_val, y_val), "test": (x_test, y_test)}
