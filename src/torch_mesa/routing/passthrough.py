"""Passing a rebuild recipe through cheap elementwise steps.

Attention scores are often scaled, masked or cast between ``q @ k^T`` and
the softmax. These steps keep nothing for backward themselves; they run as
PyTorch runs them, and when their tensor input carries a rebuild recipe the
output gets one too (recipe, then the same step), so the softmax keeps a
recipe instead of an N x N map.
"""

from __future__ import annotations

import functools
import math
import operator

import torch

from .. import quant

from ..ops.recipes import combined, derived, exact, kept_of, mark_kept
from ..ops.replay import AutocastState


def _times(x, factor):
    return x * factor


def _divided(x, divisor):
    return x / divisor


def _plus(x, other):
    return x + other


def _minus(x, other):
    return x - other


def _cast(x, *, dtype):
    return x.to(dtype)


def _masked(x, mask, *value, fill=None):
    return x.masked_fill(mask, value[0] if value else fill)


def _chosen(x, cond, *other, fill=None, x_first=True):
    o = other[0] if other else fill
    return torch.where(cond, x, o) if x_first else torch.where(cond, o, x)


def _unpacked(packed, *, shape):
    return quant.unpack_bits(packed, shape)


def _mask_step(step, *, shape):
    """``step`` whose first extra tensor (a full-size boolean mask) is kept
    packed, 1 bit per element."""
    return functools.partial(_with_unpacked, step=step, shape=shape)


def _with_unpacked(x, packed, *rest, step, shape):
    return step(x, _unpacked(packed, shape=shape), *rest)


def _with_recipe(out, source, step, extra=()):
    inner = kept_of(source)
    if inner is not None and out is not source and isinstance(out, torch.Tensor):
        mark_kept(out, derived(inner, step, extra, AutocastState(out.device.type)))
    return out


def _constant(t) -> bool:
    return isinstance(t, (int, float)) or (isinstance(t, torch.Tensor) and t.dim() == 0 and not t.requires_grad)


def _small(t, shape) -> bool:
    """A tensor a recipe may hold as it is: its storage is smaller than the
    output (a mask or bias broadcast over batch or heads, a broadcast view),
    never a full-size copy."""
    if not isinstance(t, torch.Tensor):
        return False
    try:
        held = t.untyped_storage().nbytes()
    except (RuntimeError, NotImplementedError):  # no storage (sparse, nested, fake)
        held = t.numel() * t.element_size()
    return held < math.prod(shape) * t.element_size()


# Each plan gives ``(step, extra)`` for ``out = step(x, *extra)``, or None when
# the step cannot be passed on (then the consumer keeps what it needs itself).
def _plan_scale(factor, fn):
    if not _constant(factor):
        return None
    if isinstance(factor, torch.Tensor):
        return fn, (factor,)
    return functools.partial(fn, **{"factor" if fn is _times else "divisor": factor}), ()


def _plan_offset(other, fn, shape):
    if isinstance(other, torch.Tensor):
        return (fn, (other,)) if _small(other, shape) else None
    if isinstance(other, (int, float)):
        return functools.partial(fn, other=other), ()
    return None


def _plan_masked(mask, value, shape, step_fn, **flags):
    """A step that takes a boolean mask: held as it is when it is smaller than
    the output, packed 1 bit per element when it is full size."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        return None
    if isinstance(value, torch.Tensor):
        if not (_constant(value) or (not value.requires_grad and _small(value, shape))):
            return None
        step, extra = functools.partial(step_fn, **flags), (value,)
    elif isinstance(value, (int, float, bool)):
        step, extra = functools.partial(step_fn, fill=value, **flags), ()
    else:
        return None
    if _small(mask, shape):
        return step, (mask,) + extra
    full = mask.expand(shape) if tuple(mask.shape) != tuple(shape) else mask
    packed = quant.pack_bits(full)
    return _mask_step(step, shape=tuple(shape)), (packed,) + extra


def _bind2(args, kwargs):
    return (args[0], args[1]) if not kwargs and len(args) == 2 else None


def scaled(args):
    """``a * b`` where one factor carries a recipe and the other is a constant."""
    a, b = args
    for x, factor in ((a, b), (b, a)):
        if kept_of(x) is not None:
            plan = _plan_scale(factor, _times)
            if plan is not None:
                return _with_recipe(a * b, x, *plan)
    return NotImplemented


def div_step(spec, states, args, kwargs):
    pair = _bind2(args, kwargs)
    if pair is None or kept_of(pair[0]) is None:
        return NotImplemented
    x, d = pair
    plan = _plan_scale(d, _divided)
    return NotImplemented if plan is None else _with_recipe(x / d, x, *plan)


def _both(out, a, b, fn):
    """``out = fn(a, b)`` where both carry recipes (scores plus a mask rebuilt
    from its small parts): the output's recipe combines theirs."""
    ka, kb = kept_of(a), kept_of(b)
    if ka is None or kb is None:
        return None
    mark_kept(out, combined(ka, kb, fn))
    return out


