"""The reference quantizer: eager PyTorch, and the specification of the numbers.

Layout. A tensor is quantized along its *channel axes* ``axes`` (a sorted
tuple of dimensions; usually just the last one). Along the last of them the
channels are split into contiguous groups of ``group_size`` (the last group
may be shorter); every index of the other channel axes has groups of its own.
Each group gets one asymmetric range ``[lo, lo + scale * (2**bits - 1)]``
reduced over every dimension that is not a channel axis (all tokens of the
batch). ``group_size=None`` means one group for the whole tensor.

For a ``(B, N, C)`` activation: ``axes=(2,)``; ``group_size=1`` is one range
per channel. For attention tensors ``(B, H, N, D)`` (head-wise, as in Mesa):
``axes=(1, 3)``, ``group_size=D`` is one range per head, ``group_size=1`` one
per head and channel.

Codes are stored in the tensor's logical (row-major) order, packed 1, 2 or 4
per byte for 8, 4 and 2 bits (the low bits hold the earlier element). ``lo``
and ``scale`` are fp32, one per group; ``scale`` is at least the smallest
normal fp32, so constant groups dequantize exactly to their value.

Zero point (nearest rounding). When a group's range contains 0, ``lo`` and
``scale`` are chosen so that 0 is a code and comes back as 0, and the range
still covers every value (:func:`zero_point`): zeros (padding, a class token
at initialisation, masked rows) are kept exactly, and nearest rounding does
not move every zero of a channel the same way (an error a weight gradient
would sum over every token). Stochastic rounding is unbiased at 0 already.

Row modes. Before the per-channel ranges apply, each row (the last dimension;
one token, or one token of one head) can be brought to a common scale, so a
row far smaller or larger than the others (a class token, a token with a
large norm) keeps its precision:

* ``rows="row"``: ``(x - centre) / width`` with the row's own midpoint and
  half-range (:func:`row_stats`); for inputs of normalisation layers, which
  divide by each row's spread. Kept: ``centre`` and ``width``, fp32 per row.
* ``rows="scaled"``: ``x / chan / width`` where ``chan`` is each channel's
  largest magnitude over all rows, capped at 8 times its mean magnitude
  (:func:`channel_scale`), and ``width`` each row's largest magnitude after
  that (:func:`scaled_row_stats`): a per-token times per-channel scaling.
  Dividing by ``chan`` first keeps a few outlier channels from setting every
  row's width; the cap keeps a few huge tokens from setting every channel's
  scale; raw zeros stay zeros. Kept: ``width`` (bfloat16 per row) and
  ``chan`` (fp32 per channel).

Every range is a min or max, which any reduction order computes exactly,
and the channel scale a max or a power of two (a sum computed in another
order changes it only where its cap lies within a rounding of a power of two
or of the max): the fused path matches the reference bit for bit. Every
division written above is computed as a multiplication by the divisor's
reciprocal (one per channel, row or group; :func:`_inverse`), in both paths
alike.

Values outside the range (possible with running estimates) saturate at the
nearest end; they never wrap around. A group whose range is not finite gets
a NaN scale, so NaN/Inf in an activation shows up as NaN in the gradient
instead of being silently replaced.

The fused path (:mod:`torch_mesa.quant.fused`) compiles these same functions;
for nearest rounding it is equal bit for bit.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F

from .running import step as running_step

Tensor = torch.Tensor

_TINY = torch.finfo(torch.float32).tiny


def num_groups(shape: Tuple[int, ...], axes: Tuple[int, ...], group_size: Optional[int]) -> int:
    if group_size is None:
        return 1
    rows = math.prod(shape[a] for a in axes[:-1])
    return rows * max(1, -(-shape[axes[-1]] // group_size))


def packed_numel(numel: int, bits: int) -> int:
    per_byte = 8 // bits
    return -(-numel // per_byte)


def to_channels(v: Tensor, shape: Tuple[int, ...], axes: Tuple[int, ...], group_size: Optional[int]) -> Tensor:
    """Broadcast per-group values ``(G,)`` to a tensor that broadcasts against ``shape``.

    Small (one value per channel). Written with expand and reshape, not a
    gather by group index: the fused path compiles it with the passes over
    the activation, and Inductor's CPU code for an indexed broadcast along
    the innermost dimension once read the wrong group in the tail of its
    vectorised loop.
    """
    if group_size is None:
        return v.reshape([1] * len(shape))
    channels = shape[axes[-1]]
    groups_per_row = max(1, -(-channels // group_size))
    per_group = v.reshape(-1, groups_per_row, 1)
    if group_size > 1:
        per_group = per_group.expand(-1, groups_per_row, group_size)
    per_channel = per_group.reshape(per_group.shape[0], -1)[:, :channels]  # (rows, C)
    view = [1] * len(shape)
    for a in axes:
        view[a] = shape[a]
    return per_channel.reshape(view)


def row_stats(x: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-row (last dimension) centre and half-width in fp32, ``(..., 1)`` each.

    Inputs of normalisation layers are quantized *relative to their row*:
    ``(x - centre) / width`` lies in ``[-1, 1]`` for every token, so a token
    with a small spread (a class token at initialisation) keeps the same
    relative precision as the others; a norm would otherwise amplify its
    quantization error by dividing by its small spread. Centre and width come
    from the row's min and max (halved before combining: no overflow), which
    any reduction order computes exactly: the fused path matches bit for bit.
    """
    xf = x.float()
    lo = xf.amin(-1, keepdim=True)
    hi = xf.amax(-1, keepdim=True)
    centre = lo / 2 + hi / 2
    width = torch.clamp(hi / 2 - lo / 2, min=_TINY)
    return centre, width


