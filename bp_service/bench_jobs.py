"""bp-bench items 4 and 5: the training job as a whole, against a plain loop and against scikit-learn.

Kept apart from ``bench.py`` because they import Lightning (item 4) and start whole processes
(item 5), which items 1-3 need not pay for.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from bp_service import functions as F
from bp_service.bench import BenchConfig, Row, make_row, time_round_robin
from bp_service.config import DataConfig
from bp_service.data import BPDataModule, InMemoryLoader
from bp_service.layers import MLP

DIGITS_SIZES = (64, 64, 10)
OPTIMIZER = {"_target_": "torch.optim.SGD", "lr": 0.5, "momentum": 0.9}


# --------------------------------------------------------------------------- item 4
def _digits(steps_per_execution: int = 1) -> BPDataModule:
    cfg = OmegaConf.structured(DataConfig(name="digits", batch_size=64, steps_per_execution=steps_per_execution))
    datamodule = BPDataModule(cfg, seed=0)
    datamodule.setup()
    return datamodule


def plain_loop(datamodule: BPDataModule, epochs: int) -> MLP:
    """What bp-train's loop does, written by hand: shuffled batches, SGD steps, a validation pass per epoch."""
    data = datamodule.data
    torch.manual_seed(0)
    net = MLP(DIGITS_SIZES)
    opt = torch.optim.SGD(net.parameters(), lr=OPTIMIZER["lr"], momentum=OPTIMIZER["momentum"])
    loader = InMemoryLoader(data.x["train"], data.y["train"], 64, shuffle=True, seed=0)
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        loss_sum, rows = torch.zeros(()), 0  # the epoch's train/loss, as any training loop reports it
        for ((x, y),) in loader:
            loss = F.mse_loss(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach() * len(x)
            rows += len(x)
        (loss_sum / rows).item()
        with torch.no_grad():
            pred = net(data.x["val"])
            F.mse_loss(pred, data.y["val"]).item()
            (pred.argmax(1) == data.y["val"].argmax(1)).float().mean().item()
    return net


def lightning_loop(datamodule: BPDataModule, epochs: int) -> MLP:
    """bp-train's LightningModule and Trainer, without MLflow and checkpoint files (their I/O is not the loop)."""
    import lightning.pytorch as pl

    from bp_service.module import BPModule

    torch.manual_seed(0)
    module = BPModule(MLP(DIGITS_SIZES), optimizer=OPTIMIZER, log_every_n_steps=10)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
    )
    trainer.fit(module, datamodule=datamodule)
    return module.net


def item_lightning_overhead(cfg: BenchConfig) -> list[Row]:
    """4. One epoch of the Lightning loop vs a plain loop: digits, batch 64, 64-64-10, SGD with momentum.

    Start-up (Trainer construction, the first iteration) is excluded by timing ``n2`` and ``n1``
    epochs and dividing the difference by ``n2 - n1``. Rows: one optimizer step per Lightning
    step (``K=1``) and a whole epoch per Lightning step (``data.steps_per_execution=20``).
    """
    import logging

    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    n1, n2 = (1, 3) if cfg.quick else (2, 12)
    reps = 3 if cfg.quick else 15
    rows = []
    for k in (1, 20):
        plain_dm, light_dm = _digits(), _digits(k)
        samples = time_round_robin(
            {
                "plain_n1": lambda dm=plain_dm: plain_loop(dm, n1),
                "plain_n2": lambda dm=plain_dm: plain_loop(dm, n2),
                "light_n1": lambda dm=light_dm: lightning_loop(dm, n1),
                "light_n2": lambda dm=light_dm: lightning_loop(dm, n2),
            },
            reps=reps,
            warmup=1,
        )
        med = {name: statistics.median(values) for name, values in samples.items()}
        plain = (med["plain_n2"] - med["plain_n1"]) / (n2 - n1)
        light = (med["light_n2"] - med["light_n1"]) / (n2 - n1)
        rows.append(
            make_row(
                "4",
                f"epoch time, Lightning loop (steps_per_execution={k}) vs plain loop, digits b64, 64-64-10",
                light,
                plain,
                target=1.30,
                cmp="<=",
                unit="s",
                ours_label="Lightning",
                peer_label="plain loop",
                epochs=[n1, n2],
                reps=reps,
                steps_per_epoch=len(InMemoryLoader(plain_dm.data.x["train"], plain_dm.data.y["train"], 64)),
            )
        )
    return rows


