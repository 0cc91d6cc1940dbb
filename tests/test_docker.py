"""The Docker images and the compose stack, checked without a Docker engine: hadolint on every Dockerfile,
and docker/compose.yaml parsed and its wiring checked against the Dockerfile, MLflow's server options and
our own commands. tests/test_compose_stack.py runs the same topology with real processes."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

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
    assert MLFLOW_SERVER_ENABLE_JOB_EXECUTION.get() in (True, False)


def test_train_and_predict_commands_are_valid(compose_cfg):
    from bp_service.config import validate
    from bp_service.predict import parse_args

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
