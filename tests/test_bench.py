"""bp-bench: the harness, the FLOP count and the memory measurement. Never a timing assertion."""

import json
import math

import pytest
import torch

from bp_service import MLP
from bp_service import functions as F
from bp_service.bench import cli, flops, harness, items, memory, steps


def _check_rows(rows):
    for row in rows:
        assert {"item", "name", "ours", "peer", "ratio", "target", "cmp", "met", "unit"} <= row.keys()
        assert isinstance(row["ours"], float) and row["ours"] > 0, row
        assert isinstance(row["peer"], float) and row["peer"] > 0, row
        assert isinstance(row["ratio"], float) and row["ratio"] > 0, row
        assert isinstance(row["target"], float)
        assert row["cmp"] in ("<=", ">=") and isinstance(row["met"], bool), row


def test_quick_run_writes_every_row(tmp_path, capsys):
    out = tmp_path / "b.json"
    assert cli.main(["--quick", "--items", "1,2,3", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = report["rows"]
    _check_rows(rows)
    assert {"1", "1l", "2", "2l", "3"} <= {r["item"] for r in rows}
    # Item 1 and 2 run at every shape users train (issue 11), each with its own target.
    step_rows = {(tuple(r["details"]["sizes"]), r["details"]["batch"]): r for r in rows if r["item"] == "1"}
    assert set(step_rows) == {(sizes, batch) for _, sizes, batch, _, _ in steps.SHAPES}
    assert step_rows[((3, 2, 1), 1)]["target"] == 1.0 and step_rows[(steps.SIZES, steps.BATCH)]["target"] == 1.02
    assert {r["target"] for r in rows if r["item"] == "2"} == {items.MEMORY_TARGET}
    assert report["meta"]["threads"] == torch.get_num_threads()
    assert report["meta"]["quick"] is True
    roofline = next(r for r in rows if r["item"] == "3")
    assert roofline["details"]["step_flops"] == flops.mlp_step_flops(steps.SIZES, steps.BATCH)
    assert roofline["details"]["step_flops_counted_by_torch"] == roofline["details"]["step_flops"]
    table = capsys.readouterr().out
    assert f"threads: {torch.get_num_threads()}" in table
    assert all(r["name"] in table for r in rows)


@pytest.mark.slow
def test_quick_run_with_compile_adds_its_row(tmp_path):
    out = tmp_path / "b.json"
    assert cli.main(["--quick", "--compile", "--items", "1", "--reps", "3", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    _check_rows(rows)
    assert [r["item"] for r in rows] == ["1", "1l", "1c"] * len(steps.SHAPES)


def test_a_new_item_is_one_entry(tmp_path, monkeypatch, capsys):
    """Items 4 and 5 will plug in the same way: a function returning make_row rows, one line in ITEMS."""

    def item_fake(cfg):
        return [harness.make_row("9", "fake", 2.0, 4.0, target=1.0, cmp="<=", unit="s", reps=cfg.reps)]

    monkeypatch.setitem(cli.ITEMS, "9", ("a fake item", item_fake))
    out = tmp_path / "b.json"
    assert cli.main(["--items", "9", "--reps", "3", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    _check_rows([row])
    assert (row["item"], row["ratio"], row["met"], row["details"]["reps"]) == ("9", 0.5, True, 3)
    assert "fake" in capsys.readouterr().out


def test_unknown_item_is_a_usage_error():
    with pytest.raises(SystemExit):
        cli.main(["--items", "1,42"])


def test_make_row_ratio_and_direction():
    lower = harness.make_row("x", "x", 3.0, 2.0, target=1.0, cmp="<=", unit="s")
    higher = harness.make_row("x", "x", 3.0, 2.0, target=0.75, cmp=">=", unit="FLOP/s")
    assert (lower["ratio"], lower["met"], higher["met"]) == (1.5, False, True)
    with pytest.raises(ValueError, match="cmp"):
        harness.make_row("x", "x", 1.0, 1.0, target=1.0, cmp="<", unit="s")


def test_make_row_met_flips_exactly_at_the_target():
    """ours 3 / peer 4 is 0.75 exactly: a target of 0.75 is met either way, one float step past it is not."""
    below, above = math.nextafter(0.75, 0.0), math.nextafter(0.75, 1.0)

    def row(target, cmp):
        return harness.make_row("x", "x", 3.0, 4.0, target=target, cmp=cmp, unit="s")

    assert row(0.75, "<=")["ratio"] == 0.75
    assert [row(t, "<=")["met"] for t in (below, 0.75, above)] == [False, True, True]
    assert [row(t, ">=")["met"] for t in (below, 0.75, above)] == [True, True, False]
    assert harness.make_row("x", "x", 1.0, 8.0, target=0.2, cmp="<=", unit="B")["ratio"] == 0.125


def test_round_robin_rotates_the_order():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "AB"}
    samples = harness.time_round_robin(fns, reps=4, warmup=0)
    assert calls == list("ABBAABBA")
    assert {k: len(v) for k, v in samples.items()} == {"A": 4, "B": 4}


# --------------------------------------------------------------------------- FLOPs
def test_flop_count_is_the_exact_formula():
    # P = 3*2 + 2*1 = 8 weights, N = 4: forward 2NP = 64; backward 4NP = 128 minus the first
    # layer's input gradient 2*N*3*2 = 48, so 80; 144 in all.
    assert flops.mlp_step_flops((3, 2, 1), batch=4) == 144
    assert flops.mlp_step_flops((3, 2, 1), batch=4, input_grad=True) == 192
    p = 784 * 1024 + 1024 * 1024 + 1024 * 10
    assert flops.mlp_step_flops(steps.SIZES, 512) == 2 * 512 * p + 4 * 512 * p - 2 * 512 * 784 * 1024


@pytest.mark.parametrize("input_grad", [False, True])
def test_flop_count_matches_torch_flop_counter(input_grad):
    """What torch.utils.flop_counter sees the cost step (bp-train's path) run equals the formula."""
    torch.manual_seed(0)
    sizes, batch = (7, 5, 4, 3), 6
    model = MLP(sizes)
    x, target = torch.rand(batch, sizes[0], requires_grad=input_grad), torch.rand(batch, sizes[-1])
    step = steps.CostStep(model, x, target)
    assert flops.counted_step_flops(step) == flops.mlp_step_flops(sizes, batch, input_grad=input_grad)


# --------------------------------------------------------------------------- memory
N_FLOATS = 1 << 18  # 1 MiB of float32


def _work():
    a = torch.ones(4096)
    return (a * 2).sum()


def test_peak_memory_counts_a_known_extra_tensor():
    def step():
        return _work()

    def step_with_extra():
        extra = torch.empty(N_FLOATS)  # held while _work allocates
        _work()
        return extra

    base = memory.peak_memory_bytes(step)
    more = memory.peak_memory_bytes(step_with_extra)
    assert base > 0
    assert more - base == N_FLOATS * 4


def test_peak_memory_counts_frees_of_the_previous_call():
    """A step that frees last call's state before a transient: the peak is net of that free (priming works)."""

    class Step:
        state = None

        def __call__(self):
            self.state = None  # frees N floats made by the previous call
            transient = torch.empty(2 * N_FLOATS)
            del transient
            self.state = torch.empty(N_FLOATS)

    assert memory.peak_memory_bytes(Step()) == N_FLOATS * 4


def test_peak_memory_of_a_training_step_grows_with_an_extra_tensor():
    torch.manual_seed(0)
    x, target = torch.rand(32, 20), torch.rand(32, 3)
    kept = []

    def loss_with_extra(pred, t):
        kept.append(torch.empty(N_FLOATS))  # alive until the step returns
        return F.mse_loss(pred, t)

    plain = steps.TrainStep(MLP([20, 16, 3]), F.mse_loss, x, target)
    heavy = steps.TrainStep(MLP([20, 16, 3]), loss_with_extra, x, target)

    def heavy_step():
        heavy()
        kept.clear()

    assert memory.peak_memory_bytes(heavy_step) - memory.peak_memory_bytes(plain) == N_FLOATS * 4


def test_state_bytes_counts_weights_gradients_and_batch():
    model = MLP([4, 3, 2])
    x, target = torch.rand(5, 4), torch.rand(5, 2)
    step = steps.TrainStep(model, F.mse_loss, x, target)
    n_params = 4 * 3 + 3 + 3 * 2 + 2
    assert step.state_bytes() == 4 * (n_params + x.numel() + target.numel())
    step()
    assert step.state_bytes() == 4 * (2 * n_params + x.numel() + target.numel())


@pytest.mark.gpu
def test_quick_run_on_cuda(tmp_path):
    out = tmp_path / "b.json"
    assert cli.main(["--quick", "--device", "cuda", "--items", "1,2,3", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    _check_rows(rows)
    assert {r["details"]["dtype"] for r in rows} == {"float32", "bfloat16"}


@pytest.mark.slow
def test_quick_run_of_the_job_items(tmp_path):
    """Items 4 and 5 start Trainers and whole processes: their harness, not their speed."""
    out = tmp_path / "jobs.json"
    assert cli.main(["--quick", "--items", "4,5", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["item"] for r in rows] == ["4", "4", "5"]
    for row in rows:
        assert row["ours"] > 0 and row["peer"] > 0
        assert row["ratio"] == pytest.approx(row["ours"] / row["peer"], rel=1e-12)
    peer_job = rows[-1]["details"]
    assert 0 < peer_job["ours_test_acc"] <= 1 and 0.9 < peer_job["peer_test_acc"] <= 1  # quick: 5 epochs only
    assert rows[-1]["met"] == (rows[-1]["ratio"] <= 1.0 and peer_job["ours_test_acc"] >= 0.97)


def test_tracking_overhead_row_is_met_at_one_second_and_not_above():
    from bp_service.bench import overhead

    met = overhead.overhead_row(tracked=[11.0, 12.0, 10.5], untracked=[10.0, 11.0, 9.5])  # +1.0 s each
    assert (met["item"], met["met"], met["details"]["overhead_s"]) == ("6", True, 1.0)
    assert met["peer"] == 11.0 and met["ours"] == 11.0  # median untracked + budget; median untracked + overhead
    over = overhead.overhead_row(tracked=[11.2, 12.3, 10.6], untracked=[10.0, 11.0, 9.5])
    assert over["met"] is False and over["details"]["overhead_s"] == pytest.approx(1.2)
    # the overhead is paired per round: a slower machine in one round does not count as tracking cost
    noisy = overhead.overhead_row(tracked=[10.5, 30.5, 10.5], untracked=[10.0, 30.0, 10.0])
    assert noisy["met"] is True and noisy["details"]["overhead_s"] == pytest.approx(0.5)
    assert "6" in cli.ITEMS


@pytest.mark.slow
def test_tracking_overhead_item_runs_both_sides(tmp_path):
    out = tmp_path / "b.json"
    assert cli.main(["--quick", "--items", "6", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    _check_rows([row])
    details = row["details"]
    assert row["item"] == "6" and details["reps"] == 1 and details["budget_s"] == 1.0
    assert row["met"] == (details["overhead_s"] <= 1.0)
    assert all(t > 0 for t in details["tracked_s"] + details["untracked_s"])
