"""Activations, gated products and dropout.

GELU / SiLU keep their input as codes and use PyTorch's own backward kernels
(``gelu_backward``, ``silu_backward``) on the rebuilt input. Their output is
never kept: the Linear that consumes it recomputes it from the kept input.

Gated products (SwiGLU ``silu(gate) * up``, GeGLU ``gelu(gate) * up``) keep
``gate`` and ``up`` as codes; the product is rebuilt for the consumer.

Dropout keeps no byte mask: the mask is kept as 1 bit per element (``keep``
codes packed 8 per byte), and when its input is itself rebuildable (dropout
after GELU or softmax) its output is rebuildable too, so the next Linear keeps
nothing new. Forward computes what ``F.dropout`` computes on that device,
from the same draw of the generator (:func:`_dropout_packed`), and
backward multiplies by the same factor (:func:`dropout_scale`): on the CPU,
``1 / (1 - p)`` rounded to the tensor's dtype.
"""

from __future__ import annotations

import functools
import operator
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import _disable_current_modes

from .. import quant
from ..config import QuantSpec
from ..quant.running import RangeStates
from .recipes import combined, derived, exact, is_channels_first, keep, kept_of, quantized
from .replay import AutocastState
from .saving import OpFunction, as_spec, fresh, load, needs_saving, no_double_backward, run_with_kept, save

Tensor = torch.Tensor

_GELU_APPROX = ("none", "tanh")


_ACTS = {
    # kind: (forward, backward from the input)
    "gelu": (F.gelu, lambda g, x: torch.ops.aten.gelu_backward(g, x)),
    "gelu_tanh": (lambda x: F.gelu(x, approximate="tanh"),
                  lambda g, x: torch.ops.aten.gelu_backward(g, x, approximate="tanh")),
    "silu": (F.silu, lambda g, x: torch.ops.aten.silu_backward(g, x)),
}


def _act(x: Tensor, kind: str) -> Tensor:
    return _ACTS[kind][0](x)


def _act_backward(grad: Tensor, x: Tensor, kind: str) -> Tensor:
    return _ACTS[kind][1](grad, x)


def _check_kind(kind: str) -> str:
    if kind not in ("gelu", "gelu_tanh", "silu"):
        raise ValueError(f"activation={kind!r} is not supported; use 'gelu', 'gelu_tanh' or 'silu'")
    return kind


class _ActFn(OpFunction):
    @staticmethod
    def forward(ctx, x, kind: str, spec: QuantSpec, states):
        out = _act(x, kind)
        running = states.get(spec, "input") if states is not None else None
        kept = keep(x, spec, op="activation", running=running)
        save(ctx, kept)
        ctx.kind = kind
        step = functools.partial(_act, kind=kind)
        ctx.mesa_out = derived(kept, step, (), AutocastState(x.device.type)) if spec.keep_once else None
        return fresh(out, x)

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = load(ctx)
        return _act_backward(grad_out, x, ctx.kind), None, None, None


def _activation(x, kind, config, states):
    spec = as_spec(config)
    if spec is None or not needs_saving(x):
        return _act(x, kind)
    return run_with_kept(_ActFn, x, kind, spec, states)


def gelu(x: Tensor, approximate: str = "none", *, config=None, states: Optional[RangeStates] = None) -> Tensor:
    """``F.gelu`` that keeps its input compressed for backward."""
    if approximate not in _GELU_APPROX:
        raise ValueError(f"approximate={approximate!r} is not supported; use 'none' or 'tanh'")
    return _activation(x, "gelu_tanh" if approximate == "tanh" else "gelu", config, states)


def silu(x: Tensor, *, config=None, states: Optional[RangeStates] = None) -> Tensor:
    """``F.silu`` that keeps its input compressed for backward."""
    return _activation(x, "silu", config, states)


def _save_mask(ctx, mask: Tensor) -> None:
    """Keep where the gradient passes, 1 bit per element (exact); applied to
    the gradient, of the mask's shape, from its bits."""
    ctx.save_for_backward(quant.pack_bits(mask))


def _masked_grad(ctx, grad_out: Tensor) -> Tensor:
    no_double_backward()
    (packed,) = ctx.saved_tensors
    return quant.apply_bits(grad_out, packed)


