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

import functools
import types
from typing import Any, Callable, Dict

import torch
import torch.nn.functional as F

from .. import ops
from ..ops.recipes import is_weight
from . import passthrough


class Fallback:
    """A handler's answer when its op was not written for this call: the call
    runs as PyTorch runs it (keeping what PyTorch keeps), and the scope
    counts it with ``reason``."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _args(names, args, kwargs, **unsupported) -> Any:
    """Bind ``args``/``kwargs`` to ``names``; a :class:`Fallback` naming the
    argument when one is not in ``names`` or has a value the op does not
    support (``unsupported={name: predicate}``)."""
    if len(args) > len(names):
        return Fallback(f"{len(args)} positional arguments")
    a = dict(zip(names, args))
    for k, v in kwargs.items():
        if k not in names or k in a:
            return Fallback(f"argument {k!r}")
        a[k] = v
    for name, bad in unsupported.items():
        if name in a and bad(a[name]):
            return Fallback(f"{name}={a[name]!r}")
    return a


_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def _sdpa(spec, states, args, kwargs):
    a = _args(_SDPA_ARGS, args, kwargs)
    if isinstance(a, Fallback):
        return a
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


def _tensors(*xs) -> bool:
    return all(isinstance(x, torch.Tensor) for x in xs)


def _matmul(spec, states, args, kwargs):
    a = _args(("input", "other"), args, kwargs)
    if isinstance(a, Fallback):
        return a
    if len(a) != 2 or not _tensors(a["input"], a["other"]):
        return NotImplemented
    return ops.matmul(a["input"], a["other"], config=spec, states=states)


def _baddbmm(spec, states, args, kwargs):
    a = _args(("input", "batch1", "batch2", "beta", "alpha"), args, kwargs)
    if isinstance(a, Fallback):
        return a
    if not _tensors(a.get("input"), a.get("batch1"), a.get("batch2")):
        return NotImplemented
    return ops.baddbmm(a["input"], a["batch1"], a["batch2"], beta=a.get("beta", 1), alpha=a.get("alpha", 1),
                       config=spec, states=states)


def _einsum(spec, states, args, kwargs):
    if kwargs or not args or not isinstance(args[0], str):
        return NotImplemented
    operands = args[1:]
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = tuple(operands[0])
    if len(operands) != 2 or not _tensors(*operands):
        return NotImplemented  # one operand keeps nothing; three or more: PyTorch's contraction path
    a, b = operands
    if not (a.is_floating_point() and b.is_floating_point()):
        return NotImplemented
    return ops.einsum(args[0], a, b, config=spec, states=states)


def _softmax_of(names):
    """``F.softmax(input, dim, _stacklevel, dtype)`` or ``torch.softmax`` /
    ``Tensor.softmax(input, dim, dtype)``."""

    def handler(spec, states, args, kwargs):
        a = _args(names, args, kwargs)
        if isinstance(a, Fallback):
            return a
        if a.get("dim") is None:
            return Fallback("implicit dim")
        return ops.softmax(a["input"], a["dim"], a.get("dtype"), config=spec, states=states)

    return handler


_softmax = _softmax_of(("input", "dim", "_stacklevel", "dtype"))
_tensor_softmax = _softmax_of(("input", "dim", "dtype"))


def _linear(spec, states, args, kwargs):
    a = _args(("input", "weight", "bias"), args, kwargs)
    if isinstance(a, Fallback):
        return a
    return ops.linear(a["input"], a["weight"], a.get("bias"), config=spec, states=states)


def _layer_norm(spec, states, args, kwargs):
    a = _args(("input", "normalized_shape", "weight", "bias", "eps"), args, kwargs)
    if isinstance(a, Fallback):
        return a
    return ops.layer_norm(
        a["input"], a["normalized_shape"], a.get("weight"), a.get("bias"), a.get("eps", 1e-5),
        config=spec, states=states,
    )


def _rms_norm(spec, states, args, kwargs):
    a = _args(("input", "normalized_shape", "weight", "eps"), args, kwargs)
    if isinstance(a, Fallback):
        return a
    return ops.rms_norm(
        a["input"], a["normalized_shape"], a.get("weight"), a.get("eps"), config=spec, states=states
    )


def _normalized(x, *, p, eps):
    return F.normalize(x, p=p, dim=-1, eps=eps)


def _normalize(spec, states, args, kwargs):
    """``F.normalize(x, dim=-1)``: a norm of each row, kept as its input
    relative to the row (as LayerNorm's)."""
    a = _args(("input", "p", "dim", "eps", "out"), args, kwargs)
    if isinstance(a, Fallback):
        return a
    x = a.get("input")
    if a.get("out") is not None:
        return Fallback("out=")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() == 0 \
            or a.get("dim", 1) % x.dim() != x.dim() - 1:
        return NotImplemented  # along another dimension: PyTorch's own
    fn = functools.partial(_normalized, p=a.get("p", 2.0), eps=a.get("eps", 1e-12))
    return ops.recompute(fn, x, rows=True, config=spec, states=states)


def _grouped(x, w, *, mm, offs):
    return mm(x, w, offs=offs)


def _grouped_mm(mm):
    """``F.grouped_mm(input, weight, offs=...)``: the experts of a mixture of
    experts (transformers' MoE layers). The input is kept compressed, the
    weight as itself; backward runs the grouped product again."""

    def handler(spec, states, args, kwargs):
        a = _args(("mat_a", "mat_b", "offs", "bias", "out_dtype"), args, kwargs)
        if isinstance(a, Fallback):
            return a
        if a.get("bias") is not None or a.get("out_dtype") is not None:
            return Fallback("bias or out_dtype")
        x, w = a["mat_a"], a["mat_b"]
        if not (_tensors(x, w) and is_weight(w) and x.is_floating_point()):
            return NotImplemented  # two activations: PyTorch's own
        fn = functools.partial(_grouped, mm=mm, offs=a.get("offs"))
        return ops.recompute(fn, x, [w], op="linear", config=spec, states=states)

    return handler


def _gelu(spec, states, args, kwargs):
    a = _args(("input", "approximate"), args, kwargs, approximate=lambda v: v not in ("none", "tanh"))
    if isinstance(a, Fallback):
        return a
    return ops.gelu(a["input"], a.get("approximate", "none"), config=spec, states=states)


def _silu(spec, states, args, kwargs):
    a = _args(("input", "inplace"), args, kwargs, inplace=bool)
    if isinstance(a, Fallback):
        return a
    return ops.silu(a["input"], config=spec, states=states)


def _dropout(spec, states, args, kwargs):
    a = _args(("input", "p", "training", "inplace"), args, kwargs, inplace=bool)
    if isinstance(a, Fallback):
        return a
    return ops.dropout(a["input"], a.get("p", 0.5), a.get("training", True), config=spec)


def _unary(op):
    """``torch.relu(x)``, ``x.sigmoid()``, ``F.relu(x, inplace=False)``..."""

    def handler(spec, states, args, kwargs):
        a = _args(("input", "inplace"), args, kwargs, inplace=bool)
        if isinstance(a, Fallback):
            return a
        x = a.get("input")
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            return NotImplemented
        return op(x, config=spec, states=states)

    return handler


def _conv(spec, states, args, kwargs):
    a = _args(("input", "weight", "bias", "stride", "padding", "dilation", "groups"), args, kwargs)
    if isinstance(a, Fallback):
        return a
    return ops.conv(a["input"], a["weight"], a.get("bias"), a.get("stride", 1), a.get("padding", 0),
                    a.get("dilation", 1), a.get("groups", 1), config=spec, states=states)


def _relu(spec, states, args, kwargs):
    a = _args(("input", "inplace"), args, kwargs)
    if isinstance(a, Fallback):
        return a
    x = a.get("input")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        return NotImplemented
    return ops.relu(x, inplace=bool(a.get("inplace", False)), config=spec, states=states)


def _max_pool2d(spec, states, args, kwargs):
    a = _args(("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"), args, kwargs,
              return_indices=bool)
    if isinstance(a, Fallback):
        return a
    return ops.max_pool2d(a["input"], a["kernel_size"], a.get("stride"), a.get("padding", 0), a.get("dilation", 1),
                          a.get("ceil_mode", False), config=spec)


def _batch_norm(spec, states, args, kwargs):
    if not spec.batch_norm:
        return NotImplemented  # exact unless asked for (MesaConfig.batch_norm)
    a = _args(("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"), args,
              kwargs)
    if isinstance(a, Fallback):
        return a
    return ops.batch_norm(a["input"], a["running_mean"], a["running_var"], a.get("weight"), a.get("bias"),
                          a.get("training", False), a.get("momentum", 0.1), a.get("eps", 1e-5),
                          config=spec, states=states)


def _leaky_relu(spec, states, args, kwargs):
    a = _args(("input", "negative_slope", "inplace"), args, kwargs, inplace=bool)
    if isinstance(a, Fallback):
        return a
    return ops.leaky_relu(a["input"], a.get("negative_slope", 0.01), config=spec, states=states)


def _number(v) -> bool:
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))


