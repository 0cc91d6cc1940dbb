"""The docs hold: every shell command the user docs show runs (or is listed with what it needs), every link
resolves, and the MkDocs site builds strict.

User docs are README.md and docs/*.md (CONTRIBUTING.md is for contributors: its commands are not run here).
A command is a line of a ```bash block, comments and `\\` continuations folded. How each is checked:
- ``bp-explain``, ``bp-runs``, ``bp-train --help``: run as shown, in an empty home and working folder;
- ``bp-train`` otherwise: run with ``--cfg job`` added, which composes the config (schema, guard, groups)
  without training; a sweep (``-m``) once per swept value;
- ``bp-predict`` (slow: seconds each): run in an empty home; ``--help`` and ``--tracking-uri`` succeed, the
  rest must get past the arguments to the model or input that is not there (exit 2, not an argument error);
- ``bp-bench``: parsed by its own parser (measuring takes minutes), ``--quick`` also run (slow);
- ``make``: ``make -n`` (the target exists and expands);
- ``source`` and ``export``: run by bash; ``mkdir`` and ``python`` too, in the empty folder as home;
- anything else must be in NEEDS, with the reason the test machine cannot run it.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
USER_DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# Commands the test machine cannot run, by how they start, each with what it needs.
NEEDS = {
    "docker ": "a Docker engine (CI runs the images in docker/ci-check.sh)",
    "mlflow models serve ": "a model in the store and a long-running server",
    "RAY_ADDRESS=": "a Ray cluster and hydra-ray-launcher, not in the lock (tests/test_scaling.py, where installed)",
    "srun ": "a SLURM allocation (SLURM's variables: tests/test_scaling.py's stand-ins)",
    "torchrun ": "several machines (ran on loopback by hand; tests/test_scaling.py starts 2 nodes by NODE_RANK)",
}


def commands(path: Path) -> list[str]:
    """The shell commands in ```bash blocks of ``path``: comments dropped, continuation lines joined."""
    found, block, pending = [], False, ""
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            block = line.strip() in ("```bash", "```sh", "```shell") if not block else False
            continue
        if not block:
            continue
        code = re.sub(r"(^|\s)#.*$", "", line).rstrip()  # `#` starts a comment only after a space
        if code.endswith("\\"):
            pending += code[:-1] + " "
            continue
        code = (pending + code).strip()
        pending = ""
        if code:
            found.append(code)
    return found


ALL = sorted({(path.relative_to(ROOT).as_posix(), cmd) for path in USER_DOCS for cmd in commands(path)})
UNIQUE = sorted({cmd for _, cmd in ALL})  # a command shown on several pages is run once


