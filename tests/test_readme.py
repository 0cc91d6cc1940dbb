"""The README's first hour: its user sections' commands, pasted in order into a fresh shell, all work.

A fresh shell is ``bash`` without the venv on PATH, in the clone, with a home folder and bp-service home of its
own (``HOME``, ``BP_SERVICE_HOME`` under tmp_path), so nothing lands in the checkout or the real store.
tests/test_docs.py checks every docs page's commands one by one; this runs the README's as a user meets them,
one after the other, each depending on what the ones before it did (activation, the folder, the trained and
registered model).

One change to what is pasted: ``make`` runs with ``-o .venv/.installed``, so it never reinstalls the venv this
test itself runs in (its install step is CI's ``make test``, not this test's).
"""

from __future__ import annotations

import csv
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
from conftest import clean_env, store_statuses

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
VENV_BIN = ROOT / ".venv" / "bin"

# The README's sections for users (those above the table of documentation pages).
USER_SECTIONS = ("Two commands", "One example per command")

# Commands not run here, each with its reason; the list is exact, a stale entry fails.
SKIPPED = {
    "make test": "the fast suite this test belongs to (about 3 min); CI runs it as `make test`",
    "bp-bench --quick": "minutes of measuring; tests/test_docs.py::test_bp_bench_quick_runs runs it on one item",
    "make docker-train": "a Docker engine (CI runs the images in docker/ci-check.sh)",
}


def sections(text: str) -> dict[str, str]:
    """``## `` heading -> its text (code blocks may hold ``#`` lines, never at a line's start with ``## ``)."""
    parts = re.split(r"^## (.+)$", text, flags=re.M)
    return {title.strip(): body for title, body in zip(parts[1::2], parts[2::2], strict=True)}


def shell_commands(markdown: str) -> list[str]:
    """The lines of the ```bash blocks, as they would be pasted: comments and blank lines left to bash."""
    blocks = re.findall(r"^```(?:bash|sh|shell)\n(.*?)^```", markdown, flags=re.M | re.S)
    return [line for block in blocks for line in block.splitlines() if line.strip()]


def user_commands() -> list[str]:
    found = sections(README.read_text())
    missing = [s for s in USER_SECTIONS if s not in found]
    assert not missing, f"README has no section {missing}: update USER_SECTIONS"
    return [cmd for s in USER_SECTIONS for cmd in shell_commands(found[s])]


def bare(cmd: str) -> str:
    return re.sub(r"\s+#.*$", "", cmd).strip()


def test_the_skipped_commands_are_in_the_readme_and_few():
    shown = [bare(c) for c in user_commands()]
    assert set(SKIPPED) <= set(shown), f"SKIPPED lists commands the README no longer shows: {set(SKIPPED) - set(shown)}"
    assert len(shown) - len(SKIPPED) >= 10, "most of the README's commands must run"


def test_the_commands_reach_the_scripts_without_the_venv_on_path():
    """bp-* commands come after the README says how to reach them (the first `source .venv/bin/activate`)."""
    shown = [bare(c) for c in user_commands()]
    activate = next(i for i, c in enumerate(shown) if c.startswith("source .venv/bin/activate"))
    early = [c for c in shown[:activate] if c.startswith("bp-")]
    assert not early, f"commands shown before the README says how to reach them: {early}"


def test_the_readme_says_how_long_the_two_commands_take_and_where():
    """Its durations come with the machine they were measured on, not as "a few minutes"."""
    text = sections(README.read_text())["Two commands"]
    said = re.search(r"Durations in this README were measured on (.+?)\n\n", text, flags=re.S)
    assert said, "the Two commands section no longer says where its durations were measured"
    paragraph = " ".join(said.group(1).split())
    assert "2-core" in paragraph and re.search(r"`make train` about \d+ s", paragraph), paragraph
    assert re.search(r"`make test` about \d+ min( \d+ s)?", paragraph), paragraph


@pytest.mark.slow
def test_readme_user_sections_run_in_order_in_a_fresh_shell(tmp_path):
    home, bp_home = tmp_path / "home", tmp_path / "bp-home"
    home.mkdir()
    lines = ['make() { command make -o .venv/.installed "$@"; }', "set -eo pipefail"]
    ran = []
    for cmd in user_commands():
        if bare(cmd) in SKIPPED:
            lines.append(f"echo {shlex.quote('# skipped: ' + bare(cmd))}")
            continue
        ran.append(bare(cmd))
        lines += [f"echo {shlex.quote('+ ' + bare(cmd))} >&2", cmd]
    # A fresh terminal's PATH: the system's, without the venv that runs this test.
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if Path(p).resolve() != VENV_BIN.resolve())
    env = clean_env(drop=("VIRTUAL_ENV", "PYTHON"), HOME=str(home), BP_SERVICE_HOME=str(bp_home), PATH=path)
    proc = subprocess.run(
        ["bash", "--noprofile", "--norc", "-c", "\n".join(lines)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    last = [line for line in proc.stderr.splitlines() if line.startswith("+ ")][-1:]
    assert proc.returncode == 0, f"failed at {last}: {proc.stderr[-3000:]}"
    assert "bp-train" in " ".join(ran) and "bp-predict" in " ".join(ran)
    # What the commands did, seen from outside: the worked example, trained runs, the predictions file.
    assert "-0.0311282" in proc.stdout  # bp-explain's dC/dw1, as the README shows it
    assert "test/acc" in proc.stdout and "test/rmse" in proc.stdout
    demo = home / "bp-demo"
    with open(demo / "diabetes.csv") as f, open(demo / "predictions.csv") as g:
        rows, predicted = list(csv.DictReader(f)), list(csv.DictReader(g))
    assert len(predicted) == len(rows) == 442 and all(p["prediction"] for p in predicted)
    statuses = [status for _, status in store_statuses(bp_home)]
    # make train's digits run (which ckpt_path=last continues, no new run), diabetes, iris: all closed FINISHED
    assert len(statuses) == 3 and set(statuses) == {"FINISHED"}, statuses
