"""Linear with a compressed input kept for backward.

Keeps: the input ``x`` (for the weight gradient; nothing when the weight is
frozen) as 8/4/2-bit codes with one
range per channel group, or, when ``x`` is the output of a converted
LayerNorm/RMSNorm/activation/dropout, nothing new at all: the producer's kept
tensors are saved again (same storages) and ``x`` is recomputed from them in
backward. The weight is saved as the parameter itself (no autocast copy: it
is cast again in backward, which costs time, not memory).

Backward computes the same two matmuls as PyTorch's, in the dtype the forward
matmul ran in (the autocast dtype under autocast), so the only difference from
exact training is the rebuilt input.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..config import QuantSpec
from ..quant.running import RangeStates
from .recipes import exact, keep
from .saving import OpFunction, as_spec, fresh, load, needs_saving, save

Tensor = torch.Tensor


class _LinearFn(OpFunction):
    @staticmethod
    def forward(ctx, x, weight, bias, spec: QuantSpec, states: Optional[RangeStates], forward_fn, transposed):
        # forward_fn: the layer's own forward, when it computes the product its
        # own way (GPT-2's Conv1D: addmm with a (in, out) weight, `transposed`)
        out = F.linear(x, weight, bias) if forward_fn is None else forward_fn(x)
        running = states.get(spec, "input") if states is not None else None
        # The input is needed only for the weight's gradient: a frozen weight
        # (adapters on a frozen base) keeps nothing of it, as PyTorch does.
        kept_x = keep(x, spec, op="linear", running=running) if ctx.needs_input_grad[1] else None
        save(ctx, kept_x, exact(weight))
        ctx.x_dtype = x.dtype
        ctx.compute_dtype = out.dtype
        ctx.has_bias = bias is not None
        ctx.transposed = transposed
        return fresh(out, x)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = load(ctx)
        cd = ctx.compute_dtype
        g = grad_out.to(cd)
        grad_x = grad_w = grad_b = None
        w = weight.to(cd)
        if ctx.needs_input_grad[0]:
            grad_x = (g @ (w.t() if ctx.transposed else w)).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            g2 = g.reshape(-1, g.shape[-1])
            x2 = x.reshape(-1, x.shape[-1]).to(cd)
            grad_w = ((x2.t() @ g2) if ctx.transposed else (g2.t() @ x2)).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g.reshape(-1, g.shape[-1]).sum(0).to(weight.dtype)
        return grad_x, grad_w, grad_b, None, None, None, None


def linear(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    *,
    config=None,
    states: Optional[RangeStates] = None,
    forward_fn=None,
    transposed: bool = False,
) -> Tensor:
    """``F.linear`` that keeps its input compressed for backward.

    ``forward_fn``: compute the forward with this function of ``x`` instead
    (a layer's own forward, for bit-identical outputs); ``transposed``: the
    weight is stored ``(in, out)``, as in GPT-2's ``Conv1D``.
    """
    spec = as_spec(config)
    if spec is None or not needs_saving(x, weight, bias) or x.dim() == 0:
        if forward_fn is not None:
            return forward_fn(x)
        return F.linear(x, weight.t() if transposed else weight, bias)
    return _LinearFn.apply(x, weight, bias, spec, states, forward_fn, transposed)