_ROW_BLOCK = 16


def _over_rows(xf: Tensor, others, reduce: Callable, combine: Callable, wide: bool) -> Tensor:
    """``reduce(xf, others)`` (amin, amax or a sum over the dimensions
    ``others``, keeping them), where ``others`` are leading dimensions of a
    wide fp32 tensor on the CPU (``wide``) computed in two steps: over blocks
    of ``_ROW_BLOCK`` rows, then over the blocks (and the rows left over). The
    same numbers (a min or max in any order; a sum to within its roundings,
    which :func:`channel_scale` rounds away); Inductor's CPU loop for the
    one-step form walks each group of channels down every row, and over
    rows of 6 KiB (the fp32 MLP activation of a ViT-S, 3152 x 1536) that took
    1.8 ms against 0.44 ms for the two steps. For bf16 and fp16 rows the gain
    depends on the CPU: none on one without AMX, 13-17% of the whole keep of
    the bf16 MLP activation on one with it (narrower rows: no gain, so they
    keep the one step)."""
    if not (wide and list(others) == list(range(len(others)))):
        return reduce(xf, others)
    shape = xf.shape
    rows = xf.reshape(-1, *shape[len(others):])
    n = rows.shape[0]
    m = n // _ROW_BLOCK * _ROW_BLOCK
    blocks = rows[:m].reshape(m // _ROW_BLOCK, _ROW_BLOCK, *rows.shape[1:])
    out = reduce(reduce(blocks, (1,)), (0,))
    if m < n:
        out = combine(out, reduce(rows[m:], (0,)))
    return out.reshape([1] * len(others) + list(shape[len(others):]))


def _wide(x: Tensor) -> bool:
    """Whether channel reductions of ``x`` take the two-step form (:func:`_over_rows`)."""
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16, torch.float16) and x.dim() >= 2
            and x.shape[-1] >= 512 and x.numel() >= 8 * _ROW_BLOCK * x.shape[-1])


def _amax(t: Tensor, dims) -> Tensor:
    return t.amax(dim=dims, keepdim=True)


def _amin(t: Tensor, dims) -> Tensor:
    return t.amin(dim=dims, keepdim=True)


def _sum(t: Tensor, dims) -> Tensor:
    return t.sum(dim=dims, keepdim=True)


def _power_of_two_below(t: Tensor) -> Tensor:
    """fp32 ``t`` (normal, positive, or inf or NaN) rounded down to a power of
    two, on the bits (the mantissa cleared; NaN stays NaN): dividing by it
    is exact, and any path that computes ``t`` to within a rounding gets the
    same power of two unless ``t`` lies that close to one."""
    out = (t.view(torch.int32) & 0x7F800000).view(torch.float32)
    return torch.where(torch.isnan(t), t, out)


_SPREAD = 8  # (see channel_scale)