def split_env(cmd: str) -> tuple[dict[str, str], list[str]]:
    """Leading ``NAME=value`` assignments, and the command's words."""
    words, env = shlex.split(cmd), {}
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
        name, value = words.pop(0).split("=", 1)
        env[name] = value
    return env, words


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """An empty home and working folder; the venv's scripts first on PATH; no inherited MLflow store."""
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "BP_", "HYDRA_"))}
    env.update(BP_SERVICE_HOME=str(home), PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
    return tmp_path, env


def run(words: list[str], cwd: Path, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(words, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def sweep_variants(words: list[str]) -> list[list[str]]:
    """A ``-m`` command as single runs: the i-th value of every swept override in the i-th run."""
    args = [w for w in words[1:] if w != "-m"]
    values = []
    for a in args:
        key, _, value = a.partition("=")
        parts = re.split(r",(?![^\[]*\])", value) if "=" in a else [value]  # commas outside brackets
        values.append((key, parts) if "=" in a else (None, [a]))
    n = max(len(v) for _, v in values)
    return [[f"{k}={v[i % len(v)]}" if k else v[0] for k, v in values] for i in range(n)]


def check(cmd: str, cwd: Path, env: dict[str, str]) -> None:
    env_extra, words = split_env(cmd)
    env = {**env, **env_extra}
    tool = words[0]
    if tool == "make":
        proc = run(["make", "-n", "-C", str(ROOT), *words[1:]], cwd, env)
        assert proc.returncode == 0, proc.stderr
    elif tool in ("source", "export"):
        proc = run(["bash", "-c", f"set -e; cd {shlex.quote(str(ROOT))}; {cmd}; bp-runs uri"], cwd, env)
        assert proc.returncode == 0 and proc.stdout.strip(), proc.stderr
    elif tool in ("mkdir", "python"):  # the user's own folder and file: run by bash, in the empty folder as home
        proc = run(["bash", "-c", cmd], cwd, {**env, "HOME": str(cwd)})
        assert proc.returncode == 0, proc.stderr
    elif tool.endswith("bp-explain") or tool == "bp-runs":
        proc = run([str(BIN / Path(tool).name), *words[1:]], cwd, env)
        assert proc.returncode == 0, proc.stderr
    elif tool == "bp-train":
        if words[1:] == ["--help"]:
            runs = [words[1:]]
        else:
            runs = sweep_variants(words) if "-m" in words else [words[1:]]
            runs = [[*r, "--cfg", "job"] for r in runs]
        for r in runs:
            proc = run([str(BIN / "bp-train"), *r], cwd, env)
            assert proc.returncode == 0, f"bp-train {' '.join(r)}: {proc.stderr}"
    elif tool == "bp-predict":
        proc = run([str(BIN / "bp-predict"), *words[1:]], cwd, env)
        if set(words[1:]) <= {"--help", "--tracking-uri"}:
            assert proc.returncode == 0, proc.stderr
        else:  # the arguments parse; what fails is the model or input that is not there
            assert proc.returncode == 2, proc.stderr
            assert "unknown argument" not in proc.stderr and "must not be empty" not in proc.stderr, proc.stderr
    elif tool == "bp-bench":
        from bp_service.bench.cli import build_parser

        build_parser().parse_args(words[1:])  # exits 2 on a bad option
    else:
        raise AssertionError(f"no way to check {cmd!r}: run it here, or list it in NEEDS with its reason")


def needs(cmd: str) -> str | None:
    return next((why for start, why in NEEDS.items() if cmd.startswith(start)), None)


# bp-predict imports pandas, torch and MLflow: several seconds a command on a 2-core machine.
@pytest.mark.parametrize(
    "cmd",
    [pytest.param(c, marks=[pytest.mark.slow] if c.startswith("bp-predict") else []) for c in UNIQUE if not needs(c)],
)
def test_command_in_the_docs_runs(cmd, sandbox):
    cwd, env = sandbox
    check(cmd, cwd, env)


def test_commands_not_run_are_listed_with_a_reason():
    listed = [c for _, c in ALL if needs(c)]
    assert listed, "NEEDS matches no command"
    unused = [start for start in NEEDS if not any(c.startswith(start) for _, c in ALL)]
    assert not unused, f"NEEDS entries no doc shows any more: {unused}"


def test_the_docs_show_each_command():
    shown = {shlex.split(c)[0] for _, c in ALL}
    for tool in ("make", "bp-explain", "bp-train", "bp-predict", "bp-runs", "bp-bench"):
        assert tool in shown


def test_readme_names_the_two_commands_and_how_to_reach_the_scripts():
    readme = (ROOT / "README.md").read_text()
    assert "make train" in readme and "make test" in readme
    assert "source .venv/bin/activate" in readme and ".venv/bin/bp-explain" in readme


LINK = re.compile(r"\]\(([^)\s]+)\)|<img src=\"([^\"]+)\"")


def slug(heading: str) -> str:
    """The anchor GitHub and MkDocs give a heading (the two agree on the headings these files use)."""
    text = re.sub(r"[^\w\s-]", "", heading.strip().lower())
    return re.sub(r"\s", "-", text)


def anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {slug(m) for m in re.findall(r"^#+\s+(.*)$", text, flags=re.M)}


@pytest.mark.parametrize("name", ["README.md", "CONTRIBUTING.md"])
def test_links_outside_the_site_resolve(name):
    """README.md and CONTRIBUTING.md are not built by MkDocs: their relative links and anchors are checked
    here (the pages in docs/ are checked by mkdocs build --strict)."""
    path = ROOT / name
    fences = [line for line in path.read_text().splitlines() if line.startswith("```")]
    assert len(fences) % 2 == 0, f"{name}: a code block is not closed"
    broken = []
    for m in LINK.finditer(path.read_text()):
        target = m.group(1) or m.group(2)
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists() or (anchor and dest.suffix == ".md" and anchor not in anchors(dest)):
            broken.append(target)
    assert not broken, f"{name}: broken links {broken}"


def test_readme_points_into_docs_and_stays_short():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) < 16_000
    pages = {p.name for p in (ROOT / "docs").glob("*.md")} - {"index.md"}
    linked = set(re.findall(r"\(docs/([\w-]+\.md)", readme))
    assert pages <= linked, f"pages the README does not link: {pages - linked}"


@pytest.mark.slow
def test_mkdocs_builds_strict(tmp_path):
    mkdocs = shutil.which("mkdocs", path=str(BIN))
    assert mkdocs, "mkdocs is in the dev extras: make install"
    proc = run([mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")], ROOT, dict(os.environ))
    assert proc.returncode == 0, proc.stderr


@pytest.mark.slow
def test_bp_bench_quick_runs(sandbox):
    cwd, env = sandbox
    assert any(c == "bp-bench --quick" for _, c in ALL)
    proc = run([str(BIN / "bp-bench"), "--quick", "--items", "step-time"], cwd, env, timeout=300)
    assert proc.returncode == 0, proc.stderr
