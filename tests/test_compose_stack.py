"""docker/compose.yaml run without Docker: every service a real process on loopback, in compose's order.

postgres   BP_TEST_POSTGRES_URI (.ci/run starts one), else a throwaway PostgreSQL cluster started here
mlflow     the service's command and environment: `mlflow server` on the PostgreSQL backend store
train      the EXACT entry command of the service (the image's ENTRYPOINT + the service's command) with its
predict    environment (the image's ENV + the service's), one after the other as depends_on orders them

Only *where* things are is translated, and every translation is listed by ``Stack.localize``, printed
(``pytest -s``) and written to ``mapping.txt`` beside the run:

- service addresses: ``mlflow:5000`` -> ``127.0.0.1:<free port>``, ``postgres:5432`` -> the test's PostgreSQL;
  the server binds ``127.0.0.1`` instead of ``0.0.0.0`` (this machine is shared);
- container paths: each service's volumes -> ``<tmp>/volumes/<name>`` (its own), the predict input's bind
  mount -> a digits CSV written here, the image's ``/opt/venv/bin`` -> this venv, ``/opt/bp-service/conf`` ->
  this checkout's ``conf/``;
- ``tini --`` (PID 1 in the image) is kept when tini is installed here, else dropped: it only forwards signals;
- processes run as this user, not the image's uid 10001 (checked by tests/test_docker.py instead).

Nothing else is added: no extra overrides. The train service's command itself is modest (20 epochs).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pandas as pd
import pytest
import requests
import yaml
from conftest import COMPOSE, clean_env, free_port, interpolate
from sklearn.datasets import load_digits
from test_docker import final_stage

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
IMAGE_PATHS = {"/opt/venv/bin": str(VENV_BIN), "/opt/bp-service/conf": str(REPO / "conf")}
DIGITS_ROWS = 1797


def image_config(dockerfile: Path) -> dict:
    """ENTRYPOINT, CMD, ENV and WORKDIR of the Dockerfile's last stage."""
    config: dict = {"entrypoint": [], "cmd": [], "env": {}, "workdir": "/"}
    for word, rest in final_stage(dockerfile):
        if word == "ENTRYPOINT":
            config["entrypoint"] = json.loads(rest)
        elif word == "CMD":
            config["cmd"] = json.loads(rest)
        elif word == "WORKDIR":
            config["workdir"] = rest.strip()
        elif word == "ENV":
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                config["env"][key] = value
    return config


