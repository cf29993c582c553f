"""Attention: scaled dot-product attention, batched matmul, softmax.

SDPA keeps q, k and v as codes with one range per head (Mesa's head-wise
quantization: heads have very different value ranges) and nothing else: no
attention map, no output, no log-sum-exp. Backward runs SDPA again on the
rebuilt q, k, v (with the forward's random state when dropout is on, and its
autocast state) and differentiates that: one extra attention forward, in
exchange for keeping 3 values per token and channel at 8 bits or fewer.

The eager path (``softmax(q @ k^T * scale + mask) @ v``) keeps no map either:
``q @ k^T`` keeps q and k per head and lets its consumer rebuild the scores
from them; scaling, adding a mask and casting pass that recipe on (see
:mod:`torch_mesa.routing`), so the softmax keeps only a recipe, and
``attn @ v`` rebuilds the softmax output from it (the original Mesa kept the
map twice, in the softmax and in the matmul). Backward pays one extra
``q @ k^T`` for it.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F

from ..config import QuantSpec
from ..quant.running import RangeStates
from .recipes import combined, derived, exact, keep, kept_of
from .replay import AutocastState, RngReplay, grad_by_recompute
from .saving import as_spec, load, needs_saving, run_with_kept, save

Tensor = torch.Tensor


def _has_heads(t: Tensor) -> bool:
    return t.dim() >= 4


def _running(states, spec, slot):
    return states.get(spec, slot) if states is not None else None


# ------------------------------------------------------------------ softmax
def _softmax(x: Tensor, *, dim: int, dtype) -> Tensor:
    return F.softmax(x, dim=dim, dtype=dtype)


class _SoftmaxFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim: int, dtype, spec: QuantSpec, states):
        fn = functools.partial(_softmax, dim=dim, dtype=dtype)
        out = fn(x)
        autocast = AutocastState(x.device.type)
        kept = keep(x, spec, heads=_has_heads(x), running=_running(states, spec, "input"))
        save(ctx, kept)
        ctx.fn, ctx.autocast = fn, autocast
        ctx.mesa_out = derived(kept, fn, (), autocast) if spec.keep_once else None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = load(ctx)
        (grad_x,) = grad_by_recompute(ctx.fn, [x], [True], grad_out, ctx.autocast)
        return grad_x, None, None, None, None


def softmax(
    x: Tensor,
    dim: int = -1,
    dtype: Optional[torch.dtype] = None,
    *,
    config=None,
    states: Optional[RangeStates] = None,
) -> Tensor:
    """``F.softmax`` that keeps its input (per head for 4-D+ tensors) and lets
    a converted consumer rebuild its output instead of keeping it."""
    spec = as_spec(config)
    if spec is None or not needs_saving(x):
        return F.softmax(x, dim=dim, dtype=dtype)
    return run_with_kept(_SoftmaxFn, x, dim, dtype, spec, states)


# ------------------------------------------------------------------- matmul
def _sum_to(grad: Tensor, shape) -> Tensor:
    """Undo matmul's batch broadcasting."""
    if tuple(grad.shape) == tuple(shape):
        return grad
    lead = grad.dim() - len(shape)
    if lead > 0:
        grad = grad.sum(dim=tuple(range(lead)))
    dims = tuple(i for i, (g, s) in enumerate(zip(grad.shape, shape)) if s == 1 and g != 1)
    if dims:
        grad = grad.sum(dim=dims, keepdim=True)
    return grad


def _matmul_in(a, b, *, dtype):
    return torch.matmul(a.to(dtype), b.to(dtype))


class _MatmulFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, spec: QuantSpec, states):
        out = torch.matmul(a, b)
        kept_a = keep(a, spec, heads=_has_heads(a), running=_running(states, spec, "a"))
        kept_b = keep(b, spec, heads=_has_heads(b), running=_running(states, spec, "b"))
        save(ctx, kept_a, kept_b)
        if spec.keep_once and _has_heads(a) and _has_heads(b):
            # Attention scores q @ k^T: a consumer (the softmax) rebuilds them
            # from the kept q and k (one matmul in backward) instead of
            # keeping an N x N map.
            ctx.mesa_out = combined(kept_a, kept_b, functools.partial(_matmul_in, dtype=out.dtype))
        ctx.cd = out.dtype
        ctx.shapes = (tuple(a.shape), tuple(b.shape))
        ctx.dtypes = (a.dtype, b.dtype)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        a, b = load(ctx)
        cd = ctx.cd
        g = grad_out.to(cd)
        grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_a = _sum_to(g @ b.to(cd).mT, ctx.shapes[0]).to(ctx.dtypes[0])
        if ctx.needs_input_grad[1]:
            grad_b = _sum_to(a.to(cd).mT @ g, ctx.shapes[1]).to(ctx.dtypes[1])
        return grad_a, grad_b, None, None


def matmul(a: Tensor, b: Tensor, *, config=None, states: Optional[RangeStates] = None) -> Tensor:
    """``torch.matmul`` of two activations (e.g. ``q @ k.transpose(-2, -1)``,
    ``attn @ v``), keeping both operands compressed, per head for 4-D+."""
    spec = as_spec(config)
    if spec is None or not needs_saving(a, b) or a.dim() < 2 or b.dim() < 2:
        return torch.matmul(a, b)
    return run_with_kept(_MatmulFn, a, b, spec, states)


# --------------------------------------------------------------------- SDPA
def _sdpa(q, k, v, mask, *, kwargs):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **kwargs)


class _SDPAFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, spec: QuantSpec, states, kwargs):
        rng = RngReplay(q.device) if kwargs.get("dropout_p", 0.0) > 0.0 else None
        fn = functools.partial(_sdpa, kwargs=kwargs)
        out = fn(q, k, v, mask)
        save(
            ctx,
            keep(q, spec, heads=True, running=_running(states, spec, "q")),
            keep(k, spec, heads=True, running=_running(states, spec, "k")),
            keep(v, spec, heads=True, running=_running(states, spec, "v")),
            # a mask built from smaller tensors (a bias plus a broadcast shift
            # mask, as in Swin) is kept as those, exactly
            (kept_of(mask) if spec.keep_once else None) or exact(mask),
        )
        ctx.fn, ctx.rng, ctx.autocast = fn, rng, AutocastState(q.device.type)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, mask = load(ctx)
        needs = list(ctx.needs_input_grad[:4])
        if ctx.rng is not None:
            with ctx.rng:
                grads = grad_by_recompute(ctx.fn, [q, k, v, mask], needs, grad_out, ctx.autocast)
        else:
            grads = grad_by_recompute(ctx.fn, [q, k, v, mask], needs, grad_out, ctx.autocast)
        return (*grads, None, None, None)


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
    *,
    config=None,
    states: Optional[RangeStates] = None,
) -> Tensor:
    """``F.scaled_dot_product_attention`` keeping q, k, v per head at low
    precision and never the attention map; same arguments, same output."""
    kwargs = {"dropout_p": dropout_p, "is_causal": is_causal, "scale": scale}
    if enable_gqa:
        kwargs["enable_gqa"] = True
    spec = as_spec(config)
    if spec is None or not needs_saving(query, key, value, attn_mask):
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, **kwargs)
    return _SDPAFn.apply(query, key, value, attn_mask, spec, states, kwargs)
