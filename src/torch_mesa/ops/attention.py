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
from .recipes import combined, derived, exact, keep, kept_of, quantized, quantized_qkv
from .replay import AutocastState, RngReplay, grad_by_recompute
from .saving import OpFunction, as_spec, fresh, load, needs_saving, run_with_kept, save

Tensor = torch.Tensor


def _has_heads(t: Tensor) -> bool:
    return t.dim() >= 4


def _running(states, spec, slot):
    return states.get(spec, slot) if states is not None else None


# ------------------------------------------------------------------ softmax
def _softmax(x: Tensor, *, dim: int, dtype) -> Tensor:
    return F.softmax(x, dim=dim, dtype=dtype)


class _SoftmaxFn(OpFunction):
    """Keeps its input's recipe when it has one (scores rebuilt from q and k,
    with the same scaling and masking), else its *output*, quantized per head:
    the output lies in [0, 1] whatever the input holds, so masks of ``-inf``
    or ``finfo.min`` by design are never quantized as if they were data (the
    original Mesa kept the output too). Either way a converted consumer
    (``attn @ v``) reuses what is kept instead of keeping a second copy."""

    @staticmethod
    def forward(ctx, x, dim: int, dtype, spec: QuantSpec, states):
        fn = functools.partial(_softmax, dim=dim, dtype=dtype)
        out = fn(x)
        autocast = AutocastState(x.device.type)
        inner = kept_of(x) if spec.keep_once else None
        ctx.from_output = inner is None
        if inner is None:
            kept = quantized(out, spec, op="softmax", heads=_has_heads(out), running=_running(states, spec, "output"))
            ctx.mesa_out = kept if spec.keep_once else None
        else:
            kept = inner
            ctx.mesa_out = derived(kept, fn, (), autocast)
        save(ctx, kept)
        ctx.fn, ctx.autocast, ctx.dim, ctx.x_dtype = fn, autocast, dim, x.dtype
        return fresh(out, x)

    @staticmethod
    def backward(ctx, grad_out):
        (kept,) = load(ctx)
        if ctx.from_output:
            # PyTorch's own softmax backward, from the (rebuilt) output
            grad_x = torch.ops.aten._softmax_backward_data(grad_out.to(kept.dtype), kept, ctx.dim, ctx.x_dtype)
        else:
            (grad_x,) = grad_by_recompute(ctx.fn, [kept], [True], grad_out, ctx.autocast)
        return grad_x, None, None, None, None


def softmax(
    x: Tensor,
    dim: int = -1,
    dtype: Optional[torch.dtype] = None,
    *,
    config=None,
    states: Optional[RangeStates] = None,
) -> Tensor:
    """``F.softmax`` that keeps its input's rebuild recipe (attention scores
    from q and k), or else its output quantized (per head for 4-D+ tensors);
    a converted consumer reuses what it keeps."""
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


class _MatmulFn(OpFunction):
    """``a @ b`` of two activations, or ``beta * bias + alpha * (a @ b)``
    (``torch.baddbmm``, as BLOOM computes ALiBi scores). Keeps each operand
    only when the other one needs a gradient (frozen operands cost nothing);
    the output gets a recipe that rebuilds it from what is kept (attention
    scores: the softmax keeps no N x N map)."""

    @staticmethod
    def forward(ctx, a, b, spec: QuantSpec, states, bias, beta, alpha):
        if bias is None:
            out = torch.matmul(a, b)
        else:
            out = torch.baddbmm(bias, a, b, beta=beta, alpha=alpha)
        need_a, need_b = ctx.needs_input_grad[1], ctx.needs_input_grad[0]
        # q @ k^T of attention heads: both kept rotated along the contraction
        # (head) dimension, which leaves the product unchanged
        qk = _has_heads(a) and _has_heads(b)
        kept_a = keep(a, spec, op="matmul", heads=_has_heads(a), running=_running(states, spec, "a"),
                      rotate=-1 if qk else None) if need_a else None
        kept_b = keep(b, spec, op="matmul", heads=_has_heads(b), running=_running(states, spec, "b"),
                      rotate=-2 if qk else None) if need_b else None
        save(ctx, kept_a, kept_b)
        if spec.keep_once and kept_a is not None and kept_b is not None:
            if bias is None:
                ctx.mesa_out = combined(kept_a, kept_b, functools.partial(_matmul_in, dtype=out.dtype))
            elif bias.numel() < out.numel():
                # the operands' recipes rebuilt as a pair, then the (small,
                # ALiBi-like) bias added as baddbmm adds it
                pair = combined(kept_a, kept_b, _pair)
                step = functools.partial(_baddbmm_of_pair, dtype=out.dtype, beta=beta, alpha=alpha)
                ctx.mesa_out = derived(pair, step, (bias,), AutocastState(a.device.type))
        ctx.cd, ctx.alpha, ctx.beta = out.dtype, alpha, beta
        ctx.shapes = (tuple(a.shape), tuple(b.shape), None if bias is None else tuple(bias.shape))
        ctx.dtypes = (a.dtype, b.dtype, None if bias is None else bias.dtype)
        return fresh(out, a, b, bias)

    @staticmethod
    def backward(ctx, grad_out):
        a, b = load(ctx)
        cd = ctx.cd
        g = grad_out.to(cd)
        if ctx.alpha != 1:
            g_ab = g * ctx.alpha
        else:
            g_ab = g
        grad_a = grad_b = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_a = _sum_to(g_ab @ b.to(cd).mT, ctx.shapes[0]).to(ctx.dtypes[0])
        if ctx.needs_input_grad[1]:
            grad_b = _sum_to(a.to(cd).mT @ g_ab, ctx.shapes[1]).to(ctx.dtypes[1])
        if ctx.shapes[2] is not None and ctx.needs_input_grad[4]:
            grad_bias = _sum_to(g * ctx.beta if ctx.beta != 1 else g, ctx.shapes[2]).to(ctx.dtypes[2])
        return grad_a, grad_b, None, None, grad_bias, None, None