# --------------------------------------------------------------------------- the stack, localised
class Stack:
    """The compose services as local processes; ``localize`` is the one place where anything is rewritten."""

    def __init__(self, root: Path, pg: dict) -> None:
        self.spec = yaml.safe_load(COMPOSE.read_text())
        self.services = self.spec["services"]
        self.image = image_config(REPO / self.services["mlflow"]["build"]["dockerfile"])
        self.root, self.pg = root, pg
        pg_url = urlparse(pg["uri"])
        self.mlflow_port = free_port()
        # service name:container port -> address here (the published 127.0.0.1:5000 is not used: shared machine)
        self.addresses = {
            "mlflow:5000": f"127.0.0.1:{self.mlflow_port}",
            "postgres:5432": f"{pg_url.hostname}:{pg_url.port or 5432}",
        }
        self.binds: dict[str, str] = {}  # container path -> file here, for bind mounts
        self.mapping: list[str] = []
        self.processes: dict[str, subprocess.Popen] = {}
        self.exit_codes: dict[str, int] = {}
        self.healthy: set[str] = set()
        self.timings: dict[str, float] = {}

    def note(self, line: str) -> None:
        if line not in self.mapping:
            self.mapping.append(line)
            print(f"[compose->local] {line}")

    def volume_dir(self, name: str) -> Path:
        path = self.root / "volumes" / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def paths(self, service: str) -> dict[str, str]:
        """Container path -> path here, for this service's mounts and the image's own folders."""
        out = dict(IMAGE_PATHS)
        for volume in self.services[service].get("volumes", []):
            if isinstance(volume, dict):  # long syntax: a bind mount
                out[volume["target"]] = self.binds[volume["target"]]
            else:
                source, target = volume.split(":")[:2]
                out[target] = str(self.volume_dir(source)) if source in self.spec["volumes"] else source
        return out

    def localize(self, service: str, value: str) -> str:
        new = interpolate(str(value))
        for container, here in sorted(self.paths(service).items(), key=lambda kv: -len(kv[0])):
            new = re.sub(rf"(^|(?<==)){re.escape(container)}(?=/|:|$)", lambda m, h=here: m.group(1) + h, new)
        for address, here in self.addresses.items():
            new = re.sub(rf"(?<=[/@]){re.escape(address)}(?=[/?]|$)", here, new)
        own = self.addresses.get(f"{service}:5000")  # the service's own port, as its healthcheck calls it
        if own:
            new = new.replace("http://127.0.0.1:5000/", f"http://{own}/")
        if new != str(value):
            self.note(f"{service}: {value!r} -> {new!r}")
        return new

    def environment(self, service: str) -> dict[str, str]:
        env = clean_env(drop=("PG",))
        ours = "build" in self.services[service]  # built from docker/Dockerfile: the image's ENV applies
        for key, value in self.image["env"].items() if ours else ():
            value = self.localize(service, value)
            env[key] = value.replace("$PATH", os.environ["PATH"])  # the image's PATH=/opt/venv/bin:$PATH
        for key, value in (self.services[service].get("environment") or {}).items():
            env[key] = self.localize(service, str(value))
        if service == "mlflow":  # another user, password or database than compose's: the test's, same driver
            ours, theirs = urlparse(env["MLFLOW_BACKEND_STORE_URI"]), urlparse(self.pg["uri"])
            if (ours.netloc, ours.path) != (theirs.netloc, theirs.path):
                env["MLFLOW_BACKEND_STORE_URI"] = ours._replace(netloc=theirs.netloc, path=theirs.path).geturl()
                self.note(f"mlflow: MLFLOW_BACKEND_STORE_URI -> {env['MLFLOW_BACKEND_STORE_URI']!r} (the test's)")
        return env

    def entry_command(self, service: str, env: dict[str, str]) -> list[str]:
        spec = self.services[service]
        entry = spec.get("entrypoint", self.image["entrypoint"])
        command = [self.localize(service, a) for a in spec.get("command", self.image["cmd"])]
        if service == "mlflow":  # bind loopback on a free port, not 0.0.0.0:5000
            for option, here in (("--host", "127.0.0.1"), ("--port", str(self.mlflow_port))):
                i = command.index(option) + 1
                self.note(f"mlflow: {option} {command[i]} -> {here}")
                command[i] = here
        if entry[:1] == ["tini"] and not shutil.which("tini"):
            self.note(f"{service}: entrypoint {entry} dropped (no tini here; PID 1 signal forwarding only)")
            entry = []
        full = [*entry, *command]
        exe = shutil.which(full[0], path=env["PATH"])
        assert exe, f"{full[0]} not found on the image's PATH mapped here ({env['PATH'][:200]})"
        return [exe, *full[1:]]

    def cwd(self, service: str) -> str:
        return self.localize(service, self.services[service].get("working_dir", self.image["workdir"]))

    def wait_healthy(self, service: str, timeout: float = 240) -> None:
        check = self.services[service]["healthcheck"]["test"]
        assert check[0] == "CMD", "exec-form healthchecks only"
        env = self.environment(service)
        if service == "postgres":
            if self.pg["bindir"] is None or urlparse(self.pg["uri"]).hostname != "127.0.0.1":
                self.note("postgres: healthcheck not run here (no pg_isready, or the server is not on 127.0.0.1)")
                self.healthy.add(service)
                return
            env["PATH"] = f"{self.pg['bindir']}:{env['PATH']}"
            env["PGPORT"] = str(urlparse(self.pg["uri"]).port or 5432)  # the container's 5432, here
            env["PGCONNECT_TIMEOUT"] = "5"
        command = [self.localize(service, a) for a in check[1:]]
        deadline = time.monotonic() + timeout
        while True:
            proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60, check=False)
            if proc.returncode == 0:
                self.healthy.add(service)
                return
            running = self.processes.get(service)
            if running is not None and running.poll() is not None:
                pytest.fail(f"{service} exited with {running.returncode}: {self.log(service)[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(
                    f"{service} not healthy after {timeout:.0f} s: {proc.stderr[-1000:]}\n{self.log(service)[-3000:]}"
                )
            time.sleep(1)

    def log(self, service: str) -> str:
        path = self.root / f"{service}.log"
        return path.read_text(errors="replace") if path.is_file() else ""

    def check_dependencies(self, service: str) -> None:
        for dep, rule in (self.services[service].get("depends_on") or {}).items():
            if rule["condition"] == "service_healthy":
                assert dep in self.healthy, f"{service} needs {dep} healthy"
            elif rule["condition"] == "service_completed_successfully":
                assert self.exit_codes.get(dep) == 0, f"{service} needs {dep} to have exited 0"
            else:
                raise AssertionError(f"{service}: condition {rule['condition']} not reproduced here")

    def start(self, service: str) -> None:
        """A long-running service, in its own session (so its workers can be stopped with it)."""
        self.check_dependencies(service)
        env = self.environment(service)
        command = self.entry_command(service, env)
        self.note(f"{service}: runs {shlex.join(command)}")
        with open(self.root / f"{service}.log", "w") as log:
            self.processes[service] = subprocess.Popen(
                command, cwd=self.cwd(service), env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def run_job(self, service: str, timeout: float = 900) -> None:
        self.check_dependencies(service)
        env = self.environment(service)
        command = self.entry_command(service, env)
        self.note(f"{service}: runs {shlex.join(command)}")
        with open(self.root / f"{service}.log", "w") as log:
            proc = subprocess.run(
                command,
                cwd=self.cwd(service),
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=timeout,
                check=False,
            )
        self.exit_codes[service] = proc.returncode
        assert proc.returncode == 0, f"{service} exited {proc.returncode}:\n{self.log(service)[-4000:]}"

    def stop(self) -> None:
        for proc in self.processes.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)  # the session this test started for the service
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        (self.root / "mapping.txt").write_text("\n".join(self.mapping) + "\n")


