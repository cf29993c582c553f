"""Passing a rebuild recipe through cheap elementwise steps.

Attention scores are often scaled, masked or cast between ``q @ k^T`` and
the softmax. These steps keep nothing for backward themselves; they run as
PyTorch runs them, and when their tensor input carries a rebuild recipe the
output gets one too (recipe, then the same step), so the softmax keeps a
recipe instead of an N x N map.
"""

from __future__ import annotations

import functools

import torch

from ..ops.recipes import derived, exact, kept_of, mark_kept
from ..ops.replay import AutocastState


def _times(x, factor):
    return x * factor


def _divided(x, divisor):
    return x / divisor


def _plus(x, other):
    return x + other


def _cast(x, *, dtype):
    return x.to(dtype)


def _with_recipe(out, source, step, extra=()):
    inner = kept_of(source)
    if inner is not None and out is not source and isinstance(out, torch.Tensor):
        mark_kept(out, derived(inner, step, extra, AutocastState(out.device.type)))
    return out


def _constant(t) -> bool:
    return isinstance(t, (int, float)) or (isinstance(t, torch.Tensor) and t.dim() == 0 and not t.requires_grad)


def scaled(args):
    """``a * b`` where one factor carries a recipe and the other is a constant."""
    a, b = args
    for x, factor in ((a, b), (b, a)):
        if kept_of(x) is not None and _constant(factor):
            extra = (factor,) if isinstance(factor, torch.Tensor) else ()
            step = _times if extra else functools.partial(_times, factor=factor)
            return _with_recipe(a * b, x, step, extra)
    return NotImplemented


def div_step(spec, states, args, kwargs):
    if kwargs or len(args) != 2:
        return NotImplemented
    x, d = args
    if kept_of(x) is None or not _constant(d):
        return NotImplemented
    extra = (d,) if isinstance(d, torch.Tensor) else ()
    step = _divided if extra else functools.partial(_divided, divisor=d)
    return _with_recipe(x / d, x, step, extra)


def add_step(spec, states, args, kwargs):
    if kwargs or len(args) != 2:
        return NotImplemented
    a, b = args
    for x, other in ((a, b), (b, a)):
        if kept_of(x) is not None and isinstance(x, torch.Tensor):
            out = a + b
            if isinstance(other, torch.Tensor):
                if other.numel() >= out.numel():
                    return out  # never hold a full-size tensor exactly: the consumer quantizes instead
                return _with_recipe(out, x, _plus, (other,))
            return _with_recipe(out, x, functools.partial(_plus, other=other))
    return NotImplemented


def _reshaped(x, *, shape):
    return x.reshape(shape)


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


