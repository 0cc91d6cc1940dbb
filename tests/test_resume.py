"""Resuming never reaches outside its own run: another run's folder, a downloads folder, a run still training,
a run in another PID namespace, a moved or copied home. All through the real ``bp-train`` command."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import clean_env, store_statuses
from mlflow import MlflowClient

from bp_service.training.store import owner_tags


def guard_optimizers() -> set[str]:
    """The torch.optim classes a config may name (guard.py's list)."""
    from bp_service.training.guard import JOB_CLASSES

    return {
        name.removeprefix("torch.optim.")
        for name in JOB_CLASSES
        if name.count(".") == 2 and name.startswith("torch.optim.")
    }


BIN = Path(sys.executable).parent
TINY = ["data=xor", "trainer=cpu", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
        "tracking.log_model=false"]  # fmt: skip
# ~1250 optimizer steps per epoch: a run that is still training while the test acts on it.
LONG = ["data=xor", "data.n_samples=20000", "data.batch_size=16", "trainer=cpu", "trainer.max_epochs=50",
        "trainer.enable_progress_bar=false", "tracking.log_model=false",
        "callbacks.last_checkpoint.every_n_train_steps=50"]  # fmt: skip


def _env(home: Path) -> dict[str, str]:
    return clean_env(BP_SERVICE_HOME=str(home))


def _train(home: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "bp-train"), *args], capture_output=True, text=True, env=_env(home), timeout=600, check=False
    )


