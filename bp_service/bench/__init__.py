"""bp-bench: bp-service measured against its peers, in one process, as ratios.

Every figure is a ratio against its peer measured in the same run, next to both absolute
values. Timings are medians over many repetitions that alternate the sides (round robin,
with the order rotated every round: A B, B A, A B, ...), so machine drift and noise from
other processes fall on both sides alike and whichever side runs first in a round has no
lasting advantage. The per-round ratios are kept too: their median and quartiles show how
noisy the run was.

Items (``--items`` selects them by name; :data:`bp_service.bench.cli.ITEMS` lists them):

``step-time``
   Training step time, bp-train's path vs native autograd (``nn.Linear`` + ``torch.sigmoid`` +
   ``F.mse_loss``, SGD), same weights, same batch, at the shapes users run (``steps.SHAPES``: the
   digits job's 64-64-10 at batch 64, the worked example's 3-2-1 at batch 1, 784-1024-1024-10
   at batch 512; on CUDA also 4096 wide at batch 4096). Row ``step-time`` is ``MLP.cost`` (the
   whole-network Function bp-train trains through), ``step-time-layers`` the per-layer Functions;
   ``--compile`` adds the cost path under ``torch.compile`` (``model.compile=true``) as ``step-time-compiled``
   (vs native eager) and ``step-time-compiled-vs-compiled`` (vs native's forward and loss under ``torch.compile``).
``peak-memory``
   Peak memory of the same steps, ``peak-memory`` for ``MLP.cost`` and ``peak-memory-layers``
   per-layer (see ``training_step.item_peak_memory`` and ``memory.peak_memory_bytes`` for what is
   measured and how).
``roofline``
   FLOP/s the cost step achieves over the FLOP/s ``torch.mm`` reaches on the GEMMs of that step, at
   the same thread count (see ``flops.mlp_step_flops``); on CUDA at the GPU-sized shape, where a step
   is not launch-bound.
``lightning-overhead``
   One epoch of bp-train's Lightning loop vs a plain PyTorch loop (``training_job.py``); with
   ``--device cuda|all`` also at the synthetic preset's size (``experiment=synthetic``, composed from
   ``conf/``: 1M x 128, 128-1024-1024-10, batch 4096), Lightning eager and captured vs a native eager
   loop, float32. Row ``lightning-floor``: Lightning's own epoch around steps that do nothing, as a share of
   the plain loop's (the part of the 1.30 that Lightning alone takes).
``peer-job``
   ``bp-train experiment=digits`` vs scikit-learn's ``MLPClassifier``, each from a cold process.
``tracking-overhead``
   ``bp-train experiment=digits`` with MLflow tracking vs ``tracking.enabled=false``, both fresh
   processes (``tracking_overhead.py``); met when tracking adds at most 1 s.

The numbers 1-6, in this order, still select them (``--items 1,2``).

With CUDA, every item also runs on the GPU in float32 and bfloat16.

The modules, imports pointing one way (``cli`` -> ``training_step``, ``training_job`` -> ``steps``,
``memory``, ``flops``, ``stats``, ``report`` -> ``harness``): ``harness`` (BenchConfig, ``make_row``,
round-robin timing), ``stats``, ``steps`` (the networks and training steps), ``memory``, ``flops``,
``training_step`` (step time, peak memory, roofline), ``training_job`` (Lightning overhead and peer job:
Lightning and whole processes, imported only when run), ``tracking_overhead``, ``report`` (the table, the
other processes' load, run metadata), ``cli``. This file imports only ``os``, so
``bp-bench``'s entry point can answer a Ctrl-C during the heavy imports.
"""

import os


def quiet_native_logs() -> None:
    """Silence two lines of native noise per ``bp-bench`` run, each by its own switch; call before torch loads.

    The CPU peak-memory measurement runs torch.profiler, whose libkineto logs "USDT: ... profiler_start/stop"
    at its highest level (5) every session: above it, kineto says nothing. Its first session also frees blocks
    allocated before it began, which c10 reports once as a C++ warning; ``TORCH_CPP_LOG_LEVEL`` is read when
    torch loads. A user's own setting wins. The command's entry points call this; importing the package does not.
    """
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
