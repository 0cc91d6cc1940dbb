"""tools/gpu-check.sh, dry run on the CPU: the script a CUDA machine without internet runs, checked here end to end.

A stand-in for the GPU image is built from this venv: a python that sees only the packages that
tools/gpu-wheels.sh leaves to the machine (torch, Lightning, numpy... and what they need), not Hydra,
MLflow or bp-service. The wheels are fetched for this python by the same script the GPU run uses.
"""

import importlib.metadata as md
import json
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from conftest import clean_env
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parent.parent


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def machine_python(dest: Path) -> Path:
    """A venv that sees the machine-provided packages of this venv (and their requirements), nothing else."""
    script = (REPO / "tools" / "gpu-wheels.sh").read_text()
    provided = re.compile(re.search(r"^DEVICE_PROVIDED='([^']+)'", script, re.MULTILINE).group(1))
    installed = {_norm(d.metadata["Name"]): d for d in md.distributions()}
    todo, keep = [n for n in installed if provided.match(n)] + ["pip"], set()
    while todo:
        name = todo.pop()
        if name in keep or name not in installed:
            continue
        keep.add(name)
        for line in installed[name].requires or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(_norm(req.name))
    site = dest / "machine-site"
    site.mkdir(parents=True)
    for name in keep:
        dist = installed[name]
        for top in {f.parts[0] for f in dist.files or [] if f.parts[0] != ".."}:
            src = Path(dist.locate_file(top))
            if src.exists() and not (site / top).exists():
                (site / top).symlink_to(src)
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(dest / "py")], check=True)
    python = dest / "py" / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(purelib, "machine.pth").write_text(f"{site}\n")
    return python


@pytest.mark.slow
def test_gpu_check_dry_run_on_cpu(tmp_path):
    python = machine_python(tmp_path / "machine")
    probe = (
        "import importlib.util as u; print([m for m in ('torch', 'lightning', 'hydra', 'mlflow') if u.find_spec(m)])"
    )
    seen = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, check=True).stdout
    assert seen.strip() == "['torch', 'lightning']"  # the stand-in lacks what the wheels must bring

    wheels = tmp_path / "wheels"
    fetched = subprocess.run(
        ["bash", str(REPO / "tools" / "gpu-wheels.sh"), str(wheels), "host"],
        capture_output=True,
        text=True,
        env=clean_env(PY=sys.executable),
        timeout=900,
    )
    assert fetched.returncode == 0, fetched.stderr[-3000:]

    out = tmp_path / "out"
    env = clean_env(drop=("PYTEST_",), PYTHON=str(python), WHEELS=str(wheels), WORK=str(tmp_path / "work"))
    env["GPU_CHECK_CPU"] = "1"
    env["GPU_CHECK_DEADLINE"] = "1400"  # a shared 2-core CI machine is far slower than a GPU host
    run = subprocess.run(
        ["bash", str(REPO / "tools" / "gpu-check.sh"), str(out)], capture_output=True, text=True, env=env, timeout=1500
    )
    summary = (out / "summary.txt").read_text()
    assert run.returncode == 0, summary + run.stdout[-3000:] + run.stderr[-3000:]
    assert "0 step(s) failed" in summary

    # At most 8 files, none deeper than the folder: what the device tool brings back.
    files = sorted(p.name for p in out.iterdir())
    assert files == [
        "bench-gpu.json",
        "bench-gpu.log",
        "install.log",
        "junit-gpu.xml",
        "summary.txt",
        "test-gpu.log",
        "train.log",
    ]
    assert "imports ok: torch" in (out / "install.log").read_text()
    suite = ET.parse(out / "junit-gpu.xml").getroot().find("testsuite")
    assert int(suite.get("tests")) > 0 and suite.get("failures") == "0" and suite.get("errors") == "0"
    rows = json.loads((out / "bench-gpu.json").read_text())["rows"]
    assert rows and all(r["ours"] > 0 and r["peer"] > 0 for r in rows)
    train_log = (out / "train.log").read_text()
    for precision in ("32-true", "bf16-mixed"):  # 16-mixed needs CUDA: the dry run leaves it out
        assert f"gpu_check_{precision.replace('-', '_')} finished" in train_log
    assert train_log.count("test/acc") == 2 and "gpu_check_16_mixed" not in train_log
