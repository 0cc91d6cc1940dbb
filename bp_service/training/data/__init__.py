"""Data for bp-train: sources named by ``_target_`` in ``conf/data/``, one split and scaling for all, batching.

- :mod:`.sources`: the kinds of source (scikit-learn's bundled tables, the generated toy sets, synthetic);
  :mod:`.csv`: your own CSV file. Each takes only its own fields and checks them when built.
- :mod:`.prepare`: builds the source a ``data`` node names, then splits and scales (``Prepared``).
- :mod:`.datamodule`: the LightningDataModule over those splits.

Importing the package or a source imports no torch, Lightning or scikit-learn: bp-train checks the config's
source and a CSV's data before it pays for those. The splits and the DataModule are imported when first named.
"""

import sys
import types
from typing import Any

from bp_service.tables import DataError
from bp_service.training.data.sources import build_source

__all__ = ["BPDataModule", "DataError", "Prepared", "build_source", "prepare"]


def __getattr__(name: str) -> Any:
    if name == "BPDataModule":
        from bp_service.training.data.datamodule import BPDataModule

        return BPDataModule
    if name in ("Prepared", "prepare"):
        from bp_service.training.data.prepare import Prepared, prepare

        return {"Prepared": Prepared, "prepare": prepare}[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _Package(types.ModuleType):
    """Keeps ``prepare`` the function: importing the submodule of that name sets it on the package as the module."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "prepare" and isinstance(value, types.ModuleType):
            value = value.prepare
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
