"""``python -m bp_service.bench``: the same as ``bp-bench``."""

from bp_service.bench.cli import main

raise SystemExit(main())