def channel_scale(x: Tensor, axes: Tuple[int, ...]) -> Tensor:
    """Each channel's scale: its largest magnitude over every other
    dimension, or where that exceeds ``_SPREAD`` times the mean magnitude of
    the channel's nonzero values, that cap rounded down to a power of two
    (fp32, broadcastable against ``x``; at least the smallest normal fp32).

    Capped: a few tokens far larger than the rest (the massive activations of
    trained language models, thousands of times the others in a few
    channels) set those channels' largest magnitude alone, every other
    token's value there came out of the row scale orders of magnitude below
    the range and rounded to 0, and a weight gradient's column kept only
    those tokens' share: a column's cosine 0.32 with one token 1000x at 512
    channels, where the large tokens' own gradients are small, as an
    attention sink's are (pre-norm models divide them by the huge norm).
    One token moves the mean by at most its share of the rows. Not the mean
    alone: where the large token carries the gradient (a class token with a
    few channels far above the patches'), its other channels need the
    largest magnitude's scale, and a Gaussian channel's largest magnitude
    stays within 8 times its mean magnitude (about 5.5x over 50,000 rows), so
    such channels keep it, exactly as before. The mean of the *nonzero*
    values: zeros (a ReLU's, padding, a causal attention map's upper
    triangle) say nothing of the scale. The cap is rounded so that a sum
    taken in another order (the fused path's) gives the same scale unless
    the cap lies within a rounding of a power of two or of the largest
    magnitude. The row scale that follows bounds every value again
    (:func:`scaled_row_stats`).

    Tensors kept per head (two channel axes: queries, keys, values,
    attention maps) keep the largest magnitude alone: a key's few large
    probabilities are what an attention map is made of, not outliers to
    discount (capped, a briefly trained ViT's class token fell from 0.9996
    to 0.9983 under compiled saving, which keeps the maps this way), and
    massive tokens show in attention as large probabilities, not as large
    queries or keys."""
    others = [d for d in range(x.dim()) if d not in axes]
    a = x.float().abs()
    if others:
        wide = _wide(x)
        largest = _over_rows(a, others, _amax, torch.maximum, wide)
        if len(axes) == 1:  # a token's channels (not per head): capped
            nonzero = _over_rows((a != 0).float(), others, _sum, torch.add, wide)
            cap = _over_rows(a, others, _sum, torch.add, wide) / torch.clamp(nonzero, min=1.0) * _SPREAD
            largest = torch.where(largest > cap, _power_of_two_below(torch.clamp(cap, min=_TINY)), largest)
        a = largest
    return torch.clamp(a, min=_TINY)


def _inverse(t: Tensor) -> Tensor:
    """``1 / t`` in fp32, for a per-channel, per-row or per-group divisor
    (at least the smallest normal fp32, so finite; NaN stays NaN). Every
    element is multiplied by it instead of divided by the divisor: the same
    numbers to within one rounding, and a vector division costs several
    times a multiplication (the token-scale keep's passes, each of which
    divided every element, measured 1.64 ms against 1.32 ms for the codes of
    a 3152 x 1536 fp32 tensor, compiled)."""
    return 1.0 / t.float()


def _bf16_exact(t: Tensor) -> Tensor:
    """fp32 ``t`` (normal or larger, or NaN) rounded to the nearest bfloat16
    value, ties to even, and still fp32: ``t.to(torch.bfloat16).float()``
    computed on the bits. A compiler may elide a cast to a narrower dtype
    and back where both ends fuse into one loop (Inductor does unless told
    to emulate them); integer arithmetic it cannot elide."""
    bits = t.view(torch.int32)
    rounded = ((bits + (0x7FFF + ((bits >> 16) & 1))) & -65536).view(torch.float32)
    return torch.where(torch.isnan(t), t, rounded)


def scaled_row_stats(x: Tensor, chan: Tensor) -> Tensor:
    """Each row's largest magnitude after dividing by ``chan``, ``(..., 1)``,
    in bfloat16: after :func:`channel_scale` it lies between the smallest
    normal fp32 and the larger of 1 and a quarter of the number of rows (a
    value is at most that many times its channel's capped scale), and 2 bytes
    per row keep the cost small for narrow rows (one head of one token); the rounded value is what both quantizing and expanding use, so
    its rounding costs no accuracy. (Rounded on the bits, so that compiled
    code which fuses the width into the codes' loop uses the rounded value
    too: :func:`_bf16_exact`.)"""
    t = torch.clamp((x.float() * _inverse(chan)).abs().amax(-1, keepdim=True), min=_TINY)
    return _bf16_exact(t).to(torch.bfloat16)


