"""bp-bench: the harness, the FLOP count and the memory measurement. Never a timing assertion."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from bp_service import MLP
from bp_service import functions as F
from bp_service.bench import cli, flops, harness, memory, steps, training_step


def _check_rows(rows):
    for row in rows:
        assert {"item", "name", "ours", "peer", "ratio", "target", "cmp", "met", "unit"} <= row.keys()
        if row["details"].get("unmeasured") or row["details"].get("skipped"):  # said so, and never met
            assert row["met"] is False and row["ratio"] != row["ratio"], row  # NaN
            continue
        assert isinstance(row["ours"], float) and row["ours"] > 0, row
        assert isinstance(row["peer"], float) and row["peer"] > 0, row
        assert isinstance(row["ratio"], float) and row["ratio"] > 0, row
        assert isinstance(row["target"], float)
        assert row["cmp"] in ("<=", ">=") and isinstance(row["met"], bool), row


def test_a_timing_at_or_below_zero_is_unmeasured_never_met():
    row = harness.make_row("lightning-overhead", "epoch time", -0.01, 0.03, target=1.3, cmp="<=", unit="s")
    assert row["met"] is False and row["ratio"] != row["ratio"] and "unmeasured" in row["details"]
    row = harness.make_row("lightning-overhead", "epoch time", 0.02, 0.03, target=1.3, cmp="<=", unit="s")
    assert row["met"] is True and "unmeasured" not in row["details"]


def test_quick_run_writes_every_row(tmp_path, capsys):
    out = tmp_path / "b.json"
    assert cli.main(["--quick", "--items", "step-time,peak-memory,roofline", "--reps", "3", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = report["rows"]
    _check_rows(rows)
    assert {r["item"] for r in rows} == {
        "step-time",
        "step-time-layers",
        "peak-memory",
        "peak-memory-layers",
        "roofline",
        "step-time-cross-entropy",
        "peak-memory-cross-entropy",
    }
    # The classification default against F.cross_entropy (class indices), at the digits job's shape, within 5%.
    for item in ("step-time-cross-entropy", "peak-memory-cross-entropy"):
        (row,) = [r for r in rows if r["item"] == item]
        assert row["peer_label"] == "nn.Linear+torch.sigmoid+F.cross_entropy" and row["target"] == 1.05
        assert (tuple(row["details"]["sizes"]), row["details"]["batch"]) == ((64, 64, 10), 64)
    # Step time and peak memory run at every shape users train, each with its own target.
    step_rows = {(tuple(r["details"]["sizes"]), r["details"]["batch"]): r for r in rows if r["item"] == "step-time"}
    assert set(step_rows) == {(sizes, batch) for _, sizes, batch, _, _ in steps.SHAPES}
    assert step_rows[((3, 2, 1), 1)]["target"] == 1.0 and step_rows[(steps.SIZES, steps.BATCH)]["target"] == 1.02
    assert {r["target"] for r in rows if r["item"] == "peak-memory"} == {training_step.MEMORY_TARGET}
    assert report["meta"]["threads"] == torch.get_num_threads()
    assert report["meta"]["quick"] is True
    roofline = next(r for r in rows if r["item"] == "roofline")
    assert roofline["details"]["step_flops"] == flops.mlp_step_flops(steps.SIZES, steps.BATCH)
    assert roofline["details"]["step_flops_counted_by_torch"] == roofline["details"]["step_flops"]
    table = capsys.readouterr().out
    assert f"threads: {torch.get_num_threads()}" in table
    assert all(r["name"] in table for r in rows)


@pytest.mark.slow
def test_quick_run_with_compile_adds_its_rows(tmp_path):
    out = tmp_path / "b.json"
    assert cli.main(["--quick", "--compile", "--items", "step-time", "--reps", "3", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    _check_rows(rows)
    per_shape = ["step-time", "step-time-layers", "step-time-compiled", "step-time-compiled-vs-compiled"]
    assert [r["item"] for r in rows] == [*per_shape * len(steps.SHAPES), "step-time-cross-entropy"]
    # model.compile=true against native eager, and against native compiled the same way
    both = [r for r in rows if r["item"] == "step-time-compiled-vs-compiled"]
    assert {r["peer_label"] for r in both} == {steps.SIDES["native_compiled"]}
    assert all(steps.SIDES["native_compiled"] in r["name"] for r in both)


def test_a_new_item_is_one_entry(tmp_path, monkeypatch, capsys):
    """An item plugs in as one line in ITEMS: a function returning make_row rows."""

    def item_fake(cfg):
        return [harness.make_row("fake", "fake", 2.0, 4.0, target=1.0, cmp="<=", unit="s", reps=cfg.reps)]

    monkeypatch.setitem(cli.ITEMS, "fake", ("a fake item", item_fake))
    out = tmp_path / "b.json"
    assert cli.main(["--items", "fake", "--reps", "3", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    _check_rows([row])
    assert (row["item"], row["ratio"], row["met"], row["details"]["reps"]) == ("fake", 0.5, True, 3)
    assert "fake" in capsys.readouterr().out


def test_items_are_named_by_topic_and_the_old_numbers_still_select_them(capsys):
    names = ["step-time", "peak-memory", "roofline", "lightning-overhead", "peer-job", "tracking-overhead"]
    assert list(cli.ITEMS) == names
    assert cli.build_parser().parse_args(["--items", "1,2,3,4,5,6"]).items == names
    assert cli.build_parser().parse_args(["--items", "roofline, 1"]).items == ["roofline", "step-time"]
    assert cli.build_parser().parse_args(["--items", "6,tracking-overhead"]).items == ["tracking-overhead"]
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert all(f"{name}: " in help_text for name in names)
    assert "item 1" not in help_text and "1: training step" not in help_text


@pytest.mark.parametrize("items", ["1,42", "step-time,step-tim", ""])
def test_unknown_item_is_a_usage_error(items, capsys):
    with pytest.raises(SystemExit) as stopped:
        cli.main(["--items", items])
    assert stopped.value.code == 2  # argparse's usage error, before anything is measured
    err = capsys.readouterr().err
    assert err.startswith("usage: bp-bench")
    assert "choose from step-time, peak-memory, roofline, lightning-overhead, peer-job, tracking-overhead" in err


def test_unmeasured_and_skipped_rows_say_so_in_the_table_never_a_number_or_met():
    """A negative difference of medians (a busy machine) and an item --quick leaves out: the ratio and met
    columns say which, in every row type (a plain ratio, a ratio of differences, a skipped item)."""
    from bp_service.bench.report import format_table

    unmeasured = harness.make_row("lightning-overhead", "epoch", -0.292, 0.206, target=1.3, cmp="<=", unit="s")
    ratio_of_zero = harness.make_row("roofline", "flops", 1.0, 0.0, target=0.75, cmp=">=", unit="FLOP/s")
    skipped = harness.skipped_row("tracking-overhead", "tracking", "whole processes", target=1.0)
    measured = harness.make_row("step-time", "step", 2.0, 4.0, target=1.0, cmp="<=", unit="s")
    lines = [line.split() for line in format_table([unmeasured, ratio_of_zero, skipped, measured]).splitlines()[2:]]
    assert lines[0][-5:] == ["unmeasured", "<=", "1.30", "no", "(unmeasured)"]
    assert lines[1][-5:] == ["unmeasured", ">=", "0.75", "no", "(unmeasured)"]
    assert lines[2][-6:] == ["-", "-", "skipped", "<=", "1.00", "skipped"]
    assert lines[3][-3:] == ["<=", "1.00", "yes"] and lines[3][-4] == "0.500"
    _check_rows([unmeasured, ratio_of_zero, skipped, measured])


def test_quick_lists_tracking_overhead_as_skipped_without_starting_a_process(tmp_path, monkeypatch, capsys):
    from bp_service.bench import tracking_overhead

    def no_process(*args, **kwargs):
        raise AssertionError("--quick started a bp-train process")

    monkeypatch.setattr(tracking_overhead, "_wall", no_process)
    out = tmp_path / "b.json"
    assert cli.main(["--quick", "--items", "tracking-overhead", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    _check_rows([row])
    assert row["item"] == "tracking-overhead" and "bp-bench --items tracking-overhead" in row["details"]["skipped"]
    assert row["met"] is False and row["target"] == 1.0
    table = capsys.readouterr().out
    assert "tracking-overhead" in table and "skipped" in table and " yes" not in table


def test_other_load_counts_our_own_child_processes_as_ours():
    """bp-bench's bp-train processes are its own work: their CPU time is not "other processes"."""
    import subprocess

    from bp_service.bench.report import OtherLoad

    before = OtherLoad._sample()
    busy = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.5: pass"
    subprocess.run([sys.executable, "-c", busy], check=True)
    after = OtherLoad._sample()
    assert after[2] - before[2] >= 0.5  # the child's half second of CPU is counted as our own


