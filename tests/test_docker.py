"""The Docker images and the compose stack, checked without a Docker engine: hadolint on every Dockerfile,
and docker/compose.yaml parsed and its wiring checked against the Dockerfile, MLflow's server options and
our own commands. tests/test_compose_stack.py runs the same topology with real processes."""

from __future__ import annotations

import fnmatch
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml
from conftest import clean_env

REPO = Path(__file__).resolve().parent.parent
DOCKER = REPO / "docker"
DOCKERFILES = sorted(DOCKER.glob("Dockerfile*"))
COMPOSE = DOCKER / "compose.yaml"
BP_SERVICES = ["mlflow", "train", "predict"]  # run from our own image
HADOLINT = Path(sys.executable).parent / "hadolint"


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments and parser directives dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in dockerfile.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = pending + stripped
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def final_stage(dockerfile: Path) -> list[tuple[str, str]]:
    items = instructions(dockerfile)
    last_from = max(i for i, (word, _) in enumerate(items) if word == "FROM")
    return items[last_from:]


def env_of(stage: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for word, rest in stage:
        if word == "ENV":
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def interpolate_defaults(value: str) -> str:
    """Compose's ${VAR:-default} / ${VAR-default} with nothing set: the default."""
    return re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*(?::?-([^}]*))?\}", lambda m: m.group(1) or "", value)