def _clamp(spec, states, args, kwargs):
    a = _args(("input", "min", "max"), args, kwargs)
    if isinstance(a, Fallback):
        return a
    x = a.get("input")
    if not isinstance(x, torch.Tensor) or not (_number(a.get("min")) and _number(a.get("max"))):
        return NotImplemented  # tensor bounds: PyTorch's clamp
    return ops.clamp(x, a.get("min"), a.get("max"), config=spec)


def _mul(spec, states, args, kwargs):
    if kwargs or len(args) != 2:
        return NotImplemented
    a, b = args
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dim() and b.dim() \
            and a.requires_grad and b.requires_grad and a.is_floating_point() and b.is_floating_point():
        # the product of two activations (a gated MLP's act(gate) * up)
        return ops.mul(a, b, config=spec, states=states)
    return passthrough.scaled(args)


@functools.lru_cache(maxsize=None)
def composite_body(func: Callable):
    """PyTorch's own Python implementation of a composite functional
    (``F.multi_head_attention_forward``), callable with the routing mode on:
    the same code object, whose opening ``has_torch_function`` check (which
    would hand the whole call to the mode again, or run it with the mode off)
    answers no. The functional calls inside it (``F.linear``,
    ``F.scaled_dot_product_attention``, ``torch.bmm``, ``F.softmax``,
    ``F.dropout``) then reach the mode and are routed like any other, so the
    model computes exactly what PyTorch's function computes. None where this
    PyTorch's function is not plain Python with that check (then the call
    runs as PyTorch runs it)."""
    code = getattr(func, "__code__", None)
    if code is None or "has_torch_function" not in code.co_names or func.__closure__:
        return None
    namespace = dict(func.__globals__)
    namespace["has_torch_function"] = lambda *_: False
    body = types.FunctionType(code, namespace, func.__name__, func.__defaults__)
    body.__kwdefaults__ = func.__kwdefaults__
    return body