def _offset(out, x, other, a, b, fn, step):
    """``out = fn(a, b)``, ``x`` (one of them) carrying a recipe and ``other``
    the offset: both recipes combined when ``other`` has one too, else
    ``x``'s recipe plus the offset where it is cheap to keep; otherwise
    ``out`` as it is (kept by whoever consumes it)."""
    if _both(out, a, b, fn) is not None:
        return out
    plan = _plan_offset(other, step, out.shape)
    return out if plan is None else _with_recipe(out, x, *plan)


def add_step(spec, states, args, kwargs):
    pair = _bind2(args, kwargs)
    if pair is None:
        return NotImplemented
    a, b = pair
    for x, other in ((a, b), (b, a)):
        if kept_of(x) is not None:
            return _offset(a + b, x, other, a, b, operator.add, _plus)
    return NotImplemented


def sub_step(spec, states, args, kwargs):
    """``x - other`` (a row maximum subtracted for stability, a constant)."""
    pair = _bind2(args, kwargs)
    if pair is None or kept_of(pair[0]) is None:
        return NotImplemented
    x, other = pair
    return _offset(x - other, x, other, x, other, operator.sub, _minus)


def extremum(kind: str):
    """The handler of ``torch.max(scores, finfo.min)`` / ``torch.maximum`` /
    ``torch.minimum`` (``kind`` "max" or "min") of a recipe-carrying tensor
    and a constant: a clamp written as an extremum passes the recipe on."""
    fn = torch.maximum if kind == "max" else torch.minimum

    def handler(spec, states, args, kwargs):
        pair = _bind2(args, kwargs)
        if pair is None:
            return NotImplemented
        a, b = pair
        for x, other in ((a, b), (b, a)):
            if kept_of(x) is not None and isinstance(other, torch.Tensor) and _constant(other):
                return _with_recipe(fn(a, b), x, fn, (other,))
        return NotImplemented

    return handler


def _masked_fill_args(args, kwargs):
    names = ("input", "mask", "value")
    a = dict(zip(names, args), **kwargs)
    if set(a) - set(names) or len(a) != 3:
        return None
    return a["input"], a["mask"], a["value"]


def masked_fill_step(spec, states, args, kwargs):
    """``scores.masked_fill(mask, value)``: masking written as PyTorch code."""
    a = _masked_fill_args(args, kwargs)
    if a is None or kept_of(a[0]) is None:
        return NotImplemented
    x, mask, value = a
    out = x.masked_fill(mask, value)
    plan = _plan_masked(mask, value, out.shape, _masked)
    return out if plan is None else _with_recipe(out, x, *plan)


def where_step(spec, states, args, kwargs):
    """``torch.where(mask, scores, value)`` or ``torch.where(mask, value, scores)``."""
    if kwargs or len(args) != 3:
        return NotImplemented
    cond, a, b = args
    for x, other, x_first in ((a, b, True), (b, a, False)):
        if kept_of(x) is not None:
            out = torch.where(cond, a, b)
            plan = _plan_masked(cond, other, out.shape, _chosen, x_first=x_first)
            return out if plan is None else _with_recipe(out, x, *plan)
    return NotImplemented


def _plan_inplace(kind, x, args, kwargs):
    if kind == "masked_fill":
        a = _masked_fill_args((x,) + tuple(args), kwargs)
        return None if a is None else _plan_masked(a[1], a[2], x.shape, _masked)
    if kwargs or len(args) != 1:
        return None
    (other,) = args
    if kind in ("mul", "div"):
        return _plan_scale(other, _times if kind == "mul" else _divided)
    return _plan_offset(other, _plus if kind == "add" else _minus, x.shape)


_INPLACE = {
    "masked_fill_": "masked_fill",
    "add_": "add",
    "__iadd__": "add",
    "sub_": "sub",
    "__isub__": "sub",
    "mul_": "mul",
    "__imul__": "mul",
    "div_": "div",
    "__itruediv__": "div",
    "__idiv__": "div",
}


def inplace(func):
    """The handler of an in-place step (``scores += mask``, ``scores *= scale``,
    ``scores.masked_fill_(mask, value)``): it runs as PyTorch runs it, and the
    tensor gets its recipe back, extended by the step, where the out-of-place
    step would pass the recipe on (otherwise the version check drops it)."""
    kind = _INPLACE[func.__name__]

    def handler(spec, states, args, kwargs):
        x = args[0] if args else None
        inner = kept_of(x)
        if inner is None:
            return NotImplemented
        plan = _plan_inplace(kind, x, args[1:], kwargs)
        out = func(*args, **kwargs)
        if plan is not None and out is x:
            mark_kept(x, derived(inner, plan[0], plan[1], AutocastState(x.device.type)))
        return out

    return handler