def _as_float(x: Tensor, centre: Optional[Tensor], width: Optional[Tensor],
              chan: Optional[Tensor] = None) -> Tensor:
    """``x`` in fp32 in the frame its ranges are taken in (see the row
    modes): divided by ``chan``, less ``centre``, divided by ``width``, each
    division a multiplication by the reciprocal (:func:`_inverse`)."""
    xf = x.float()
    if chan is not None:
        xf = xf * _inverse(chan)
    if centre is not None:
        xf = xf - centre
    if width is not None:
        xf = xf * _inverse(width)
    return xf


def channel_minmax(
    x: Tensor,
    axes: Tuple[int, ...],
    per_tensor: bool,
    centre: Optional[Tensor] = None,
    width: Optional[Tensor] = None,
    chan: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """fp32 min and max per channel (shape of the channel axes), or of the
    whole tensor (``(1,)``): the one pass over ``x`` that range estimation
    needs. With ``centre``/``width``/``chan`` (a row mode), of the normalised ``x``."""
    xf = _as_float(x, centre, width, chan)
    if per_tensor:
        return xf.amin().reshape(1), xf.amax().reshape(1)
    others = [d for d in range(x.dim()) if d not in axes]
    if not others:
        return xf, xf
    wide = _wide(x)
    lo = _over_rows(xf, others, _amin, torch.minimum, wide)
    hi = _over_rows(xf, others, _amax, torch.maximum, wide)
    channels = [x.shape[a] for a in axes]
    return lo.reshape(channels), hi.reshape(channels)


def groups_from_channels(
    cmin: Tensor, cmax: Tensor, group_size: Optional[int]
) -> Tuple[Tensor, Tensor]:
    """Reduce per-channel min/max to per-group ``(G,)``."""
    if group_size is None:
        return cmin.reshape(1), cmax.reshape(1)
    channels = cmin.shape[-1] if cmin.dim() else 1
    cmin, cmax = cmin.reshape(-1, channels), cmax.reshape(-1, channels)
    groups = max(1, -(-channels // group_size))
    pad = groups * group_size - channels
    if pad:
        # Fill the short last group with copies of its last channel: neutral
        # for min and max.
        cmin = torch.cat([cmin, cmin[:, -1:].expand(-1, pad)], dim=1)
        cmax = torch.cat([cmax, cmax[:, -1:].expand(-1, pad)], dim=1)
    rows = cmin.shape[0]
    lo = cmin.reshape(rows, groups, group_size).amin(-1).reshape(-1)
    hi = cmax.reshape(rows, groups, group_size).amax(-1).reshape(-1)
    return lo, hi


def scale_from_range(lo: Tensor, hi: Tensor, bits: int) -> Tensor:
    qmax = float(2**bits - 1)
    # hi/qmax - lo/qmax rather than (hi - lo)/qmax: no overflow near the fp32 limit.
    scale = torch.clamp(hi / qmax - lo / qmax, min=_TINY)
    finite = torch.isfinite(lo) & torch.isfinite(hi)
    return torch.where(finite, scale, torch.full_like(scale, float("nan")))


def zero_point(lo: Tensor, hi: Tensor, scale: Tensor, bits: int) -> Tuple[Tensor, Tensor]:
    """``(lo, scale)`` of a range that still covers ``[lo, hi]`` and has 0 as
    a code, where the range contains 0 inside: 0 gets the code ``z`` nearest
    its place, and the step grows just enough for ``[-z * scale,
    (qmax - z) * scale]`` to cover the range (at 8 bits by at most about one
    part in ``min(z, qmax - z)``). Other ranges are unchanged."""
    qmax = float(2**bits - 1)
    z = torch.clamp(torch.round(-lo / scale), 1.0, qmax - 1.0)
    step = torch.maximum(hi / (qmax - z), -lo / z)
    inside = (lo < 0) & (hi > 0) & torch.isfinite(step)
    return torch.where(inside, -z * step, lo), torch.where(inside, step, scale)


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


def _lanes(packed: Tensor, bits: int, dtype: torch.dtype = torch.uint8) -> Tensor:
    """``(M, 8 // bits)`` of ``dtype``: each byte's values along the inner dimension."""
    shifts = torch.arange(0, 8, bits, device=packed.device, dtype=dtype)  # one lane per value in a byte
    return (packed.to(dtype).unsqueeze(1) >> shifts) & ((1 << bits) - 1)


def unpack(packed: Tensor, bits: int, numel: int) -> Tensor:
    if bits == 8:
        return packed[:numel]
    return _lanes(packed, bits).reshape(-1)[:numel]


def pack_bits(mask: Tensor) -> Tensor:
    """A boolean tensor kept 1 bit per element (dropout, ReLU and clamp masks)."""
    return pack(mask.reshape(-1).to(torch.uint8), 1)


def unpack_bits(packed: Tensor, shape: Tuple[int, ...]) -> Tensor:
    return unpack(packed, 1, math.prod(shape)).reshape(shape).bool()


def product_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype :func:`apply_bits` computes in: fp64 for fp64, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def apply_bits(x: Tensor, packed: Tensor, scale: float) -> Tensor:
    """``x * mask * scale`` for the mask of ``x``'s shape that :func:`pack_bits`
    kept, as ATen's ``native_dropout_backward`` computes it: ``x * mask`` is
    exact, then one rounding of its product with the scale (computed here in
    fp32, or fp64 for fp64, and rounded once to ``x``'s dtype: no
    intermediate in a low-precision dtype, whose casts a compiler emulating
    them would keep scalar)."""
    n = x.numel()
    if n % 8 == 0:
        # as (bytes, 8), each byte's eight bits along the inner dimension:
        # compiled code then loads the bytes and x contiguously and
        # vectorises the loop (over the flat order, one byte for every eight
        # elements, Inductor's CPU loop stayed scalar, 3-8x slower)
        # (int32 lanes: Inductor's uint8 vector shifts were 20-30% slower here)
        bits, rows = _lanes(packed[: n // 8], 1, torch.int32), x.reshape(-1, 8)
    else:
        bits, rows = unpack(packed, 1, n).reshape(x.shape), x
    wide = product_dtype(x.dtype)
    return (rows.to(wide) * bits.to(wide) * scale).to(x.dtype).reshape(x.shape)


_M32 = 0xFFFFFFFF


def uniform_from_seed(shape: Tuple[int, ...], seed: Tensor) -> Tensor:
    """Uniform [0, 1) noise for stochastic rounding, from a counter-based hash.

    Element ``i`` gets ``hash(i, seed)``: a few integer operations that
    compiled code fuses into the quantize loop, about 5x cheaper on CPU than
    drawing from the generator element by element, and the same numbers in
    the reference and the fused path (so they agree bit for bit here too).
    The hash is a well-known 32-bit integer mixer (two multiply/xor-shift
    rounds with 0x45d9f3b); every product stays below 2**63, so int64
    arithmetic never overflows. 24 bits of it make the uniform value.
    ``seed`` is a 0-dim int64 tensor from :func:`next_seed`.
    """
    idx = torch.arange(math.prod(shape), device=seed.device, dtype=torch.int64).reshape(shape)
    h = (idx & _M32) ^ (idx >> 32) ^ ((seed * 0x9E3779B1) & _M32)
    h = ((h ^ (h >> 16)) * 0x45D9F3B) & _M32
    h = ((h ^ (h >> 16)) * 0x45D9F3B) & _M32
    h = h ^ (h >> 16)
    return (h >> 8).to(torch.float32) * (1.0 / (1 << 24))


_seeds = itertools.count()


def next_seed(device) -> Tensor:
    """The seed of one stochastic rounding: a private counter-based stream,
    never PyTorch's generator. Drawing from the generator would change the
    user's random state, so a model with dropout would compute a different
    forward at 4 or 2 bits than unconverted, and reentrant checkpointing
    would replay different dropout masks. The stream is this process's call
    counter mixed with ``torch.initial_seed()`` (read, not advanced): runs
    that make the same calls after the same ``torch.manual_seed`` round
    alike."""
    n = next(_seeds)
    s = (torch.initial_seed() * 0x9E3779B97F4A7C15 + (n + 1) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    s ^= s >> 31
    # (filled on the device: torch.tensor(s, device=...) is a copy from the
    # host, which on a GPU waits for every kernel queued before it)
    return torch.full((), s & 0x7FFFFFFF, dtype=torch.int64, device=device)


def quantize_codes(
    x: Tensor,
    lo_c: Tensor,
    scale_c: Tensor,
    bits: int,
    seed: Optional[Tensor] = None,
    centre: Optional[Tensor] = None,
    width: Optional[Tensor] = None,
    chan: Optional[Tensor] = None,
) -> Tensor:
    """Packed codes of ``x`` given broadcastable per-channel ``lo`` and ``scale``;
    stochastic rounding when a ``seed`` is given, nearest otherwise."""
    qmax = float(2**bits - 1)
    q = (_as_float(x, centre, width, chan) - lo_c) * _inverse(scale_c)
    if seed is not None:
        q = torch.floor(q + uniform_from_seed(tuple(x.shape), seed))
    else:
        q = torch.round(q)
    codes = torch.clamp(q, 0.0, qmax).to(torch.uint8)
    return pack(codes, bits)


def dequantize_codes(
    packed: Tensor,
    lo_c: Tensor,
    scale_c: Tensor,
    shape: Tuple[int, ...],
    dtype: torch.dtype,
    bits: int,
    centre: Optional[Tensor] = None,
    width: Optional[Tensor] = None,
    chan: Optional[Tensor] = None,
) -> Tensor:
    numel = math.prod(shape)
    codes = unpack(packed, bits, numel).reshape(shape)
    out = codes.float() * scale_c + lo_c
    if width is not None:
        out = out * width.float()
    if centre is not None:
        out = out + centre
    if chan is not None:
        out = out * chan
    return out.to(dtype)


def rotate_last(x: Tensor, r: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """``x @ r`` along the last dimension, in fp32 (under autocast too), as
    one matrix product over ``x`` copied to rows of ``d`` (a copy only where
    ``x`` is not laid out so already); into ``out`` (contiguous, fp32) if
    given. A strided ``(B, H, N, D)`` or ``(B, N, H, D)`` view of a
    projection's output (an attention's query or key) given to matmul as it
    is makes one small product per row block: measured 3.9 ms against 1.0 ms
    for the copy and one product, on a ViT-S query of a batch of 16."""
    d = x.shape[-1]
    rows = x.float().reshape(-1, d)
    if out is not None:
        torch.mm(rows, r, out=out.view(-1, d))  # (an out= product: autocast leaves it alone)
        return out
    device = rows.device.type
    off = torch.autocast(device, enabled=False) if torch.is_autocast_enabled(device) else contextlib.nullcontext()
    with off:
        return (rows @ r).view(x.shape)


def normalize_axes(axes, ndim: int) -> Tuple[int, ...]:
    if isinstance(axes, int):
        axes = (axes,)
    return tuple(sorted({a % ndim for a in axes}))


ROW_MODES = (None, "row", "scaled")


def _frame(saved_rows: Tuple[Tensor, ...], rows: Optional[str]) -> dict:
    """The row-mode tensors kept after ``(packed, lo, scale)``, by name."""
    if rows == "row":
        return {"centre": saved_rows[0], "width": saved_rows[1]}
    if rows == "scaled":
        return {"width": saved_rows[0], "chan": saved_rows[1]}
    return {}


def quantize_core(
    x: Tensor,
    seed: Optional[Tensor],
    run_lo: Optional[Tensor],
    run_span: Optional[Tensor],
    momentum: Optional[Tensor],
    *,
    bits: int,
    axes: Tuple[int, ...],
    group_size: Optional[int],
    rows: Optional[str],
    running: Optional[str],
) -> Tuple[Tensor, ...]:
    """The whole of :func:`quantize` as a function of tensors and static
    settings, without Python state: the fused path compiles exactly this.
    ``seed``: stochastic rounding's seed (None: nearest). ``running``: what
    the running estimate ``(run_lo, run_span)`` does this step, with
    ``momentum`` (None: dynamic ranges; see :func:`.running.step`); with
    "update" the new estimate's ``(lo, span)`` follow the kept tensors."""
    frame: dict = {}
    kept_rows: Tuple[Tensor, ...] = ()
    if rows == "row":
        centre, width = row_stats(x)
        frame, kept_rows = {"centre": centre, "width": width}, (centre, width)
    elif rows == "scaled":
        chan = channel_scale(x, axes)
        width = scaled_row_stats(x, chan)
        frame, kept_rows = {"width": width, "chan": chan}, (width, chan)
    cmin, cmax = channel_minmax(x, axes, group_size is None, **frame)
    lo, hi = groups_from_channels(cmin, cmax, group_size)
    new: Tuple[Tensor, ...] = ()
    if running is not None:
        lo, hi, new = running_step(running, momentum, lo, hi, run_lo, run_span)
    scale = scale_from_range(lo, hi, bits)
    if seed is None:
        # Nearest rounding is a fixed function of x: without a zero point it
        # would move every 0 of a group the same way, step after step.
        # (Stochastic rounding is unbiased at 0 already.)
        lo, scale = zero_point(lo, hi, scale, bits)
    shape = tuple(x.shape)
    lo_c = to_channels(lo, shape, axes, group_size)
    scale_c = to_channels(scale, shape, axes, group_size)
    packed = quantize_codes(x, lo_c, scale_c, bits, seed, **frame)
    return (packed, lo, scale) + kept_rows + tuple(new)


def dequantize_core(
    saved: Tuple[Tensor, ...],
    *,
    shape: Tuple[int, ...],
    dtype: torch.dtype,
    bits: int,
    axes: Tuple[int, ...],
    group_size: Optional[int],
    rows: Optional[str],
) -> Tensor:
    """The whole of :func:`dequantize` (the fused path compiles exactly this)."""
    packed, lo, scale = saved[:3]
    lo_c = to_channels(lo, shape, axes, group_size)
    scale_c = to_channels(scale, shape, axes, group_size)
    return dequantize_codes(packed, lo_c, scale_c, shape, dtype, bits, **_frame(tuple(saved[3:]), rows))


def quantize_with(
    core: Callable[..., Tuple[Tensor, ...]],
    x: Tensor,
    bits: int,
    axes,
    group_size: Optional[int],
    stochastic: bool,
    rows: Optional[str],
    running,
) -> Tuple[Tensor, ...]:
    """:func:`quantize` with ``core`` in place of :func:`quantize_core`
    (same signature): the Python state (seed stream, running estimate) is
    handled here, the tensors there."""
    if rows not in ROW_MODES:
        raise ValueError(f"rows={rows!r}; use one of {ROW_MODES}")
    axes = normalize_axes(axes, x.dim())
    seed = next_seed(x.device) if stochastic else None
    mode, run_lo, run_span, momentum = None, None, None, None
    if running is not None:
        mode, run_lo, run_span, momentum = running.plan(num_groups(tuple(x.shape), axes, group_size), x.device)
    out = core(x, seed, run_lo, run_span, momentum, bits=bits, axes=axes, group_size=group_size, rows=rows,
               running=mode)
    if mode == "update":
        running.commit(out[-2], out[-1])
        out = out[:-2]
    return tuple(out)


def quantize(
    x: Tensor,
    bits: int,
    axes,
    group_size: Optional[int],
    stochastic: bool,
    *,
    rows: Optional[str] = None,
    running=None,
) -> Tuple[Tensor, ...]:
    """Quantize ``x``; returns the tensors to keep: ``(packed, lo, scale)``,
    plus ``(centre, width)`` with ``rows="row"`` or ``(width, chan)`` with
    ``rows="scaled"`` (see the module docstring).

    ``running`` (a :class:`~.running.RunningRange`) replaces the dynamic
    per-group range with its running estimate, updating it; values outside
    that range saturate.
    """
    return quantize_with(quantize_core, x, bits, axes, group_size, stochastic, rows, running)


def dequantize(
    saved: Tuple[Tensor, ...],
    shape: Tuple[int, ...],
    dtype: torch.dtype,
    bits: int,
    axes,
    group_size: Optional[int],
    *,
    rows: Optional[str] = None,
) -> Tensor:
    """Inverse of :func:`quantize` (up to the rounding)."""
    shape = tuple(shape)
    return dequantize_core(tuple(saved), shape=shape, dtype=dtype, bits=bits,
                           axes=normalize_axes(axes, len(shape)), group_size=group_size, rows=rows)
