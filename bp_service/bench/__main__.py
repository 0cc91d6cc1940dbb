"""``python -m bp_service.bench``: the same as ``bp-bench``."""

from bp_service.bench import quiet_native_logs

quiet_native_logs()  # before bp_service.bench.cli imports torch

from bp_service.bench.cli import main  # noqa: E402

raise SystemExit(main())