@pytest.mark.slow  # a bp-bench process: its imports take seconds
def test_bp_bench_prints_no_native_log_noise(tmp_path):
    """The CPU peak-memory item runs torch.profiler: no USDT lines, no CPUAllocator warning on the terminal."""
    import subprocess

    env = {k: v for k, v in __import__("os").environ.items() if k not in ("KINETO_LOG_LEVEL", "TORCH_CPP_LOG_LEVEL")}
    run = subprocess.run(
        [str(Path(sys.executable).parent / "bp-bench"), "--quick", "--items", "peak-memory"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "peak-memory" in run.stdout
    assert "USDT" not in run.stderr and "CPUAllocator" not in run.stderr, run.stderr[-2000:]


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
    assert (
        cli.main(["--quick", "--device", "cuda", "--items", "step-time,peak-memory,roofline", "--json", str(out)]) == 0
    )
    rows = json.loads(out.read_text())["rows"]
    _check_rows(rows)
    assert {r["details"]["dtype"] for r in rows} == {"float32", "bfloat16"}


@pytest.mark.slow
def test_quick_run_of_the_job_items(tmp_path):
    """The Lightning overhead and the peer job start Trainers and whole processes: their harness, not their speed."""
    out = tmp_path / "jobs.json"
    assert cli.main(["--quick", "--items", "lightning-overhead,peer-job", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    _check_rows(rows)
    assert [r["item"] for r in rows] == ["lightning-overhead"] * 4 + ["lightning-floor", "peer-job"]
    # Digits, then a 6,366-row CSV: one optimizer step per Lightning step, then as shipped (auto: a whole epoch,
    # digits' 20 batches of 64 of its 1257 training rows, the CSV's 140 of 32 of its 4456).
    assert "steps_per_execution=1)" in rows[0]["name"] and "digits b64" in rows[0]["name"]
    assert "steps_per_execution=auto (as shipped))" in rows[1]["name"] and "digits b64" in rows[1]["name"]
    assert all("own CSV 6366 rows b32" in r["name"] for r in rows[2:4])
    assert [r["details"]["steps_per_epoch"] for r in rows[:4]] == [20, 20, 140, 140]
    assert [r["details"]["lightning_steps_per_epoch"] for r in rows[:4]] == [20, 1, 140, 1]
    assert [r["details"]["epochs"] for r in rows[:5]] == [[1, 3]] * 5
    floor = rows[4]  # Lightning around idle steps: a share of the plain epoch, measured like the rows above
    assert floor["target"] == 0.30 and floor["ours_label"] == "Lightning, idle steps" and "digits b64" in floor["name"]
    peer_job = rows[-1]
    assert "bp-train (tracking off, 5 epochs) vs MLPClassifier" in peer_job["name"]
    # Both accuracies are read from the processes' own output.
    assert 0 < peer_job["details"]["ours_test_acc"] <= 1 and 0.9 < peer_job["details"]["peer_test_acc"] <= 1


def test_the_peer_job_is_met_only_when_bp_train_is_faster_and_reaches_0_97(monkeypatch):
    """Scripted processes: (bp-train wall, bp-train test/acc) against scikit-learn's 10 s at 0.96."""
    from bp_service.bench import training_job

    def rows_for(bp_wall, bp_acc):
        def fake_timed(command, env):
            if command[0] == sys.executable:  # the scikit-learn job
                return 10.0, "test_acc=0.9600 wall=9.000\n"
            return bp_wall, f"Epoch 4 done\n  test/acc  {bp_acc}\n"

        monkeypatch.setattr(training_job, "_timed", fake_timed)
        (row,) = training_job.item_peer_job(harness.BenchConfig(quick=True))
        return row

    fast_good = rows_for(8.0, 0.98)
    assert (fast_good["ours"], fast_good["peer"], fast_good["ratio"], fast_good["met"]) == (8.0, 10.0, 0.8, True)
    assert (fast_good["details"]["ours_test_acc"], fast_good["details"]["peer_test_acc"]) == (0.98, 0.96)
    assert rows_for(8.0, 0.96)["met"] is False  # faster, but short of 0.97
    assert rows_for(12.0, 0.99)["met"] is False  # accurate, but slower

    # The full run: as shipped (tracked) is held to 2.5x scikit-learn's wall, untracked to 1x.
    shipped, untracked = training_job.item_peer_job(harness.BenchConfig(quick=False))
    assert "bp-train (as shipped)" in shipped["name"] and "bp-train (tracking off)" in untracked["name"]
    assert (shipped["target"], untracked["target"]) == (2.5, 1.0)
    assert (shipped["ratio"], shipped["met"], untracked["met"]) == (1.2, True, False)


def test_tracking_overhead_row_is_met_at_one_second_and_not_above():
    from bp_service.bench import tracking_overhead

    met = tracking_overhead.overhead_row(tracked=[11.0, 12.0, 10.5], untracked=[10.0, 11.0, 9.5])  # +1.0 s each
    assert (met["item"], met["met"], met["details"]["overhead_s"]) == ("tracking-overhead", True, 1.0)
    assert met["peer"] == 11.0 and met["ours"] == 11.0  # median untracked + budget; median untracked + overhead
    over = tracking_overhead.overhead_row(tracked=[11.2, 12.3, 10.6], untracked=[10.0, 11.0, 9.5])
    assert over["met"] is False and over["details"]["overhead_s"] == pytest.approx(1.2)
    # the overhead is paired per round: a slower machine in one round does not count as tracking cost
    noisy = tracking_overhead.overhead_row(tracked=[10.5, 30.5, 10.5], untracked=[10.0, 30.0, 10.0])
    assert noisy["met"] is True and noisy["details"]["overhead_s"] == pytest.approx(0.5)
    assert "tracking-overhead" in cli.ITEMS


def test_tracking_overhead_alternates_a_tracked_and_an_untracked_bp_train_in_one_fresh_home(monkeypatch):
    from bp_service.bench import tracking_overhead

    calls = []
    # An untimed run of each side; then five rounds, the order alternating.
    walls = iter([99.0, 98.0, 11.0, 10.0, 10.2, 11.4, 12.0, 10.8, 10.5, 11.5, 11.9, 10.0])

    def fake_wall(command, env):
        calls.append(("untracked" if "tracking.enabled=false" in command else "tracked", env["BP_SERVICE_HOME"]))
        assert Path(command[0]).name == "bp-train" and "experiment=digits" in command
        assert "MLFLOW_TRACKING_URI" not in env  # the embedded store in the fresh home, not the caller's server
        return next(walls), 1.0

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://elsewhere:5000")
    monkeypatch.setattr(tracking_overhead, "_wall", fake_wall)
    (row,) = tracking_overhead.item_tracking_overhead(harness.BenchConfig(quick=False))
    sides = [side for side, _ in calls]
    assert sides == ["tracked", "untracked"] + ["tracked", "untracked", "untracked", "tracked"] * 2 + [
        "tracked",
        "untracked",
    ]
    assert len({home for _, home in calls}) == 1 and not Path(calls[0][1]).exists()  # one home, removed after
    details = row["details"]
    assert (details["tracked_s"], details["untracked_s"]) == (
        [11.0, 11.4, 12.0, 11.5, 11.9],
        [10.0, 10.2, 10.8, 10.5, 10.0],
    )
    assert details["paired_overhead_s"] == pytest.approx([1.0, 1.2, 1.2, 1.0, 1.9])
    assert details["overhead_s"] == pytest.approx(1.2) and row["met"] is False


@pytest.mark.slow
def test_tracking_overhead_item_runs_both_sides():
    """The item itself, one round per side (--quick lists it as skipped; the full run takes five)."""
    from bp_service.bench import tracking_overhead

    (row,) = tracking_overhead.item_tracking_overhead(harness.BenchConfig(quick=True))
    _check_rows([row])
    details = row["details"]
    assert row["item"] == "tracking-overhead" and details["reps"] == 1 and details["budget_s"] == 1.0
    assert len(details["tracked_s"]) == len(details["untracked_s"]) == 1
    # both sides were whole processes that used CPU time of their own
    assert all(t > 0 for t in details["tracked_s"] + details["untracked_s"])
    assert all(t > 0 for t in details["cpu_tracked_s"] + details["cpu_untracked_s"])