def _session_cmdlines(session_id: int) -> list[str]:
    out = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                if os.getsid(int(proc.name)) == session_id:
                    out.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
    return out


@pytest.fixture(scope="module")
def stack(tmp_path_factory, postgres) -> Iterator[Stack]:
    """The whole stack, brought up in compose's order; stopped at the end of the module."""
    root = tmp_path_factory.mktemp("stack")
    stack = Stack(root, postgres)
    # predict's input, bind-mounted from the host: digits rows with an id column, as `make compose-up` writes
    digits = load_digits()
    rows = pd.DataFrame(digits.data, columns=digits.feature_names)
    rows.insert(0, "id", [f"d{i}" for i in range(len(rows))])
    input_csv = root / "input.csv"
    rows.to_csv(input_csv, index=False)
    (bind,) = [v for v in stack.services["predict"]["volumes"] if isinstance(v, dict)]
    stack.binds[bind["target"]] = str(input_csv)
    stack.note(f"predict: bind {bind['source']} -> {input_csv}")

    started = time.perf_counter()
    try:
        order = ["postgres", "mlflow", "train", "predict"]
        assert set(order) == set(stack.services)
        stack.wait_healthy("postgres")
        stack.start("mlflow")
        stack.wait_healthy("mlflow")
        stack.run_job("train")
        stack.run_job("predict")
        stack.timings["stack_s"] = time.perf_counter() - started
        yield stack
    finally:
        stack.stop()


