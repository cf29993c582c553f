"""Functional calls inside a converted model: attention without rewriting code.

Models compute attention with functions, not modules: ``q @ k.transpose(-2, -1)``,
``F.softmax``, ``F.scaled_dot_product_attention``; many also call
``F.linear``/``F.layer_norm``/``F.gelu`` directly, and gated MLPs multiply two
activations (``act(gate) * up``). The original Mesa made its
users rewrite that code by hand. Here, :func:`compress_` installs a
:class:`Scope` on the model: forward hooks on every module that was not
converted keep a stack of the modules currently running, and while the
outermost one runs with autograd recording, a ``TorchFunctionMode`` routes
those calls to the ops in :mod:`torch_mesa.ops`, with the policy (bits, or
exact) of the innermost running module.

Only calls made *directly* in a module's ``forward`` (or helpers it calls) are
routed: calls inside a converted layer, inside PyTorch's own composite
functions (``F.multi_head_attention_forward``), or under ``no_grad`` run as
PyTorch runs them. Running range estimates of routed calls are kept per
(module, call index) on the scope; a module that makes its calls in a
different order from step to step should use dynamic ranges.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from . import ops
from .config import MesaConfig, QuantSpec
from .ops import RangeStates
from .ops import _saved

__all__ = ["Scope"]


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


# --- passing a rebuild recipe through cheap elementwise steps -------------
# Attention scores are often scaled, masked or cast between ``q @ k^T`` and
# the softmax. These steps keep nothing for backward themselves; they run as
# PyTorch runs them, and when their tensor input carries a rebuild recipe the
# output gets one too (recipe, then the same step), so the softmax keeps a
# recipe instead of an N x N map.
def _times(x, factor):
    return x * factor


def _divided(x, divisor):
    return x / divisor


def _plus(x, other):
    return x + other


def _cast(x, *, dtype):
    return x.to(dtype)


def _with_recipe(out, source, step, extra=()):
    inner = _saved.kept_of(source)
    if inner is not None and out is not source and isinstance(out, torch.Tensor):
        _saved.mark_kept(out, _saved.derived(inner, step, extra, _saved.AutocastState(out.device.type)))
    return out


def _constant(t) -> bool:
    return isinstance(t, (int, float)) or (isinstance(t, torch.Tensor) and t.dim() == 0 and not t.requires_grad)


def _mul(spec, states, args, kwargs):
    if kwargs or len(args) != 2:
        return NotImplemented
    a, b = args
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dim() and b.dim() \
            and a.requires_grad and b.requires_grad and a.is_floating_point() and b.is_floating_point():
        # the product of two activations (a gated MLP's act(gate) * up)
        return ops.mul(a, b, config=spec, states=states)
    for x, factor in ((a, b), (b, a)):
        if _saved.kept_of(x) is not None and _constant(factor):
            extra = (factor,) if isinstance(factor, torch.Tensor) else ()
            step = _times if extra else functools.partial(_times, factor=factor)
            return _with_recipe(a * b, x, step, extra)
    return NotImplemented


def _div(spec, states, args, kwargs):
    if kwargs or len(args) != 2:
        return NotImplemented
    x, d = args
    if _saved.kept_of(x) is None or not _constant(d):
        return NotImplemented
    extra = (d,) if isinstance(d, torch.Tensor) else ()
    step = _divided if extra else functools.partial(_divided, divisor=d)
    return _with_recipe(x / d, x, step, extra)


def _add(spec, states, args, kwargs):
    if kwargs or len(args) != 2:
        return NotImplemented
    a, b = args
    for x, other in ((a, b), (b, a)):
        if _saved.kept_of(x) is not None and isinstance(x, torch.Tensor):
            out = a + b
            if isinstance(other, torch.Tensor):
                if other.numel() >= out.numel():
                    return out  # never hold a full-size tensor exactly: the consumer quantizes instead
                return _with_recipe(out, x, _plus, (other,))
            return _with_recipe(out, x, functools.partial(_plus, other=other))
    return NotImplemented


def _reshaped(x, *, shape):
    return x.reshape(shape)


def _reshape(spec, states, args, kwargs):
    # A reshape that materialises a broadcast view (an attention mask
    # expanded over batch and heads) copies a small tensor into a large one;
    # the copy gets a recipe that keeps only the small one.
    x = args[0]
    if kwargs or not isinstance(x, torch.Tensor) or 0 not in x.stride() or x.requires_grad:
        return NotImplemented
    out = x.reshape(*args[1:])
    if out.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
        return out  # a view: nothing was copied
    _saved.mark_kept(out, _saved.derived(_saved.exact(x), functools.partial(_reshaped, shape=tuple(out.shape)),
                                         (), _saved.AutocastState(out.device.type)))
    return out


def _type(spec, states, args, kwargs):
    dtype = args[1] if len(args) > 1 else kwargs.get("dtype")
    if not isinstance(dtype, torch.dtype) or _saved.kept_of(args[0]) is None:
        return NotImplemented
    return _to(spec, states, (args[0], dtype), {})


def _to(spec, states, args, kwargs):
    x = args[0]
    if _saved.kept_of(x) is None:
        return NotImplemented
    out = x.to(*args[1:], **kwargs)
    if out.device != x.device:
        return out
    return _with_recipe(out, x, functools.partial(_cast, dtype=out.dtype))


def _handlers() -> Dict[Callable, Callable]:
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
        torch.Tensor.__truediv__: _div,
        torch.div: _div,
        torch.Tensor.div: _div,
        torch.add: _add,
        torch.Tensor.add: _add,
        torch.Tensor.__add__: _add,
        torch.Tensor.__radd__: _add,
        torch.Tensor.to: _to,
        torch.Tensor.type: _type,
        torch.Tensor.reshape: _reshape,
    }
    if hasattr(F, "rms_norm"):
        table[F.rms_norm] = _rms_norm
    return table


_HANDLERS: Optional[Dict[Callable, Callable]] = None


class _Frame:
    __slots__ = ("name", "calls")

    def __init__(self, name: str) -> None:
        self.name = name
        self.calls = 0


class _Mode(TorchFunctionMode):
    def __init__(self, scope: "Scope") -> None:
        super().__init__()
        self.scope = scope

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = _HANDLERS.get(func)  # type: ignore[union-attr]
        scope = self.scope
        if handler is not None and scope.stack and torch.is_grad_enabled():
            frame = scope.stack[-1]
            spec = scope.spec_for(frame.name)
            if spec is not None:
                slot = frame.calls
                frame.calls += 1
                states = scope.states_for(frame.name, slot) if spec.running else None
                out = handler(spec, states, args, kwargs)
                if out is not NotImplemented:
                    scope.routed += 1
                    return out
        return func(*args, **kwargs)


class Scope:
    """Routes functional calls of a converted model (see module docstring)."""

    def __init__(
        self,
        config: MesaConfig,
        names: Dict[torch.nn.Module, str],
        exact: Tuple[str, ...] = (),
    ) -> None:
        global _HANDLERS
        if _HANDLERS is None:
            _HANDLERS = _handlers()
        self.config = config
        self.stack: List[_Frame] = []
        self.routed = 0  # calls routed so far (for reports and tests)
        # Modules left exact by filter_fn route nothing either.
        self._specs: Dict[str, Optional[QuantSpec]] = {name: None for name in exact}
        self._states: Dict[Tuple[str, int], RangeStates] = {}
        self._mode: Optional[_Mode] = None
        self._handles = []
        for module, name in names.items():
            self._handles.append(module.register_forward_pre_hook(self._make_pre(name)))
            self._handles.append(module.register_forward_hook(self._post, always_call=True))

    def _make_pre(self, name: str):
        return _PreHook(self, name)

    def enter(self, name: str) -> None:
        if not self.stack and torch.is_grad_enabled():
            self._mode = _Mode(self)
            self._mode.__enter__()
        self.stack.append(_Frame(name))

    def _post(self, module, args, output):
        self.exit()
        return None

    def exit(self) -> None:
        if self.stack:
            self.stack.pop()
        if not self.stack and self._mode is not None:
            mode, self._mode = self._mode, None
            mode.__exit__(None, None, None)

    def spec_for(self, name: str) -> Optional[QuantSpec]:
        if name not in self._specs:
            self._specs[name] = self.config.resolve(name)
        return self._specs[name]

    def states_for(self, name: str, slot: int) -> RangeStates:
        key = (name, slot)
        if key not in self._states:
            self._states[key] = RangeStates()
        return self._states[key]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        while self.stack:
            self.exit()

    def __getstate__(self):
        state = self.__dict__.copy()
        state["stack"], state["_mode"] = [], None
        return state


class _PreHook:
    """A picklable forward pre-hook (a closure would not survive torch.save)."""

    def __init__(self, scope: Scope, name: str) -> None:
        self.scope, self.name = scope, name

    def __call__(self, module, args):
        self.scope.enter(self.name)
        return None