def _pair(a, b):
    return (a, b)


def _baddbmm_of_pair(pair, bias, *, dtype, beta, alpha):
    a, b = pair
    return torch.baddbmm(bias, a.to(dtype), b.to(dtype), beta=beta, alpha=alpha)


def matmul(a: Tensor, b: Tensor, *, config=None, states: Optional[RangeStates] = None) -> Tensor:
    """``torch.matmul`` of two activations (e.g. ``q @ k.transpose(-2, -1)``,
    ``attn @ v``), keeping both operands compressed, per head for 4-D+."""
    spec = as_spec(config)
    if spec is None or not needs_saving(a, b) or a.dim() < 2 or b.dim() < 2:
        return torch.matmul(a, b)
    return run_with_kept(_MatmulFn, a, b, spec, states, None, 1, 1)


def baddbmm(bias: Tensor, a: Tensor, b: Tensor, *, beta=1, alpha=1, config=None,
            states: Optional[RangeStates] = None) -> Tensor:
    """``torch.baddbmm(bias, a, b, beta=beta, alpha=alpha)`` keeping ``a`` and
    ``b`` compressed (and ``bias`` in the output's recipe when it is smaller
    than the output, as BLOOM's ALiBi bias is)."""
    spec = as_spec(config)
    if spec is None or not needs_saving(a, b, bias) or a.dim() != 3 or b.dim() != 3:
        return torch.baddbmm(bias, a, b, beta=beta, alpha=alpha)
    return run_with_kept(_MatmulFn, a, b, spec, states, bias, beta, alpha)


# ------------------------------------------------------------------- einsum
def _einsum(a, b, *, equation, dtype):
    return torch.einsum(equation, a.to(dtype), b.to(dtype))


class _EinsumFn(OpFunction):
    """``torch.einsum(equation, a, b)``: keeps each operand only when the other
    one needs a gradient (a Parameter as itself); backward runs the einsum
    again on the rebuilt operands and differentiates it. An operand that is
    not kept is replaced by zeros of its shape (one broadcast value: the
    product is linear in each operand, so the other's gradient does not
    depend on it)."""

    @staticmethod
    def forward(ctx, a, b, equation: str, spec: QuantSpec, states):
        out = torch.einsum(equation, a, b)
        kept = []
        for i, (t, slot) in enumerate(((a, "a"), (b, "b"))):
            if ctx.needs_input_grad[1 - i]:
                kept.append(keep(t, spec, op="matmul", heads=_has_heads(t), running=_running(states, spec, slot)))
            else:
                kept.append(None)
        save(ctx, *kept)
        step = functools.partial(_einsum, equation=equation, dtype=out.dtype)
        if spec.keep_once and kept[0] is not None and kept[1] is not None:
            ctx.mesa_out = combined(kept[0], kept[1], step)
        ctx.step, ctx.autocast = step, AutocastState(a.device.type)
        ctx.meta = ((a.shape, a.dtype), (b.shape, b.dtype))
        return fresh(out, a, b)

    @staticmethod
    def backward(ctx, grad_out):
        loaded = load(ctx)
        inputs = [
            t if t is not None else torch.zeros((), dtype=dt, device=grad_out.device).expand(shape)
            for t, (shape, dt) in zip(loaded, ctx.meta)
        ]
        needs = list(ctx.needs_input_grad[:2])
        grads = grad_by_recompute(ctx.step, inputs, needs, grad_out, ctx.autocast)
        return (*[g.to(dt) if g is not None else None for g, (_, dt) in zip(grads, ctx.meta)], None, None, None)


def einsum(equation: str, a: Tensor, b: Tensor, *, config=None, states: Optional[RangeStates] = None) -> Tensor:
    """``torch.einsum(equation, a, b)`` of two operands, keeping them
    compressed (per head for 4-D+); its output gets a rebuild recipe."""
    spec = as_spec(config)
    if spec is None or not needs_saving(a, b):
        return torch.einsum(equation, a, b)
    return run_with_kept(_EinsumFn, a, b, equation, spec, states)


# --------------------------------------------------------------------- SDPA
def _sdpa(q, k, v, mask, *, kwargs):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **kwargs)


class _SDPAFn(OpFunction):
    @staticmethod
    def forward(ctx, q, k, v, mask, spec: QuantSpec, states, kwargs):
        rng = RngReplay(q.device) if kwargs.get("dropout_p", 0.0) > 0.0 else None
        fn = functools.partial(_sdpa, kwargs=kwargs)
        out = fn(q, k, v, mask)
        kept_qkv = quantized_qkv(q, k, v, spec, op="attention") or (
            keep(q, spec, op="attention", heads=True, running=_running(states, spec, "q"), rotate=-1),
            keep(k, spec, op="attention", heads=True, running=_running(states, spec, "k"), rotate=-1),
            keep(v, spec, op="attention", heads=True, running=_running(states, spec, "v")))
        save(
            ctx,
            *kept_qkv,
            # a mask built from smaller tensors (a bias plus a broadcast shift
            # mask, as in Swin) is kept as those, exactly
            (kept_of(mask) if spec.keep_once else None) or exact(mask),
        )
        ctx.fn, ctx.rng, ctx.autocast = fn, rng, AutocastState(q.device.type)
        return fresh(out, q, k, v, mask)

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