class _ReluFn(OpFunction):
    """ReLU's own gradient needs only where its input is positive: kept as a
    1-bit mask, exactly. Its output, quantized (zeros stay exact), is the
    recipe a consuming Linear keeps instead of a copy of its own. The output,
    not the input: an input may hold -inf by design (a masked score)."""

    @staticmethod
    def forward(ctx, x, spec: QuantSpec, states, inplace: bool):
        _save_mask(ctx, x > 0)
        if inplace:  # ReLU(inplace=True): the same tensor, overwritten
            out = x.relu_()
            ctx.mark_dirty(x)
        else:
            out = torch.relu(x)
        ctx.mesa_out = _output_recipe(out, x, spec, states)
        return out if inplace else fresh(out, x)

    @staticmethod
    def backward(ctx, grad_out):
        return _masked_grad(ctx, grad_out), None, None, None


def _output_recipe(out: Tensor, x: Tensor, spec: QuantSpec, states):
    """The quantized output a consuming Linear or convolution keeps instead
    of a copy of its own (shared by all consumers); a feature map's (an
    input noted by mark_channels_first) with ranges per channel along dim 1."""
    if not spec.keep_once:
        return None
    running = states.get(spec, "output") if states is not None else None
    return quantized(out, spec, op="activation", running=running, channels_first=is_channels_first(x))


# Piecewise-linear activations: where each piece applies is kept exactly
# (1 bit per element and boundary), so a quantized value can never take the
# wrong branch at a kink; only Hardswish's middle piece, whose slope depends
# on the input, also keeps the input quantized.
_PIECEWISE = {
    "relu6": F.relu6,
    "hardsigmoid": F.hardsigmoid,
    "hardswish": F.hardswish,
    "leaky_relu": F.leaky_relu,
}


class _PiecewiseFn(OpFunction):
    @staticmethod
    def forward(ctx, x, kind: str, slope: float, spec: QuantSpec, states):
        out = _PIECEWISE[kind](x, slope) if kind == "leaky_relu" else _PIECEWISE[kind](x)
        if kind == "relu6":
            masks = [(x > 0) & (x < 6)]
        elif kind == "hardsigmoid":
            masks = [(x > -3) & (x < 3)]
        elif kind == "leaky_relu":
            masks = [x > 0]
        else:  # hardswish: 0 below -3, x / 3 + 1/2 in [-3, 3], 1 above 3
            masks = [x >= -3, x > 3]
        ctx.shape = tuple(x.shape)
        packed = [quant.pack_bits(m) for m in masks]
        kept = None
        if kind == "hardswish":
            running = states.get(spec, "input") if states is not None else None
            kept = keep(x, spec, op="activation", running=running)
        save(ctx, *[exact(p) for p in packed], kept)
        ctx.kind, ctx.slope, ctx.n_masks = kind, slope, len(masks)
        ctx.mesa_out = _output_recipe(out, x, spec, states)
        return fresh(out, x)

    @staticmethod
    def backward(ctx, grad_out):
        loaded = load(ctx)
        kind = ctx.kind
        if kind == "relu6":  # (applied from its bits)
            return quant.apply_bits(grad_out, loaded[0]), None, None, None, None
        masks = [quant.unpack_bits(p, ctx.shape) for p in loaded[:ctx.n_masks]]
        if kind == "hardsigmoid":
            g = torch.where(masks[0], grad_out * (1.0 / 6.0), torch.zeros_like(grad_out))
        elif kind == "leaky_relu":
            # (the slope times each gradient rounded once, as PyTorch's
            # leaky_relu_backward computes it, not the slope rounded first)
            g = torch.where(masks[0], grad_out, grad_out * ctx.slope)
        else:
            x = loaded[-1]
            mid = masks[0] & ~masks[1]
            slope = torch.where(mid, x.to(grad_out.dtype) / 3 + 0.5, masks[1].to(grad_out.dtype))
            g = grad_out * slope
        return g, None, None, None, None


def _piecewise(kind: str, x: Tensor, slope: float, config, states) -> Tensor:
    spec = as_spec(config)
    if spec is None or not needs_saving(x) or not x.is_floating_point():
        return _PIECEWISE[kind](x, slope) if kind == "leaky_relu" else _PIECEWISE[kind](x)
    return run_with_kept(_PiecewiseFn, x, kind, float(slope), spec, states)


def relu6(x: Tensor, *, config=None, states: Optional[RangeStates] = None) -> Tensor:
    """``F.relu6`` keeping a 1-bit mask of its linear piece (exact)."""
    return _piecewise("relu6", x, 0.0, config, states)


def hardsigmoid(x: Tensor, *, config=None, states: Optional[RangeStates] = None) -> Tensor:
    """``F.hardsigmoid`` keeping a 1-bit mask of its linear piece (exact)."""
    return _piecewise("hardsigmoid", x, 0.0, config, states)