# --------------------------------------------------------------------------- Dockerfiles
def test_there_is_a_cpu_and_a_cuda_dockerfile():
    assert [p.name for p in DOCKERFILES] == ["Dockerfile", "Dockerfile.cuda"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(dockerfile):
    proc = subprocess.run(
        [str(HADOLINT), "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def base_images(dockerfile: Path) -> list[str]:
    """The images the FROM lines name (ARG defaults filled in), not earlier stages."""
    items = instructions(dockerfile)
    args: dict[str, str] = {}
    for word, rest in items:
        if word == "ARG" and "=" in rest:
            key, _, value = rest.partition("=")
            args.setdefault(key, value)
    stages: set[str] = set()
    images: list[str] = []
    for word, rest in items:
        if word == "FROM":
            parts = rest.split()
            ref = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], parts[0])
            if ref not in stages:
                images.append(ref)
            if len(parts) == 3 and parts[1].upper() == "AS":
                stages.add(parts[2])
    return images


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_image_layout_user_and_entry_point(dockerfile):
    assert sum(word == "FROM" for word, _ in instructions(dockerfile)) >= 2, "multi-stage: no build caches at run"
    for image in base_images(dockerfile):
        tag = image.rsplit("/", 1)[-1].partition(":")[2]
        assert re.search(r"\d", tag) and tag != "latest", f"{image}: pin a versioned tag"

    stage = final_stage(dockerfile)
    env = env_of(stage)
    assert env["BP_SERVICE_HOME"] == "/data"
    conf_dir = env["BP_SERVICE_CONF_DIR"]
    assert ("COPY", f"conf {conf_dir}") in stage, "the package finds conf/ through BP_SERVICE_CONF_DIR"
    assert env["PATH"].startswith("/opt/venv/bin:")
    assert ("VOLUME", '["/data"]') in stage and ("WORKDIR", "/data") in stage

    users = [rest for word, rest in stage if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image runs as a non-root user"
    uid = users[-1].split(":")[0]
    assert f"--uid {uid}" in " ".join(rest for word, rest in stage if word == "RUN")

    entry = [json.loads(rest) for word, rest in stage if word == "ENTRYPOINT"]
    cmd = [json.loads(rest) for word, rest in stage if word == "CMD"]  # exec form: JSON, no shell in between
    assert entry == [["tini", "--"]], "an init as PID 1 forwards SIGTERM to the job and reaps children"
    assert cmd and cmd[-1][:2] == ["bp-train", "experiment=digits"], "the default command trains"
    copies = " ".join(rest for word, rest in instructions(dockerfile) if word == "COPY")
    assert "requirements.lock ./" in copies, "installs the pinned lock"


def test_cpu_image_takes_torch_from_the_cpu_index_only():
    items = instructions(DOCKER / "Dockerfile")
    args = {k: v for word, rest in items if word == "ARG" for k, _, v in [rest.partition("=")]}
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    run = " ".join(rest for word, rest in items if word == "RUN")
    assert '--index-url "${TORCH_INDEX_URL}"' in run and "--extra-index-url" not in run
    assert "whl/cpu" not in (DOCKER / "Dockerfile.cuda").read_text()  # CUDA: torch's default wheel from PyPI


def test_dockerignore_keeps_local_state_out_but_not_what_the_build_copies():
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert not any(p.startswith("!") for p in patterns)  # the simple matcher below would not follow negations

    def ignored(path: str) -> bool:
        """Whether the path or a folder above it matches (fnmatch's * also crosses "/": errs on ignoring)."""
        parts = path.split("/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        for pattern in (p.strip("/") for p in patterns):
            variants = [pattern, pattern[3:]] if pattern.startswith("**/") else [pattern]  # **/ matches no folder too
            if any(fnmatch.fnmatch(prefix, v) for prefix in prefixes for v in variants):
                return True
        return False

    for path in [".venv", ".git", "mlflow.db", "mlartifacts", "outputs", "multirun", "docker/input.csv"]:
        assert ignored(path), f"{path} must not go into the build context"
    assert ignored("outputs/train/runs/x/checkpoints/best.ckpt") and ignored("model.ckpt")
    for dockerfile in DOCKERFILES:
        for word, rest in instructions(dockerfile):
            if word == "COPY" and not rest.startswith("--from"):
                for source in rest.split()[:-1]:
                    assert not ignored(source), f"{dockerfile.name} copies {source}, which .dockerignore drops"


# --------------------------------------------------------------------------- compose wiring
def test_services_and_volumes():
    spec = compose()
    assert set(spec["services"]) == {"postgres", *BP_SERVICES}
    assert set(spec["volumes"]) == {"database", "artifacts", "checkpoints", "predictions"}
    services = spec["services"]
    assert "database:/var/lib/postgresql/data" in services["postgres"]["volumes"]
    assert "artifacts:/data" in services["mlflow"]["volumes"]
    assert "checkpoints:/data" in services["train"]["volumes"]  # BP_SERVICE_HOME: runs and checkpoints
    assert "predictions:/data" in services["predict"]["volumes"]
    bind = next(v for v in services["predict"]["volumes"] if isinstance(v, dict))
    assert bind["type"] == "bind" and bind["read_only"] is True and bind["target"] == "/input/rows.csv"


def test_bp_services_build_our_image_and_run_as_its_non_root_user():
    services = compose()["services"]
    users = [rest for word, rest in final_stage(DOCKER / "Dockerfile") if word == "USER"]
    for name in BP_SERVICES:
        service = services[name]
        assert service["build"] == {"context": "..", "dockerfile": "docker/Dockerfile"}
        assert service["user"] == users[-1], f"{name}: the image's user, stated in compose too"
    assert services["postgres"]["user"] == "postgres"
    for name, service in services.items():
        assert str(service.get("user", "root")).split(":")[0] not in ("root", "0"), name


def test_published_ports_are_loopback_only():
    for name, service in compose()["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
    assert compose()["services"]["mlflow"]["ports"] == ["127.0.0.1:5000:5000"]
    assert "ports" not in compose()["services"]["postgres"]


def test_healthchecks_and_start_order():
    services = compose()["services"]
    pg = services["postgres"]["healthcheck"]["test"]
    assert pg[:4] == ["CMD", "pg_isready", "-h", "127.0.0.1"], "TCP: the init-time server only listens on a socket"
    assert services["mlflow"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    assert services["train"]["depends_on"] == {"mlflow": {"condition": "service_healthy"}}
    assert services["predict"]["depends_on"] == {
        "mlflow": {"condition": "service_healthy"},
        "train": {"condition": "service_completed_successfully"},
    }
    for job in ("train", "predict"):
        assert services[job]["restart"] == "no" and "healthcheck" not in services[job]


def test_mlflow_healthcheck_uses_an_api_call_with_the_clients_host_header():
    service = compose()["services"]["mlflow"]
    test = service["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"]
    code = test[3]
    assert "/health" not in code, "/health skips the Host check: green even when clients get 403"
    assert "/api/2.0/mlflow/" in code and "'Host': 'mlflow:5000'" in code
    compile(code, "healthcheck", "exec")


def _server_command() -> list[str]:
    return compose()["services"]["mlflow"]["command"]


def _option(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def test_mlflow_server_command_is_valid_for_the_installed_mlflow():
    from mlflow.cli import server

    command = _server_command()
    assert command[:2] == ["mlflow", "server"]
    env = compose()["services"]["mlflow"]["environment"]
    backend = next(p for p in server.params if p.name == "backend_store_uri")
    assert backend.envvar in env, "the backend store URI (with its password) is passed in the environment"
    ctx = server.make_context("server", [*command[2:], "--backend-store-uri", "postgresql://u:p@h/db"])
    assert ctx.params["serve_artifacts"] is True
    assert ctx.params["artifacts_destination"] == "/data/mlartifacts"
    assert ctx.params["host"] == "0.0.0.0" and ctx.params["port"] == 5000


def test_backend_store_is_the_compose_postgres():
    spec = compose()
    uri = urlparse(interpolate_defaults(spec["services"]["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"]))
    pg_env = {k: interpolate_defaults(str(v)) for k, v in spec["services"]["postgres"]["environment"].items()}
    assert (uri.hostname, uri.port) == ("postgres", 5432)
    # the driver SQLAlchemy picks for the scheme is installed (a bare postgresql:// means psycopg 3 in 2.1)
    from sqlalchemy.engine import make_url

    assert uri.scheme == "postgresql+psycopg2"
    make_url(uri.geturl()).get_dialect().import_dbapi()
    assert (uri.username, uri.password, uri.path.lstrip("/")) == (
        pg_env["POSTGRES_USER"],
        pg_env["POSTGRES_PASSWORD"],
        pg_env["POSTGRES_DB"],
    )
    assert "${POSTGRES_PASSWORD" in spec["services"]["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"]


def test_clients_host_is_allowed_and_job_execution_is_off():
    from mlflow.environment_variables import MLFLOW_SERVER_ENABLE_JOB_EXECUTION
    from mlflow.server.security_utils import is_allowed_host_header

    services = compose()["services"]
    allowed = _option(_server_command(), "--allowed-hosts").split(",")
    for job in ("train", "predict"):
        uri = services[job]["environment"]["MLFLOW_TRACKING_URI"]
        assert uri == "http://mlflow:5000"
        assert is_allowed_host_header(allowed, urlparse(uri).netloc), f"{job} would get 403 from the server"
    for host in ("localhost:5000", "127.0.0.1:5000"):  # the published port, from the host's browser
        assert is_allowed_host_header(allowed, host)
    assert not is_allowed_host_header(allowed, "evil.example:5000") and "*" not in allowed

    env = services["mlflow"]["environment"]
    assert env[MLFLOW_SERVER_ENABLE_JOB_EXECUTION.name] == "false"  # the variable MLflow reads, spelt right


def test_job_execution_value_reads_as_off_and_its_absence_as_on(monkeypatch):
    """The string compose passes is one MLflow parses as False (and the default really is on)."""
    from mlflow.environment_variables import MLFLOW_SERVER_ENABLE_JOB_EXECUTION

    value = compose()["services"]["mlflow"]["environment"][MLFLOW_SERVER_ENABLE_JOB_EXECUTION.name]
    monkeypatch.setenv(MLFLOW_SERVER_ENABLE_JOB_EXECUTION.name, value)
    assert MLFLOW_SERVER_ENABLE_JOB_EXECUTION.get() is False
    monkeypatch.delenv(MLFLOW_SERVER_ENABLE_JOB_EXECUTION.name)
    assert MLFLOW_SERVER_ENABLE_JOB_EXECUTION.get() is True


def test_train_and_predict_commands_are_valid(compose_cfg):
    from bp_service.serving.predict import parse_args
    from bp_service.training.preflight import validate

    services = compose()["services"]
    train = services["train"]["command"]
    assert train[0] == "bp-train"
    validate(compose_cfg(*train[1:]))  # composes against conf/ and passes bp-train's own checks
    registered = next(a.split("=", 1)[1] for a in train if a.startswith("tracking.register_model="))

    predict = services["predict"]["command"]
    assert predict[0] == "bp-predict"
    cfg = parse_args(predict[1:])
    assert cfg.model.startswith(f"models:/{registered}/"), "predict uses the model train registers"
    assert cfg.input == "/input/rows.csv" and cfg.output.startswith("/data/")


# --------------------------------------------------------------------------- Makefile
def test_makefile_has_docker_targets_and_lints_the_dockerfiles():
    text = (REPO / "Makefile").read_text()
    for target in ("docker-build", "docker-train", "compose-up", "compose-down"):
        assert re.search(rf"^{target}:.*## \S", text, re.M), f"make {target} (with a ## help line)"
    lint = re.search(r"^lint:.*\n((?:\t.*\n)+)", text, re.M).group(1)
    assert "$(BIN)/hadolint docker/Dockerfile docker/Dockerfile.cuda" in lint


# --------------------------------------------------------------------------- the host-network override
COMPOSE_HOST = DOCKER / "compose.host.yaml"
RESET = object()  # compose v2's `!reset`: the key is removed from the merged service


class _ComposeLoader(yaml.SafeLoader):
    pass


_ComposeLoader.add_constructor("!reset", lambda loader, node: RESET)


def compose_host() -> dict:
    return yaml.load(COMPOSE_HOST.read_text(), Loader=_ComposeLoader)


def _host_port(service: str) -> str:
    return {"mlflow": "${BP_MLFLOW_PORT:-5000}", "postgres": "${BP_PG_PORT:-5432}"}[service]


def test_host_override_puts_every_service_on_the_host_network_and_changes_only_addresses():
    base, over = compose()["services"], compose_host()["services"]
    assert set(over) == set(base)
    allowed = {"network_mode", "environment", "command", "healthcheck", "ports"}
    for name, service in over.items():
        assert service["network_mode"] == "host", name
        assert set(service) <= allowed, f"{name}: the override changes {set(service) - allowed}"
    assert over["mlflow"]["ports"] is RESET  # nothing published; a v1 engine refuses ports with host networking

    # the server: the same command but for where it listens
    command, expected = over["mlflow"]["command"], list(base["mlflow"]["command"])
    expected[expected.index("--host") + 1] = "127.0.0.1"
    expected[expected.index("--port") + 1] = _host_port("mlflow")
    assert command == expected
    # service names -> 127.0.0.1 on the configured ports, in every URI and in the healthcheck
    mlflow_url = f"http://127.0.0.1:{_host_port('mlflow')}"
    for job in ("train", "predict"):
        assert base[job]["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
        assert over[job]["environment"] == {"MLFLOW_TRACKING_URI": mlflow_url}
    backend = base["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"]
    assert over["mlflow"]["environment"] == {
        "MLFLOW_BACKEND_STORE_URI": backend.replace("@postgres:5432/", f"@127.0.0.1:{_host_port('postgres')}/")
    }
    base_check, over_check = base["mlflow"]["healthcheck"]["test"], over["mlflow"]["healthcheck"]["test"]
    assert over_check == [*base_check[:3], base_check[3].replace("127.0.0.1:5000", f"127.0.0.1:{_host_port('mlflow')}")]
    assert "'Host': 'mlflow:5000'" in over_check[3]  # still the header the server must accept
    # PostgreSQL on loopback only, on the port its healthcheck (pg_isready reads PGPORT) asks
    assert over["postgres"]["command"] == ["postgres", "-c", "listen_addresses=127.0.0.1"]
    assert over["postgres"]["environment"] == {"PGPORT": _host_port("postgres")}
    assert "-h" in base["postgres"]["healthcheck"]["test"] and "127.0.0.1" in base["postgres"]["healthcheck"]["test"]


def test_postgres_stand_in_is_linted_and_keeps_the_official_images_contract():
    dockerfile = DOCKER / "ci" / "Dockerfile.postgres"
    proc = subprocess.run([str(HADOLINT), "--no-color", str(dockerfile)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    env = env_of(final_stage(dockerfile))
    assert env["PGDATA"] == "/var/lib/postgresql/data" and env["PATH"].startswith("/usr/lib/postgresql/")
    stage = final_stage(dockerfile)
    assert ("VOLUME", '["/var/lib/postgresql/data"]') in stage and ("USER", "postgres") in stage
    entry = (DOCKER / "ci" / "postgres-entrypoint.sh").read_text()
    for variable in ("POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"):  # what compose.yaml sets
        assert variable in entry and variable in compose()["services"]["postgres"]["environment"]
    assert compose()["services"]["postgres"]["image"] == "${BP_POSTGRES_IMAGE:-postgres:16.10-bookworm}"


def test_offline_build_installs_only_from_the_wheelhouse():
    items = instructions(DOCKER / "Dockerfile")
    assert ("ARG", "OFFLINE=0") in items and ("COPY", "docker/wheelhouse /wheelhouse") in items
    run = " ".join(rest for word, rest in items if word == "RUN")
    assert "pip install --no-index --find-links /wheelhouse -r /tmp/runtime.lock" in run
    ignored = (DOCKER / "wheelhouse" / ".gitignore").read_text().split()
    assert "*" in ignored and "!.gitignore" in ignored  # the wheels never reach git; the folder does


def test_makefile_and_ci_run_the_container_checks():
    text = (REPO / "Makefile").read_text()
    for target in ("wheelhouse", "docker-check"):
        assert re.search(rf"^{target}:.*## \S", text, re.M), f"make {target} (with a ## help line)"
    ci = (REPO / ".ci" / "run").read_text()
    assert "docker/ci-check.sh" in ci and ci.index("make test-slow") < ci.index("docker/ci-check.sh")


# --------------------------------------------------------------------------- with a Docker engine
# The image and the compose stack run for real. docker/ci-check.sh (`make docker-check`, and so CI) starts an
# engine, builds the image and sets BP_TEST_DOCKER_IMAGE; without it these are skipped, saying so.
IMAGE = os.environ.get("BP_TEST_DOCKER_IMAGE", "")
POSTGRES_IMAGE = os.environ.get("BP_TEST_POSTGRES_IMAGE", "postgres:16.10-bookworm")
needs_engine = pytest.mark.skipif(not IMAGE, reason="no image to run: `make docker-check` builds one and runs these")
VENV_BIN = Path(sys.executable).parent
DIGITS_EPOCHS = 20


def docker(
    *args: str, timeout: float = 600, check: bool = True, env: dict | None = None
) -> subprocess.CompletedProcess:
    proc = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, env=env, check=False)
    if check and proc.returncode != 0:
        pytest.fail(
            f"docker {shlex.join(args)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc


def in_volume(volume: str, *command: str, mounts: tuple[str, ...] = (), timeout: float = 600) -> str:
    """Run the image as users do: its own (non-root) user, no network, the volume at /data; stdout back."""
    mount_args = [a for m in mounts for a in ("-v", m)]
    return docker("run", "--rm", "--network", "none", "-v", f"{volume}:/data", *mount_args, IMAGE, *command,
                  timeout=timeout).stdout  # fmt: skip


def runs_in_volume(volume: str) -> list[dict]:
    """The runs of the embedded store in the volume, read by MLflow inside the image."""
    script = (
        "import json, mlflow; c = mlflow.MlflowClient('sqlite:////data/mlflow.db'); "
        "e = c.get_experiment_by_name('digits'); "
        "print(json.dumps([{'id': r.info.run_id, 'status': r.info.status, 'metrics': r.data.metrics} "
        "for r in c.search_runs([e.experiment_id])]))"
    )
    return json.loads(in_volume(volume, "python", "-c", script).strip().splitlines()[-1])


def checkpoint_epoch(volume: str, path: str) -> dict:
    script = (
        "import json, sys, torch; c = torch.load(sys.argv[1], map_location='cpu', weights_only=True); "
        "print(json.dumps({'epoch': c['epoch'], 'global_step': c['global_step']}))"
    )
    return json.loads(in_volume(volume, "python", "-c", script, path).strip().splitlines()[-1])


def digits_csv(path: Path) -> Path:
    from sklearn.datasets import load_digits

    digits = load_digits()
    import pandas as pd

    rows = pd.DataFrame(digits.data, columns=digits.feature_names)
    rows.insert(0, "id", [f"d{i}" for i in range(len(rows))])
    rows.to_csv(path, index=False)
    path.chmod(0o644)  # readable by the image's user through the bind mount
    return path


@pytest.fixture(scope="module")
def volumes():
    """Named volumes, each new and removed at the end."""
    made: list[str] = []

    def make() -> str:
        name = f"bp-test-{uuid.uuid4().hex[:10]}"
        docker("volume", "create", name)
        made.append(name)
        return name

    yield make
    for name in made:
        docker("volume", "rm", "-f", name, check=False)


@pytest.fixture(scope="module")
def trained(volumes) -> dict:
    """bp-train experiment=digits in the image, on a fresh named volume at /data."""
    volume = volumes()
    out = in_volume(volume, "bp-train", "experiment=digits", f"trainer.max_epochs={DIGITS_EPOCHS}",
                    "trainer.enable_progress_bar=false")  # fmt: skip
    checkpoint = re.search(r"^\s+checkpoint\s+(/data/\S+\.ckpt)$", out, re.M)
    run = re.search(r"^\s+MLflow run\s+([0-9a-f]{32})\b", out, re.M)
    assert checkpoint and run, out[-3000:]
    return {"volume": volume, "out": out, "checkpoint": checkpoint.group(1), "run_id": run.group(1)}


def _locked(package: str) -> str:
    return re.search(rf"^{package}==(\S+)$", (REPO / "requirements.lock").read_text(), re.M).group(1)


@pytest.mark.slow
@needs_engine
class TestImage:
    def test_image_config_is_what_the_dockerfile_says(self):
        config = json.loads(docker("image", "inspect", IMAGE).stdout)[0]["Config"]
        assert config["User"] == "10001:10001"
        assert config["Entrypoint"] == ["tini", "--"] and config["Cmd"][:2] == ["bp-train", "experiment=digits"]
        assert "BP_SERVICE_HOME=/data" in config["Env"] and config["WorkingDir"] == "/data"
        assert list(config["Volumes"]) == ["/data"]
        script = "import sys, torch; print(sys.version_info[:2], torch.__version__, torch.version.cuda)"
        versions = docker("run", "--rm", "--network", "none", IMAGE, "python", "-c", script).stdout
        assert versions.split() == ["(3,", "11)", f"{_locked('torch')}+cpu", "None"], versions  # the CPU build

    def test_train_as_the_non_root_user_on_the_volume(self, trained):
        assert "bp-train: digits finished" in trained["out"]
        ids = in_volume(trained["volume"], "sh", "-c", "id -u; find /data ! -user 10001 -print | head -n 5")
        assert ids.split() == ["10001"], f"files in /data not owned by the image's user: {ids}"
        (run,) = runs_in_volume(trained["volume"])
        assert run["id"] == trained["run_id"] and run["status"] == "FINISHED"
        assert run["metrics"]["test/acc"] > 0.8, run["metrics"]
        listing = in_volume(trained["volume"], "sh", "-c", "ls /data/outputs/digits/runs/*/checkpoints/")
        assert "last.ckpt" in listing.split() and trained["checkpoint"].rsplit("/", 1)[1] in listing.split()

    def test_predict_with_the_trained_checkpoint(self, trained, tmp_path):
        import pandas as pd
        from sklearn.datasets import load_digits

        rows = digits_csv(tmp_path / "rows.csv")
        in_volume(trained["volume"], "bp-predict", f"model={trained['checkpoint']}", "input=/in/rows.csv",
                  "output=/data/predictions.csv", mounts=(f"{rows}:/in/rows.csv:ro",))  # fmt: skip
        got = pd.read_csv(io.StringIO(in_volume(trained["volume"], "cat", "/data/predictions.csv")))
        assert list(got.columns) == ["id", "prediction", *[f"proba_{k}" for k in range(10)]]
        target = load_digits().target
        assert got["id"].tolist() == [f"d{i}" for i in range(len(target))]
        assert (got["prediction"].to_numpy() == target).mean() > 0.8

    def test_explain_gives_the_same_numbers_as_the_source_and_plots_as_the_user(self, volumes):
        volume = volumes()
        got = json.loads(in_volume(volume, "bp-explain", "--json", "--plot", "/data/explain.png"))
        here = subprocess.run([str(VENV_BIN / "bp-explain"), "--json"], capture_output=True, text=True, check=True)
        assert got == json.loads(here.stdout)
        assert got["cost_after"] < got["forward"]["cost"]  # one step of the hand-written backward lowers the cost
        magic = in_volume(volume, "python", "-c", "print(open('/data/explain.png', 'rb').read(8))")
        assert magic.strip() == repr(b"\x89PNG\r\n\x1a\n")

    def test_docker_stop_exits_143_with_a_killed_run_and_a_last_ckpt_that_resumes(self, volumes):
        volume, name = volumes(), f"bp-test-stop-{uuid.uuid4().hex[:8]}"
        overrides = ["experiment=digits", "trainer.enable_progress_bar=false"]
        docker("run", "-d", "--name", name, "--network", "none", "-v", f"{volume}:/data", IMAGE,
               "bp-train", *overrides, "trainer.max_epochs=400")  # fmt: skip
        try:
            last = "/data/outputs/digits/runs/*/checkpoints/last.ckpt"
            deadline = time.monotonic() + 300
            while docker("exec", name, "sh", "-c", f"ls {last}", check=False).returncode != 0:
                state = json.loads(docker("inspect", name).stdout)[0]["State"]
                assert state["Running"], f"exited {state['ExitCode']} early:\n{docker('logs', name).stderr[-3000:]}"
                assert time.monotonic() < deadline, "no last.ckpt after 300 s"
                time.sleep(0.5)
            docker("stop", "--time", "60", name, timeout=120)  # SIGTERM through tini; SIGKILL only after 60 s
            state = json.loads(docker("inspect", name).stdout)[0]["State"]
            logs = docker("logs", name)
            assert state["ExitCode"] == 143, f"{state}\n{logs.stderr[-3000:]}"
            assert "stopped by SIGTERM" in logs.stderr and "resume with ckpt_path=last" in logs.stderr
        finally:
            docker("rm", "-f", name, check=False)

        (killed,) = runs_in_volume(volume)
        assert killed["status"] == "KILLED"
        path = in_volume(volume, "sh", "-c", f"ls {last}").strip()
        stopped = checkpoint_epoch(volume, path)
        assert stopped["global_step"] > 0 and stopped["epoch"] < 399

        # a second container picks it up: the same run, continued to a few more epochs, then FINISHED
        until = stopped["epoch"] + 3
        out = in_volume(volume, "bp-train", *overrides, f"trainer.max_epochs={until}", "ckpt_path=last")
        assert f"MLflow run   {killed['id']}" in out, out[-3000:]
        (finished,) = runs_in_volume(volume)
        assert finished["id"] == killed["id"] and finished["status"] == "FINISHED"
        resumed = checkpoint_epoch(volume, path)
        assert resumed["global_step"] > stopped["global_step"] and resumed["epoch"] >= until - 1


# --------------------------------------------------------------------------- the compose stack, in containers
def compose_command(project: str, root: Path) -> list[str]:
    """`docker compose` (v2) on compose.yaml + compose.host.yaml; else Debian's docker-compose 1.29 on the same
    two files adapted to what it knows: no top-level `name` (the project is -p anyway), no `!reset` tag (the
    key it marks is removed from the base service, which is what v2 does)."""
    if subprocess.run(["docker", "compose", "version"], capture_output=True, check=False).returncode == 0:
        return ["docker", "compose", "-p", project, "-f", str(COMPOSE), "-f", str(COMPOSE_HOST)]
    v1 = shutil.which("docker-compose")
    if v1 is None:
        pytest.fail("neither `docker compose` (v2) nor docker-compose (v1: apt-get install docker-compose)")
    base, override = compose(), compose_host()
    base.pop("name")
    for name, service in override["services"].items():
        for key in [k for k, v in service.items() if v is RESET]:
            del service[key]
            base["services"][name].pop(key, None)
    files = []
    for path, spec in ((root / "compose.yaml", base), (root / "compose.host.yaml", override)):
        path.write_text(yaml.safe_dump(spec, sort_keys=False))
        files += ["-f", str(path)]
    return [v1, "--project-directory", str(DOCKER), "-p", project, *files]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """docker/compose.yaml with the host-network override: PostgreSQL, the MLflow server, train, predict."""
    from conftest import free_port

    root = tmp_path_factory.mktemp("compose")
    root.chmod(0o755)
    project = f"bptest{uuid.uuid4().hex[:8]}"
    ports = {"BP_PG_PORT": str(free_port()), "BP_MLFLOW_PORT": str(free_port())}
    env = clean_env(**ports, BP_IMAGE=IMAGE, BP_POSTGRES_IMAGE=POSTGRES_IMAGE,
                    BP_PREDICT_INPUT=str(digits_csv(root / "input.csv")))  # fmt: skip
    command = compose_command(project, root)

    def compose_run(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
        return subprocess.run([*command, *args], capture_output=True, text=True, env=env, timeout=timeout, check=False)

    def container(service: str) -> dict:
        ids = compose_run("ps", "-a", "-q", service).stdout.split()
        assert len(ids) == 1, f"{service}: containers {ids}"
        return json.loads(docker("inspect", ids[0]).stdout)[0]

    started = time.perf_counter()
    try:
        # up -d: services in order, each depends_on condition waited for; then predict, the last job, ends
        up = compose_run("up", "-d", "--no-build")
        logs = lambda: compose_run("logs", "--no-color").stdout[-6000:]  # noqa: E731
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:] + logs()
        predict = container("predict")
        code = docker("wait", predict["Id"], timeout=900).stdout.strip()
        assert code == "0", f"predict exited {code}:\n{logs()}"
        yield {
            "url": f"http://127.0.0.1:{ports['BP_MLFLOW_PORT']}",
            "project": project,
            "container": container,
            "input": root / "input.csv",
            "seconds": time.perf_counter() - started,
        }
    finally:
        down = compose_run("down", "-v", "--remove-orphans", timeout=300)
        assert down.returncode == 0, down.stderr[-3000:]


def _registered_name() -> str:
    train = compose()["services"]["train"]["command"]
    return next(a.split("=", 1)[1] for a in train if a.startswith("tracking.register_model="))


@pytest.mark.slow
@needs_engine
class TestComposeStack:
    def test_every_service_ran_on_the_host_network_as_its_user(self, stack):
        for service in ("postgres", "mlflow", "train", "predict"):
            info = stack["container"](service)
            assert info["HostConfig"]["NetworkMode"] == "host", service
            assert info["Config"]["User"] == compose()["services"][service]["user"], service
            assert info["HostConfig"]["PortBindings"] in (None, {}), service
        for job in ("train", "predict"):
            assert stack["container"](job)["State"]["ExitCode"] == 0
        for server in ("postgres", "mlflow"):
            assert stack["container"](server)["State"]["Health"]["Status"] == "healthy"
        print(f"\ncompose stack up, trained and predicted in {stack['seconds']:.0f} s")

    def test_training_run_finished_on_the_server_and_its_model_is_registered(self, stack):
        from mlflow import MlflowClient

        client = MlflowClient(stack["url"])
        experiment = client.get_experiment_by_name("digits")
        assert experiment is not None and experiment.artifact_location.startswith("mlflow-artifacts:")
        (run,) = client.search_runs([experiment.experiment_id])
        assert run.info.status == "FINISHED"
        assert run.data.tags["hydra.overrides"] == " ".join(compose()["services"]["train"]["command"][1:])
        assert run.data.metrics["test/acc"] > 0.8
        (version,) = client.search_model_versions(f"name='{_registered_name()}'")
        assert version.run_id == run.info.run_id

        # artifacts went through the server into the mlflow service's volume; checkpoints stayed with train
        found = in_volume(f"{stack['project']}_artifacts", "find", "/data/mlartifacts", "-name", "*.ckpt")
        assert found.strip(), "no checkpoint among the server's artifacts"
        home = in_volume(
            f"{stack['project']}_checkpoints", "sh", "-c", "ls /data; ls /data/outputs/digits/runs/*/checkpoints"
        )
        assert "last.ckpt" in home.split() and "mlflow.db" not in home.split() and "mlartifacts" not in home.split()

    def test_predictions_are_the_registered_models(self, stack):
        import numpy as np
        import pandas as pd

        got = pd.read_csv(io.StringIO(in_volume(f"{stack['project']}_predictions", "cat", "/data/predictions.csv")))
        rows = pd.read_csv(stack["input"])
        assert list(got.columns) == ["id", "prediction", *[f"proba_{k}" for k in range(10)]]
        assert got["id"].tolist() == rows["id"].tolist()
        # MLflow's own loader, here on the host, pointed at the server in the container as any client would be
        script = (
            "import sys, mlflow, pandas as pd; "
            f"m = mlflow.pyfunc.load_model('models:/{_registered_name()}/latest'); "
            "x = pd.read_csv(sys.argv[1]).drop(columns='id'); m.predict(x).to_csv(sys.argv[2], index=False)"
        )
        out = stack["input"].with_name("pyfunc.csv")
        env = clean_env(MLFLOW_TRACKING_URI=stack["url"])
        proc = subprocess.run([sys.executable, "-c", script, str(stack["input"]), str(out)],
                              capture_output=True, text=True, env=env, timeout=300, check=False)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        expected = pd.read_csv(out)
        assert got["prediction"].tolist() == expected["prediction"].tolist()
        np.testing.assert_allclose(got.iloc[:, 2:].to_numpy(), expected.iloc[:, 1:].to_numpy(), rtol=0, atol=1e-6)

    def test_server_accepts_the_stacks_host_header_and_refuses_others(self, stack):
        import requests

        url = f"{stack['url']}/api/2.0/mlflow/experiments/search?max_results=1"
        assert requests.get(url, headers={"Host": "mlflow:5000"}, timeout=10).status_code == 200
        assert requests.get(url, headers={"Host": "evil.example:5000"}, timeout=10).status_code == 403

    def test_server_runs_no_job_runner(self, stack):
        mlflow = stack["container"]("mlflow")
        processes = docker("top", mlflow["Id"], "-eo", "pid,args").stdout
        assert "mlflow server" in processes or "mlflow.server" in processes, processes  # the server is there ...
        assert "mlflow.server.jobs." not in processes and "huey" not in processes, processes  # ... and no jobs
