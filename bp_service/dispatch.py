"""How a call reaches a hand-written Function: the plumbing around the math of :mod:`bp_service.functions`.

* each Function's ``forward`` signature, built once (:func:`cache_signature`);
* its twin without ``jvp``, which ``torch.compile`` can trace (:func:`caller`);
* a whole-network Function's ``apply`` without ``Function.apply``'s Python layer (:func:`direct_apply`);
* the casts autocast would make for a native op (:func:`layer_inputs`, :func:`cost_inputs`);
* the numbers a training step multiplies by, each a tensor made once (:func:`scalar`);
* the private torch names, each read here and nowhere else (:func:`transforms_active`,
  :func:`graph_kept`, :func:`autocast_dtype`'s ``_is_any_autocast_enabled``, :func:`scalar`'s
  ``_DisableFuncTorch``, and :func:`direct_apply`'s ``_FunctionBase.apply`` and ``unwrap_if_dead``);
  ``tests/test_private_apis.py`` fails by name when an upgrade removes one.

This module imports only torch.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch._C._functorch import unwrap_if_dead as _unwrap_if_dead
from torch.autograd import Function, forward_ad

__all__ = [
    "autocast_dtype",
    "cache_signature",
    "caller",
    "cast",
    "cost_dtype",
    "cost_inputs",
    "direct_apply",
    "graph_kept",
    "layer_inputs",
    "no_jvp_twin",
    "scalar",
    "transforms_active",
]


def caller(function: type[Function]) -> Callable[..., Any]:
    """``function.apply``, made ready once: its signature built (:func:`cache_signature`), and under
    ``torch.compile`` its twin without ``jvp`` (:func:`no_jvp_twin`) applied instead.

    The two classes are held by the closure: Dynamo traces a class read from a closure or a module
    global, not one read off another class's attribute.
    """
    cache_signature(function)
    twin = no_jvp_twin(function) if "jvp" in vars(function) else function

    def apply(*args: Any) -> Any:
        return (twin if torch.compiler.is_compiling() else function).apply(*args)

    apply.__qualname__ = apply.__name__ = f"{function.__name__}.apply"
    return apply


# --------------------------------------------------------------------------- call overhead
_C_APPLY = torch._C._FunctionBase.__dict__["apply"]  # what Function.apply calls after its Python checks


def direct_apply(function: type[Function]) -> Callable[..., Any]:
    """``function.apply`` without the Python layer ``Function.apply`` puts in front of the C++ one.

    That layer binds arguments for ``setup_context`` (a combined ``forward(ctx, ...)`` has none),
    routes calls under ``torch.func`` transforms (the caller routes those to a ``setup_context`` twin
    first: :func:`transforms_active`) and unwraps dead functorch wrappers, a tensor kept from inside a
    transform that has ended (kept here for the batch and target, the tensors a user hands in; the rest
    are a module's parameters); about 6 µs a call, a third of a small training step's gap to native
    autograd. Under ``torch.compile`` the ordinary ``apply``, which Dynamo knows how to trace.
    """
    raw = _C_APPLY.__get__(None, function)
    public = function.apply

    def apply(x: Any, target: Any, *args: Any) -> Any:
        if torch.compiler.is_compiling():
            return public(x, target, *args)
        return raw(_unwrap_if_dead(x), _unwrap_if_dead(target), *args)

    apply.__qualname__ = apply.__name__ = f"{function.__name__}.apply"
    return apply


def cache_signature(function: type[Function]) -> None:
    """Build the Function's ``forward`` signature once.

    ``Function.apply`` binds every call's arguments to ``forward``'s signature, and
    ``inspect.signature`` rebuilds that signature each time: about 10 µs a call, as much as a
    small layer's arithmetic. It honours a precomputed ``__signature__`` (PEP 362). A subclass
    shares its parent's ``forward`` and so its signature.
    """
    function.forward.__signature__ = inspect.signature(function.forward)


# --------------------------------------------------------------------------- torch.compile
def no_jvp_twin(function: type[Function]) -> type[Function]:
    """The same Function without ``jvp``, which Dynamo refuses to trace; used only under compile.

    Dynamo re-imports the class it traces by module and name, so the twin is a global of this module.
    """
    twin = type(f"_{function.__name__}NoJvp", (function,), {"jvp": staticmethod(Function.jvp), "__module__": __name__})
    globals()[twin.__name__] = twin
    return twin


# --------------------------------------------------------------------------- autocast
def autocast_dtype(t: Tensor) -> torch.dtype | None:
    """The dtype autocast runs matrix products in on ``t``'s device, or None outside autocast."""
    if not torch._C._is_any_autocast_enabled():  # every step asks: 0.2 µs, where t.device.type alone takes 0.7
        return None
    device = t.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


def cost_dtype(dtype: torch.dtype) -> torch.dtype:
    """The cost is summed in at least float32, as native losses are under autocast."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def cast(dtype: torch.dtype, *tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """Casts recorded by autograd: each input's gradient comes back in that input's own dtype. Only the tensors
    autocast casts: floating point, float64 left as it is."""
    return tuple(
        t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t for t in tensors
    )


def layer_inputs(x: Tensor, *tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """``(x, *tensors)``, under autocast all in its dtype, as ``F.linear`` casts them."""
    dtype = autocast_dtype(x)
    return (x, *tensors) if dtype is None else cast(dtype, x, *tensors)


def cost_inputs(pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """``(pred, target)``, under autocast both in at least float32, as native losses take them."""
    return (pred, target) if autocast_dtype(pred) is None else cast(cost_dtype(pred.dtype), pred, target)


# --------------------------------------------------------------------------- constants
def scalar(value: float, dtype: torch.dtype) -> Tensor | float:
    """``value`` as an operand of a training step's op: a 0-dim tensor of ``dtype`` made once, the same number.

    torch makes a Python number in an op into a new 0-dim tensor on every call: ``t.mul_(0.5)`` takes 4.8 µs on
    CPU, ``t.mul_(c)`` with ``c`` made once 2.0 (on CPU ``t.mean()`` makes one for its 1/M the same way). A 0-dim
    CPU tensor is a scalar operand for a tensor on any device. Under ``torch.compile``, the number itself: traced
    code makes no tensor per call, and a cache is no part of a graph.
    """
    return value if torch.compiler.is_compiling() else _constant(value, dtype)


@functools.lru_cache(maxsize=64)  # a few batch sizes, a few entries each
def _constant(value: float, dtype: torch.dtype) -> Tensor:
    # Whatever the caller is inside, a plain tensor: made in inference mode, a graph could not save it later;
    # inside a torch.func transform, it would be that transform's wrapper, dead once it ends; on the default device
    # (``torch.set_default_device``), no scalar operand for a CPU tensor.
    with torch.inference_mode(False), torch._C._DisableFuncTorch():
        return torch.tensor(value, dtype=dtype, device="cpu")


# --------------------------------------------------------------------------- private torch probes
def transforms_active() -> bool:
    """Whether a ``torch.func`` transform or a forward-mode level is active around this call.

    What ``Function.apply`` itself checks to route a call through torch.func; forward mode's level
    is the one ``forward_ad.dual_level()`` sets. Neither has a public reader.
    """
    return torch._C._are_functorch_transforms_active() or forward_ad._current_level >= 0


def graph_kept() -> bool:
    """Whether the running backward keeps its graph for another one (``retain_graph``, ``create_graph``).

    The engine's own flag, which AOTAutograd reads too; it has no public reader.
    """
    return torch._C._autograd._get_current_graph_task_keep_graph()