def leaky_relu(x: Tensor, negative_slope: float = 0.01, *, config=None,
               states: Optional[RangeStates] = None) -> Tensor:
    """``F.leaky_relu`` keeping a 1-bit sign mask (exact)."""
    return _piecewise("leaky_relu", x, negative_slope, config, states)


def hardswish(x: Tensor, *, config=None, states: Optional[RangeStates] = None) -> Tensor:
    """``F.hardswish`` keeping which piece each element is on (2 bits,
    exact) and its input quantized (the middle piece's slope)."""
    return _piecewise("hardswish", x, 0.0, config, states)


def relu(x: Tensor, *, inplace: bool = False, config=None, states: Optional[RangeStates] = None) -> Tensor:
    """``torch.relu`` (``relu_`` with ``inplace``) keeping a 1-bit mask for
    its own backward; its output is rebuilt for the next layer from the
    output quantized."""
    spec = as_spec(config)
    if spec is None or not needs_saving(x):
        return torch.relu_(x) if inplace else torch.relu(x)
    return run_with_kept(_ReluFn, x, spec, states, bool(inplace))


_SATURATING = {
    "sigmoid": (torch.sigmoid, torch.ops.aten.sigmoid_backward),
    "tanh": (torch.tanh, torch.ops.aten.tanh_backward),
}


class _SaturatingFn(OpFunction):
    """Sigmoid and tanh keep their *output*, quantized, as PyTorch keeps it:
    their derivative is a function of the output, which is bounded whatever
    the input holds (router scores set to -inf by design come out as 0)."""

    @staticmethod
    def forward(ctx, x, kind: str, spec: QuantSpec, states):
        out = _SATURATING[kind][0](x)
        running = states.get(spec, "output") if states is not None else None
        kept = quantized(out, spec, op="activation", running=running)
        save(ctx, kept)
        ctx.kind = kind
        ctx.mesa_out = kept if spec.keep_once else None
        return fresh(out, x)

    @staticmethod
    def backward(ctx, grad_out):
        (y,) = load(ctx)
        return _SATURATING[ctx.kind][1](grad_out.to(y.dtype), y), None, None, None


def _saturating(x, kind, config, states):
    spec = as_spec(config)
    if spec is None or not needs_saving(x):
        return _SATURATING[kind][0](x)
    return run_with_kept(_SaturatingFn, x, kind, spec, states)


def sigmoid(x: Tensor, *, config=None, states: Optional[RangeStates] = None) -> Tensor:
    """``torch.sigmoid`` keeping its output compressed for backward."""
    return _saturating(x, "sigmoid", config, states)


def tanh(x: Tensor, *, config=None, states: Optional[RangeStates] = None) -> Tensor:
    """``torch.tanh`` keeping its output compressed for backward."""
    return _saturating(x, "tanh", config, states)


