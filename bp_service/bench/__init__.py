"""bp-bench: bp-service measured against its peers, in one process, as ratios.

Every figure is a ratio against its peer measured in the same run, next to both absolute
values. Timings are medians over many repetitions that alternate the sides (round robin,
with the order rotated every round: A B, B A, A B, ...), so machine drift and noise from
other processes fall on both sides alike and whichever side runs first in a round has no
lasting advantage. The per-round ratios are kept too: their median and quartiles show how
noisy the run was.

Items (``--items`` selects them; :data:`bp_service.bench.cli.ITEMS` lists them):

1. Training step time, bp-train's path vs native autograd (``nn.Linear`` + ``torch.sigmoid`` +
   ``F.mse_loss``, SGD), same weights, same batch, at the shapes users run (``steps.SHAPES``: the
   digits job's 64-64-10 at batch 64, the worked example's 3-2-1 at batch 1, 784-1024-1024-10
   at batch 512; on CUDA also 4096 wide at batch 4096). Row ``1`` is ``MLP.cost`` (the
   whole-network Function bp-train trains through), ``1l`` the per-layer Functions;
   ``--compile`` adds the cost path under ``torch.compile`` as ``1c``.
2. Peak memory of the same steps, ``2`` for ``MLP.cost`` and ``2l`` per-layer (see
   ``items.item_peak_memory`` and ``memory.peak_memory_bytes`` for what is measured and how).
3. Roofline: FLOP/s the cost step achieves over the FLOP/s ``torch.mm`` reaches on the
   GEMMs of that step, at the same thread count (see ``flops.mlp_step_flops``); on CUDA at the
   GPU-sized shape, where a step is not launch-bound.
4. One epoch of bp-train's Lightning loop vs a plain PyTorch loop (``jobs.py``); with
   ``--device cuda|all`` also at the synthetic preset's size (1M x 128, 128-1024-1024-10, batch 4096),
   Lightning eager and captured vs a native eager loop, float32.
5. ``bp-train experiment=digits`` vs scikit-learn's ``MLPClassifier``, each from a cold process.
6. Tracking overhead: ``bp-train experiment=digits`` with MLflow tracking vs ``tracking.enabled=false``,
   both fresh processes (``overhead.py``); met when tracking adds at most 1 s.

With CUDA, every item also runs on the GPU in float32 and bfloat16.

The modules, imports pointing one way (``cli`` -> ``items``, ``jobs`` -> ``steps``, ``memory``,
``flops``, ``stats``, ``report`` -> ``harness``): ``harness`` (BenchConfig, ``make_row``, round-robin
timing), ``stats``, ``steps`` (the networks and training steps), ``memory``, ``flops``, ``items``
(1-3), ``jobs`` (4 and 5: Lightning and whole processes, imported only when run), ``overhead`` (6), ``report`` (the
table, the other processes' load, run metadata), ``cli``. This file imports nothing, so
``bp-bench``'s entry point can answer a Ctrl-C during the heavy imports.
"""
