"""Scaling out without a cluster: the Optuna search preset, SLURM through submitit against stand-ins for
sbatch/srun/sacct/scontrol that run the job on this machine (a preemption and requeue included), two DDP
"nodes" on loopback, and Ray inside a private network namespace where Ray is installed.

Joblib and submitit_local sweeps staying one sweep: tests/test_sweeps.py.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import clean_env, free_port
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException
from hydra.types import RunMode
from mlflow import MlflowClient

from bp_service.training import guard
from bp_service.training.config import CONF_DIR, register_configs

BIN = Path(sys.executable).parent
QUIET = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "tracking.log_model=false"]


def _compose(*overrides: str):
    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            return compose("train", overrides=["paths.root_dir=/tmp", *overrides], return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()


def _runs(home: Path):
    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    parents = [r for r in runs if r.data.tags.get("bp.role") == "sweep"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    return client, runs, parents, children


# --------------------------------------------------------------------------- Optuna
def test_the_optuna_preset_is_a_seeded_tpe_search_over_lr_and_widths():
    cfg = _compose("hparams_search=optuna", "seed=7")
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_ == "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    assert sweeper.sampler._target_ == "optuna.samplers.TPESampler" and sweeper.sampler.seed == 7
    assert 0 < sweeper.sampler.n_startup_trials < sweeper.n_trials
    assert 0 < sweeper.max_failure_rate < 1  # one diverging trial does not end the study
    assert sweeper.storage is None  # optuna 2.x's database storage fails beside SQLAlchemy 2
    assert sweeper.params["optimizer.lr"].startswith("tag(log, interval(")
    assert sweeper.params["model.net.hidden"].startswith("choice([")
    assert cfg.hydra.mode == RunMode.MULTIRUN  # a search is a sweep, -m or not
    guard.check_composed(cfg)


@pytest.mark.parametrize(
    ("overrides", "wanted"),
    [(["data=diabetes"], "minimize"),  # regression: val/loss
     (["data=iris", "callbacks.model_checkpoint.monitor=val/loss"], "minimize"),
     (["data=iris", "hydra.sweeper.direction=minimize"], "maximize")],
)  # fmt: skip
def test_a_search_direction_against_the_monitored_metric_is_refused_where_hydra_composes(overrides, wanted):
    with pytest.raises(ConfigCompositionException, match=rf"hydra.sweeper.direction=\w+ .*{wanted}$"):
        _compose("hparams_search=optuna", *overrides)
    data_and_metric = [o for o in overrides if "direction" not in o]
    _compose("hparams_search=optuna", *data_and_metric, f"hydra.sweeper.direction={wanted}")  # as it says: fine


def test_a_mismatched_search_stops_before_its_first_trial(cli, tmp_path):
    result = cli("bp-train", "hparams_search=optuna", "data=diabetes", "trainer=cpu")
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [
        "bp-train: error: hydra.sweeper.direction=maximize but the trials return val/loss, which is best at its "
        "smallest: set hydra.sweeper.direction=minimize"
    ]
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "mlflow.db").exists()


@pytest.mark.slow
def test_an_optuna_search_of_4_trials_on_2_parallel_jobs_records_its_best(cli, tmp_path):
    result = cli(
        "bp-train", "hparams_search=optuna", "data=iris", "trainer=cpu", "trainer.max_epochs=3", *QUIET,
        "hydra.sweeper.n_trials=4", "hydra.sweeper.n_jobs=2", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep,) = (tmp_path / "outputs" / "train" / "multiruns").iterdir()
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1", "2", "3"]
    _, _, parents, children = _runs(tmp_path)
    assert len(parents) == 1 and len(children) == 4
    assert all(r.info.status == "FINISHED" for r in [*parents, *children])
    lrs = [float(c.data.params["optimizer.lr"]) for c in children]
    assert len(set(lrs)) == 4 and all(1e-4 <= lr <= 0.3 for lr in lrs)  # sampled, in the search space
    assert {c.data.params["model.net.hidden"] for c in children} <= {"[16]", "[32]", "[64]", "[32, 32]"}
    # What each trial returned (its best val/acc, in the summary); Optuna's best is the parent's best
    returned = [float(v) for v in re.findall(r"^  \d+\s+best/val/acc\s+(\S+)", result.stdout, re.M)]
    best = float(re.search(r"Best value: (\S+)", result.stdout + result.stderr)[1])
    assert len(returned) == 4 and best == pytest.approx(max(returned), abs=1e-4)
    assert parents[0].data.metrics["best/val/acc"] == pytest.approx(best)


# --------------------------------------------------------------------------- SLURM through submitit
def test_the_slurm_presets_follow_the_trainer():
    cfg = _compose("hydra/launcher=slurm", "trainer=slurm", "trainer.num_nodes=3", "trainer.devices=4")
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (3, 4, 4)  # one task per device
    assert launcher.max_num_timeout >= 1 and launcher.signal_delay_s > 0
    assert (cfg.trainer.strategy, cfg.trainer.accelerator) == ("ddp", "gpu")
    guard.check_composed(cfg)


# Stand-ins for SLURM's commands, on PATH: sbatch keeps the script and runs it on this machine in the background,
# with the variables SLURM gives a job, and again (SLURM_RESTART_COUNT + 1) when `scontrol requeue` asked for it.
SBATCH = r"""#!/bin/bash
here="$(cd "$(dirname "$0")" && pwd)"
script="${*: -1}"
id=$(cat "$here/next_id" 2>/dev/null || echo 4242)
echo $((id + 1)) > "$here/next_id"
cp "$script" "$here/job_$id.sh"
if [ -e "$here/refuse" ]; then echo "sbatch: error: stand-in refuses" >&2; exit 1; fi
echo RUNNING > "$here/state_$id"
(
    restarts=0
    while :; do
        echo "start $restarts" >> "$here/attempts_$id"
        SLURM_JOB_ID=$id SLURM_RESTART_COUNT=$restarts SLURM_JOB_NAME=bp-job SLURM_NNODES=1 \
            SLURM_NODELIST=localhost SLURM_JOB_NODELIST=localhost bash "$here/job_$id.sh"
        rc=$?
        if [ -e "$here/requeue_$id" ]; then rm -f "$here/requeue_$id"; restarts=$((restarts + 1)); continue; fi
        if [ $rc = 0 ]; then echo COMPLETED > "$here/state_$id"; else echo FAILED > "$here/state_$id"; fi
        break
    done
) </dev/null >>"$here/sbatch_$id.log" 2>&1 &
echo "Submitted batch job $id"
"""
SRUN = r"""#!/bin/bash
here="$(cd "$(dirname "$0")" && pwd)"
out=/dev/null err=/dev/null
while [[ $1 == --* ]]; do
    case $1 in --output) out=$2; shift 2 ;; --error) err=$2; shift 2 ;; *) shift ;; esac