# --------------------------------------------------------------------------- what the stack leaves behind
def test_training_run_finished_on_the_server(stack):
    from mlflow import MlflowClient

    client = MlflowClient(f"http://127.0.0.1:{stack.mlflow_port}")
    experiment = client.get_experiment_by_name("digits")
    assert experiment is not None and experiment.artifact_location.startswith("mlflow-artifacts:")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.tags["hydra.overrides"] == " ".join(stack.services["train"]["command"][1:])
    assert run.data.metrics["test/acc"] > 0.8
    print(
        f"\nstack up, trained and predicted in {stack.timings['stack_s']:.0f} s;"
        f" test/acc {run.data.metrics['test/acc']:.3f}"
    )

    # artifacts went through the server (--serve-artifacts) into the mlflow service's volume ...
    artifacts = stack.volume_dir("artifacts") / "mlartifacts"
    assert list(artifacts.rglob("model_bundle.pt")) and list(artifacts.rglob("*.ckpt"))
    # ... the train service kept its checkpoints in its own, and recorded nothing locally
    home = stack.volume_dir("checkpoints")
    assert list(home.glob("outputs/digits/runs/*/checkpoints/last.ckpt"))
    assert not (home / "mlflow.db").exists() and not (home / "mlartifacts").exists()


def test_model_is_registered_and_loadable_and_matches_the_predictions(stack):
    from mlflow import MlflowClient

    uri = f"http://127.0.0.1:{stack.mlflow_port}"
    client = MlflowClient(uri)
    name = next(
        a.split("=", 1)[1] for a in stack.services["train"]["command"] if a.startswith("tracking.register_model=")
    )
    (version,) = client.search_model_versions(f"name='{name}'")
    (run,) = client.search_runs([client.get_experiment_by_name("digits").experiment_id])
    assert version.run_id == run.info.run_id

    predictions = stack.volume_dir("predictions") / "predictions.csv"
    got = pd.read_csv(predictions)
    assert list(got.columns) == ["id", "prediction", *[f"proba_{k}" for k in range(10)]]
    assert len(got) == DIGITS_ROWS and got["id"].tolist() == [f"d{i}" for i in range(DIGITS_ROWS)]

    # MLflow's own loader, in a fresh process pointed at the server as any client would be
    script = (
        "import sys, mlflow, pandas as pd; "
        f"m = mlflow.pyfunc.load_model('models:/{name}/latest'); "
        "x = pd.read_csv(sys.argv[1]).drop(columns='id'); m.predict(x).to_csv(sys.argv[2], index=False)"
    )
    out = stack.root / "pyfunc.csv"
    env = clean_env(MLFLOW_TRACKING_URI=uri)
    proc = subprocess.run(
        [sys.executable, "-c", script, stack.binds["/input/rows.csv"], str(out)],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = pd.read_csv(out)
    assert got["prediction"].tolist() == expected["prediction"].tolist()
    np.testing.assert_allclose(got.iloc[:, 2:].to_numpy(), expected.iloc[:, 1:].to_numpy(), rtol=0, atol=1e-6)


def test_server_accepts_the_stacks_host_header_and_refuses_others(stack):
    url = f"http://127.0.0.1:{stack.mlflow_port}/api/2.0/mlflow/experiments/search?max_results=1"
    assert requests.get(url, headers={"Host": "mlflow:5000"}, timeout=10).status_code == 200
    assert requests.get(url, headers={"Host": "evil.example:5000"}, timeout=10).status_code == 403


def test_server_runs_no_job_runner(stack):
    """MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false: by default MLflow 3.17's server also starts a job runner
    (``python -m mlflow.server.jobs._job_runner``) and seven Huey consumers beside the web workers."""
    server = stack.processes["mlflow"]
    assert server.poll() is None, stack.log("mlflow")[-3000:]
    cmdlines = _session_cmdlines(server.pid)
    assert any(" server" in c for c in cmdlines)  # the server and its workers are there ...
    assert not [c for c in cmdlines if "mlflow.server.jobs." in c or "huey" in c], cmdlines  # ... and no job runner


def test_every_rewrite_is_listed(stack):
    text = "\n".join(stack.mapping)
    assert "http://mlflow:5000" in text and f"127.0.0.1:{stack.mlflow_port}" in text
    assert "/data" in text and "/opt/venv/bin" in text
    for service in ("mlflow", "train", "predict"):
        assert f"{service}: runs " in text
