"""The reference quantizer: eager PyTorch, and the specification of the numbers.

Layout. A tensor is quantized along one *channel axis*: its channels are split
into contiguous groups of ``group_size`` (the last group may be shorter), and
each group gets one asymmetric range ``[lo, lo + scale * (2**bits - 1)]``
reduced over every other dimension (all tokens of the batch). ``group_size=None``
means one group for the whole tensor. Head-wise quantization of a
``(B, H, N, D)`` tensor is ``axis=1, group_size=1``.

Codes are stored in the tensor's logical (row-major) order, packed 1, 2 or 4
per byte for 8, 4 and 2 bits (the low bits hold the earlier element). ``lo``
and ``scale`` are fp32, one per group; ``scale`` is at least the smallest
normal fp32, so constant groups dequantize exactly to their value.

Values outside the range (possible with running estimates) saturate at the
nearest end; they never wrap around. A group whose range is not finite gets
a NaN scale, so NaN/Inf in an activation shows up as NaN in the gradient
instead of being silently replaced.

The fused path (:mod:`torch_mesa.quant.fused`) compiles these same functions;
for nearest rounding it is equal bit for bit.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

_TINY = torch.finfo(torch.float32).tiny


def num_groups(channels: int, group_size: Optional[int]) -> int:
    if group_size is None:
        return 1
    return max(1, -(-channels // group_size))


def packed_numel(numel: int, bits: int) -> int:
    per_byte = 8 // bits
    return -(-numel // per_byte)


def to_channels(v: Tensor, shape: Tuple[int, ...], axis: int, group_size: Optional[int]) -> Tensor:
    """Broadcast per-group values ``(G,)`` to a tensor that broadcasts against ``shape``.

    Small (one value per channel); the fused path computes it eagerly and hands
    it to the compiled loops (Inductor's CPU code for an indexed broadcast along
    the innermost dimension was found to read the wrong group in the tail of
    the vectorised loop).
    """
    if group_size is None:
        return v.reshape([1] * len(shape))
    channels = shape[axis]
    group_of_channel = torch.arange(channels, device=v.device) // group_size
    view = [1] * len(shape)
    view[axis] = channels
    return v[group_of_channel].reshape(view)


def channel_minmax(x: Tensor, axis: int, per_tensor: bool) -> Tuple[Tensor, Tensor]:
    """fp32 min and max per channel along ``axis`` (``(C,)``), or of the whole
    tensor (``(1,)``). The one pass over ``x`` that range estimation needs."""
    xf = x.float()
    if per_tensor:
        return xf.amin().reshape(1), xf.amax().reshape(1)
    others = [d for d in range(x.dim()) if d != axis]
    if not others:
        return xf, xf
    return xf.amin(dim=others), xf.amax(dim=others)


def groups_from_channels(
    cmin: Tensor, cmax: Tensor, group_size: Optional[int]
) -> Tuple[Tensor, Tensor]:
    """Reduce per-channel ``(C,)`` min/max to per-group ``(G,)``."""
    if group_size is None:
        return cmin, cmax
    channels = cmin.shape[0]
    groups = num_groups(channels, group_size)
    pad = groups * group_size - channels
    if pad:
        # Fill the short last group with copies of its last channel: neutral
        # for min and max.
        cmin = torch.cat([cmin, cmin[-1:].expand(pad)])
        cmax = torch.cat([cmax, cmax[-1:].expand(pad)])
    return cmin.reshape(groups, group_size).amin(1), cmax.reshape(groups, group_size).amax(1)


def group_minmax(x: Tensor, axis: int, group_size: Optional[int]) -> Tuple[Tensor, Tensor]:
    """Per-group min and max of ``x`` in fp32, each of shape ``(G,)``."""
    cmin, cmax = channel_minmax(x, axis % x.dim(), group_size is None)
    return groups_from_channels(cmin, cmax, group_size)


def scale_from_range(lo: Tensor, hi: Tensor, bits: int) -> Tensor:
    qmax = float(2**bits - 1)
    # hi/qmax - lo/qmax rather than (hi - lo)/qmax: no overflow near the fp32 limit.
    scale = torch.clamp(hi / qmax - lo / qmax, min=_TINY)
    finite = torch.isfinite(lo) & torch.isfinite(hi)
    return torch.where(finite, scale, torch.full_like(scale, float("nan")))


def pack(codes: Tensor, bits: int) -> Tensor:
    """Pack uint8 codes (< 2**bits) into bytes, ``8 // bits`` per byte, low bits first."""
    flat = codes.reshape(-1)
    if bits == 8:
        return flat
    per_byte = 8 // bits
    pad = (-flat.numel()) % per_byte
    if pad:
        flat = F.pad(flat, (0, pad))
    lanes = flat.reshape(-1, per_byte)
    out = lanes[:, 0]
    for i in range(1, per_byte):
        out = out | (lanes[:, i] << (bits * i))
    return out


