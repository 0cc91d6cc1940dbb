"""``bp-explain``: the worked example of backpropagation, executed and checked.

The network is the classic one of the walk-through: three inputs, two sigmoid hidden neurons,
one sigmoid output, and the squared-error cost of a single example. Every gradient is written
out as the product of its chain-rule factors, each factor read off the forward pass
(``dC/da3 = 2(a3 - y)``, ``da3/dz2 = a3(1 - a3)``, ``dz2/dw7 = a2_1``, ...). Autograd, run
through bp_service's own hand-written Functions, is only the check: the product of the factors
must match it to 1e-12 in float64. One gradient-descent step ``w <- w - lr * dC/dw`` then shows
the cost falling. ``--sizes 3 4 4 1`` leaves the worked example for a deeper sigmoid network with
seeded random weights and shows the layer-wise form of the same chain rule, the delta recursion,
and what it saves compared with expanding every weight's chain separately.

The parts, imports pointing one way (``cli`` -> ``render`` -> ``deep`` -> ``model``; ``plot``
reads only the report), each importing from the rest of bp_service only the core (``functions``):

- :mod:`~bp_service.explain.model`: the 3-2-1 numbers: forward pass, named chain factors,
  the autograd check, :func:`~bp_service.explain.model.explain` and ``train``;
- :mod:`~bp_service.explain.deep`: ``--sizes``: the delta recursion, multiplication counts,
  :func:`~bp_service.explain.deep.explain_deep`;
- :mod:`~bp_service.explain.render`: text and JSON;
- :mod:`~bp_service.explain.plot`: the PNG (matplotlib, imported only for ``--plot``);
- :mod:`~bp_service.explain.cli`: flags and ``main``.

This file imports nothing, so importing a part costs only that part.
"""
