"""Quantize activations for backward and expand them again.

``compress(x, ...)`` returns the tensors to hand to ``ctx.save_for_backward``
(packed codes, per-group ``lo`` and ``scale``) and a small :class:`Layout` with
the metadata needed to undo it; ``expand(tensors, layout)`` gives back a tensor
of ``x``'s shape and dtype. Which implementation runs is chosen per call:
the compiled one (default) or the eager reference (the spec), see
:mod:`.reference` and :mod:`.fused`. The environment variable
``TORCH_MESA_KERNEL=reference|compiled`` overrides the config's choice.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from . import fused, reference
from .running import RangeStates, RunningRange

Tensor = torch.Tensor

__all__ = ["Layout", "RangeStates", "RunningRange", "compress", "expand", "pack_bits", "apply_bits", "unpack_bits",
           "reference", "fused"]


@dataclass(frozen=True)
class Layout:
    shape: Tuple[int, ...]
    dtype: torch.dtype
    bits: int
    axes: Tuple[int, ...]
    group_size: Optional[int]
    kernel: str
    rows: Optional[str] = None  # None, "row" or "scaled" (reference.ROW_MODES)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _kernel(requested: str) -> str:
    env = os.environ.get("TORCH_MESA_KERNEL")
    choice = env or requested
    if choice not in ("auto", "compiled", "reference"):
        raise ValueError(
            f"TORCH_MESA_KERNEL={env!r} is not supported; use 'compiled' or 'reference'"
        )
    return "reference" if choice == "reference" else "compiled"


def _impl(kernel: str):
    return reference if kernel == "reference" else fused


def compress(
    x: Tensor,
    bits: int,
    axes=-1,
    group_size: Optional[int] = 1,
    stochastic: bool = False,
    running: Optional[RunningRange] = None,
    kernel: str = "auto",
    rows: Optional[str] = None,
) -> Tuple[Tuple[Tensor, ...], Layout]:
    """Quantize ``x`` for keeping; returns ``(tensors to save, layout)``.

    ``rows``: ``"row"`` quantizes each row (last dimension) relative to its
    own centre and width (inputs of normalisation layers); ``"scaled"``
    scales each channel and then each row to a common range first (see
    :mod:`.reference`); ``None``: per-channel ranges only.
    """
    if rows and x.dim() < 2:
        rows = None  # a single row: per-channel ranges already fit it
    if x.dim() == 0:
        x = x.reshape(1)
        shape: Tuple[int, ...] = ()
    else:
        shape = tuple(x.shape)
    axes = reference.normalize_axes(axes, x.dim())
    kern = _kernel(kernel)
    layout = Layout(shape, x.dtype, bits, axes, group_size, kern, rows)
    if x.numel() == 0:
        groups = reference.num_groups(tuple(x.shape), axes, group_size)
        packed = torch.empty(0, dtype=torch.uint8, device=x.device)
        zeros = torch.zeros(groups, dtype=torch.float32, device=x.device)
        saved = (packed, zeros, torch.ones_like(zeros))
        if rows:
            row = torch.ones(*x.shape[:-1], 1, dtype=torch.float32, device=x.device)
            chan = torch.ones([1] * (x.dim() - 1) + [x.shape[-1]], dtype=torch.float32, device=x.device)
            saved = saved + ((torch.zeros_like(row), row) if rows == "row" else (row.bfloat16(), chan))
        return saved, layout
    saved = _impl(kern).quantize(x, bits, axes, group_size, stochastic, rows=rows, running=running)
    return tuple(saved), layout


def expand(saved: Tuple[Tensor, ...], layout: Layout) -> Tensor:
    """Dequantize what :func:`compress` kept, back to the original shape and dtype."""
    if layout.numel == 0:
        return torch.empty(layout.shape, dtype=layout.dtype, device=saved[0].device)
    shape = layout.shape if layout.shape else (1,)
    out = _impl(layout.kernel).dequantize(
        saved, shape, layout.dtype, layout.bits, layout.axes if layout.shape else (0,), layout.group_size,
        rows=layout.rows,
    )
    return out if layout.shape else out.reshape(())  # (of the layout's shape already otherwise)


def pack_bits(mask: Tensor) -> Tensor:
    """A boolean tensor kept 1 bit per element (dropout, ReLU and clamp masks)."""
    if mask.numel() == 0:
        return torch.empty(0, dtype=torch.uint8, device=mask.device)
    return _impl(_kernel("auto")).pack_bits(mask)


def unpack_bits(packed: Tensor, shape) -> Tensor:
    """The boolean tensor of ``shape`` that :func:`pack_bits` kept."""
    if math.prod(shape) == 0:
        return torch.zeros(tuple(shape), dtype=torch.bool, device=packed.device)
    return _impl(_kernel("auto")).unpack_bits(packed, shape)


def apply_bits(x: Tensor, packed: Tensor, scale: float = 1.0) -> Tensor:
    """``x * mask * scale`` for the mask of ``x``'s shape that :func:`pack_bits`
    kept, read from its bits in one pass (a dropout's output and gradient, a
    ReLU's gradient), with the arithmetic of ATen's
    ``native_dropout_backward(x, mask, scale)``: a kept element is ``x *
    scale`` rounded once to ``x``'s dtype, a dropped one a zero signed as
    ``x`` (NaN where ``x`` is infinite or NaN). Never a boolean tensor: ATen
    multiplies a float tensor by a boolean one, or converts one, in a
    mixed-dtype loop that casts it to a new tensor first, and in a training
    step each new tensor of this size costs more than the arithmetic
    (``benchmarks/quant_speed.py --masks``)."""
    if x.numel() == 0:
        return x * scale
    return _impl(_kernel("auto")).apply_bits(x, packed, scale)


without_data = fused.without_data  # (fake, meta: no compiled kernel, no data-dependent check)
