"""``python -m bp_service.explain``, the same as ``bp-explain``."""

from bp_service.explain.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
