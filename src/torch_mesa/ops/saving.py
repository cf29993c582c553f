"""How an op saves its recipes for backward and gets its inputs back.

The glue between :mod:`.recipes` and ``torch.autograd.Function``:
:func:`save` hands every recipe's tensors to ``ctx.save_for_backward`` (and
remembers how to rebuild each), :func:`load` rebuilds them in backward,
:func:`run_with_kept` attaches the recipe a forward left for its output.
"""

from __future__ import annotations

import functools
from typing import List, Optional, Union

import torch
from torch.overrides import TorchFunctionMode

from ..config import MesaConfig, QuantSpec
from . import recipes
from .recipes import Recipe, is_channels_first, mark_channels_first, mark_kept

Tensor = torch.Tensor


class RoutingMode(TorchFunctionMode):
    """The base of the routing scope's mode (:mod:`torch_mesa.routing.scope`),
    here so that ops can step out of it without importing the routing."""


def _unrouted(fn):
    """``fn`` run with the routing mode off when it is the innermost mode.
    An op's forward runs without grad and routes nothing anyway, and its
    backward must not route the recomputations it runs; without the mode,
    the op's own torch calls skip a Python hop each, and the compiled
    quantizer is never traced through the mode (Dynamo would guard on the
    routing stack's depth and recompile for each)."""

    @functools.wraps(fn)
    def run(*args):
        n = torch._C._len_torch_function_stack()
        if n and isinstance(torch._C._get_function_stack_at(n - 1), RoutingMode):
            mode = torch._C._pop_torch_function_stack()
            try:
                return fn(*args)
            finally:
                torch._C._push_on_torch_function_stack(mode)
        return fn(*args)

    return run


def _autocast_reuses_casts_made_without_grad() -> bool:
    """Whether this PyTorch's autocast hands an op that records gradients a
    weight's cast it cached while gradients were off. An op's forward runs
    without them; its autocast cast of a weight (a leaf) would then reach
    every later op of the autocast region that uses the same weight (tied
    or shared weights), with no gradient path back to it: that weight's
    gradient from those ops silently missing. PyTorch 2.8 does this; 2.11
    and 2.14 cache no cast made without gradients."""
    w = torch.ones(1, 1, requires_grad=True)
    x = torch.ones(1, 1)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with torch.no_grad():
                torch.mm(x, w)
            return torch.mm(x, w).grad_fn is None
    except RuntimeError:  # (no CPU autocast in this build: nothing to work around)
        return False


_STALE_CASTS = _autocast_reuses_casts_made_without_grad()


def _forgetting_casts(fn):
    """``fn``, then autocast's cache cleared (where :func:`_autocast_reuses_casts_made_without_grad`):
    the casts it made without gradients are forgotten before any later op
    can reuse them (later ops cast again: time, on those versions alone)."""

    @functools.wraps(fn)
    def run(*args):
        try:
            return fn(*args)
        finally:
            torch.clear_autocast_cache()

    return run


class OpFunction(torch.autograd.Function):
    """The base of every op's ``autograd.Function``: its forward and backward
    run as Python, never traced by ``torch.compile``, and outside the
    routing mode (:func:`_unrouted`). They keep Python state
    (recipes attached to tensors, version counters, running ranges) that a
    traced graph would freeze or drop, and call the compiled quantizer
    themselves. In a compiled model each converted op is one graph break,
    and the code between them compiles (docs/design.md, "torch.compile")."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for name in ("forward", "backward"):
            fn = cls.__dict__.get(name)
            if isinstance(fn, staticmethod):
                fn = _unrouted(fn.__func__)
                if name == "forward" and _STALE_CASTS:
                    fn = _forgetting_casts(fn)
                setattr(cls, name, staticmethod(torch._dynamo.disable(fn)))


def as_spec(config: Union[None, MesaConfig, QuantSpec]) -> Optional[QuantSpec]:
    """A functional op's ``config`` argument as a spec (``None``: default config)."""
    if config is None:
        return MesaConfig().resolve("")
    if isinstance(config, MesaConfig):
        return config.resolve("")
    if isinstance(config, QuantSpec):
        return config
    raise TypeError(
        f"config must be a MesaConfig or None, got {type(config).__name__}"
    )


def needs_saving(*tensors: Optional[Tensor]) -> bool:
    """True when autograd will record this op (else run it plainly: no cost)."""
    if not torch.is_grad_enabled():
        return False
    return any(t is not None and t.requires_grad for t in tensors)


def save(ctx, *items: Optional[Recipe]) -> None:
    """Save the recipes' tensors; ``None`` items (nothing needed) load as None."""
    tensors: List[Optional[Tensor]] = []
    plan = []
    for item in items:
        if item is None:
            plan.append((0, None))
            continue
        plan.append((len(item.tensors), item.rebuild))
        tensors.extend(item.tensors)
        recipes.hold(item.rebuild)
    ctx.save_for_backward(*tensors)
    ctx.mesa_plan = plan


def no_double_backward() -> None:
    """Backward runs with autograd recording only under ``create_graph=True``.
    The rebuilt inputs are not connected to the originals, so a second
    derivative would be silently wrong: refuse it instead."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            "torch-mesa: double backward (create_graph=True) through a converted layer is not "
            "supported, since its inputs are kept compressed; keep the layers involved exact "
            "(MesaConfig(policy={pattern: None})) or call torch_mesa.restore_(model)"
        )


def load(ctx) -> List[Optional[Tensor]]:
    no_double_backward()
    tensors = ctx.saved_tensors
    out: List[Optional[Tensor]] = []
    i = 0
    for n, rebuild in ctx.mesa_plan:
        out.append(None if rebuild is None else recipes.rebuilt(rebuild, tensors[i : i + n]))
        i += n
    return out


def fresh(out: Tensor, *inputs) -> Tensor:
    """The output a Function's forward returns, never a view of a tensor made
    inside it (``F.linear`` of a 3-D input is one): autograd forbids in-place
    changes to such views (``ReLU(inplace=True)``, ``scores += mask`` after a
    converted op), so it is handed out as a plain alias of the same storage
    (no copy). A view of an *input* is copied instead, so that an in-place
    change to it cannot reach the input behind autograd's back."""
    if not isinstance(out, torch.Tensor) or not out._is_view():
        return out
    base = out._base
    for t in inputs:
        if isinstance(t, torch.Tensor) and (t is base or t._base is base or base._base is t):
            return out.clone()
    return out.detach()


def run_with_kept(fn_cls, *args) -> Tensor:
    """``fn_cls.apply(*args)``, then attach to the output the recipe its
    forward left in ``ctx.mesa_out`` (the ctx is the output's ``grad_fn``),
    and the feature-map note of its first tensor argument where the shape
    is unchanged (see :func:`~.recipes.mark_channels_first`)."""
    out = fn_cls.apply(*args)
    # an elementwise op of a feature map gives a feature map
    source = next((a for a in args if isinstance(a, Tensor)), None)
    if is_channels_first(source) and isinstance(out, Tensor) and out.shape == source.shape:
        mark_channels_first(out)
    ctx = out.grad_fn
    recipe = getattr(ctx, "mesa_out", None) if ctx is not None else None
    if recipe is not None:
        del ctx.mesa_out
        mark_kept(out, recipe)
    return out