# --------------------------------------------------------------------------- item 5
SKLEARN_JOB = """
import sys, time
t0 = time.perf_counter()
import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier
from sklearn.preprocessing import StandardScaler
x, y = load_digits(return_X_y=True)
# The same split as bp-train: 15% test, then 15% of all rows for validation, stratified, seed 42.
n = len(x)
x_rest, x_test, y_rest, y_test = train_test_split(x, y, test_size=int(np.ceil(n * 0.15)), random_state=42, stratify=y)
x_train, x_val, y_train, y_val = train_test_split(
    x_rest, y_rest, test_size=int(np.ceil(n * 0.15)), random_state=42, stratify=y_rest
)
scaler = StandardScaler().fit(x_train)
clf = MLPClassifier(hidden_layer_sizes=(64,), activation="logistic", max_iter=300, random_state=0)
clf.fit(scaler.transform(x_train), y_train)
print(f"test_acc={clf.score(scaler.transform(x_test), y_test):.4f} wall={time.perf_counter() - t0:.3f}")
"""


def _timed(command: list[str], env: dict[str, str]) -> tuple[float, str]:
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{command[0]} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return wall, proc.stdout


def _test_acc(stdout: str) -> float:
    for line in stdout.splitlines():
        if line.strip().startswith("test/acc"):
            return float(line.split()[1])
        if line.startswith("test_acc="):
            return float(line.split()[0].split("=")[1])
    raise RuntimeError(f"no test accuracy in output: {stdout[-500:]}")


def item_peer_job(cfg: BenchConfig) -> list[Row]:
    """5. Cold process to a tested model on digits: ``bp-train experiment=digits`` vs scikit-learn's MLPClassifier.

    Both from a fresh interpreter (imports included), both on the same split; each side's test
    accuracy is reported next to its wall time (the target is reaching >= 0.97 in less time).
    bp-train runs as shipped (MLflow tracking into a temporary SQLite store, model logging
    included) and also with ``tracking.enabled=false``.
    """
    reps = 1 if cfg.quick else 3
    bin_dir = Path(sys.executable).parent
    rows = []
    with tempfile.TemporaryDirectory() as home:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "HYDRA_"))}
        env["BP_SERVICE_HOME"] = home
        base = [str(bin_dir / "bp-train"), "experiment=digits", "trainer=cpu", "trainer.enable_progress_bar=false"]
        variants = {"as shipped": base, "tracking off": [*base, "tracking.enabled=false"]}
        if cfg.quick:
            variants = {"tracking off, 5 epochs": [*base, "tracking.enabled=false", "trainer.max_epochs=5"]}
        sklearn_cmd = [sys.executable, "-c", SKLEARN_JOB]
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in [*variants, "sklearn"]}
        for _ in range(reps):  # alternate the sides
            for name, command in [*variants.items(), ("sklearn", sklearn_cmd)]:
                wall, out = _timed(command, env)
                results[name].append((wall, _test_acc(out)))
    sk_wall = statistics.median(w for w, _ in results["sklearn"])
    sk_acc = statistics.median(a for _, a in results["sklearn"])
    for name in variants:
        wall = statistics.median(w for w, _ in results[name])
        acc = statistics.median(a for _, a in results[name])
        row: dict[str, Any] = make_row(
            "5",
            f"cold process to a tested model on digits: bp-train ({name}) vs MLPClassifier(logistic)",
            wall,
            sk_wall,
            target=1.0,
            cmp="<=",
            unit="s",
            ours_label="bp-train",
            peer_label="scikit-learn",
            ours_test_acc=acc,
            peer_test_acc=sk_acc,
            reps=reps,
        )
        row["met"] = row["met"] and acc >= 0.97  # reaching 0.97 is part of the target
        rows.append(row)
    return rows