def unpack(packed: Tensor, bits: int, numel: int) -> Tensor:
    if bits == 8:
        return packed[:numel]
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    shifts = torch.arange(0, 8, bits, device=packed.device, dtype=torch.uint8)
    lanes = (packed.unsqueeze(1) >> shifts) & mask  # (M, per_byte)
    return lanes.reshape(-1)[:numel]


def quantize_codes(x: Tensor, lo_c: Tensor, scale_c: Tensor, bits: int, stochastic: bool) -> Tensor:
    """Packed codes of ``x`` given broadcastable per-channel ``lo`` and ``scale``."""
    qmax = float(2**bits - 1)
    q = (x.float() - lo_c) / scale_c
    if stochastic:
        q = torch.floor(q + torch.rand_like(q))
    else:
        q = torch.round(q)
    codes = torch.clamp(q, 0.0, qmax).to(torch.uint8)
    return pack(codes, bits)


def dequantize_codes(
    packed: Tensor, lo_c: Tensor, scale_c: Tensor, shape: Tuple[int, ...], dtype: torch.dtype, bits: int
) -> Tensor:
    numel = math.prod(shape)
    codes = unpack(packed, bits, numel).reshape(shape)
    return (codes.float() * scale_c + lo_c).to(dtype)


def quantize_with_range(
    x: Tensor,
    lo: Tensor,
    hi: Tensor,
    bits: int,
    axis: int,
    group_size: Optional[int],
    stochastic: bool,
    codes_fn=quantize_codes,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Quantize ``x`` with the per-group range ``[lo, hi]`` (fp32, ``(G,)``).

    Returns ``(packed uint8, lo fp32 (G,), scale fp32 (G,))``.
    """
    scale = scale_from_range(lo, hi, bits)
    shape = tuple(x.shape)
    lo_c = to_channels(lo, shape, axis, group_size)
    scale_c = to_channels(scale, shape, axis, group_size)
    return codes_fn(x, lo_c, scale_c, bits, stochastic), lo, scale


def dequantize(
    packed: Tensor,
    lo: Tensor,
    scale: Tensor,
    shape: Tuple[int, ...],
    dtype: torch.dtype,
    bits: int,
    axis: int,
    group_size: Optional[int],
    dequantize_fn=dequantize_codes,
) -> Tensor:
    lo_c = to_channels(lo, shape, axis, group_size)
    scale_c = to_channels(scale, shape, axis, group_size)
    return dequantize_fn(packed, lo_c, scale_c, tuple(shape), dtype, bits)


def quantize(
    x: Tensor,
    bits: int,
    axis: int,
    group_size: Optional[int],
    stochastic: bool,
    minmax_fn=channel_minmax,
    codes_fn=quantize_codes,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Quantize with the dynamic (min/max) range of ``x`` itself."""
    cmin, cmax = minmax_fn(x, axis % x.dim(), group_size is None)
    lo, hi = groups_from_channels(cmin, cmax, group_size)
    return quantize_with_range(x, lo, hi, bits, axis, group_size, stochastic, codes_fn)
