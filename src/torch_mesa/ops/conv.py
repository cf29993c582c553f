"""Convolutions and batch norms with a compressed input kept for backward.

``conv(x, weight, bias, stride, padding, dilation, groups)`` (1-, 2- or 3-D,
by the weight's rank) runs ``F.conv{1,2,3}d`` exactly and keeps its input
(for the weight's gradient only; nothing when the weight is frozen) as
8/4/2-bit codes with one range per input channel, over the batch and every
position; or, when the input is a converted op's output (a ReLU after a
batch norm), nothing new: that op's kept tensors. A convolution cheap to
recompute (at most 64 multiply-adds per output: depthwise ones) leaves on its
output how to rebuild it from that kept input, so the op after it keeps
nothing new (keep each piece of data once). Backward is PyTorch's own
``convolution_backward`` with the rebuilt input, in the dtype the forward
ran in (the autocast dtype under autocast): the input's gradient needs only
the weight, so the input's compression touches the weight's gradient only.

``batch_norm(x, running_mean, running_var, weight, bias, training, momentum,
eps)`` runs ``F.batch_norm`` exactly (batch statistics and the running
statistics' update as PyTorch does them, once) and keeps its input
compressed per channel; backward recomputes the normalisation from the
rebuilt input (with its own batch statistics in training mode) for autograd
to differentiate, as LayerNorm does here.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from ..config import QuantSpec
from ..quant.running import RangeStates
from .recipes import derived, exact, keep, mark_channels_first
from .recompute import recompute
from .replay import AutocastState
from .saving import OpFunction, as_spec, fresh, load, needs_saving, run_with_kept, save

Tensor = torch.Tensor

__all__ = ["conv", "batch_norm", "max_pool2d"]

_CONV = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}


def _tuple(v, n: int):
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


# A convolution whose outputs each cost at most this many multiply-adds (a
# depthwise 3x3 costs 9, ConvNeXt's 7x7 49, a 1x1 over 64 channels 64) is
# cheap to recompute: its output gets a rebuild recipe from its kept input,
# so the op after it (PVT-v2's GELU, a ResNet's batch norm when converted)
# keeps nothing new. A row normalisation after it (ConvNeXt's LayerNorm)
# keeps its own row-wise copy: a sum of quantized neighbours has errors that
# normalising small rows amplifies (with massive activations, LayerNorm
# weight gradients fell from cosine 0.9991 to 0.996). A dense convolution (a
# 3x3 over 64 channels: 576) is recomputed by nobody.
_CHEAP_MACS = 64


def _memory_format(x: Tensor) -> torch.memory_format:
    """The memory format ``x`` is laid out in (channels-last where it is
    that and not also contiguous)."""
    for fmt, dim in ((torch.channels_last, 4), (torch.channels_last_3d, 5)):
        if x.dim() == dim and not x.is_contiguous() and x.is_contiguous(memory_format=fmt):
            return fmt
    return torch.contiguous_format


def _conv_step(x, weight, *bias, conf):
    stride, padding, dilation, groups = conf
    return _CONV[weight.dim()](x, weight, bias[0] if bias else None, stride, padding, dilation, groups)


def explicit_padding(padding, weight: Tensor, dilation) -> Optional[tuple]:
    """``padding`` as one int per spatial dim, or None where it is not
    symmetric (``"same"`` with an even effective kernel)."""
    n = weight.dim() - 2
    if padding == "valid":
        return (0,) * n
    if padding == "same":
        d = _tuple(dilation, n)
        total = [d[i] * (weight.shape[2 + i] - 1) for i in range(n)]
        if any(t % 2 for t in total):
            return None
        return tuple(t // 2 for t in total)
    return _tuple(padding, n)


class _ConvFn(OpFunction):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups, spec: QuantSpec,
                states: Optional[RangeStates]):
        out = _CONV[weight.dim()](x, weight, bias, stride, padding, dilation, groups)
        running = states.get(spec, "input") if states is not None else None
        kept_x = keep(x, spec, op="conv", running=running, channels_first=True) if ctx.needs_input_grad[1] else None
        save(ctx, kept_x, exact(weight))
        ctx.conf = (stride, padding, dilation, groups)
        if kept_x is not None and spec.keep_once and weight[0].numel() <= _CHEAP_MACS:
            extra = (weight,) if bias is None else (weight, bias)
            ctx.mesa_out = derived(kept_x, functools.partial(_conv_step, conf=ctx.conf), extra,
                                   AutocastState(x.device.type), for_norms=False)
        ctx.x_shape, ctx.x_dtype, ctx.compute_dtype = x.shape, x.dtype, out.dtype
        ctx.x_format = _memory_format(x)
        ctx.has_bias = bias is not None
        return fresh(out, x)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = load(ctx)
        stride, padding, dilation, groups = ctx.conf
        cd = ctx.compute_dtype
        n = weight.dim() - 2
        need = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
        g = grad_out.to(cd)
        if x is not None and x.device.type == "cpu":
            # The input is rebuilt as its channels-last view was kept. On
            # the CPU it goes to the weight gradient in the layout the
            # forward's input had (a copy): PyTorch's CPU kernel for the
            # weight gradient of a 1x1 convolution with an even stride
            # writes out of bounds for a channels-last input of 2 to 12
            # channels at large sizes (a FastViT or MobileOne stem's 1x1
            # stride-2 branch on the image: the process crashed), where the
            # unconverted model, given the image as it is, never reaches it.
            x = x.contiguous(memory_format=ctx.x_format)
        xin = x.to(cd) if x is not None else torch.empty(ctx.x_shape, dtype=cd, device=g.device).as_strided(
            ctx.x_shape, [0] * len(ctx.x_shape))  # only its shape matters for the input's gradient
        gx, gw, gb = torch.ops.aten.convolution_backward(
            g, xin, weight.to(cd), [weight.shape[0]] if ctx.has_bias else None,
            _tuple(stride, n), _tuple(padding, n), _tuple(dilation, n), False, (0,) * n, groups, need)
        return (gx.to(ctx.x_dtype) if need[0] else None, gw.to(weight.dtype) if need[1] else None,
                gb.to(weight.dtype) if need[2] else None, None, None, None, None, None, None)


def conv(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    stride: Union[int, Sequence[int]] = 1,
    padding: Union[int, Sequence[int], str] = 0,
    dilation: Union[int, Sequence[int]] = 1,
    groups: int = 1,
    *,
    config=None,
    states: Optional[RangeStates] = None,
) -> Tensor:
    """``F.conv1d/2d/3d`` (by ``weight.dim()``) keeping its input compressed
    per channel. ``padding="same"`` with an even effective kernel (PyTorch
    pads it unevenly) runs as PyTorch runs it."""
    spec = as_spec(config)
    fn = _CONV.get(weight.dim())
    if fn is None:
        raise ValueError(f"conv: weight of rank {weight.dim()}; expected 3, 4 or 5 (1-, 2- or 3-D)")
    pad = explicit_padding(padding, weight, dilation)
    if spec is None or pad is None or x.dim() != weight.dim() or not needs_saving(x, weight, bias):
        out = fn(x, weight, bias, stride, padding, dilation, groups)
        return mark_channels_first(out) if x.dim() == weight.dim() else out  # (unbatched: dim 1 is not C)
    return mark_channels_first(run_with_kept(_ConvFn, x, weight, bias, stride, pad, dilation, groups, spec, states))


# A batch norm over fewer values per channel runs as PyTorch runs it: its
# statistics, from so few values, amplify any error of the rebuilt input
# (LeViT's heads normalise a batch of 4 pooled vectors: converted, the
# gradients upstream fell to cosine -0.3), and what it keeps is small.
_MIN_PER_CHANNEL = 64


def _batch_norm_train(x, weight, bias, *, eps):
    return F.batch_norm(x, None, None, weight, bias, True, 0.0, eps)


def _batch_norm_eval(x, weight, bias, *, mean, var, eps):
    return F.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)


def batch_norm(
    x: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    config=None,
    states: Optional[RangeStates] = None,
) -> Tensor:
    """``F.batch_norm`` keeping its input compressed per channel (dim 1).

    The forward is PyTorch's, updating the running statistics once; the
    backward differentiates the same normalisation of the rebuilt input
    (batch statistics in training mode, the running ones, as constants,
    in eval mode). Fewer than 64 values per channel: PyTorch's own, exact.
    """
    spec = as_spec(config)
    if (spec is None or x.dim() < 2 or x.numel() < _MIN_PER_CHANNEL * x.shape[1]
            or not needs_saving(x, weight, bias)):
        return mark_channels_first(F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps))
    if training:
        fn = functools.partial(_batch_norm_train, eps=eps)
    else:
        fn = functools.partial(_batch_norm_eval, mean=running_mean.detach().clone(),
                               var=running_var.detach().clone(), eps=eps)
    # The exact forward (updates the running statistics), then the kept input
    # and the recompute recipe from recompute(); its own forward output is
    # discarded in favour of PyTorch's.
    out = recompute(fn, x, (weight, bias), op="norm", config=spec, states=states, channels_first=True,
                    forward=lambda: F.batch_norm(x, running_mean, running_var, weight, bias, training,
                                                 momentum, eps))
    return mark_channels_first(out)


def _pair(v):
    return [v, v] if isinstance(v, int) else list(v)


class _MaxPool2dFn(OpFunction):
    """Keeps where each maximum came from (its index in the input plane, in
    the smallest integer type that holds it), not the input: backward only
    routes each gradient back to its position."""

    @staticmethod
    def forward(ctx, x, kernel_size, stride, padding, dilation, ceil_mode):
        out, idx = F.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode, return_indices=True)
        plane = x.shape[-1] * x.shape[-2]
        small = torch.int16 if plane <= torch.iinfo(torch.int16).max else torch.int32
        save(ctx, exact(idx.to(small)))
        ctx.conf = (_pair(kernel_size), _pair(stride if stride else kernel_size), _pair(padding), _pair(dilation),
                    ceil_mode)
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (idx,) = load(ctx)
        k, s, p, d, ceil = ctx.conf
        shape_only = torch.empty((), dtype=grad_out.dtype, device=grad_out.device).expand(ctx.x_shape)
        gx = torch.ops.aten.max_pool2d_with_indices_backward(grad_out, shape_only, k, s, p, d, ceil,
                                                             idx.to(torch.int64))
        return gx.to(ctx.x_dtype), None, None, None, None, None


def max_pool2d(x: Tensor, kernel_size, stride=None, padding=0, dilation=1, ceil_mode: bool = False, *,
               config=None) -> Tensor:
    """``F.max_pool2d`` keeping the maxima's positions (2 or 4 bytes per
    output) instead of the input and 8-byte indices: exact, any ``bits``."""
    spec = as_spec(config)
    if spec is None or x.dim() != 4 or not needs_saving(x):
        return mark_channels_first(F.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode))
    return mark_channels_first(_MaxPool2dFn.apply(x, kernel_size, stride, padding, dilation, ceil_mode))
