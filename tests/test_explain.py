"""bp-explain: the worked example's chain-rule products against autograd, and the command line."""

import json
import math
import re
import subprocess
import sys
from itertools import pairwise
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bp_service.explain import cli, deep
from bp_service.explain import model as E

DOUBLE = torch.float64
TOL = 1e-12
REPO = Path(__file__).resolve().parents[1]
PARAMS = [*E.WEIGHT_NAMES, *E.BIAS_NAMES]


def torch_gradients(x, target, weights, biases=None):
    """dC/dparam by plain torch autograd (torch.sigmoid, @): an oracle independent of bp_service."""
    a1 = torch.tensor(x, dtype=DOUBLE)
    W1 = torch.tensor(weights[:6], dtype=DOUBLE).reshape(2, 3).requires_grad_()
    W2 = torch.tensor(weights[6:], dtype=DOUBLE).reshape(1, 2).requires_grad_()
    leaves = [W1, W2]
    b1 = b3 = torch.zeros((), dtype=DOUBLE)
    if biases is not None:
        b1 = torch.tensor(biases[:2], dtype=DOUBLE).requires_grad_()
        b3 = torch.tensor(biases[2:], dtype=DOUBLE).requires_grad_()
        leaves += [b1, b3]
    a3 = torch.sigmoid(W2 @ torch.sigmoid(W1 @ a1 + b1) + b3)
    cost = ((a3 - target) ** 2).sum()
    grads = torch.autograd.grad(cost, leaves)
    return dict(zip(PARAMS, torch.cat([g.flatten() for g in grads]).tolist()))


def assert_chains_match_autograd(report, x, target, weights, biases):
    native = torch_gradients(x, target, weights, biases)
    unfused = E.autograd_gradients(x, target, weights, biases, fused=False)
    assert set(report["gradients"]) == set(native)
    for name, g in report["gradients"].items():
        product = math.prod(f["value"] for f in g["chain"])
        assert product == g["value"]
        for reference in (g["autograd"], unfused[name], native[name]):
            assert abs(product - reference) <= TOL, (name, product, reference)


# --------------------------------------------------------------------------- the default example
# The worked example's numbers, pinned (x = (1, 0.5, -1), y = 1, lr 0.5; the weights of E.DEFAULT_WEIGHTS):
# a2 = sigmoid(z1), z2 = 0 so a3 = 0.5 and C = 0.25 exactly; dC/dw7 = 2 (a3 - y) a3 (1 - a3) a2_1, and so on.
PINNED = {
    "no-bias": {
        "z1": [0.125, 0.125],
        "a2": [0.5312093733737563, 0.5312093733737563],
        "gradients": {
            "w1": -0.031128246876702185, "w2": -0.015564123438351092, "w3": 0.031128246876702185,
            "w4": 0.031128246876702185, "w5": 0.015564123438351092, "w6": -0.031128246876702185,
            "w7": -0.13280234334343907, "w8": -0.13280234334343907,
        },
        "cost_after": 0.23058653244659774,
    },
    "bias": {
        "z1": [0.375, 0.375],
        "a2": [0.5926665999540697, 0.5926665999540697],
        "gradients": {
            "w1": -0.030176612656619053, "w2": -0.015088306328309526, "w3": 0.030176612656619053,
            "w4": 0.030176612656619053, "w5": 0.015088306328309526, "w6": -0.030176612656619053,
            "w7": -0.14816664998851742, "w8": -0.14816664998851742,
            "b1": -0.030176612656619053, "b2": 0.030176612656619053, "b3": -0.25,
        },
        "cost_after": 0.1972022619716219,
    },
}  # fmt: skip