def _reshaped(x, *, shape):
    return x.reshape(shape)


def _shaped(x, *, shape):
    return x.reshape(shape)


def _permuted(x, *, dims):
    return x.permute(dims)


def shape_step(func):
    """The handler of a view or reshape (``view``, ``reshape``, ``flatten``,
    ``unflatten``, ``transpose``, ``permute``...) of a recipe-carrying tensor:
    the output gets the recipe, then the same change of shape (attention
    scores viewed between their heads and a batch of heads, as BLOOM and XGLM
    do). Tensors without a recipe: PyTorch's own."""

    def handler(spec, states, args, kwargs):
        x = args[0] if args else None
        if kept_of(x) is None:
            return reshape_step(spec, states, args, kwargs) if func is torch.Tensor.reshape else NotImplemented
        out = func(*args, **kwargs)
        if not isinstance(out, torch.Tensor) or out is x or out.dtype != x.dtype:
            return out  # the same tensor, or a reinterpretation of its bytes
        if func in _PERMUTING:
            # (by the dims asked for, not by the shapes: a transpose of a
            # square (N, N) pair of dims changes no shape)
            dims = _permutation(func, x.dim(), args[1:], kwargs)
            if dims is None or out.dim() != x.dim():
                return out
            return _with_recipe(out, x, functools.partial(_permuted, dims=dims))
        if out.numel() != x.numel():
            return out
        return _with_recipe(out, x, functools.partial(_shaped, shape=tuple(out.shape)))

    return handler


_SWAPPING = (torch.Tensor.transpose, torch.transpose, torch.Tensor.swapaxes, torch.swapaxes,
             torch.Tensor.swapdims, torch.swapdims)
_MOVING = (torch.Tensor.movedim, torch.movedim, torch.Tensor.moveaxis, torch.moveaxis)
_MATRIX_T = torch.Tensor.mT.__get__
_PERMUTING = _SWAPPING + _MOVING + (torch.Tensor.permute, torch.permute, _MATRIX_T)


def _as_dims(v, ndim):
    return [int(d) % ndim for d in (v if isinstance(v, (tuple, list)) else (v,))]


def _permutation(func, ndim, args, kwargs):
    """The dims of ``permute`` equivalent to this transpose/swap/move/permute
    call (``args`` without the tensor), or None for a form not understood."""
    if func == _MATRIX_T:  # (a new method-wrapper each access: equal, not identical)
        if args or kwargs or ndim < 2:
            return None
        return tuple(range(ndim - 2)) + (ndim - 1, ndim - 2)
    if func in _SWAPPING:
        if kwargs or len(args) != 2:
            return None
        d0, d1 = (int(a) % ndim for a in args)
        dims = list(range(ndim))
        dims[d0], dims[d1] = dims[d1], dims[d0]
        return tuple(dims)
    if func in _MOVING:
        if kwargs or len(args) != 2:
            return None
        src, dst = _as_dims(args[0], ndim), _as_dims(args[1], ndim)
        if len(src) != len(dst):
            return None
        dims = [None] * ndim
        for s_, d_ in zip(src, dst):
            dims[d_] = s_
        rest = iter(d for d in range(ndim) if d not in src)
        return tuple(next(rest) if d is None else d for d in dims)
    dims = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list)) else args
    if kwargs or len(dims) != ndim:
        return None
    return tuple(int(d) % ndim for d in dims)


def reshape_step(spec, states, args, kwargs):
    # A reshape that materialises a broadcast view (an attention mask
    # expanded over batch and heads) copies a small tensor into a large one;
    # the copy gets a recipe that keeps only the small one.
    x = args[0]
    if kwargs or not isinstance(x, torch.Tensor) or 0 not in x.stride() or x.requires_grad:
        return NotImplemented
    out = x.reshape(*args[1:])
    if out.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
        return out  # a view: nothing was copied
    mark_kept(out, derived(exact(x), functools.partial(_reshaped, shape=tuple(out.shape)),
                                         (), AutocastState(out.device.type)))
    return out


def type_step(spec, states, args, kwargs):
    dtype = args[1] if len(args) > 1 else kwargs.get("dtype")
    if not isinstance(dtype, torch.dtype) or kept_of(args[0]) is None:
        return NotImplemented
    return to_step(spec, states, (args[0], dtype), {})


def to_step(spec, states, args, kwargs):
    x = args[0]
    if kept_of(x) is None:
        return NotImplemented
    out = x.to(*args[1:], **kwargs)
    if out.device != x.device:
        return out
    return _with_recipe(out, x, functools.partial(_cast, dtype=out.dtype))


