"""Any cheap op of one activation, kept as its compressed input and recomputed.

``recompute(fn, x, params)`` runs ``fn(x, *params)`` exactly, keeps ``x``
compressed (relative to each row when ``rows=True``: for normalisations) and
the parameters as they are, and in backward runs ``fn`` again on the rebuilt
input, under the forward's autocast state, for autograd to differentiate.
Its output is never kept: a converted consumer rebuilds it from this op's kept
input.

This is how LayerNorm and RMSNorm work here, and how model families' own
norm and activation modules are converted without copying their code
(``fn`` is then the module's original ``forward``, which reaches its
parameters through its attributes): Hugging Face ``LlamaRMSNorm``,
``NewGELUActivation`` and the like, timm's norm and activation layers.
Only for ops whose forward costs little next to a matmul: backward pays it
twice.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from ..config import QuantSpec
from ..quant.running import RangeStates
from .recipes import derived, exact, keep
from .replay import AutocastState, grad_by_recompute
from .saving import OpFunction, as_spec, fresh, load, needs_saving, run_with_kept, save

Tensor = torch.Tensor


class RecomputeFn(OpFunction):
    """``fn(x, *params)``; keeps ``x`` compressed and ``params`` as they are."""

    @staticmethod
    def forward(ctx, x, spec: QuantSpec, states, fn, rows: bool, op: str, channels_first: bool, forward, *params):
        out = fn(x, *params) if forward is None else forward()
        autocast = AutocastState(x.device.type)
        running = states.get(spec, "input") if states is not None else None
        kept = keep(x, spec, op=op, rows=rows, running=running, channels_first=channels_first)
        save(ctx, kept, *[exact(p) for p in params])
        # Parameters are differentiated as the objects themselves: a module's
        # forward reaches them through its attributes, and what comes back
        # from the saved tensors may be an alias (activation checkpointing
        # hands back recomputed copies).
        ctx.param_refs = [p if isinstance(p, torch.nn.Parameter) else None for p in params]
        ctx.fn, ctx.autocast = fn, autocast
        # How to rebuild `out`; attached to it by run_with_kept.
        ctx.mesa_out = derived(kept, fn, params, autocast) if spec.keep_once else None
        return fresh(out, x, *params)

    @staticmethod
    def backward(ctx, grad_out):
        x, *loaded = load(ctx)
        params = [ref if ref is not None else t for ref, t in zip(ctx.param_refs, loaded)]
        needs = [ctx.needs_input_grad[0]] + list(ctx.needs_input_grad[8:])
        grads = grad_by_recompute(ctx.fn, [x, *params], needs, grad_out, ctx.autocast)
        return (grads[0], None, None, None, None, None, None, None, *grads[1:])


def recompute(
    fn: Callable[..., Tensor],
    x: Tensor,
    params: Sequence[Optional[Tensor]] = (),
    *,
    rows: bool = False,
    op: Optional[str] = None,
    config=None,
    states: Optional[RangeStates] = None,
    channels_first: bool = False,
    forward: Optional[Callable[[], Tensor]] = None,
) -> Tensor:
    """``fn(x, *params)`` keeping only ``x`` (compressed) for backward.

    ``fn`` must be deterministic and cheap (elementwise or a normalisation),
    and must return one tensor; ``params`` are the tensors it differentiates
    besides ``x`` (a module's parameters when ``fn`` is its forward). ``op``:
    the kind of op for per-op error breakdowns (default "norm" with ``rows``,
    else "activation"). ``channels_first``: ``x`` is ``(N, C, *spatial)``,
    kept with ranges per channel (dim 1). ``forward``: computes the output
    instead of ``fn(x, *params)`` (an op with side effects done once, such as
    a batch norm's running statistics; ``fn`` must compute the same output
    without them).
    """
    spec = as_spec(config)
    if spec is None or not needs_saving(x, *params):
        return fn(x, *params) if forward is None else forward()
    op = op or ("norm" if rows else "activation")
    out = run_with_kept(RecomputeFn, x, spec, states, fn, rows, op, channels_first, forward, *params)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"recompute(): fn must return one tensor, got {type(out).__name__}")
    return out
