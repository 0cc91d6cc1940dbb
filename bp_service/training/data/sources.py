"""The kinds of data source a ``data=`` option names by ``_target_``: each takes only its own fields and checks them.

A source's constructor refuses a bad field with a :class:`ConfigError` naming it (``data.noise must be >= 0``);
:meth:`Source.load` gives the raw table. Splitting and scaling are the same for every source
(:mod:`.prepare`). A new dataset of a kind listed here is one YAML file in ``conf/data/``; a new kind of
source is a class here (or beside it), its schema in :mod:`bp_service.training.config` and its name in
:data:`bp_service.training.guard.JOB_CLASSES`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import ClassVar

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from bp_service.training.config import ConfigError, DataSettings, Task, instantiate

# The data node's keys that are not the source's: split and loader settings, the same for every source.
SETTINGS = frozenset(f.name for f in dataclasses.fields(DataSettings))


@dataclass
class Raw:
    """A source's table before splitting: features, targets, feature names and the task they make."""

    x: np.ndarray
    y: np.ndarray
    feature_names: list[str]
    task: str  # classification | regression
    target: str | None = None  # the target column's name, where the data names one
    impute: bool = False  # NaN feature cells are to be filled with the training split's means


def choice(kind: type[Enum], value: object, field_name: str) -> str:
    """``value`` as the plain name of one of ``kind``'s members; refused naming the field otherwise."""
    try:
        return kind(str(value)).value
    except ValueError:
        names = ", ".join(m.value for m in kind)
        raise ConfigError(f"{field_name} must be one of {names}, got {str(value)!r}") from None


def require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def infer_task(target: pd.Series) -> str:
    """``task=auto``: text or at most 20 distinct whole numbers are classes; any other numbers are a regression."""
    numeric = pd.to_numeric(target, errors="coerce")
    is_small_int = numeric.notna().all() and np.allclose(numeric, np.round(numeric)) and numeric.nunique() <= 20
    return "classification" if (numeric.isna().any() or is_small_int) else "regression"


class Source:
    """What every source takes: its ``data=`` name and its task (``auto``: inferred from the target)."""

    def __init__(self, name: str, task: str = "auto") -> None:
        self.name = str(name)
        self.task = choice(Task, task, "data.task")

    @property
    def label(self) -> str:
        """How messages name this data."""
        return f"data={self.name}"

    def load(self, seed: int) -> Raw:
        raise NotImplementedError

    def memory_need(self) -> tuple[str, int, str] | None:
        """At least what generating the data takes: (the fields that ask for it, bytes, what), or None."""
        return None

    def widths(self) -> tuple[int, int]:
        """The network's input and output widths as far as they are known before loading (1 where unknown)."""
        return 1, 1

    def problems(self) -> list[str]:
        """Every problem :meth:`load` would refuse, each one line, found without torch or scikit-learn; only where
        that is cheap (a user's file), else none: what the source generates or ships is checked by loading it."""
        return []


def build_source(cfg: DictConfig) -> Source:
    """The source the ``data`` node names by ``_target_`` (allowlisted), given that node's own fields only.

    The constructor checks them: a bad one is a ConfigError naming it. A field left ``???`` is not
    passed, so the source says which one is required.
    """
    node = OmegaConf.to_container(cfg, resolve=True)
    return instantiate({k: v for k, v in node.items() if k not in SETTINGS and v != "???"}, "data")


class BundledSource(Source):
    """A table that ships with scikit-learn (``sklearn.datasets.load_<name>``): nothing to download."""

    # scikit-learn's bundled tables with one target (linnerud has three).
    TABLES = ("breast_cancer", "diabetes", "digits", "iris", "wine")

    def __init__(self, name: str, task: str = "auto") -> None:
        super().__init__(name, task)
        require(self.name in self.TABLES, f"data.name must be one of {', '.join(self.TABLES)}, got {self.name!r}")

    def load(self, seed: int) -> Raw:
        from sklearn import datasets as skd  # a second's import: not before bp-train has checked the config

        bunch = getattr(skd, f"load_{self.name}")()
        names = [str(n) for n in getattr(bunch, "feature_names", [])] or [f"x{i}" for i in range(bunch.data.shape[1])]
        y = np.asarray(bunch.target)
        task = infer_task(pd.Series(y)) if self.task == "auto" else self.task
        return Raw(np.asarray(bunch.data, dtype=np.float64), y, names, task)


# A toy set: (n_samples, noise, seed) -> features, labels, feature names.
Generator = Callable[[int, float, int], tuple[np.ndarray, np.ndarray, list[str]]]


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
    from sklearn import datasets as skd

    x, y = skd.make_moons(n_samples=n, noise=noise, random_state=seed)
    return x, y, ["x1", "x2"]


