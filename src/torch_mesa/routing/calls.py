"""Routed calls: the functions a model calls, bound to torch-mesa ops.

Each handler takes ``(spec, states, args, kwargs)`` of one call of a
PyTorch function (``F.scaled_dot_product_attention``, ``torch.matmul``,
``F.softmax``, ``F.linear``, ``F.layer_norm``, ``a * b``...), binds the
arguments the way PyTorch would, and calls the matching op of
:mod:`torch_mesa.ops` with the module's spec; or returns ``NotImplemented``
(an argument the op was not written for), and the call runs as PyTorch runs
it. :func:`handlers` is the table the scope dispatches on.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Dict

import torch
import torch.nn.functional as F

from .. import ops
from . import passthrough


def _bind(fn: Callable) -> Callable[..., Dict[str, Any]]:
    sig = inspect.signature(fn)

    def bind(args, kwargs):
        b = sig.bind(*args, **kwargs)
        return b.arguments

    return bind


_bind_sdpa = None  # bound lazily: signature inspection costs nothing at import


def _sdpa(spec, states, args, kwargs):
    global _bind_sdpa
    if _bind_sdpa is None:
        try:
            _bind_sdpa = _bind(F.scaled_dot_product_attention)
        except (TypeError, ValueError):  # builtin without a signature
            _bind_sdpa = _bind(_sdpa_signature)
    a = _bind_sdpa(args, kwargs)
    extra = set(a) - {"query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"}
    if extra:
        return NotImplemented
    return ops.scaled_dot_product_attention(
        a["query"],
        a["key"],
        a["value"],
        a.get("attn_mask"),
        a.get("dropout_p", 0.0),
        a.get("is_causal", False),
        a.get("scale"),
        a.get("enable_gqa", False),
        config=spec,
        states=states,
    )


def _sdpa_signature(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    pass


def _matmul(spec, states, args, kwargs):
    if kwargs or len(args) != 2:
        return NotImplemented
    a, b = args
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        return NotImplemented
    return ops.matmul(a, b, config=spec, states=states)


def _softmax(spec, states, args, kwargs):
    x = args[0] if args else kwargs.get("input")
    dim = args[1] if len(args) > 1 else kwargs.get("dim")
    dtype = kwargs.get("dtype", args[3] if len(args) > 3 else None)
    if dim is None or not isinstance(x, torch.Tensor):
        return NotImplemented
    return ops.softmax(x, dim, dtype, config=spec, states=states)


def _tensor_softmax(spec, states, args, kwargs):
    x = args[0]
    dim = args[1] if len(args) > 1 else kwargs.get("dim")
    dtype = args[2] if len(args) > 2 else kwargs.get("dtype")
    if dim is None:
        return NotImplemented
    return ops.softmax(x, dim, dtype, config=spec, states=states)


def _linear(spec, states, args, kwargs):
    names = ("input", "weight", "bias")
    a = dict(zip(names, args), **kwargs)
    if set(a) - set(names):
        return NotImplemented
    return ops.linear(a["input"], a["weight"], a.get("bias"), config=spec, states=states)


def _layer_norm(spec, states, args, kwargs):
    names = ("input", "normalized_shape", "weight", "bias", "eps")
    a = dict(zip(names, args), **kwargs)
    if set(a) - set(names):
        return NotImplemented
    return ops.layer_norm(
        a["input"], a["normalized_shape"], a.get("weight"), a.get("bias"), a.get("eps", 1e-5),
        config=spec, states=states,
    )


def _rms_norm(spec, states, args, kwargs):
    names = ("input", "normalized_shape", "weight", "eps")
    a = dict(zip(names, args), **kwargs)
    if set(a) - set(names):
        return NotImplemented
    return ops.rms_norm(
        a["input"], a["normalized_shape"], a.get("weight"), a.get("eps"), config=spec, states=states
    )


def _gelu(spec, states, args, kwargs):
    names = ("input", "approximate")
    a = dict(zip(names, args), **kwargs)
    if set(a) - set(names):
        return NotImplemented
    return ops.gelu(a["input"], a.get("approximate", "none"), config=spec, states=states)


def _silu(spec, states, args, kwargs):
    names = ("input", "inplace")
    a = dict(zip(names, args), **kwargs)
    if set(a) - set(names) or a.get("inplace", False):
        return NotImplemented
    return ops.silu(a["input"], config=spec, states=states)


def _dropout(spec, states, args, kwargs):
    names = ("input", "p", "training", "inplace")
    a = dict(zip(names, args), **kwargs)
    if set(a) - set(names) or a.get("inplace", False):
        return NotImplemented
    return ops.dropout(a["input"], a.get("p", 0.5), a.get("training", True), config=spec)


def _mul(spec, states, args, kwargs):
    if kwargs or len(args) != 2:
        return NotImplemented
    a, b = args
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dim() and b.dim() \
            and a.requires_grad and b.requires_grad and a.is_floating_point() and b.is_floating_point():
        # the product of two activations (a gated MLP's act(gate) * up)
        return ops.mul(a, b, config=spec, states=states)
    return passthrough.scaled(args)


def handlers() -> Dict[Callable, Callable]:
    table = {
        F.scaled_dot_product_attention: _sdpa,
        torch.matmul: _matmul,
        torch.Tensor.matmul: _matmul,
        torch.Tensor.__matmul__: _matmul,
        torch.bmm: _matmul,
        torch.Tensor.bmm: _matmul,
        F.softmax: _softmax,
        torch.softmax: _tensor_softmax,
        torch.Tensor.softmax: _tensor_softmax,
        F.linear: _linear,
        F.layer_norm: _layer_norm,
        F.gelu: _gelu,
        F.silu: _silu,
        F.dropout: _dropout,
        torch.mul: _mul,
        torch.Tensor.mul: _mul,
        torch.Tensor.__mul__: _mul,
        torch.Tensor.__rmul__: _mul,
        torch.Tensor.__truediv__: passthrough.div_step,
        torch.div: passthrough.div_step,
        torch.Tensor.div: passthrough.div_step,
        torch.add: passthrough.add_step,
        torch.Tensor.add: passthrough.add_step,
        torch.Tensor.__add__: passthrough.add_step,
        torch.Tensor.__radd__: passthrough.add_step,
        torch.Tensor.to: passthrough.to_step,
        torch.Tensor.type: passthrough.type_step,
        torch.Tensor.reshape: passthrough.reshape_step,
    }
    if hasattr(F, "rms_norm"):
        table[F.rms_norm] = _rms_norm
    return table


