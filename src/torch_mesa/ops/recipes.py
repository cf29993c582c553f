"""Rebuild recipes: what an op keeps of an input, and how it gets it back.

Every op in this package keeps each input it needs for backward as a
:class:`Recipe`: a tuple of tensors handed to ``ctx.save_for_backward``
(principle 2: hooks, offloading and measurement see all of it) and a
``rebuild`` function that turns those tensors back into the input. Most
recipes are quantized copies (:func:`keep`). Some are cheaper:

*Keep each piece of data once.* An op whose output is an elementwise or norm
step of what it already keeps (LayerNorm, RMSNorm, GELU, SiLU, gated products,
dropout, ``q @ k^T``) attaches to that output a recipe that rebuilds it from
its own kept tensors (:func:`mark_kept`). An op that then needs this output
for its backward (the Linear after a LayerNorm, the softmax after the
scores) saves the *same* tensors (same storages, so nothing is stored twice)
and recomputes the cheap step in backward.

*Version checks.* An attachment records the version counter of the output
and of every tensor the recipe holds that came from outside (the other
operand of an addition or a product, a mask, the small tensor behind a
broadcast view). If any of them was modified in place before a consumer
saves the recipe, :func:`kept_of` returns None and the consumer quantizes
the tensor as it is now instead (after the consumer has saved it,
autograd's own version check guards the saved tensors).

Rebuild functions never capture tensors (only shapes, flags and other
functions); all tensors travel through ``save_for_backward``.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Callable, Dict, FrozenSet, Optional, Sequence, Set, Tuple

import torch

from .. import quant
from ..config import QuantSpec

Tensor = torch.Tensor

_KEPT_ATTR = "_mesa_kept"


@dataclass(frozen=True)
class Recipe:
    """Tensors to save, and how to turn them back into the kept input.

    ``outside``: the tensors among ``tensors`` that came from outside the
    op (masks, addends, views), with their version counters when the recipe
    was made: an in-place change to any of them invalidates the recipe.
    """

    tensors: Tuple[Optional[Tensor], ...]
    rebuild: Callable[[Sequence[Optional[Tensor]]], Tensor]
    outside: Tuple[Tuple[Tensor, int], ...] = ()
    # False: rebuilt through a sum over neighbouring quantized values (a
    # convolution), whose error a normalisation would amplify in rows of
    # small width; a norm keeps its own row-wise copy instead
    for_norms: bool = True

    def unchanged(self) -> bool:
        return all(t._version == v for t, v in self.outside)


@dataclass(frozen=True)
class _Kept:
    recipe: Recipe
    version: int


def _rebuild_quantized(tensors: Sequence[Tensor], layout: quant.Layout) -> Tensor:
    return quant.expand(tuple(tensors), layout)


def _identity(tensors: Sequence[Tensor]) -> Tensor:
    return tensors[0]


def _versions(tensors: Sequence[Optional[Tensor]]) -> Tuple[Tuple[Tensor, int], ...]:
    return tuple((t, t._version) for t in tensors if isinstance(t, torch.Tensor))


def exact(x: Optional[Tensor]) -> Recipe:
    """Keep ``x`` as it is (parameters, masks)."""
    return Recipe((x,), _identity, _versions((x,)))


# Op kinds, for per-op error breakdowns (torch_mesa.verify): what each op keeps.
OP_KINDS = ("linear", "conv", "norm", "activation", "gated", "product", "softmax", "matmul", "attention")
_exact_ops: ContextVar[FrozenSet[str]] = ContextVar("torch_mesa_exact_ops", default=frozenset())
_seen_ops: ContextVar[Optional[Set[str]]] = ContextVar("torch_mesa_seen_ops", default=None)


@contextlib.contextmanager
def exact_ops(kinds):
    """Within this context, ops of these kinds keep their inputs exact instead
    of quantized (for measuring each kind's share of the gradient error)."""
    token = _exact_ops.set(frozenset(kinds))
    try:
        yield
    finally:
        _exact_ops.reset(token)


@contextlib.contextmanager
def record_ops():
    """Collects the op kinds that quantize something within this context."""
    seen: Set[str] = set()
    token = _seen_ops.set(seen)
    try:
        yield seen
    finally:
        _seen_ops.reset(token)


_MIN_SCALED_ROW = 32
_MAX_ROTATED = 256  # head dimensions up to this are rotated (a D x D product per row)
_rotations: Dict[Tuple[int, str], Tensor] = {}


def rotation(d: int, device) -> Tensor:
    """A fixed orthonormal ``d x d`` matrix (fp32): Hadamard for powers of 2,
    else the Q of a fixed-seed Gaussian's QR. Rotating q and k alike along
    the head dimension leaves ``q @ k^T`` unchanged and spreads a few outlier
    channels over all of them (as FlashAttention-3 does for FP8)."""
    key = (d, str(device))
    r = _rotations.get(key)
    if r is None:
        if d & (d - 1) == 0:
            h = torch.ones(1, 1)
            while h.shape[0] < d:
                h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
            r = h / d**0.5
        else:
            g = torch.Generator().manual_seed(d)
            r, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
            r = r.float()
        r = _rotations[key] = r.to(device)
    return r


def _rotate(x: Tensor, dim: int, inverse: bool = False) -> Tensor:
    """``x`` (fp32) rotated along ``dim`` (-1 or -2) by :func:`rotation`."""
    r = rotation(x.shape[dim], x.device)
    r = r.t() if inverse else r
    if dim == -1:
        return quant.reference.rotate_last(x, r)
    return quant.reference.rotate_last(x.transpose(-2, -1), r).transpose(-2, -1)


def _rebuild_rotated(tensors: Sequence[Tensor], *, layout: quant.Layout, dim: int, dtype: torch.dtype) -> Tensor:
    return _rotate(quant.expand(tuple(tensors), layout), dim, inverse=True).to(dtype)


def quantized(x: Tensor, spec: QuantSpec, *, op: str, heads: bool = False, rows: bool = False,
              running: Optional[quant.RunningRange] = None, rotate: Optional[int] = None,
              channels_first: bool = False) -> Recipe:
    """A quantized copy of ``x`` kept by an op of kind ``op`` (see :func:`keep`
    for the other arguments). ``rotate``: the dimension (-1 or -2) along which
    ``x`` is a query or key of attention; with ``spec.qk_rotation`` it is kept
    rotated (see :func:`rotation`) and rotated back when rebuilt."""
    seen = _seen_ops.get()
    if seen is not None:
        seen.add(op)
    if op in _exact_ops.get():
        # a copy, as the quantized one it stands in for: an op that then
        # overwrites its input (an activation with inplace=True) would
        # change what backward reads (verify's per-op breakdown of
        # EfficientNet failed with PyTorch's in-place error)
        return exact(x.detach().clone())
    # (Heads under 32 channels skip it: there a spike in one element spread
    # over the whole row costs more than outlier channels do; measured in
    # benchmarks/quant_study.py.)
    if rotate is not None and x.dim() >= 2 and _rotated(spec, x.shape[rotate]):
        xr = _rotate(x, rotate)
        inner = quantized(xr, spec, op=op, heads=heads, running=running)
        return Recipe(inner.tensors, functools.partial(_rebuild_rotated, layout=inner.rebuild.keywords["layout"],
                                                       dim=rotate, dtype=x.dtype))
    if (channels_first or is_channels_first(x)) and x.dim() >= 3 and not rows and not heads and rotate is None:
        # (N, C, *spatial): kept as its channels-last view is, like a
        # Linear's input: ranges per channel group over the batch and every
        # position, then (C >= 32, token_scale) each position scaled to the
        # common range, so positions far smaller or larger than the others
        # keep their precision (convolutions, batch norms, activations of
        # feature maps)
        inner = quantized(x.movedim(1, -1), spec, op=op, running=running)
        return Recipe(inner.tensors, functools.partial(_rebuild_moved, inner=inner.rebuild), inner.outside,
                      inner.for_norms)
    if x.dim() >= 2 and x.shape[-1] == 1 and not rows:
        # one value per row (a hand-written norm's reciprocal width, a gate
        # per token): one range would span every row, and a row far from
        # the others decides every row's step. A padding token's zero row
        # gets 1 / sqrt(eps) from an RMS or L2 norm written out as
        # x * rsqrt(mean(x^2) + eps): the other rows' reciprocals fell to a
        # few codes, and Llama 4's key projection's gradient to cosine 0.978
        # with its padding tokens in the batch. Kept exact, as compiled
        # saving keeps such statistics: 4 bytes a row, against a byte per
        # channel of the row it scales. (A copy: an activation with
        # inplace=True overwrites its input after keeping it.)
        return exact(x.detach().clone())
    axes, group_size = _ranges(x, spec, heads)
    mode = "row" if rows else _token_scale(spec, x.shape[-1])
    tensors, layout = quant.compress(x, spec.bits, axes, group_size, spec.stochastic, running, spec.kernel,
                                     rows=mode)
    return Recipe(tensors, functools.partial(_rebuild_quantized, layout=layout))


def _rotated(spec: QuantSpec, d: int) -> bool:
    """Whether queries and keys with ``d`` channels per head are kept rotated."""
    return bool(spec.qk_rotation) and _MIN_SCALED_ROW <= d <= _MAX_ROTATED


def _ranges(x: Tensor, spec: QuantSpec, heads: bool) -> Tuple[Tuple[int, ...], Optional[int]]:
    """The axes and group size of ``x``'s ranges (:func:`quantized`)."""
    axes, group_size = (-1,), spec.group_size
    if heads and spec.head_wise and x.dim() >= 3:
        # Ranges never shared across heads; within a head, group_size channels
        # share one (None: one range per head, Mesa's original choice).
        gs = spec.group_size if spec.group_size is not None else max(1, x.shape[-1])
        groups = x.shape[-3] * -(-x.shape[-1] // gs)
        # ... unless dim -3 is not heads but tokens (a (B, N, H, D) layout):
        # ranges costing more than an eighth of the codes fall back to
        # per channel
        if 8 * groups <= x.numel() * spec.bits / 64:
            axes, group_size = (x.dim() - 3, x.dim() - 1), gs
    return axes, group_size


def _token_scale(spec: QuantSpec, row: int) -> Optional[str]:
    # With token_scale, values are scaled per channel and then per row (a
    # token far smaller or larger than the others keeps its precision); norm
    # inputs are kept relative to each row's own centre and width instead.
    # (Rows of fewer than 32 values, one head of a tiny model, skip the
    # token scale: its 2 bytes per row would cost more than 6% there.)
    return "scaled" if spec.token_scale and row >= _MIN_SCALED_ROW else None


def _pick(tensors: Sequence[Tensor], *, inner, index: int) -> Tensor:
    return rebuilt(inner, tensors)[index]


def _stacked_view(ts: Sequence[Tensor]) -> Optional[Tensor]:
    """The tensors, of one shape, dtype and strides, as one view ``(len(ts),
    *shape)`` of their common storage, where they lie at equal distances in
    it and share no element (q, k and v unbound from one projection's
    output); else None."""
    first = ts[0]
    if quant.without_data(first):
        return None  # (no storage to compare: a fake or meta tensor)
    step = ts[1].storage_offset() - first.storage_offset()
    storage = first.untyped_storage().data_ptr()
    for i, t in enumerate(ts):
        if (t.stride() != first.stride() or t.untyped_storage().data_ptr() != storage
                or t.storage_offset() != first.storage_offset() + i * step):
            return None
    shape, strides = (len(ts),) + tuple(first.shape), (step,) + tuple(first.stride())
    # no element twice: each stride, smallest first, steps past everything
    # the smaller ones reach
    reach = 0
    for st, n in sorted((st, n) for n, st in zip(shape, strides) if n > 1):
        if st <= reach:
            return None
        reach += (n - 1) * st
    return first.as_strided(shape, strides, first.storage_offset())


def quantized_qkv(q: Tensor, k: Tensor, v: Tensor, spec: QuantSpec, *,
                  op: str) -> Optional[Tuple[Recipe, Recipe, Recipe]]:
    """Attention's queries, keys and values (``(..., H, N, D)``, one shape)
    kept by fewer quantizations, with the ranges each would get on its own
    (every group lies within one of them), so the codes are those of
    :func:`keep` with ``heads=True`` (and ``rotate=-1`` for q and k): q and
    k rotated by one call and expanded and rotated back by one; without the
    rotation (head dimensions under 32, as in small models) q, k and v by
    one call over the view of the projection output they were unbound from.
    A small model pays per compiled call. None where that does not apply
    (running ranges, other shapes, recipes to reuse, no common view): keep
    each with :func:`keep`."""
    if (spec.running or q.dim() < 3 or not q.is_floating_point() or q.shape != k.shape or q.shape != v.shape
            or q.dtype != k.dtype or q.dtype != v.dtype or q.device != k.device or q.device != v.device
            or any(is_weight(t) for t in (q, k, v)) or op in _exact_ops.get()
            or (spec.keep_once and any(kept_of(t) is not None for t in (q, k, v)))):
        return None
    d = q.shape[-1]
    # the ranges quantized() gives each alone (head-wise: heads and
    # channels), then the index along the stack
    axes, group_size = _ranges(q, spec, heads=True)
    if group_size is None:
        return None  # one range for each tensor: not one for all
    axes = (0,) + tuple(a % q.dim() + 1 for a in axes)
    rotate = _rotated(spec, d)
    if rotate:
        both = torch.empty((2,) + tuple(q.shape), dtype=torch.float32, device=q.device)  # (2, ..., H, N, D)
        r = rotation(d, q.device)
        quant.reference.rotate_last(q, r, out=both[0])
        quant.reference.rotate_last(k, r, out=both[1])
        stacked, n = both, 2
    else:
        stacked, n = _stacked_view((q, k, v)), 3
        if stacked is None:
            return None
    seen = _seen_ops.get()
    if seen is not None:
        seen.add(op)
    mode = _token_scale(spec, d)
    tensors, layout = quant.compress(stacked, spec.bits, axes, group_size, spec.stochastic, None, spec.kernel,
                                     rows=mode)
    if rotate:
        inner = functools.partial(_rebuild_rotated, layout=layout, dim=-1, dtype=q.dtype)
    else:
        inner = functools.partial(_rebuild_quantized, layout=layout)
    kept = [Recipe(tensors, functools.partial(_pick, inner=inner, index=i)) for i in range(n)]
    if n == 2:
        kept.append(quantized(v, spec, op=op, heads=True))
    return tuple(kept)


def _rebuild_moved(tensors: Sequence[Tensor], *, inner) -> Tensor:
    return inner(tensors).movedim(-1, 1)


_CHANNELS_FIRST_ATTR = "_mesa_channels_first"


def mark_channels_first(out: Tensor) -> Tensor:
    """Note on ``out`` that it is a feature map ``(N, C, *spatial)``: the
    output of a convolution, batch norm or pooling, or of an elementwise op
    of one. An op that keeps it takes its channels along dim 1 (by shape
    alone, ``(N, C, H, W)`` and ``(N, H, W, C)`` cannot be told apart). A
    view or reshape is a new tensor and carries no note."""
    if isinstance(out, torch.Tensor) and out.dim() >= 3:
        setattr(out, _CHANNELS_FIRST_ATTR, True)
    return out


def is_channels_first(x) -> bool:
    # (in-place elementwise steps, ReLU(inplace=True) and `x += shortcut`,
    # keep the note; an in-place transpose_ would too, a known limit)
    return getattr(x, _CHANNELS_FIRST_ATTR, False)


def is_weight(x: Tensor) -> bool:
    """A Parameter, or a view of one (``w.t()``, an expert's slice ``w[i]``):
    kept as it is, at no cost (its storage is held anyway), never quantized."""
    return isinstance(x, torch.nn.Parameter) or isinstance(x._base, torch.nn.Parameter)


def keep(
    x: Tensor,
    spec: QuantSpec,
    *,
    op: str,
    heads: bool = False,
    rows: bool = False,
    running: Optional[quant.RunningRange] = None,
    rotate: Optional[int] = None,
    channels_first: bool = False,
) -> Recipe:
    """How to keep input ``x``: the producer's attachment if it has a valid one,
    else a quantized copy. ``op``: the kind of op keeping it (one of
    :data:`OP_KINDS`). ``heads``: ``x`` has a head dimension at -3
    (``(B, H, N, D)``) and, with ``spec.head_wise``, gets one range per head.
    ``rows``: quantize each row relative to its own centre and width (inputs
    of normalisation layers, which would amplify the error of small rows).
    ``channels_first``: ``x`` is ``(N, C, *spatial)``, ranges per channel
    along dim 1 (convolutions, batch norms)."""
    if is_weight(x):
        return exact(x)
    kept = kept_of(x) if spec.keep_once else None
    if kept is not None and (kept.for_norms or not rows):
        return kept
    return quantized(x, spec, op=op, heads=heads, rows=rows, running=running, rotate=rotate,
                     channels_first=channels_first)


def kept_of(x) -> Optional[Recipe]:
    """The valid rebuild recipe attached to ``x``, if any: neither ``x`` nor
    any outside tensor of the recipe was modified in place since."""
    kept = getattr(x, _KEPT_ATTR, None) if isinstance(x, torch.Tensor) else None
    if kept is not None and kept.version == x._version and kept.recipe.unchanged():
        return kept.recipe
    return None


def mark_kept(out: Tensor, recipe: Recipe) -> Tensor:
    """Attach to ``out`` how to rebuild it from what its producer keeps."""
    setattr(out, _KEPT_ATTR, _Kept(recipe, out._version))
    return out


def overwrite(x: Tensor, out: Tensor) -> Tensor:
    """``x`` overwritten with ``out`` (an op's output computed from ``x``),
    as a module with ``inplace=True`` overwrites its input, with or without
    autograd: the caller may read ``x`` again and must see the new values
    (code like ``y = act(h); h + y`` reads both). Autograd records the copy,
    so gradients reach the op and, through it, the old ``x``; a leaf that
    requires grad is refused as PyTorch refuses it. The rebuild recipe of
    ``out`` moves to ``x`` (with ``x``'s new version), so a consumer of ``x``
    keeps nothing of its own, as it would of ``out``."""
    x.copy_(out)
    recipe = kept_of(out)
    if recipe is not None:
        mark_kept(x, recipe)
    return x


def _then(tensors, *, inner, n_inner, step, autocast):
    x = rebuilt(inner, tensors[:n_inner])
    with autocast():
        return step(x, *tensors[n_inner:])


def derived(
    inner: Recipe, step: Callable[..., Tensor], extra: Sequence[Optional[Tensor]], autocast, *,
    for_norms: bool = True,
) -> Recipe:
    """A recipe that rebuilds ``step(inner, *extra)``: the output of a cheap
    op from what that op keeps of its input. ``step`` must be a function of
    its arguments only (a module-level function or a partial of one);
    ``extra`` tensors come from outside (their versions are checked);
    ``autocast`` (an :class:`~torch_mesa.ops.replay.AutocastState`) is the
    state ``step`` runs under."""
    rebuild = functools.partial(
        _then, inner=inner.rebuild, n_inner=len(inner.tensors), step=step, autocast=autocast
    )
    return Recipe(tuple(inner.tensors) + tuple(extra), rebuild, inner.outside + _versions(extra),
                  inner.for_norms and for_norms)


def _rebuild_pair(tensors, *, a, n_a, b, combine):
    return combine(rebuilt(a, tensors[:n_a]), rebuilt(b, tensors[n_a:]))


def combined(a: Recipe, b: Recipe, combine: Callable[[Tensor, Tensor], Tensor]) -> Recipe:
    """A recipe that rebuilds ``combine(a, b)`` from what ``a`` and ``b`` keep
    (a gated product, a product, attention scores ``q @ k^T``)."""
    rebuild = functools.partial(_rebuild_pair, a=a.rebuild, n_a=len(a.tensors), b=b.rebuild, combine=combine)
    return Recipe(tuple(a.tensors) + tuple(b.tensors), rebuild, a.outside + b.outside, a.for_norms and b.for_norms)


# ------------------------------------------------ rebuilt once, used in turn
# How many saved plans, or enclosing rebuilds, will still call each rebuild (a
# recipe's own function object: one per kept tensor); weak, so a graph freed
# without backward leaves nothing.
_uses: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
# Rebuilt tensors still wanted, oldest first: rebuild -> (tensor, its
# version, the backward pass); the tensor None where only the place is kept
# (an expansion done again where needed: see rebuilt). For the process, not
# per thread: the engine may finish a pass on another thread than the one
# that rebuilt.
_held: Dict[Callable, Tuple[Optional[Tensor], int, int]] = {}
_MAX_HELD = 4  # (q, k and their scores; an activation's input and its dropout mask)
_callbacks: Set[int] = set()  # backward passes whose end clears what they hold
_depth: ContextVar[int] = ContextVar("torch_mesa_rebuild_depth", default=0)  # (see rebuilt)
# The expansions held while a saved plan's rebuild runs: (rebuild, depth).
_expansions: ContextVar[Optional[list]] = ContextVar("torch_mesa_rebuilt_expansions", default=None)


def _nested(rebuild) -> Tuple[Callable, ...]:
    """The rebuilds a derived or combined recipe's rebuild calls."""
    if isinstance(rebuild, functools.partial):
        if rebuild.func is _then:
            return (rebuild.keywords["inner"],)
        if rebuild.func is _rebuild_pair:
            return (rebuild.keywords["a"], rebuild.keywords["b"])
        if rebuild.func is _pick:
            return (rebuild.keywords["inner"],)
    return ()


def hold(rebuild) -> None:
    """Count one more caller of ``rebuild`` (and of the rebuilds it calls):
    a saved plan that will rebuild it in backward."""
    if rebuild is _identity:
        return
    _uses[rebuild] = _uses.get(rebuild, 0) + 1
    for inner in _nested(rebuild):
        hold(inner)


def _done(rebuild) -> int:
    """One caller of ``rebuild`` is done; the callers left."""
    left = _uses.get(rebuild, 0) - 1
    if left > 0:
        _uses[rebuild] = left
    else:
        _uses.pop(rebuild, None)
        _held.pop(rebuild, None)
    return left


def _skip(rebuild) -> None:
    """A caller of ``rebuild`` got its result without calling it (the
    enclosing rebuild's result was held): it, and the rebuilds it calls,
    have one caller less."""
    if rebuild is not _identity:
        _done(rebuild)
        for inner in _nested(rebuild):
            _skip(inner)


def _graph_task() -> int:
    """The running backward pass's id, -1 outside backward."""
    current = getattr(torch._C, "_current_graph_task_id", None)
    return -1 if current is None else current()


def _clear(task: int) -> None:
    _callbacks.discard(task)
    for rebuild in [r for r, entry in _held.items() if entry[2] == task]:
        del _held[rebuild]


def rebuilt(rebuild, tensors) -> Tensor:
    """``rebuild(tensors)``, shared by the consumers of one kept tensor whose
    backwards run one after another: the q, k and v projections of one
    norm's output; a gated MLP's gate and up; and an op and the consumer of
    its output, which rebuilds that output from the op's kept input (a
    norm or activation and the Linear after it, ``q @ k^T`` and the softmax
    after it): the consumer's backward runs first, and the op's own backward
    gets the input it rebuilt. A rebuilt tensor is held while other saved
    plans still call the same rebuild, and dropped when the last of them has
    run or the backward pass ends; at most a few are held (the oldest is
    dropped first), and one changed in place since is rebuilt again.

    Except a tensor expanded from its codes alone (a rebuild that calls no
    other), which is expanded again where it is used rather than held across
    other ops' backwards, where it would sit beside their gradients at what
    may be the step's peak: one expanded two or more rebuilds below a saved
    plan's (a PVT MLP's fc2 rebuilds GELU's output from the depthwise
    convolution's kept input, through the convolution: the convolution's
    backward, two ops later, expands that input again), and a plan's own
    input expanded for a result that sibling consumers still read (a norm's
    input, under the output its q, k and v projections share: the norm's
    backward comes after theirs). It is held while the rebuild of the saved
    plan's input that made it runs (its consumers there share it: q and k
    of ``q @ k^T``), then keeps only its place among the held, filled again
    where it is: the same entries are dropped first as if it were held, and
    a kept place counts towards the limit. Results of recomputed ops, which
    cost more than an expansion, are held as before."""
    if rebuild is _identity:
        return tensors[0]
    depth = _depth.get()
    if depth:
        return _rebuilt(rebuild, tensors, depth)
    expansions: list = []
    token = _expansions.set(expansions)
    try:
        out = _rebuilt(rebuild, tensors, depth)
    finally:
        _expansions.reset(token)
    if expansions:  # (most rebuilds hold no expansion: nothing to look at)
        entry = _held.get(rebuild)
        _forget(expansions, siblings=entry is not None and entry[0] is out)
    return out


def _rebuilt(rebuild, tensors, depth: int):
    entry = _held.get(rebuild)
    if entry is not None and entry[0] is not None and entry[0]._version == entry[1]:
        out = entry[0]
        for inner in _nested(rebuild):
            _skip(inner)
    else:
        token = _depth.set(depth + 1)
        try:
            out = rebuild(tensors)  # (the rebuilds it calls come through here too)
        finally:
            _depth.reset(token)
    if _done(rebuild) > 0 and isinstance(out, Tensor) and (entry is None or entry[0] is not out):
        task = _graph_task()
        if task != -1 and task not in _callbacks:
            _callbacks.add(task)
            torch.autograd.Variable._execution_engine.queue_callback(functools.partial(_clear, task))
        if entry is None or entry[0] is not None:  # (a place kept is filled where it is)
            _held.pop(rebuild, None)
        _held[rebuild] = (out, out._version, task)
        if depth and not _nested(rebuild):
            _expansions.get().append((rebuild, depth))
        while len(_held) > _MAX_HELD:
            del _held[next(iter(_held))]
    return out


def _forget(expansions, siblings: bool) -> None:
    """After a saved plan's rebuild of one input: of the expansions it held,
    keep only the place of those a later backward than the next one reads
    (see :func:`rebuilt`), unless another held tensor is a view of the same
    storage (q, k and v picked from one expansion: dropping it would free
    nothing)."""
    held = list(_held.items())  # (another device's engine thread may change it meanwhile)
    for rebuild, depth in expansions:
        entry = _held.get(rebuild)
        if entry is None or entry[0] is None or (depth < 2 and not siblings):
            continue
        storage = _storage(entry[0])
        if storage is not None and not any(other is not rebuild and e[0] is not None and _storage(e[0]) == storage
                                           for other, e in held):
            _held[rebuild] = (None,) + entry[1:]


def _storage(t: Tensor) -> Optional[int]:
    """Where ``t``'s data lies, or None where that cannot be said (a tensor
    without data, a subclass that keeps it elsewhere): then nothing is forgotten."""
    if quant.without_data(t):
        return None
    try:
        return t.untyped_storage().data_ptr()
    except RuntimeError:
        return None