# Composite functionals whose inner calls are routed (see composite_body).
COMPOSITES = (F.multi_head_attention_forward,)


def handlers() -> Dict[Callable, Callable]:
    table = {
        F.scaled_dot_product_attention: _sdpa,
        torch.matmul: _matmul,
        torch.Tensor.matmul: _matmul,
        torch.Tensor.__matmul__: _matmul,
        torch.bmm: _matmul,
        torch.Tensor.bmm: _matmul,
        torch.baddbmm: _baddbmm,
        torch.einsum: _einsum,
        torch.Tensor.baddbmm: _baddbmm,
        F.softmax: _softmax,
        torch.softmax: _tensor_softmax,
        torch.Tensor.softmax: _tensor_softmax,
        F.linear: _linear,
        F.layer_norm: _layer_norm,
        F.gelu: _gelu,
        **({F.grouped_mm: _grouped_mm(F.grouped_mm)} if hasattr(F, "grouped_mm") else {}),
        **({torch._grouped_mm: _grouped_mm(torch._grouped_mm)} if hasattr(torch, "_grouped_mm") else {}),
        F.normalize: _normalize,
        F.silu: _silu,
        F.dropout: _dropout,
        F.conv1d: _conv,
        F.conv2d: _conv,
        F.conv3d: _conv,
        F.max_pool2d: _max_pool2d,
        F.batch_norm: _batch_norm,
        F.relu6: _unary(ops.relu6),
        F.hardswish: _unary(ops.hardswish),
        F.hardsigmoid: _unary(ops.hardsigmoid),
        F.leaky_relu: _leaky_relu,
        F.relu: _relu,
        torch.relu: _unary(ops.relu),
        torch.Tensor.relu: _unary(ops.relu),
        torch.sigmoid: _unary(ops.sigmoid),
        torch.Tensor.sigmoid: _unary(ops.sigmoid),
        torch.tanh: _unary(ops.tanh),
        torch.Tensor.tanh: _unary(ops.tanh),
        torch.clamp: _clamp,
        torch.Tensor.clamp: _clamp,
        torch.clip: _clamp,
        torch.Tensor.clip: _clamp,
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
        torch.sub: passthrough.sub_step,
        torch.Tensor.sub: passthrough.sub_step,
        torch.Tensor.__sub__: passthrough.sub_step,
        torch.Tensor.masked_fill: passthrough.masked_fill_step,
        torch.masked_fill: passthrough.masked_fill_step,
        torch.where: passthrough.where_step,
        torch.max: passthrough.extremum("max"),
        torch.maximum: passthrough.extremum("max"),
        torch.min: passthrough.extremum("min"),
        torch.minimum: passthrough.extremum("min"),
        torch.Tensor.masked_fill_: passthrough.inplace(torch.Tensor.masked_fill_),
        torch.Tensor.add_: passthrough.inplace(torch.Tensor.add_),
        torch.Tensor.__iadd__: passthrough.inplace(torch.Tensor.__iadd__),
        torch.Tensor.sub_: passthrough.inplace(torch.Tensor.sub_),
        torch.Tensor.__isub__: passthrough.inplace(torch.Tensor.__isub__),
        torch.Tensor.mul_: passthrough.inplace(torch.Tensor.mul_),
        torch.Tensor.__imul__: passthrough.inplace(torch.Tensor.__imul__),
        torch.Tensor.div_: passthrough.inplace(torch.Tensor.div_),
        torch.Tensor.__itruediv__: passthrough.inplace(torch.Tensor.__itruediv__),
        torch.Tensor.to: passthrough.to_step,
        torch.Tensor.type: passthrough.type_step,
        **{f: passthrough.shape_step(f) for f in (
            torch.Tensor.reshape, torch.reshape, torch.Tensor.view, torch.Tensor.flatten, torch.flatten,
            torch.Tensor.unflatten, torch.Tensor.squeeze, torch.squeeze, torch.Tensor.unsqueeze, torch.unsqueeze,
            torch.Tensor.contiguous, *passthrough._PERMUTING)},
    }
    if hasattr(F, "rms_norm"):
        table[F.rms_norm] = _rms_norm
    return table