class ToySource(Source):
    """A small two-class problem generated from the run's seed: ``n_samples`` rows, ``noise`` on the inputs."""

    GENERATORS: ClassVar[dict[str, Generator]] = {"blog": _blog, "xor": _xor, "moons": _moons}

    def __init__(self, name: str, n_samples: int = 1000, noise: float = 0.1, task: str = "auto") -> None:
        super().__init__(name, task)
        names = ", ".join(self.GENERATORS)
        require(self.name in self.GENERATORS, f"data.name must be one of {names}, got {self.name!r}")
        require(n_samples >= 20, f"data.n_samples must be >= 20, got {n_samples}")
        require(noise >= 0, f"data.noise must be >= 0, got {noise}")
        self.n_samples, self.noise = int(n_samples), float(noise)

    def load(self, seed: int) -> Raw:
        x, y, names = self.GENERATORS[self.name](self.n_samples, self.noise, seed)
        return Raw(x, y, names, "classification" if self.task == "auto" else self.task)

    def memory_need(self) -> tuple[str, int, str]:
        return f"data.n_samples={self.n_samples}", self.n_samples * 16, "16 bytes a row"  # 2-3 features: 1 bounds


class SyntheticSource(Source):
    """scikit-learn's ``make_classification`` / ``make_regression``, sized by ``n_samples`` x ``n_features``.

    Classification: ``noise`` is the fraction of labels assigned at random (``flip_y``). Regression:
    ``noise`` is the standard deviation of the Gaussian noise added to the target.
    """

    def __init__(
        self,
        name: str = "synthetic",
        n_samples: int = 10000,
        n_features: int = 20,
        n_classes: int = 2,
        n_informative: int | None = None,
        noise: float = 0.01,
        task: str = "auto",
    ) -> None:
        super().__init__(name, task)
        self.regression = self.task == "regression"  # auto: classification
        self.n_samples, self.n_features, self.n_classes, self.noise = n_samples, n_features, n_classes, noise
        self._check(n_informative)
        self.n_informative = n_informative if n_informative is not None else self._default_informative()

    def _check(self, informative: int | None) -> None:
        """make_classification's own limits, checked here so that the error names the field."""
        require(self.n_samples >= 20, f"data.n_samples must be >= 20, got {self.n_samples}")
        require(self.noise >= 0, f"data.noise must be >= 0, got {self.noise}")
        require(self.n_features >= 1, f"data.n_features must be >= 1, got {self.n_features}")
        require(self.n_classes >= 2, f"data.n_classes must be >= 2, got {self.n_classes}")
        if informative is not None:
            require(
                1 <= informative <= self.n_features,
                f"data.n_informative must be in [1, data.n_features={self.n_features}], got {informative}",
            )
        if self.regression:
            return
        require(
            self.noise <= 1, f"data.noise must be <= 1 for synthetic classification (labels flipped), got {self.noise}"
        )
        n = informative if informative is not None else self.n_features
        require(
            (2 * self.n_classes - 1).bit_length() <= n,  # 2 * n_classes <= 2**n, without computing 2**n
            f"data.n_informative={n} is too small for data.n_classes={self.n_classes}: "
            "needs 2 * n_classes <= 2 ** n_informative",
        )

    def _default_informative(self) -> int:
        """Half the features, at least enough for the classes' clusters."""
        needed = math.ceil(math.log2(2 * self.n_classes))  # make_classification: 2 clusters per class on a hypercube
        return min(self.n_features, max(self.n_features // 2, needed))

    def load(self, seed: int) -> Raw:
        """Features come back as float32: at 1M x 128 that is 0.5 GB instead of scikit-learn's 1 GB of float64,
        before the splits copy it. ``shuffle=False`` and no redundant features skip two full passes over the
        matrix (about 6 s instead of 15 s at 1M x 128 on one core); the split shuffles the rows anyway."""
        common = {
            "n_samples": self.n_samples,
            "n_features": self.n_features,
            "n_informative": self.n_informative,
            "shuffle": False,
            "random_state": seed,
        }
        from sklearn import datasets as skd

        if self.regression:
            x, y = skd.make_regression(**common, noise=self.noise)
        else:
            x, y = skd.make_classification(**common, n_classes=self.n_classes, n_redundant=0, flip_y=self.noise)
        task = "regression" if self.regression else "classification"
        return Raw(x.astype(np.float32), y, [f"x{i}" for i in range(self.n_features)], task)

    def widths(self) -> tuple[int, int]:
        return self.n_features, (self.n_classes if not self.regression and self.n_classes > 2 else 1)

    def memory_need(self) -> tuple[str, int, str]:
        """scikit-learn's float64 matrix beside the float32 copy kept (12 bytes a feature value), float32 targets."""
        label = f"data.n_samples={self.n_samples} x data.n_features={self.n_features}"
        return label, self.n_samples * (12 * self.n_features + 4 * self.widths()[1]), "12 bytes a feature value"