@pytest.mark.parametrize("biases", [None, E.DEFAULT_BIASES], ids=["no-bias", "bias"])
def test_default_example(biases):
    pinned = PINNED["bias" if biases else "no-bias"]
    report = E.explain(E.DEFAULT_X, E.DEFAULT_TARGET, E.DEFAULT_WEIGHTS, biases)
    fwd = report["forward"]
    assert (report["x"], report["target"], report["lr"]) == ([1.0, 0.5, -1.0], 1.0, 0.5)
    assert fwd["z2"] == [0.0] and fwd["a3"] == [0.5] and fwd["cost"] == 0.25  # exactly, as in the walk-through
    assert fwd["z1"] == pinned["z1"]
    assert fwd["a2"] == pytest.approx(pinned["a2"], rel=1e-15)
    gradients = {name: g["value"] for name, g in report["gradients"].items()}
    assert gradients == pytest.approx(pinned["gradients"], rel=1e-14)
    assert report["cost_after"] == pytest.approx(pinned["cost_after"], rel=1e-14)
    updated = {name: w - 0.5 * pinned["gradients"][name] for name, w in report["weights"].items()}
    assert report["updated"] == pytest.approx(updated, rel=1e-14)
    assert_chains_match_autograd(report, E.DEFAULT_X, E.DEFAULT_TARGET, E.DEFAULT_WEIGHTS, biases)


def test_chain_factors_are_the_forward_values():
    """Each factor is the local derivative the text names, read off the forward pass."""
    x, y, w = E.DEFAULT_X, E.DEFAULT_TARGET, E.DEFAULT_WEIGHTS
    report = E.explain(x, y, w, E.DEFAULT_BIASES)
    a2, a3 = report["forward"]["a2"], report["forward"]["a3"][0]

    def chain(name):
        return {f["factor"]: f["value"] for f in report["gradients"][name]["chain"]}

    assert chain("w7") == {"dC/da3": 2 * (a3 - y), "da3/dz2": a3 * (1 - a3), "dz2/dw7": a2[0]}
    assert chain("w1") == {
        "dC/da3": 2 * (a3 - y),
        "da3/dz2": a3 * (1 - a3),
        "dz2/da2_1": w[6],
        "da2_1/dz1_1": a2[0] * (1 - a2[0]),
        "dz1_1/dw1": x[0],
    }
    assert chain("w5") == {
        "dC/da3": 2 * (a3 - y),
        "da3/dz2": a3 * (1 - a3),
        "dz2/da2_2": w[7],
        "da2_2/dz1_2": a2[1] * (1 - a2[1]),
        "dz1_2/dw5": x[1],
    }
    assert list(chain("b1"))[-1] == "dz1_1/db1"
    assert list(chain("b2"))[-1] == "dz1_2/db2"
    assert list(chain("b3")) == ["dC/da3", "da3/dz2", "dz2/db3"]


finite = st.floats(-3.0, 3.0, allow_nan=False)


@settings(max_examples=150, deadline=None)
@given(
    x=st.lists(finite, min_size=3, max_size=3),
    target=st.floats(0.0, 1.0),
    weights=st.lists(st.floats(-4.0, 4.0), min_size=8, max_size=8),
    biases=st.none() | st.lists(finite, min_size=3, max_size=3),
)
def test_chain_products_equal_autograd(x, target, weights, biases):
    lr = 1e-3
    report = E.explain(x, target, weights, biases, lr=lr)
    assert_chains_match_autograd(report, x, target, weights, biases)
    # Downhill for a small step, when the first-order decrease lr |g|^2 clears rounding in C.
    grad_sq = sum(g["value"] ** 2 for g in report["gradients"].values())
    if lr * grad_sq > 1e-9:
        assert report["cost_after"] < report["forward"]["cost"]


def test_train_cost_falls_and_matches_explain():
    rows = E.train(E.DEFAULT_X, E.DEFAULT_TARGET, E.DEFAULT_WEIGHTS, steps=5)
    report = E.explain(E.DEFAULT_X, E.DEFAULT_TARGET, E.DEFAULT_WEIGHTS)
    assert [r["step"] for r in rows] == list(range(6))
    assert rows[0]["cost"] == report["forward"]["cost"]
    assert rows[1]["cost"] == report["cost_after"]
    assert all(a["cost"] > b["cost"] for a, b in pairwise(rows))