# -------------------------------------------------------------------- clamp
def _clamp_grad_passes_at_bounds() -> bool:
    """Whether this PyTorch's gradient of ``clamp`` passes at an element equal
    to a bound (PyTorch 2.11 and older: yes; 2.14: no, strictly inside)."""
    x = torch.zeros(1, requires_grad=True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(torch.clamp(x, 0.0, 1.0).sum(), x)
    return bool(g.item() == 1.0)


# where the gradient passes: (above the lower bound, below the upper), as this PyTorch compares
_CLAMP_INSIDE = (operator.ge, operator.le) if _clamp_grad_passes_at_bounds() else (operator.gt, operator.lt)


def _clamped(x: Tensor, *, lo, hi) -> Tensor:
    return torch.clamp(x, lo, hi)


class _ClampFn(OpFunction):
    """``torch.clamp`` keeping a 1-bit mask of where the gradient passes
    (PyTorch keeps the whole input); its output is rebuildable when its input
    is (a clamp after a converted op)."""

    @staticmethod
    def forward(ctx, x, lo, hi, spec: QuantSpec):
        out = torch.clamp(x, lo, hi)
        # where PyTorch's gradient of clamp passes: inside the bounds, an
        # element equal to a bound as this PyTorch treats it, each compared
        # in x's dtype, as the bound rounds there
        above, below = _CLAMP_INSIDE
        inside = torch.ones_like(x, dtype=torch.bool)
        if lo is not None:
            inside &= above(x, lo)
        if hi is not None:
            inside &= below(x, hi)
        _save_mask(ctx, inside)
        kept = kept_of(x) if spec.keep_once else None
        if kept is not None:
            ctx.mesa_out = derived(kept, functools.partial(_clamped, lo=lo, hi=hi), (), AutocastState(x.device.type))
        return fresh(out, x)

    @staticmethod
    def backward(ctx, grad_out):
        return _masked_grad(ctx, grad_out), None, None, None


def clamp(x: Tensor, min=None, max=None, *, config=None) -> Tensor:
    """``torch.clamp(x, min, max)`` with numbers as bounds, keeping a 1-bit
    mask for backward."""
    spec = as_spec(config)
    if spec is None or not needs_saving(x) or (min is None and max is None):
        return torch.clamp(x, min, max)
    return run_with_kept(_ClampFn, x, min, max, spec)


def _gated(gate: Tensor, up: Tensor, *, kind: str) -> Tensor:
    return _act(gate, kind) * up


class _GatedFn(OpFunction):
    @staticmethod
    def forward(ctx, gate, up, kind: str, spec: QuantSpec, states):
        out = _gated(gate, up, kind=kind)
        kept_gate = keep(gate, spec, op="gated", running=states.get(spec, "gate") if states else None)
        # up is needed only for the gate's gradient
        kept_up = keep(up, spec, op="gated", running=states.get(spec, "up") if states else None) if ctx.needs_input_grad[0] else None
        save(ctx, kept_gate, kept_up)
        ctx.kind = kind
        if spec.keep_once and kept_up is not None:
            ctx.mesa_out = combined(kept_gate, kept_up, functools.partial(_gated, kind=kind))
        return fresh(out, gate, up)

    @staticmethod
    def backward(ctx, grad_out):
        gate, up = load(ctx)
        grad_gate = grad_up = None
        if ctx.needs_input_grad[1]:
            grad_up = grad_out * _act(gate, ctx.kind)
        if ctx.needs_input_grad[0]:
            grad_gate = _act_backward(grad_out * up, gate, ctx.kind)
        return grad_gate, grad_up, None, None, None


def gated(
    gate: Tensor,
    up: Tensor,
    activation: str = "silu",
    *,
    config=None,
    states: Optional[RangeStates] = None,
) -> Tensor:
    """``act(gate) * up`` (SwiGLU with ``'silu'``, GeGLU with ``'gelu'``/``'gelu_tanh'``),
    keeping ``gate`` and ``up`` compressed; the product is never kept."""
    kind = _check_kind(activation)
    spec = as_spec(config)
    if spec is None or not needs_saving(gate, up):
        return _gated(gate, up, kind=kind)
    if gate.shape != up.shape:
        raise ValueError(
            f"gated(): gate and up must have the same shape, got {tuple(gate.shape)} and {tuple(up.shape)}"
        )
    return run_with_kept(_GatedFn, gate, up, kind, spec, states)


# ------------------------------------------------------------------ dropout
@functools.lru_cache(maxsize=None)
def dropout_scale(p: float, dtype: torch.dtype, device_type: str) -> float:
    """The factor a kept element is multiplied by, forward and backward, as
    the unconverted model's ``F.dropout`` computes it. On the CPU it runs
    ``input * noise`` with ``noise = bernoulli(1 - p).div_(1 - p)`` in the
    input's dtype: the factor is ``1 / (1 - p)`` rounded to that dtype.
    ``torch.native_dropout_backward`` does not round it: through it a bf16
    gradient differed from the unconverted one in about a quarter of its
    elements, by one unit in the last place, and an fp32 one for most ``p``
    (0.021, not 0.1). Elsewhere (CUDA) ``F.dropout``'s fused kernel scales
    by ``1 / (1 - p)`` in fp32, forward and backward."""
    if device_type == "cpu":
        with _disable_current_modes():  # (a real number even under a FakeTensorMode)
            return torch.ones((), dtype=dtype).div_(1.0 - p).item()
    return 1.0 / (1.0 - p)


def _dropout_packed(x: Tensor, p: float, scale: float):
    """``F.dropout(x, p)`` and its mask (True: kept) packed 1 bit per
    element, from the same draw of the generator as ``F.dropout``'s. On the
    CPU by ``F.dropout``'s arithmetic (``torch.native_dropout`` there scales
    by ``1 / (1 - p)`` in double precision, ``F.dropout`` by that factor
    rounded to the dtype: for most ``p`` the fp32 outputs differ in the last
    bit), the output made from the packed bits in one pass, times ``scale``
    (:func:`dropout_scale`); elsewhere ``torch.native_dropout``, which
    ``F.dropout`` calls there."""
    if x.device.type == "cpu":
        # (a boolean tensor draws as F.dropout's float noise does, as
        # torch.native_dropout draws its mask)
        packed = quant.pack_bits(torch.empty_like(x, dtype=torch.bool).bernoulli_(1.0 - p))
        return quant.apply_bits(x, packed, scale), packed
    out, mask = torch.native_dropout(x, p, True)
    return out, quant.pack_bits(mask)


class _DropoutFn(OpFunction):
    @staticmethod
    def forward(ctx, x, p: float, spec: QuantSpec):
        scale = dropout_scale(p, x.dtype, x.device.type)
        out, packed = _dropout_packed(x, p, scale)
        # the mask, 1 bit per element, applied from its bits (never unpacked
        # to a tensor of its own) by the consumer that rebuilds the output
        # (the Linear after an activation and dropout) and by this backward
        kept_mask = exact(packed)
        ctx.scale = scale
        save(ctx, kept_mask)
        kept = kept_of(x) if spec.keep_once else None
        if kept is not None:
            ctx.mesa_out = combined(kept, kept_mask, functools.partial(quant.apply_bits, scale=scale))
        return fresh(out, x)

    @staticmethod
    def backward(ctx, grad_out):
        (packed,) = load(ctx)
        return quant.apply_bits(grad_out, packed, ctx.scale), None, None


def dropout(x: Tensor, p: float = 0.5, training: bool = True, *, config=None) -> Tensor:
    """``F.dropout`` keeping a 1-bit mask instead of a byte mask."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    spec = as_spec(config)
    if not training or p == 0.0 or x.numel() == 0:
        return x  # what F.dropout returns too (the same tensor)
    if spec is None or p == 1.0 or not needs_saving(x):
        return F.dropout(x, p, True)
    return run_with_kept(_DropoutFn, x, p, spec)


# ------------------------------------------------------------ product
def _gated_map(x: Tensor, other: Tensor) -> bool:
    """Whether ``x`` is a feature map ``(N, C, H, W)`` (or ``(N, C, D, H, W)``)
    times a gate per channel ``(N or 1, C, 1, 1)`` (a CNN's squeeze-excite): then its
    channels are dim 1, and it is kept as a convolution's input is (ranges
    per channel over the batch and every position). Feature maps are noted
    as such where a convolution, batch norm or pooling makes them, but not
    where a plain sum does (RepViT's ``conv(x) + conv1(x) + x`` before its
    squeeze-excite), and along the last dimension (a row of pixels) one range
    spans every channel: the gates' gradients, which sum ``grad * x`` over
    a channel's pixels, fell to cosines of 0.998 there (RepViT at 128 px).
    (Not for 3-d tensors: ``(B, T, D)`` times a per-token ``(B, T, 1)`` is a
    Transformer's, whose ranges stay per channel of D.)"""
    return (x.dim() >= 4 and other.dim() == x.dim() and x.shape[1] > 1 and other.shape[1] == x.shape[1]
            and other.shape[0] in (1, x.shape[0]) and all(n == 1 for n in other.shape[2:]))


class _MulFn(OpFunction):
    @staticmethod
    def forward(ctx, a, b, spec: QuantSpec, states):
        out = a * b
        # each factor is needed only for the other's gradient
        kept_a = keep(a, spec, op="product", running=states.get(spec, "a") if states else None,
                      channels_first=_gated_map(a, b)) if ctx.needs_input_grad[1] else None
        kept_b = keep(b, spec, op="product", running=states.get(spec, "b") if states else None,
                      channels_first=_gated_map(b, a)) if ctx.needs_input_grad[0] else None
        save(ctx, kept_a, kept_b)
        ctx.shapes, ctx.dtypes = (tuple(a.shape), tuple(b.shape)), (a.dtype, b.dtype)
        if spec.keep_once and kept_a is not None and kept_b is not None:
            ctx.mesa_out = combined(kept_a, kept_b, operator.mul)
        return fresh(out, a, b)

    @staticmethod
    def backward(ctx, grad_out):
        from .attention import _sum_to

        a, b = load(ctx)
        grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_a = _sum_to(grad_out * b, ctx.shapes[0]).to(ctx.dtypes[0])
        if ctx.needs_input_grad[1]:
            grad_b = _sum_to(grad_out * a, ctx.shapes[1]).to(ctx.dtypes[1])
        return grad_a, grad_b, None, None


def mul(a: Tensor, b: Tensor, *, config=None, states: Optional[RangeStates] = None) -> Tensor:
    """``a * b`` of two activations (a gated MLP's ``act(gate) * up``, a gate
    times a branch), keeping both compressed, or reusing what their producers
    keep; the product itself is never kept. Broadcasting is supported."""
    spec = as_spec(config)
    if spec is None or not needs_saving(a, b):
        return a * b
    return run_with_kept(_MulFn, a, b, spec, states)
