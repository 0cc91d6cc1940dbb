"""Data for bp-train: sources named by ``_target_`` in ``conf/data/``, one split and scaling for all, batching.

- :mod:`.sources`: the kinds of source (scikit-learn's bundled tables, the generated toy sets, synthetic);
  :mod:`.csv`: your own CSV file. Each takes only its own fields and checks them when built.
- :mod:`.prepare`: builds the source a ``data`` node names, then splits and scales (``Prepared``).
- :mod:`.datamodule`: the LightningDataModule over those splits.
"""

from bp_service.tables import DataError
from bp_service.training.data.datamodule import BPDataModule
from bp_service.training.data.prepare import Prepared, build_source, prepare

__all__ = ["BPDataModule", "DataError", "Prepared", "build_source", "prepare"]