def _start(home: Path, *args: str, prefix: tuple[str, ...] = ()) -> subprocess.Popen:
    return subprocess.Popen(
        [*prefix, str(BIN / "bp-train"), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(home),
    )


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with a hash of its content: what a run must leave as it found it."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _runs_dir(home: Path) -> Path:
    return home / "outputs" / "train" / "runs"


def _client(home: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{home / 'mlflow.db'}")


def _all_runs(home: Path) -> list:
    client = _client(home)
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def _wait_for(predicate, proc: subprocess.Popen, what: str, timeout: float = 180):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert proc.poll() is None, f"ended (rc={proc.returncode}) before {what}: {proc.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _stop(proc: subprocess.Popen, pid: int | None = None) -> tuple[int, str]:
    if proc.poll() is None:
        os.kill(pid or proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def _last_line(result: subprocess.CompletedProcess) -> str:
    return result.stderr.strip().splitlines()[-1]


# --------------------------------------------------------------------------- resuming from other checkpoints
@pytest.mark.slow
def test_resuming_an_earlier_epochs_checkpoint_starts_a_new_run_and_leaves_the_old_one_whole(tmp_path):
    home = tmp_path / "home"
    first = _train(home, *TINY, "trainer.max_epochs=3", "callbacks.model_checkpoint.save_top_k=-1")
    assert first.returncode == 0, first.stderr[-3000:]
    (old_dir,) = _runs_dir(home).iterdir()
    (old_run,) = _all_runs(home)
    before = _snapshot(old_dir)
    epoch0 = next((old_dir / "checkpoints").glob("best-epoch000-*.ckpt"))

    resumed = _train(home, *TINY, "trainer.max_epochs=3", f"ckpt_path={epoch0}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _snapshot(old_dir) == before  # last.ckpt not rewound, nothing added or replaced
    (new_dir,) = set(_runs_dir(home).iterdir()) - {old_dir}
    assert torch.load(new_dir / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 2
    client = _client(home)
    after = client.get_run(old_run.info.run_id)
    assert (after.info.status, after.info.end_time) == ("FINISHED", old_run.info.end_time)
    assert after.data.metrics == old_run.data.metrics and "bp.resumed" not in after.data.tags
    (new_run,) = [r for r in _all_runs(home) if r.info.run_id != old_run.info.run_id]
    assert new_run.info.status == "FINISHED"
    assert new_run.data.tags["bp.resumed_from"] == str(epoch0.resolve())
    assert new_run.data.tags["bp.resumed_from_run"] == old_run.info.run_id
    assert f"MLflow run   {new_run.info.run_id}" in resumed.stdout


@pytest.mark.slow
@pytest.mark.parametrize("name", ["model.ckpt", "last.ckpt"])
def test_resuming_a_copy_in_a_downloads_folder_writes_nothing_there(tmp_path, name):
    home = tmp_path / "home"
    first = _train(home, *TINY, "trainer.max_epochs=1", "tracking.enabled=false")
    assert first.returncode == 0, first.stderr[-3000:]
    (old_dir,) = _runs_dir(home).iterdir()
    downloads = tmp_path / "Downloads"
    downloads.mkdir()
    shutil.copy(old_dir / "checkpoints" / "last.ckpt", downloads / name)
    if name != "last.ckpt":
        (downloads / "last.ckpt").write_bytes(b"someone else's file")
    before = _snapshot(downloads)

    resumed = _train(home, *TINY, "trainer.max_epochs=2", "tracking.enabled=false", f"ckpt_path={downloads / name}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _snapshot(downloads) == before
    (new_dir,) = set(_runs_dir(home).iterdir()) - {old_dir}
    assert torch.load(new_dir / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 1


# --------------------------------------------------------------------------- a run still training
@pytest.mark.slow
def test_ckpt_path_last_refuses_a_run_that_is_still_training(tmp_path):
    home = tmp_path / "home"
    owner = _start(home, *LONG)
    try:
        last = _wait_for(lambda: next(_runs_dir(home).glob("*/checkpoints/last.ckpt"), None), owner, "a last.ckpt")
        (run_id, _), *_ = store_statuses(home)
        second = _train(home, *LONG, "ckpt_path=last")
        assert second.returncode != 0, second.stderr[-3000:]
        line = _last_line(second)
        assert line.startswith("bp-train: error: ") and str(last.parent.parent) in line and "still" in line, line
        assert owner.poll() is None, "the owner was disturbed"
        run = _client(home).get_run(run_id)
        assert run.info.status == "RUNNING" and run.data.tags["bp.pid"] == str(owner.pid)
        assert "bp.resumed" not in run.data.tags
        assert len(store_statuses(home)) == 1  # the refused resume opened no run of its own
    finally:
        code, err = _stop(owner)
    assert code == 143, err[-3000:]
    assert dict(store_statuses(home)) == {run_id: "KILLED"}


# --------------------------------------------------------------------------- runs of another PID namespace
def _unshare_works() -> bool:
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True, check=False)
    return probe.returncode == 0


def _child_of(pid: int) -> int | None:
    """The process ``unshare --fork`` started (its pid as seen here)."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:  # unshare has ended
        return None
    return int(children[0]) if children else None


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare (util-linux)")
def test_stale_runs_close_leaves_a_live_run_of_another_pid_namespace_and_says_cannot_tell(tmp_path):
    if not _unshare_works():
        pytest.skip("unshare --pid needs root (or user namespaces) here")
    home = tmp_path / "home"
    owner = _start(home, *LONG, prefix=("unshare", "--pid", "--fork", "--mount-proc"))
    try:
        _wait_for(lambda: any(s == "RUNNING" for _, s in store_statuses(home)), owner, "a RUNNING run")
        (run_id, _), *_ = store_statuses(home)
        tags = _client(home).get_run(run_id).data.tags
        assert tags["bp.host"] == socket.gethostname() and tags["bp.pid"] != str(_child_of(owner.pid))
        closed = subprocess.run(
            [str(BIN / "bp-train"), "--stale-runs", "--close"], capture_output=True, text=True, env=_env(home)
        )
        assert closed.returncode == 0, closed.stderr[-2000:]
        (line,) = [line for line in closed.stdout.splitlines() if line.startswith(run_id)]
        assert "cannot tell" in line and "left as it is" in line, line
        assert "0 closed" in closed.stdout
        assert dict(store_statuses(home)) == {run_id: "RUNNING"}
    finally:
        code, err = _stop(owner, _child_of(owner.pid))
    assert code == 143, err[-3000:]
    assert dict(store_statuses(home)) == {run_id: "KILLED"}


def test_only_an_owner_proven_gone_is_stale():
    from bp_service.training.store import owner_state

    mine = owner_tags(os.getpid())
    assert owner_state(mine) == ("alive", f"process {mine['bp.pid']} is running")
    other_ns = {**mine, "bp.pid_ns": "pid:[1]"}
    assert owner_state(other_ns)[0] == "cannot tell"
    older = {k: v for k, v in mine.items() if k != "bp.pid_ns"}
    assert owner_state(older)[0] == "cannot tell"
    rebooted = {**mine, "bp.boot_id": "00000000-0000-0000-0000-000000000000"}
    assert owner_state(rebooted) == ("gone", "this host has restarted since")
    assert owner_state({**mine, "bp.host": "elsewhere"})[0] == "elsewhere"


# --------------------------------------------------------------------------- moved and copied homes
@pytest.mark.slow
@pytest.mark.parametrize("how", ["moved", "copied"])
def test_a_moved_or_copied_home_never_writes_into_the_old_one(tmp_path, how):
    old, new = tmp_path / "old-home", tmp_path / "new-home"
    first = _train(old, *TINY, "trainer.max_epochs=1", "tracking.log_model=true")
    assert first.returncode == 0, first.stderr[-3000:]
    (run_before,) = _all_runs(old)
    (shutil.move if how == "moved" else shutil.copytree)(old, new)
    before = _snapshot(old) if how == "copied" else None

    result = _train(new, *TINY, "trainer.max_epochs=2", *(["ckpt_path=last"] if how == "moved" else []))
    assert result.returncode != 0, result.stderr[-3000:]
    line = _last_line(result)
    assert line.startswith("bp-train: error: ") and str(old / "mlartifacts") in line and str(new) in line, line
    if how == "moved":
        assert not old.exists(), sorted(str(p) for p in old.rglob("*"))
    else:
        assert _snapshot(old) == before
    (run_after,) = _all_runs(new)  # nothing opened, nothing reopened
    assert (run_after.info.status, run_after.info.end_time) == ("FINISHED", run_before.info.end_time)
    assert "bp.resumed" not in run_after.data.tags


# --------------------------------------------------------------------------- the store deleted
@pytest.mark.slow
def test_resuming_after_the_store_was_deleted_says_so_in_one_clean_line(tmp_path):
    home = tmp_path / "home"
    first = _train(home, *TINY, "trainer.max_epochs=1")
    assert first.returncode == 0, first.stderr[-3000:]
    # Read without MLflow's client: it would keep the deleted file open and go on reading it.
    ((old_id, _),) = store_statuses(home)
    (home / "mlflow.db").unlink()
    resumed = _train(home, *TINY, "trainer.max_epochs=2", "ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    notes = [line for line in resumed.stderr.splitlines() if old_id in line]
    assert len(notes) == 1 and notes[0].startswith("bp-train: note: "), resumed.stderr[-3000:]
    assert "Warning" not in resumed.stderr and "warnings.warn" not in resumed.stderr, resumed.stderr[-3000:]
    ((new_id, status),) = store_statuses(home)
    assert new_id != old_id and status == "FINISHED"


# --------------------------------------------------------------------------- another run's folders
def test_a_checkpoint_folder_outside_the_run_is_claimed_by_its_first_run_alone(tmp_path):
    from bp_service.training.resume import claim_checkpoint_folder

    folder, first, second = tmp_path / "ck", tmp_path / "runs" / "a", tmp_path / "runs" / "b"
    claim_checkpoint_folder(folder, first, create=False)  # a check only: nothing claimed, nothing made
    assert not (tmp_path / ".ck.run").exists() and not folder.exists()
    claim_checkpoint_folder(folder, first)
    claim_checkpoint_folder(folder, first)  # the same job again (a requeue): its own
    assert (tmp_path / ".ck.run").read_text() == str(first.resolve())
    with pytest.raises(FileExistsError, match=f"paths.ckpt_dir={folder}: the checkpoint folder of another run"):
        claim_checkpoint_folder(folder, second, create=False)
    claim_checkpoint_folder(second / "checkpoints", second)  # inside the run's own folder: nothing to claim
    assert not (second / ".checkpoints.run").exists()
    (first / ".hydra").mkdir(parents=True)  # Hydra's record of a run: first is another run's folder
    with pytest.raises(FileExistsError, match=f"inside another run's folder \\({first.resolve()}\\)"):
        claim_checkpoint_folder(first / "checkpoints", second)

    unclaimed = tmp_path / "old"
    unclaimed.mkdir()
    (unclaimed / "last.ckpt").write_bytes(b"")
    (unclaimed / "best.ckpt").write_bytes(b"")
    with pytest.raises(FileExistsError, match=r"holds checkpoints of another run \(best.ckpt and 1 more\)"):
        claim_checkpoint_folder(unclaimed, second)
    (tmp_path / ".odd.run").mkdir()  # a claim that is not a file is read as nobody's: refused, never read
    with pytest.raises(FileExistsError, match=r"another run \(unknown\)"):
        claim_checkpoint_folder(tmp_path / "odd", second)


def test_a_distributed_runs_other_processes_and_a_requeued_slurm_job_use_the_first_ones_claim(tmp_path, monkeypatch):
    from hydra.core.hydra_config import HydraConfig

    from bp_service.training.resume import claim_checkpoint_folder

    monkeypatch.setattr(HydraConfig.instance(), "cfg", None)  # a single run (another test's may linger here)
    folder, first, second = tmp_path / "ck", tmp_path / "runs" / "a", tmp_path / "runs" / "b"
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    claim_checkpoint_folder(folder, first)
    claim_checkpoint_folder(folder, second)  # Lightning's requeue: the same job id, a new run folder
    monkeypatch.setenv("SLURM_JOB_ID", "4243")
    with pytest.raises(FileExistsError, match="the checkpoint folder of another run"):
        claim_checkpoint_folder(folder, second)
    monkeypatch.setenv("LOCAL_RANK", "1")  # DDP's second process: its first one claimed the folder for all
    claim_checkpoint_folder(folder, second)
    claim_checkpoint_folder(tmp_path / "other", second)
    assert not (tmp_path / ".other.run").exists()


def test_a_claimed_folders_parent_removed_meanwhile_is_made_again(tmp_path):
    from bp_service.files import _made

    assert _made(tmp_path / "runs" / "2026-12-06_07-00-00")  # its parent gone (another run's clean-up)
    assert not _made(tmp_path / "runs" / "2026-12-06_07-00-00")  # taken: the next name is tried


@pytest.mark.parametrize("name", sorted(guard_optimizers()))
def test_every_allowed_optimizers_state_is_taken_and_another_networks_refused(tmp_path, name):
    """check_training_state knows each optimizer a config may name (Adafactor keeps (H_out, 1) and (1, H_in)
    statistics of a weight); an optimizer state of another network is refused, naming the file."""
    from bp_service import MLP
    from bp_service.training.checkpoints import CheckpointError, check_training_state

    def stepped_state(net):
        optimizer = getattr(torch.optim, name)(net.parameters(), lr=0.01)
        net.cost(torch.randn(8, 3), torch.rand(8, 2)).backward()
        optimizer.step()
        return optimizer.state_dict()

    torch.manual_seed(0)
    net = MLP([3, 4, 2])
    torch.save({"optimizer_states": [stepped_state(net)]}, tmp_path / "ours.ckpt")
    check_training_state(tmp_path / "ours.ckpt", net)
    torch.save({"optimizer_states": [stepped_state(MLP([3, 5, 2]))]}, tmp_path / "theirs.ckpt")
    if any(
        v.dim() > 0 for s in stepped_state(MLP([3, 5, 2]))["state"].values() for v in s.values() if torch.is_tensor(v)
    ):
        with pytest.raises(
            CheckpointError, match=f"{tmp_path / 'theirs.ckpt'}: optimizer_states\\[0\\]: .* of parameter 0"
        ):
            check_training_state(tmp_path / "theirs.ckpt", net)


@pytest.mark.slow
def test_no_override_lets_a_run_write_into_another_runs_folders(tmp_path):
    home, shared = tmp_path / "home", tmp_path / "scratch" / "ck"
    first = _train(home, *TINY, "trainer.max_epochs=1", "tracking.enabled=false", f"paths.ckpt_dir={shared}")
    assert first.returncode == 0, first.stderr[-3000:]
    (old_dir,) = _runs_dir(home).iterdir()
    assert sorted(p.name for p in shared.iterdir()) == ["best-epoch000-step22.ckpt", "last.ckpt"]
    before, shared_before = _snapshot(old_dir), _snapshot(shared)
    attempts = {
        f"paths.ckpt_dir={shared}": f"paths.ckpt_dir={shared}: the checkpoint folder of another run ({old_dir})",
        f"paths.ckpt_dir={old_dir / 'checkpoints'}": f"inside another run's folder ({old_dir})",
        f"paths.output_dir={old_dir}": f"paths.output_dir='{old_dir}' is not allowed",
        f"hydra.run.dir=${{bp_run_dir:{tmp_path / 'new'}}}/../../home/outputs/train/runs/{old_dir.name}": (
            "a run claims a new folder of its own"
        ),
    }
    for override, needle in attempts.items():
        result = _train(home, *TINY, "trainer.max_epochs=2", override)
        assert result.returncode == 2 and needle in _last_line(result), (override, result.stderr[-2000:])
        assert "resuming it" not in result.stderr
    assert (_snapshot(old_dir), _snapshot(shared)) == (before, shared_before)
    assert list(_runs_dir(home).iterdir()) == [old_dir] and not (tmp_path / "new").exists()
    assert not (home / "mlflow.db").exists()  # no run opened, none closed

    # A copy with a claim file of its own naming that run is not that run's: a new run, nothing written beside it.
    downloads = tmp_path / "Downloads" / "ck"
    shutil.copytree(shared, downloads)
    (downloads.parent / ".ck.run").write_text(str(old_dir.resolve()))
    copied = _snapshot(downloads.parent)
    started = _train(
        home, *TINY, "trainer.max_epochs=2", "tracking.enabled=false", f"ckpt_path={downloads / 'last.ckpt'}"
    )
    assert started.returncode == 0 and "resuming it" not in started.stderr, started.stderr[-3000:]
    assert _snapshot(downloads.parent) == copied and len(list(_runs_dir(home).iterdir())) == 2

    # Its own last.ckpt, named, continues it there (the folder it claimed), as <run>/checkpoints/last.ckpt does.
    last = shared / "last.ckpt"
    resumed = _train(home, *TINY, "trainer.max_epochs=2", "tracking.enabled=false", f"ckpt_path={last}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert torch.load(last, weights_only=True)["epoch"] == 1


def _damaged_copy(source: Path, folder: Path, name: str, change) -> Path:
    checkpoint = torch.load(source, weights_only=True)
    change(checkpoint)
    torch.save(checkpoint, folder / f"{name}.ckpt")
    return folder / f"{name}.ckpt"


def _first_buffer(checkpoint: dict) -> dict:
    return next(iter(checkpoint["optimizer_states"][0]["state"].values()))


@pytest.mark.slow
def test_a_checkpoint_whose_training_state_does_not_fit_is_refused_before_any_run_reopens(tmp_path):
    home = tmp_path / "home"
    first = _train(home, *TINY, "trainer.max_epochs=1")
    assert first.returncode == 0, first.stderr[-3000:]
    (old_dir,) = _runs_dir(home).iterdir()
    (run_before,) = _all_runs(home)
    last = old_dir / "checkpoints" / "last.ckpt"
    damages = {
        "extra_weight": (lambda c: c["state_dict"].update({"extra.weight": torch.zeros(2)}), "'extra.weight'"),
        "adam_buffer": (lambda c: _first_buffer(c).update(exp_avg=torch.zeros(3, 3)), "'exp_avg' of parameter 0"),
        "epoch_sums": (lambda c: c.update(bp_service_epoch_sums=["x", 1]), "bp_service_epoch_sums must be"),
        "grouping": (lambda c: c.update(BPDataModule={"steps_per_execution": "many"}), "BPDataModule"),
        "two_optimizers": (
            lambda c: c["optimizer_states"][0]["param_groups"].append({"params": [9]}),
            "other parameters",
        ),
    }
    for name, (change, needle) in damages.items():
        copy = _damaged_copy(last, tmp_path, name, change)
        result = _train(home, *TINY, "trainer.max_epochs=2", f"ckpt_path={copy}")
        line = _last_line(result)
        assert result.returncode == 1 and line.startswith(f"bp-train: error: {copy}: ") and needle in line, line
        assert "Traceback" not in result.stderr
    (run_after,) = _all_runs(home)  # nothing opened, nothing reopened or failed
    assert (run_after.info.status, run_after.info.end_time) == ("FINISHED", run_before.info.end_time)