# --------------------------------------------------------------------------- command line
def test_text_output(capsys):
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    assert "a3   = 0.5" in out
    for name in E.WEIGHT_NAMES:
        assert f"dC/d{name} =" in out
    assert "dC/da3    * da3/dz2    * dz2/da2_1 * da2_1/dz1_1    * dz1_1/dw1" in out
    assert out.count("autograd:") == 8
    assert "cost C: 0.25 -> " in out


def test_steps_table_strictly_decreasing(capsys):
    assert cli.main(["--steps", "5"]) == 0
    lines = capsys.readouterr().out.splitlines()
    start = lines.index("Training on this one example for 5 steps")
    assert lines[start + 1].split() == ["step", "cost", "a3"]
    rows = [line.split() for line in lines[start + 2 : start + 8]]
    assert [int(r[0]) for r in rows] == list(range(6))
    costs = [float(r[1]) for r in rows]
    assert costs[0] == 0.25
    assert all(a > b for a, b in pairwise(costs))


def check_json(report, bias=False):
    assert list(report) == list(E.REPORT_KEYS)
    assert set(report["forward"]) == {"z1", "a2", "z2", "a3", "cost"}
    names = list(E.WEIGHT_NAMES) + (list(E.BIAS_NAMES) if bias else [])
    for key in ("weights", "gradients", "updated"):
        assert list(report[key]) == names
    factors = {n: [f["factor"] for f in g["chain"]] for n, g in report["gradients"].items()}
    assert factors["w7"] == ["dC/da3", "da3/dz2", "dz2/dw7"]
    assert factors["w1"] == ["dC/da3", "da3/dz2", "dz2/da2_1", "da2_1/dz1_1", "dz1_1/dw1"]
    assert factors["w6"] == ["dC/da3", "da3/dz2", "dz2/da2_2", "da2_2/dz1_2", "dz1_2/dw6"]
    if bias:
        assert factors["b3"] == ["dC/da3", "da3/dz2", "dz2/db3"]
        assert factors["b2"][-1] == "dz1_2/db2"
    for g in report["gradients"].values():
        assert set(g) == {"chain", "value", "autograd"}
        assert abs(g["value"] - g["autograd"]) <= TOL
    assert report["forward"]["a3"] == [0.5]
    assert report["cost_after"] < report["forward"]["cost"]


@pytest.mark.parametrize("bias", [False, True])
def test_json_in_process(capsys, bias):
    assert cli.main(["--json", "--steps", "3"] + (["--bias"] if bias else [])) == 0
    captured = capsys.readouterr()
    check_json(json.loads(captured.out), bias)
    assert captured.err == ""


