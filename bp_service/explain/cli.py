"""``bp-explain``'s command line: flags, their checks, and which report is printed how."""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from bp_service.explain.deep import explain_deep
from bp_service.explain.model import (
    DEFAULT_BIASES,
    DEFAULT_LR,
    DEFAULT_TARGET,
    DEFAULT_WEIGHTS,
    DEFAULT_X,
    explain,
    train,
)
from bp_service.explain.render import num, render_deep_text, render_json, render_text

MAX_STEPS = 10_000
MAX_WIDTH, MAX_LAYERS = 1024, 12  # --sizes: as many widths (layers + 1) and as wide as this
OVERFLOW_EXAMPLE = "the numbers overflow float64; try smaller --weights, --x, --target or --lr"
OVERFLOW_DEEP = "the numbers overflow float64; try smaller --x, --target or --lr"


# Every negative number float() reads. argparse's own pattern (Python 3.11) knows only -1 and -1.5: it took
# -1e6, -.5e-3 or -inf for an unknown option, and "--lr -1e6" failed as "expected one argument".
NEGATIVE_NUMBER = re.compile(
    r"^-(?:(?:\d[\d_]*(?:\.[\d_]*)?|\.\d[\d_]*)(?:[eE][+-]?\d[\d_]*)?|inf|infinity|nan)$", re.IGNORECASE
)


class _Parser(argparse.ArgumentParser):
    """argparse, but an error is one line on stderr (no usage block) and exit status 2, and a negative
    number in any form float() reads is a value, never an option (no flag of ours looks like a number)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = NEGATIVE_NUMBER

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _finite(text: str) -> float:
    """argparse type: a finite float, with a message argparse prefixes with the flag's name."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _build_parser() -> _Parser:
    p = _Parser(
        prog="bp-explain",
        description="Backpropagation on the 3-2-1 sigmoid network of the walk-through, written out "
        "factor by factor and checked against autograd.",
    )

    def default(values: Sequence[float]) -> str:
        return " ".join(map(num, values))

    p.add_argument("--x", nargs="+", type=_finite, metavar="X", help=f"x1 x2 x3 (default: {default(DEFAULT_X)})")
    p.add_argument("--target", type=_finite, default=DEFAULT_TARGET, metavar="Y", help="desired output (default 1)")
    weights_help = f"w1..w8 (default: {default(DEFAULT_WEIGHTS)})"
    biases_help = f"b1 b2 b3, implies --bias (default: {default(DEFAULT_BIASES)})"
    p.add_argument("--weights", nargs="+", type=_finite, metavar="W", help=weights_help)
    p.add_argument("--bias", action="store_true", help="add biases b1 b2 (hidden) and b3 (output)")
    p.add_argument("--biases", nargs="+", type=_finite, metavar="B", help=biases_help)
    p.add_argument("--lr", type=_finite, default=DEFAULT_LR, help=f"learning rate, > 0 (default {DEFAULT_LR})")
    p.add_argument("--steps", type=int, metavar="N", help="also train N steps and show the cost falling")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--plot", metavar="FILE.png", help="draw the network, edges labelled with weight and gradient")
    p.add_argument("--sizes", nargs="+", type=int, metavar="N", help="a deeper sigmoid network instead, e.g. 3 4 4 1")
    p.add_argument("--seed", type=int, help="seed of the random weights for --sizes (default 0)")
    return p


def _validate_common(p: _Parser, args: argparse.Namespace) -> None:
    """Checks argparse cannot express, for either network; each failure is one line naming the flag."""
    n_in = args.sizes[0] if args.sizes else 3
    if args.x is not None and len(args.x) != n_in:
        what = "x1, x2, x3" if not args.sizes else "the first of --sizes"
        p.error(f"--x takes {n_in} numbers ({what}), got {len(args.x)}")
    if args.weights is not None and len(args.weights) != 8:
        p.error(f"--weights takes 8 numbers (w1..w8), got {len(args.weights)}")
    if args.biases is not None and len(args.biases) != 3:
        p.error(f"--biases takes 3 numbers (b1, b2, b3), got {len(args.biases)}")
    if args.lr <= 0:
        p.error(f"--lr must be > 0, got {num(args.lr)}")
    if args.steps is not None and args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    if args.steps is not None and args.steps > MAX_STEPS:
        p.error(f"--steps must be <= {MAX_STEPS}, got {args.steps}")
    if args.plot is not None and not args.plot.lower().endswith(".png"):
        p.error(f"--plot writes a PNG: give a file name ending in .png, got {args.plot!r}")


