"""A config may name only listed classes, write only into its run, and remove only what a run can do without.

The attacks go through the real entry point (``bp_service.cli:bp_train``) in a fresh process that records,
with ``sys.addaudithook``, every process it starts and every file it opens for writing or opens by the
secret's name: a refused config must leave no trace of either, and no marker file.
"""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from conftest import clean_env
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from bp_service.training import guard
from bp_service.training.cli import CONF_DIR, one_line
from bp_service.training.config import ConfigError, register_configs

AUDITED = textwrap.dedent(
    """
    import os, sys
    log = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    secret = sys.argv[2]
    WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    STARTS = ("subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty")

    def hook(event, args):
        if event in STARTS:
            os.write(log, f"start {event} {args!r:.300}\\n".encode())
        elif event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            path, mode, flags = os.fsdecode(args[0]), args[1] or "", args[2] or 0
            if secret in path or any(c in str(mode) for c in "wax+") or flags & WRITE:
                os.write(log, f"open {path} {mode} {flags}\\n".encode())

    sys.addaudithook(hook)
    sys.argv = [sys.argv[3], *sys.argv[4:]]
    {call}
    """
)


def run_audited(tmp_path: Path, *argv: str, call: str = "from bp_service.cli import bp_train; bp_train()"):
    """``bp-train *argv`` (or ``call``) in a fresh, audited process: (result, starts, writes, secret opens)."""
    secret = tmp_path / "secret.txt"
    secret.write_text("root:*:secret\n")
    log = tmp_path / "audit.log"
    script = tmp_path / "audited.py"
    script.write_text(AUDITED.replace("{call}", call))
    scratch = tmp_path / "tmp"  # tempfile's own probe of its folder (a write and a delete) lands here
    scratch.mkdir()
    env = clean_env(BP_SERVICE_HOME=str(tmp_path / "home"), PYTHONDONTWRITEBYTECODE="1", TMPDIR=str(scratch))
    argv = [
        a.replace("SECRET_DIR", str(tmp_path))
        .replace("SECRET", str(secret))
        .replace("MARKER", str(tmp_path / "marker"))
        for a in argv
    ]
    result = subprocess.run(
        [sys.executable, str(script), str(log), str(secret), "bp-train", *argv],
        capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    events = log.read_text().splitlines() if log.exists() else []
    starts = [e for e in events if e.startswith("start ")]
    opens = [e.split(" ", 2)[1] for e in events if e.startswith("open ")]
    writes = [p for p in opens if not p.startswith(("/dev/", str(log), str(scratch))) and str(secret) not in p]
    return result, starts, writes, [p for p in opens if str(secret) in p]


HOSTILE = {
    "a helper that runs a command": (
        ["+callbacks.x._target_=bp_service.bench.training_job._timed", "+callbacks.x.command=[sh,-c,'touch MARKER']"],
        "callbacks.x._target_='bp_service.bench.training_job._timed' is not allowed",
    ),
    "a target in a list under an allowed callback": (
        ["+callbacks.gradient_flow.extra=[{_target_:shutil.copyfile,src:SECRET,dst:MARKER}]"],
        "callbacks.gradient_flow.extra[0]._target_='shutil.copyfile' is not allowed",
    ),
    "a target in _args_": (
        ["+optimizer._args_=[{_target_:shutil.copyfile,_args_:[SECRET,MARKER]}]"],
        "optimizer._args_[0]._target_='shutil.copyfile' is not allowed",
    ),
    "a Hydra callback": (
        [
            "+hydra.callbacks.x._target_=shutil.copyfile",
            "+hydra.callbacks.x.src=SECRET",
            "+hydra.callbacks.x.dst=MARKER",
        ],
        "hydra.callbacks.x._target_='shutil.copyfile' is not allowed",
    ),
    "a log handler class": (
        ["hydra.job_logging.handlers.console.class=subprocess.Popen", "+hydra.job_logging.handlers.console.args=[id]"],
        "hydra.job_logging.handlers.console.class='subprocess.Popen' is not allowed",
    ),
    "a log file outside the run": (
        ["hydra.job_logging.handlers.file.filename=MARKER"],
        "hydra.job_logging.handlers.file.filename=",
    ),
    "a log stream naming a module": (
        ["hydra.job_logging.handlers.console.stream=ext://os.system"],
        "hydra.job_logging.handlers.console.stream='ext://os.system' is not allowed",
    ),
    "a target inside the launcher": (
        ["-m", "hydra/launcher=joblib", "+hydra.launcher.x={_target_:shutil.copyfile,src:SECRET,dst:MARKER}"],
        "hydra.launcher.x._target_='shutil.copyfile' is not allowed",
    ),
    "a Hydra callback built from text only when Hydra builds it": (
        [
            "+hydra.job.env_set.OMP_NUM_THREADS='{_target_: logging.FileHandler, filename: MARKER, mode: w}'",
            "+hydra.callbacks.x='${oc.create:${hydra:job.env_set.OMP_NUM_THREADS}}'",
        ],
        "the resolver 'oc.create' is not allowed here",
    ),
    "a run folder given as text": (
        [
            "hydra.run.dir='{_target_: logging.FileHandler, filename: MARKER}'",
            "+hydra.callbacks.x='${oc.create:${hydra.run.dir}}'",
        ],
        "hydra.run.dir='{_target_: logging.FileHandler",
    ),
    "a run folder that already exists": (["hydra.run.dir=SECRET_DIR"], "a run claims a new folder of its own"),
    "a new run folder climbing into an existing one": (
        ["hydra.run.dir=${bp_run_dir:SECRET_DIR/new}/../../${task_name}"],
        "a run claims a new folder of its own",
    ),
    "another run's folder as this run's": (["paths.output_dir=SECRET_DIR"], "paths.output_dir='"),
    "a callback's folder as a positional argument": (
        ["+callbacks.ck={_target_:lightning.pytorch.callbacks.ModelCheckpoint,_args_:[MARKER]}"],
        "callbacks.ck._args_ is not allowed",
    ),
    "the loader's variables": (["+hydra.job.env_set.LD_PRELOAD=MARKER"], "hydra.job.env_set.LD_PRELOAD is not allowed"),
    "a task name that climbs out": (
        ["task_name=../../../escaped"],
        "task_name='../../../escaped' is not a folder name",
    ),
    "a job name that climbs out": (["hydra.job.name=../escaped"], "hydra.job.name='../escaped' is not a folder name"),
    "Hydra's folder climbing out": (["hydra.output_subdir=../../escaped"], "hydra.output_subdir='../../escaped'"),
    "a sweep subfolder climbing out": (
        ["-m", "hydra.sweep.subdir=../../escaped"],
        "hydra.sweep.subdir='../../escaped'",
    ),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_a_hostile_override_is_refused_before_anything_runs_reads_or_writes(tmp_path, case):
    overrides, message = HOSTILE[case]
    result, starts, writes, secret_opens = run_audited(tmp_path, *overrides, "trainer=cpu")
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bp-train: error: ") and message in lines[0], result.stderr
    assert starts == [], starts  # no process started
    assert secret_opens == [], secret_opens  # the secret never opened
    assert writes == [], writes  # nothing written anywhere: no run folder, no store, no log
    assert not (tmp_path / "marker").exists() and not (tmp_path / "escaped").exists()
    assert not (tmp_path / "home").exists()


DOWNLOADED = {
    "a quote closing the new run folder early": (  # an override of this shape does not parse; YAML does
        "hydra:\n  run:\n    dir: \"${bp_run_dir:'{'}/../MARKER}\"\n",
        "a run claims a new folder of its own",
    ),
    "a Hydra callback": (
        "hydra:\n  callbacks:\n    speedup:\n      _target_: shutil.copyfile\n      src: SECRET\n      dst: MARKER\n",
        "hydra.callbacks.speedup._target_='shutil.copyfile' is not allowed",
    ),
    "a Hydra callback made by a resolver": (
        "hydra:\n  callbacks:\n    speedup: '${oc.create:{_target_: shutil.copyfile, src: SECRET, dst: MARKER}}'\n",
        "the resolver 'oc.create' is not allowed here",
    ),
    "a log formatter factory": (
        "hydra:\n  job_logging:\n    formatters:\n      simple:\n        (): shutil.copyfile\n        src: SECRET\n",
        "hydra.job_logging.formatters.simple.()='shutil.copyfile' is not allowed",
    ),
    "a log filter factory": (
        "hydra:\n  hydra_logging:\n    filters:\n      f:\n        (): os.system\n",
        "hydra.hydra_logging.filters.f.()='os.system' is not allowed",
    ),
    "a method replaced through a log handler's attributes": (
        "hydra:\n  job_logging:\n    handlers:\n      console:\n        .: {emit: ext://os.system}\n",
        "emit='ext://os.system' is not allowed",
    ),
    "a callback's target": (
        "callbacks:\n  speedup:\n    _target_: bp_service.bench.tracking_overhead._wall\n"
        "    command: [sh, -c, touch MARKER]\n",
        "callbacks.speedup._target_='bp_service.bench.tracking_overhead._wall' is not allowed",
    ),
}


@pytest.mark.parametrize("case", DOWNLOADED)
def test_a_downloaded_config_dir_is_refused_the_same_way(tmp_path, case):
    body, message = DOWNLOADED[case]
    body = body.replace("SECRET", str(tmp_path / "secret.txt")).replace("MARKER", str(tmp_path / "marker"))
    downloaded = tmp_path / "downloaded" / "experiment"
    downloaded.mkdir(parents=True)
    (downloaded / "fast.yaml").write_text("# @package _global_\ntrainer: {max_epochs: 1}\n" + body)
    result, starts, writes, secret_opens = run_audited(
        tmp_path, "--config-dir", str(tmp_path / "downloaded"), "experiment=fast", "trainer=cpu"
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and message in lines[0], result.stderr
    assert (starts, writes, secret_opens) == ([], [], [])
    assert not (tmp_path / "marker").exists() and not (tmp_path / "home").exists()


def test_a_config_file_that_moves_the_run_folder_leaves_no_empty_one_where_it_was(tmp_path):
    """OmegaConf resolves the interpolation a merge replaces: the default ${bp_run_dir:...} claims a folder too."""
    config = tmp_path / "config" / "experiment"
    config.mkdir(parents=True)
    (config / "elsewhere.yaml").write_text(
        f"# @package _global_\nhydra:\n  run:\n    dir: ${{bp_run_dir:{tmp_path / 'scratch'}}}\n"
    )
    args = ["--config-dir", str(tmp_path / "config"), "experiment=elsewhere", "data=xor", "trainer=cpu",
            "trainer.max_epochs=1", "tracking.enabled=false", "trainer.enable_progress_bar=false"]  # fmt: skip
    result = subprocess.run([str(Path(sys.executable).parent / "bp-train"), *args], capture_output=True, text=True,
                            env=clean_env(BP_SERVICE_HOME=str(tmp_path / "home")), timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    (run_dir,) = (tmp_path / "scratch").iterdir()
    assert list((run_dir / "checkpoints").glob("*.ckpt")) and not (tmp_path / "home" / "outputs").exists()


def test_the_audit_sees_what_it_is_there_to_see(tmp_path):
    """The hook is no stub: the same copy and command, done directly, are seen."""
    call = "import shutil, subprocess; shutil.copyfile(sys.argv[1], 'MARKER'); subprocess.run(['true'])"
    call = call.replace("sys.argv[1]", repr(str(tmp_path / "secret.txt"))).replace("MARKER", str(tmp_path / "marker"))
    result, starts, writes, secret_opens = run_audited(tmp_path, call=call)
    assert result.returncode == 0, result.stderr
    assert [s.split()[1] for s in starts] == ["subprocess.Popen"]
    assert writes == [str(tmp_path / "marker")] and secret_opens == [str(tmp_path / "secret.txt")]


@pytest.mark.parametrize(
    ("override", "refused"),
    [
        ("~seed", "'~seed': seed cannot be removed"),
        ("~model.net", "'~model.net': model.net cannot be removed"),
        ("~optimizer", "'~optimizer': optimizer cannot be removed"),
        ("~data", "'~data': data cannot be removed"),
        ("~callbacks.gradient_flow", None),
        ("~scheduler", None),
        ("~hydra.callbacks.mlflow_sweep", None),
    ],
)
def test_removing_a_key_a_run_needs_is_one_line(cli, override, refused):
    result = cli("bp-train", override, "--cfg", "job")
    if refused is None:
        assert result.returncode == 0, result.stderr
        return
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith(f"bp-train: error: {refused}"), lines[0]


@pytest.mark.slow
def test_a_callback_writing_outside_the_run_is_refused_before_the_run_opens(cli, tmp_path):
    outside = tmp_path / "elsewhere"
    result = cli(
        "bp-train", "trainer=cpu", "trainer.max_epochs=1",
        "+callbacks.extra._target_=lightning.pytorch.callbacks.ModelCheckpoint", f"+callbacks.extra.dirpath={outside}",
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"callbacks.extra.dirpath='{outside}' is outside the run's folder" in result.stderr
    assert not outside.exists()
    import mlflow

    runs = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").search_runs(["0", "1"])
    assert not (tmp_path / "mlflow.db").exists() or runs == []


# --------------------------------------------------------------------------- the lists themselves
def _targets(node):
    if isinstance(node, dict):
        if "_target_" in node:
            yield node["_target_"]
        for value in node.values():
            yield from _targets(value)
    elif isinstance(node, list):
        for value in node:
            yield from _targets(value)


def test_every_target_in_conf_is_listed_and_every_listed_name_is_an_installed_class():
    in_conf = {t for path in CONF_DIR.rglob("*.yaml") for t in _targets(yaml.safe_load(path.read_text()))}
    assert in_conf and in_conf <= guard.JOB_CLASSES | guard.HYDRA_CALLBACKS
    for name in sorted(guard.JOB_CLASSES | guard.HYDRA_CALLBACKS):  # an upgrade that drops one fails here
        assert isinstance(guard.check_target(name, "x", guard.JOB_CLASSES | guard.HYDRA_CALLBACKS), type), name


@pytest.mark.parametrize(
    "target", ["os.system", "builtins.eval", "subprocess.Popen", "torch.optim", "torch.optim.__builtins__",
               "torch.optim.Optimizer", "lightning.pytorch.callbacks.LambdaCallback", "bp_service.training.cli.main",
               "torch.optim.lr_scheduler.LambdaLR", "bp_service.layers.MLP.forward"],
)  # fmt: skip
def test_names_under_an_allowed_prefix_are_still_refused(target):
    with pytest.raises(ConfigError, match="is not allowed"):
        guard.check_target(target, "optimizer")


@pytest.mark.parametrize(
    "overrides",
    [[], ["hydra/launcher=joblib"], ["hydra/job_logging=default"], ["hydra/job_logging=disabled"],
     ["hydra/hydra_logging=default"], ["+hydra.job.env_set.OMP_NUM_THREADS=1"], ["scheduler=cosine"],
     ["callbacks=early_stopping"], ["experiment=digits", "task_name=digits-v2.1"]],
)  # fmt: skip
def test_what_the_project_and_hydra_ship_passes(overrides):
    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            cfg = compose("train", overrides=overrides, return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()
    guard.check_composed(cfg)


def test_the_check_sits_where_hydra_composes():
    """A Hydra release that renames its config loader's entry fails here, not silently."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl

    guard.install()
    assert getattr(ConfigLoaderImpl.load_configuration, "bp_guarded", False)


def test_hydras_wrapped_refusals_stay_whole_sentences():
    from hydra.utils import instantiate

    with pytest.raises(Exception) as caught:
        instantiate({"_target_": "os.remove", "path": "/nonexistent"})
    line = one_line(caught.value)
    assert "from config to prevent" in line and "set env var HYDRA_INSTANTIATE_ALLOWLIST_OVERRIDE=" in line, line


class _Payload:
    """A pickle that runs a command when loaded, as a downloaded ``.hydra/config.pickle`` could."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (subprocess.call, (["touch", str(self.marker)],))


@pytest.mark.parametrize("flag", ["--experimental-rerun", "--exp"])
def test_hydras_rerun_of_a_pickle_is_refused_before_it_is_read(tmp_path, flag):
    import pickle

    payload = tmp_path / "config.pickle"
    payload.write_bytes(pickle.dumps(_Payload(tmp_path / "marker")))
    result, starts, writes, _ = run_audited(tmp_path, flag, str(payload))
    assert result.returncode == 2 and "--experimental-rerun is not supported" in result.stderr, result.stderr
    assert (starts, writes) == ([], []) and not (tmp_path / "marker").exists()


@pytest.mark.parametrize(
    ("folder", "claimed"),
    [
        ("${bp_run_dir:${paths.root_dir}/outputs/${task_name}/runs}", True),  # conf/train.yaml's
        ("${bp_run_dir:/scratch/runs}", True),
        ("${bp_run_dir:/scratch/runs}/../victim", False),  # text after it leads out of the new folder
        ("${bp_run_dir:/a}${bp_run_dir:/b}", False),
        ("${bp_run_dir:'{'}/../victim}", False),  # OmegaConf ends it at the quoted brace's close
        ('${bp_run_dir:"/a"}', False),
        ("${bp_run_dir:/a", False),
        ("/scratch/runs/${bp_run_dir:/a}", False),
    ],
)
def test_a_run_folder_is_one_claimed_folder_and_nothing_around_it(folder, claimed):
    assert guard.is_claimed_folder(folder) is claimed


def test_only_a_ddp_rank_may_be_handed_its_run_folder(tmp_path, monkeypatch):
    """Lightning starts DDP's other ranks with ``hydra.run.dir=<rank 0's folder>``: allowed there alone."""
    hydra = {"run": {"dir": str(tmp_path)}, "sweep": {"dir": "${bp_run_dir:/x}"}}
    with pytest.raises(ConfigError, match="a run claims a new folder of its own"):
        guard.check_hydra_raw(hydra)
    monkeypatch.setenv("LOCAL_RANK", "1")
    guard.check_hydra_raw(hydra)  # rank 1, rank 0's existing folder
    with pytest.raises(ConfigError, match="a run claims a new folder of its own"):
        guard.check_hydra_raw({**hydra, "run": {"dir": str(tmp_path / "not-made-by-rank-0")}})
