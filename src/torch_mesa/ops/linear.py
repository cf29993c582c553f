"""Linear with a compressed input kept for backward.

Keeps: the input ``x`` (for the weight gradient) as 8/4/2-bit codes with one
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
from ._saved import RangeStates, as_spec, exact, keep, load, needs_saving, save

Tensor = torch.Tensor


class _LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, spec: QuantSpec, states: Optional[RangeStates]):
        out = F.linear(x, weight, bias)
        running = states.get(spec, "input") if states is not None else None
        save(ctx, keep(x, spec, running=running), exact(weight))
        ctx.x_dtype = x.dtype
        ctx.compute_dtype = out.dtype
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = load(ctx)
        cd = ctx.compute_dtype
        g = grad_out.to(cd)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (g @ weight.to(cd)).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            g2 = g.reshape(-1, g.shape[-1])
            x2 = x.reshape(-1, x.shape[-1]).to(cd)
            grad_w = (g2.t() @ x2).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g.reshape(-1, g.shape[-1]).sum(0).to(weight.dtype)
        return grad_x, grad_w, grad_b, None, None


def linear(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    *,
    config=None,
    states: Optional[RangeStates] = None,
) -> Tensor:
    """``F.linear`` that keeps its input compressed for backward."""
    spec = as_spec(config)
    if spec is None or not needs_saving(x, weight, bias) or x.dim() == 0:
        return F.linear(x, weight, bias)
    return _LinearFn.apply(x, weight, bias, spec, states)