def test_json_subprocess():
    run = subprocess.run(
        [sys.executable, "-m", "bp_service.explain", "--json"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    check_json(json.loads(run.stdout))


def test_plot_writes_png(tmp_path, capsys):
    path = tmp_path / "network.png"
    assert cli.main(["--bias", "--plot", str(path)]) == 0
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 10_000
    assert str(path) in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--x", "1", "2"], "--x"),
        (["--weights", "1", "2", "3"], "--weights"),
        (["--x", "a", "b", "c"], "--x"),
        (["--lr", "0"], "--lr"),
        (["--lr", "-1"], "--lr"),
        (["--lr", "nan"], "--lr"),
        (["--target", "inf"], "--target"),
        (["--target", "1e200"], "--target"),  # finite, but C = (a3 - y)^2 overflows
        (["--sizes", "2", "1", "--target", "1e200"], "--target"),
        (["--weights", "1", "1", "1", "1", "1", "1", "1", "nan"], "--weights"),
        (["--steps", "0"], "--steps"),
        (["--biases", "1"], "--biases"),
        (["--plot", "network.svg"], "--plot"),
        (["--sizes", "3", "4", "1", "--weights", *"12345678"], "--weights"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(capsys, argv, flag):
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("bp-explain: error: ")
    assert captured.err.count("\n") == 1 and captured.err.endswith("\n")
    assert flag in captured.err


def test_bad_input_message_wording(capsys):
    cli.main(["--weights", "1", "2", "3"])
    assert capsys.readouterr().err == "bp-explain: error: --weights takes 8 numbers (w1..w8), got 3\n"


def test_bad_input_subprocess_has_no_traceback():
    run = subprocess.run(
        [sys.executable, "-m", "bp_service.explain", "--x", "a", "b", "c"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2
    assert run.stdout == ""
    assert run.stderr == "bp-explain: error: argument --x: 'a' is not a number\n"


def test_help_exits_0(capsys):
    assert cli.main(["--help"]) == 0
    assert "--sizes" in capsys.readouterr().out


# --------------------------------------------------------------------------- deeper networks
def test_multiplication_counts_of_the_worked_example():
    # 8 chains: 2 of 3 factors (2 multiplications each) + 6 of 5 factors (4 each) = 28.
    assert deep.naive_multiplications([3, 2, 1]) == 28
    # delta_2: 1, delta_1: 2 (W2^T delta_2) + 2 (* sigmoid'), dC/dW2: 2, dC/dW1: 6 = 13.
    assert deep.backprop_multiplications([3, 2, 1]) == 13


@pytest.mark.parametrize(("sizes", "seed", "bias"), [([3, 4, 4, 1], 0, False), ([2, 3, 3, 2], 1, True)])
def test_deltas_match_autograd(sizes, seed, bias):
    report = deep.explain_deep(sizes, seed=seed, bias=bias)
    # The report's own check, through bp_service's Functions ...
    for layer in report["layers"]:
        assert layer["max_abs_diff"] <= TOL
        assert layer["naive_max_abs_diff"] <= TOL
    # ... and an independent one with plain torch on the same weights.
    Ws = [torch.tensor(W, dtype=DOUBLE, requires_grad=True) for W in report["weights"]]
    bs = [torch.tensor(b, dtype=DOUBLE, requires_grad=True) for b in report["biases"]] if bias else []
    a = torch.tensor(report["x"], dtype=DOUBLE)
    for i, W in enumerate(Ws):
        a = torch.sigmoid(W @ a + (bs[i] if bias else 0))
    cost = ((a - report["target"]) ** 2).sum()
    assert abs(cost.item() - report["cost"]) <= TOL
    grads = torch.autograd.grad(cost, Ws + bs)
    for layer, g in zip(report["layers"], grads):
        assert torch.allclose(torch.tensor(layer["grad_W"], dtype=DOUBLE), g, rtol=0, atol=TOL)
    for layer, g in zip(report["layers"], grads[len(Ws) :]):
        assert torch.allclose(torch.tensor(layer["delta"], dtype=DOUBLE), g, rtol=0, atol=TOL)
    counts = report["multiplications"]
    assert counts["naive_counted"] == counts["naive"] == deep.naive_multiplications(sizes, bias)
    assert counts["backprop"] < counts["naive"]
    assert report["cost_after"] < report["cost"]


def test_sizes_command(capsys):
    assert cli.main(["--sizes", "3", "4", "4", "1", "--seed", "0"]) == 0
    out = capsys.readouterr().out
    assert "3-4-4-1" in out
    assert "delta_l = (W_{l+1}^T delta_{l+1}) * a_l(1 - a_l)" in out
    assert "naive, every parameter's chain multiplied out over every path: 360   (counted by doing it: 360)" in out
    (backprop_line,) = [line for line in out.splitlines() if "backprop, reusing the deltas:" in line]
    assert backprop_line.split()[-1] == "61"

    assert cli.main(["--sizes", "3", "4", "4", "1", "--seed", "0", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["multiplications"] == {"naive": 360, "backprop": 61, "naive_counted": 360}
    assert all(layer["max_abs_diff"] <= TOL for layer in report["layers"])


# --------------------------------------------------------------------------- the package's shape
def test_imports_only_the_core_and_matplotlib_only_for_plot():
    """bp-explain is a tool on the core: it never loads the training service, serving or another
    tool, and the text report never loads matplotlib (checked in a fresh interpreter)."""
    code = (
        "import sys, io, contextlib\n"
        "from bp_service.explain import cli\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    assert cli.main(['--bias', '--steps', '2']) == 0\n"
        "    assert cli.main(['--sizes', '3', '4', '1', '--json']) == 0\n"
        "print('matplotlib' in sys.modules)\n"
        "print(' '.join(sorted(m for m in sys.modules if m.startswith('bp_service'))))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    matplotlib_loaded, modules = run.stdout.splitlines()
    assert matplotlib_loaded == "False"
    core = {"bp_service", "bp_service.functions", "bp_service.layers", "bp_service.gradcheck"}
    core |= {"bp_service.activations", "bp_service.dispatch"}
    shared = {"bp_service.commands"}  # one-line errors and text columns, stdlib only
    outside = [m for m in modules.split() if m not in core | shared and not m.startswith("bp_service.explain")]
    assert outside == []
    assert "bp_service.explain.cli" in modules.split()


# --------------------------------------------------------------------------- negative numbers, -0, the verdict
NEGATIVE_ZERO = re.compile(r"(?<![\w.])-0(?![\d.e])")  # "-0" as a number of its own, not in -0.125 or 1e-05


def _verdict(out: str) -> str:
    (line,) = [line for line in out.splitlines() if line.startswith("  cost C: ")]
    return line


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--lr", "-1e6"], "--lr must be > 0, got -1e+06"),
        (["--lr", "-inf"], "argument --lr: '-inf' is not a finite number"),
        (["--target", "-1e400"], "argument --target: '-1e400' is not a finite number"),
    ],
)
def test_a_negative_number_in_any_form_reaches_the_flags_own_check(cli, args, message):
    run = cli("bp-explain", *args)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr == f"bp-explain: error: {message}\n"


def test_negative_inputs_in_exponent_form_are_taken_as_numbers(cli):
    run = cli(
        "bp-explain", "--x", "-1e3", "-.5", "-2E-1", "--target", "-0.5e0", "--bias", "--biases", "-1e-2", "0", "-1"
    )
    assert run.returncode == 0, run.stderr
    assert "x = (-1000, -0.5, -0.2)   target y = -0.5   lr = 0.5" in run.stdout
    assert "b1=-0.01 b2=0 b3=-1" in run.stdout


def test_zero_is_never_printed_as_minus_zero(cli):
    run = cli("bp-explain", "--weights", *"00000000")  # w7 = w8 = 0: the hidden gradients are -0.0 products
    assert run.returncode == 0, run.stderr
    assert NEGATIVE_ZERO.findall(run.stdout) == [], run.stdout
    assert "  w1      0        0        0" in run.stdout
    # a saturated output: delta_L = 2(a_L - y) * a_L(1 - a_L) = -2 * 0.0 = -0.0
    deep_run = cli("bp-explain", "--sizes", "2", "1", "--x", "1000", "1000", "--target", "2")
    assert deep_run.returncode == 0 and NEGATIVE_ZERO.findall(deep_run.stdout) == [], deep_run.stdout


def test_a_saturated_network_is_not_told_to_lower_the_learning_rate(cli):
    # z2 = 200: a3 is 1.0 in float64, so a3(1 - a3) = 0 and every gradient is 0; no step size changes that.
    run = cli("bp-explain", "--weights", *["100"] * 8, "--x", "10", "10", "10", "--target", "0")
    assert run.returncode == 0, run.stderr
    verdict = _verdict(run.stdout)
    assert verdict.startswith("  cost C: 1 -> 1   (unchanged: "), verdict
    assert "saturated" in verdict and "a3(1 - a3) = 0" in verdict and "smaller --lr" not in verdict


def test_a_cost_already_zero_is_said_so(cli):
    run = cli("bp-explain", "--target", "0.5")  # the default network answers a3 = 0.5 exactly
    assert run.returncode == 0, run.stderr
    assert _verdict(run.stdout) == "  cost C: 0 -> 0   (already 0: a3 equals the target, nothing to learn)"


def test_an_overshooting_step_still_advises_a_smaller_learning_rate(cli):
    run = cli("bp-explain", "--x", "1", "1", "1", "--target", "0.5", "--lr", "30")  # cost 0.00027 -> 0.0022
    assert run.returncode == 0, run.stderr
    assert _verdict(run.stdout).endswith("(NOT lower: the step overshot: try a smaller --lr)")