def _validate_sizes(p: _Parser, args: argparse.Namespace) -> None:
    """Checks of --sizes and --seed, and of the flags that belong to the 3-2-1 example only."""
    if args.seed is not None and not 0 <= args.seed < 2**63:
        p.error(f"--seed must be from 0 to 2**63 - 1, got {args.seed}")
    sizes = args.sizes
    if len(sizes) < 2 or min(sizes) < 1 or max(sizes) > MAX_WIDTH or len(sizes) > MAX_LAYERS:
        p.error(
            f"--sizes takes 2 to {MAX_LAYERS} widths from 1 to {MAX_WIDTH}, input first and output last, got {sizes}"
        )
    for flag, value in (("--weights", args.weights), ("--biases", args.biases), ("--plot", args.plot)):
        if value is not None:
            p.error(f"{flag} applies to the 3-2-1 example only, not with --sizes")
    if args.steps is not None:
        p.error("--steps applies to the 3-2-1 example only, not with --sizes")


def _validate(p: _Parser, args: argparse.Namespace) -> None:
    _validate_common(p, args)
    if args.sizes is not None:
        _validate_sizes(p, args)
    elif args.seed is not None:
        p.error("--seed only applies with --sizes")


def _fail(message: str) -> int:
    sys.stderr.write(f"bp-explain: error: {message}\n")
    return 2


def _all_finite(obj: Any) -> bool:
    """True when every number in a nested dict/list is finite (JSON has no NaN or inf)."""
    if isinstance(obj, dict):
        return all(_all_finite(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return all(_all_finite(v) for v in obj)
    if isinstance(obj, float):
        return math.isfinite(obj)
    return True


def _run_deep(args: argparse.Namespace) -> int:
    seed = 0 if args.seed is None else args.seed
    report = explain_deep(args.sizes, seed, args.x, args.target, args.bias, args.lr)
    if not _all_finite(report):
        return _fail(OVERFLOW_DEEP)
    sys.stdout.write(render_json(report) if args.json else render_deep_text(report))
    return 0


def _run_example(args: argparse.Namespace) -> int:
    x = DEFAULT_X if args.x is None else args.x
    weights = DEFAULT_WEIGHTS if args.weights is None else args.weights
    biases = args.biases if args.biases is not None else (DEFAULT_BIASES if args.bias else None)
    try:
        report = explain(x, args.target, weights, biases, args.lr)
        # The JSON keys are fixed, so --steps only adds the text table.
        steps = train(x, args.target, weights, biases, args.lr, args.steps) if args.steps and not args.json else None
    except OverflowError:  # float ** 2 raises where float * float gives inf, e.g. C = (a3 - y)^2 for y = 1e200
        return _fail(OVERFLOW_EXAMPLE)
    if not (_all_finite(report) and _all_finite(steps)):
        return _fail(OVERFLOW_EXAMPLE)
    if args.plot:
        from bp_service.explain.plot import plot_network  # matplotlib only when a picture is asked for

        try:
            plot_network(report, args.plot)
        except OSError as exc:
            return _fail(f"--plot: cannot write {args.plot!r}: {exc.strerror or exc}")
    if args.json:
        sys.stdout.write(render_json(report))
    else:
        sys.stdout.write(render_text(report, steps))
        if args.plot:
            sys.stdout.write(f"\nNetwork drawn to {args.plot}\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``bp-explain``; returns the exit status (0, or 2 for bad input)."""
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
        _validate(parser, args)
    except SystemExit as exit_:  # argparse exits for --help (0) and bad input (2): return it instead
        return int(exit_.code or 0)
    return _run_deep(args) if args.sizes else _run_example(args)


if __name__ == "__main__":
    raise SystemExit(main())