done
out=${out//%j/$SLURM_JOB_ID}; out=${out//%t/0}; err=${err//%j/$SLURM_JOB_ID}; err=${err//%t/0}
mkdir -p "$(dirname "$out")" "$(dirname "$err")"
echo $$ > "$here/task_$SLURM_JOB_ID.pid"
export SLURM_NTASKS=1 SLURM_NTASKS_PER_NODE=1 SLURM_PROCID=0 SLURM_LOCALID=0 SLURM_NODEID=0 SLURM_STEP_ID=0
exec "$@" >>"$out" 2>>"$err"
"""
SACCT = r"""#!/bin/bash
here="$(cd "$(dirname "$0")" && pwd)"
ids="${*: -1}"
echo "JobID|State|NodeList"
for id in ${ids//,/ }; do echo "$id|$(cat "$here/state_$id" 2>/dev/null || echo PENDING)|localhost"; done
"""
SCONTROL = r"""#!/bin/bash
here="$(cd "$(dirname "$0")" && pwd)"
echo "$*" >> "$here/scontrol.log"
if [ "$1" = requeue ]; then touch "$here/requeue_$2"; fi
"""


@pytest.fixture
def slurm(tmp_path) -> Path:
    """A folder of SLURM stand-ins (and what they keep), to put first on PATH."""
    folder = tmp_path / "slurm"
    folder.mkdir()
    for name, text in (("sbatch", SBATCH), ("srun", SRUN), ("sacct", SACCT), ("scontrol", SCONTROL)):
        (folder / name).write_text(text)
        (folder / name).chmod(0o755)
    return folder


def _slurm_env(home: Path, slurm: Path) -> dict[str, str]:
    return clean_env(BP_SERVICE_HOME=str(home), PATH=f"{slurm}{os.pathsep}{os.environ['PATH']}")


def test_the_sbatch_script_asks_for_the_trainers_nodes_and_tasks_and_for_usr2(slurm, tmp_path):
    (slurm / "refuse").touch()  # keep the script, run nothing
    result = subprocess.run(
        [str(BIN / "bp-train"), "-m", "hydra/launcher=slurm", "trainer=slurm", "trainer.num_nodes=2",
         "trainer.devices=4", "trainer.accelerator=cpu", "data=iris", "tracking.enabled=false"],
        capture_output=True, text=True, env=_slurm_env(tmp_path, slurm), timeout=300,
    )  # fmt: skip
    assert result.returncode != 0 and "sbatch: error: stand-in refuses" in result.stderr
    script = (slurm / "job_4242.sh").read_text()
    directives = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)$", script, re.M))
    assert directives["nodes"] == "2" and directives["ntasks-per-node"] == "4" and directives["gpus-per-node"] == "4"
    assert directives["signal"] == "USR2@120"  # submitit's preemption and time-out signal, 120 s ahead
    assert re.search(r"^srun .* -m submitit\.core\._submit ", script, re.M)


@pytest.mark.slow
def test_a_preempted_slurm_job_is_requeued_resumes_its_own_last_checkpoint_and_continues_its_run(slurm, tmp_path):
    home = tmp_path / "home"
    epochs = 4
    proc = subprocess.Popen(
        [str(BIN / "bp-train"), "-m", "hydra/launcher=slurm", "trainer=slurm", "trainer.accelerator=cpu",
         "hydra.launcher.gpus_per_node=null", "data=xor", "data.n_samples=8000", "data.batch_size=16",
         f"trainer.max_epochs={epochs}", *QUIET],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_slurm_env(home, slurm),
    )  # fmt: skip
    deadline = time.monotonic() + 240
    while not list(home.glob("outputs/train/multiruns/*/0/checkpoints/last.ckpt")):
        assert proc.poll() is None and time.monotonic() < deadline, "the job never wrote last.ckpt"
        time.sleep(0.05)
    (sweep,) = (home / "outputs" / "train" / "multiruns").iterdir()
    os.kill(int((slurm / "task_4242.pid").read_text()), signal.SIGUSR2)  # what SLURM sends before preempting
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert (slurm / "scontrol.log").read_text().split() == ["requeue", "4242"]  # submitit asked SLURM to requeue
    assert (slurm / "attempts_4242").read_text().split() == ["start", "0", "start", "1"]
    logs = "".join(p.read_text() for p in (sweep / ".submitit").rglob("*_log.err"))
    assert "this job is preempted" in logs and "(requeued): resuming it" in logs
    # One job folder, one run: the requeued job continued its MLflow run from its own last.ckpt
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir() and not p.name.startswith(".")) == ["0"]
    client, runs, parents, children = _runs(home)
    assert len(runs) == 2 and len(parents) == 1 and len(children) == 1
    (run,) = children
    assert run.info.status == "FINISHED" and run.data.tags["bp.output_dir"] == str(sweep / "0")
    for key in ("val/acc", "train/loss"):  # every epoch once: none lost, none counted twice
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert len(steps) == epochs and len(set(steps)) == epochs, (key, steps)
    assert torch.load(sweep / "0" / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == epochs - 1
    assert f"sweep of 1 job(s) finished ({sweep})" in out


# --------------------------------------------------------------------------- multi-node DDP
@pytest.mark.parametrize(
    ("env", "devices", "rank"),
    [({"NODE_RANK": "1"}, 4, 4), ({"NODE_RANK": "2", "LOCAL_RANK": "1"}, 2, 5), ({"NODE_RANK": "0"}, 2, 0),
     ({"NODE_RANK": "1", "RANK": "3"}, 2, 0), ({"NODE_RANK": "1", "SLURM_PROCID": "3"}, 2, 0)],
)  # fmt: skip
def test_a_process_on_another_node_knows_it_is_not_rank_zero_before_the_trainer(monkeypatch, env, devices, rank):
    """By hand (NODE_RANK), Lightning learns the rank only when the Trainer sets up; torchrun's RANK and srun's
    SLURM_PROCID it reads at import, and they are left to it (rank 0 here: this process's own)."""
    from lightning.pytorch.utilities import rank_zero_only

    from bp_service.training.lifecycle import claim_node_rank

    for key in ("NODE_RANK", "LOCAL_RANK", "RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(rank_zero_only, "rank", 0)
    claim_node_rank(_compose("trainer=ddp", f"trainer.devices={devices}").trainer)
    assert rank_zero_only.rank == rank


def _node(home: Path, rank: int, port: str, *args: str) -> subprocess.Popen:
    """One "node" of a hand-started multi-node run: Lightning reads NODE_RANK, MASTER_ADDR and MASTER_PORT."""
    env = clean_env(
        BP_SERVICE_HOME=str(home),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=port,
        NODE_RANK=str(rank),
        drop=("RANK", "LOCAL_RANK", "WORLD_SIZE", "SLURM_"),
    )
    cmd = [str(BIN / "bp-train"), *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


@pytest.mark.slow
def test_two_ddp_nodes_on_loopback_train_as_one_job(tmp_path):
    """2 "nodes" x 1 process (NODE_RANK, MASTER_ADDR, MASTER_PORT: Lightning's multi-node environment), at
    batch 8 each, take the optimizer steps one process takes at batch 16; only the first records the run."""
    common = ["data=iris", "trainer.max_epochs=3", *QUIET]
    ddp = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=1", "trainer.num_nodes=2", "data.batch_size=8"]
    port = str(free_port())
    nodes = [_node(tmp_path, rank, port, *common, *ddp, "task_name=nodes") for rank in (0, 1)]
    outs = [node.communicate(timeout=300) for node in nodes]
    for node, (_, err) in zip(nodes, outs):
        assert node.returncode == 0, err[-3000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in outs[1][1]
    assert outs[0][0].count("finished in") == 1 and "finished in" not in outs[1][0]  # one summary
    _, runs, _, _ = _runs(tmp_path)
    assert [r.info.status for r in runs] == ["FINISHED"]  # the second node recorded nothing
    one = subprocess.run(
        [str(BIN / "bp-train"), *common, "trainer=cpu", "data.batch_size=16", "task_name=one",
         "tracking.enabled=false"],
        capture_output=True, text=True, env=clean_env(BP_SERVICE_HOME=str(tmp_path)), timeout=300,
    )  # fmt: skip
    assert one.returncode == 0, one.stderr[-2000:]
    (two_nodes,) = (tmp_path / "outputs" / "nodes").glob("runs/*/checkpoints/last.ckpt")  # written by rank 0 only
    (one_process,) = (tmp_path / "outputs" / "one").glob("runs/*/checkpoints/last.ckpt")
    weights = [torch.load(p, weights_only=True)["state_dict"] for p in (two_nodes, one_process)]
    for key, value in weights[1].items():
        torch.testing.assert_close(weights[0][key], value, rtol=1e-5, atol=1e-6)
    metrics = [dict(re.findall(r"^  (test/\w+)\s+(\S+)$", text, re.M)) for text in (outs[0][0], one.stdout)]
    assert metrics[0] and metrics[0] == metrics[1]


# --------------------------------------------------------------------------- Ray
def _ray_ready() -> str | None:
    """Why the Ray test cannot run here, or None."""
    for module in ("ray", "hydra_plugins.hydra_ray_launcher"):
        if importlib.util.find_spec(module.split(".")[0]) is None or importlib.util.find_spec(module) is None:
            return f"{module} is not installed (not in the lock: its pins conflict; see docs/scaling.md)"
    if shutil.which("unshare") is None:
        return "no unshare: Ray may only run in a private network namespace here"
    probe = subprocess.run(["unshare", "--net", "--map-root-user", "true"], capture_output=True)
    return None if probe.returncode == 0 else "cannot create a private network namespace here"


@pytest.mark.slow
@pytest.mark.skipif(_ray_ready() is not None, reason=str(_ray_ready()))
def test_a_sweep_on_an_existing_ray_cluster_stays_one_sweep(tmp_path):
    """Inside ``unshare --net`` (loopback only; Ray binds every interface it sees): start a one-node cluster,
    then a 2-job sweep through hydra/launcher=ray_cluster with RAY_ADDRESS, the workers started without the
    driver's BP_SERVICE_HOME."""
    home = tmp_path / "home"
    script = f"""
set -e
ip link set lo up
export RAY_ADDRESS=127.0.0.1:{free_port()}
ray start --head --node-ip-address=127.0.0.1 --port=${{RAY_ADDRESS#*:}} --num-cpus=2 --include-dashboard=false
trap 'ray stop --force' EXIT
BP_SERVICE_HOME={home} {BIN / "bp-train"} -m hydra/launcher=ray_cluster data=iris trainer=cpu trainer.max_epochs=2 \
    tracking.log_model=false optimizer.lr=0.01,0.1
"""
    env = clean_env(PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", drop=("BP_SERVICE_HOME",))
    result = subprocess.run(
        ["unshare", "--net", "--map-root-user", "bash", "-c", script],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep,) = (home / "outputs" / "train" / "multiruns").iterdir()
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    _, _, parents, children = _runs(home)
    assert len(parents) == 1 and len(children) == 2
