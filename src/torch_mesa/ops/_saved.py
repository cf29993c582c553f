"""What an op keeps for backward, and how it gets it back.

Every op in this package keeps each input it needs for backward as a
:class:`Saved`: a tuple of tensors handed to ``ctx.save_for_backward``
(principle 2: hooks, offloading and measurement see all of it) and a
``rebuild`` function that turns those tensors back into the input. Most
``Saved`` are quantized copies (:func:`keep`). Some are cheaper:

*Keep each piece of data once.* An op whose output is an elementwise or norm
step of what it already keeps (LayerNorm, RMSNorm, GELU, SiLU, gated products,
softmax, dropout) attaches to that output a ``Saved`` that rebuilds it from its
own kept tensors (``mark_kept``). An op that then needs this output for its
backward (the Linear after a LayerNorm, the matmul after a softmax) saves the
*same* tensors (same storages, so nothing is stored twice) and recomputes the
cheap step in backward. The attachment is checked against the tensor's version
counter, so an output modified in place is quantized afresh.

Rebuild functions never capture tensors (only shapes, flags and other
functions); all tensors travel through ``save_for_backward``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from .. import quant
from ..config import MesaConfig, QuantSpec

Tensor = torch.Tensor

_KEPT_ATTR = "_mesa_kept"


@dataclass(frozen=True)
class Saved:
    tensors: Tuple[Optional[Tensor], ...]
    rebuild: Callable[[Sequence[Optional[Tensor]]], Tensor]


@dataclass(frozen=True)
class _Kept:
    saved: Saved
    version: int


class AutocastState:
    """The autocast state an op ran under, replayed when it is recomputed."""

    __slots__ = ("device_type", "enabled", "dtype")

    def __init__(self, device_type: str) -> None:
        self.device_type = device_type
        try:
            self.enabled = torch.is_autocast_enabled(device_type)
            self.dtype = torch.get_autocast_dtype(device_type) if self.enabled else None
        except (RuntimeError, TypeError):  # a device type autocast does not know
            self.enabled, self.dtype = False, None

    def __call__(self):
        if not self.enabled:
            return torch.autocast(self.device_type, enabled=False)
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=True)


class RangeStates:
    """Running range estimates of an op's kept inputs, one per input slot."""

    def __init__(self) -> None:
        self.slots: Dict[Any, quant.RunningRange] = {}

    def get(self, spec: QuantSpec, slot: Any) -> Optional[quant.RunningRange]:
        if not spec.running:
            return None
        r = self.slots.get(slot)
        if r is None or r.momentum != spec.momentum:
            r = self.slots[slot] = quant.RunningRange(spec.momentum)
        return r

    def reset(self) -> None:
        self.slots.clear()


def as_spec(config: Union[None, MesaConfig, QuantSpec]) -> Optional[QuantSpec]:
    """A functional op's ``config`` argument as a spec (``None``: default config)."""
    if config is None:
        return MesaConfig().resolve("")
    if isinstance(config, MesaConfig):
        return config.resolve("")
    if isinstance(config, QuantSpec):
        return config
    raise TypeError(
        f"config must be a MesaConfig or None, got {type(config).__name__}"
    )


def needs_saving(*tensors: Optional[Tensor]) -> bool:
    """True when autograd will record this op (else run it plainly: no cost)."""
    if not torch.is_grad_enabled():
        return False
    return any(t is not None and t.requires_grad for t in tensors)


def _rebuild_quantized(tensors: Sequence[Tensor], layout: quant.Layout) -> Tensor:
    return quant.expand(tuple(tensors), layout)


def _identity(tensors: Sequence[Tensor]) -> Tensor:
    return tensors[0]


def exact(x: Optional[Tensor]) -> Saved:
    """Keep ``x`` as it is (parameters, masks)."""
    return Saved((x,), _identity)


def keep(
    x: Tensor,
    spec: QuantSpec,
    *,
    heads: bool = False,
    rows: bool = False,
    running: Optional[quant.RunningRange] = None,
) -> Saved:
    """How to keep input ``x``: the producer's attachment if it has a valid one,
    else a quantized copy. ``heads``: ``x`` has a head dimension at -3
    (``(B, H, N, D)``) and, with ``spec.head_wise``, gets one range per head.
    ``rows``: quantize each row relative to its own centre and width (inputs
    of normalisation layers, which would amplify the error of small rows)."""
    if isinstance(x, torch.nn.Parameter):
        return exact(x)
    kept = kept_of(x) if spec.keep_once else None
    if kept is not None:
        return kept
    if heads and spec.head_wise and x.dim() >= 3:
        # Ranges never shared across heads; within a head, group_size channels
        # share one (None: one range per head, Mesa's original choice).
        axes = (x.dim() - 3, x.dim() - 1)
        group_size = spec.group_size if spec.group_size is not None else max(1, x.shape[-1])
    else:
        axes, group_size = (-1,), spec.group_size
    tensors, layout = quant.compress(
        x, spec.bits, axes, group_size, spec.stochastic, running, spec.kernel, rows=rows and x.dim() >= 1
    )
    return Saved(tensors, functools.partial(_rebuild_quantized, layout=layout))


def kept_of(x) -> Optional[Saved]:
    """The valid rebuild recipe attached to ``x``, if any."""
    kept = getattr(x, _KEPT_ATTR, None) if isinstance(x, torch.Tensor) else None
    if kept is not None and kept.version == x._version:
        return kept.saved
    return None


def mark_kept(out: Tensor, saved: Saved) -> Tensor:
    """Attach to ``out`` how to rebuild it from what its producer keeps."""
    setattr(out, _KEPT_ATTR, _Kept(saved, out._version))
    return out


def _then(tensors, *, inner, n_inner, step, autocast):
    x = inner(tensors[:n_inner])
    with autocast():
        return step(x, *tensors[n_inner:])


def derived(
    inner: Saved, step: Callable[..., Tensor], extra: Sequence[Optional[Tensor]], autocast: AutocastState
) -> Saved:
    """A ``Saved`` that rebuilds ``step(inner, *extra)``: the output of a cheap
    op from what that op keeps of its input. ``step`` must be a function of
    its arguments only (a module-level function or a partial of one)."""
    rebuild = functools.partial(
        _then, inner=inner.rebuild, n_inner=len(inner.tensors), step=step, autocast=autocast
    )
    return Saved(tuple(inner.tensors) + tuple(extra), rebuild)


def _rebuild_pair(tensors, *, a, n_a, b, combine):
    return combine(a(tensors[:n_a]), b(tensors[n_a:]))


def combined(a: Saved, b: Saved, combine: Callable[[Tensor, Tensor], Tensor]) -> Saved:
    """A ``Saved`` that rebuilds ``combine(a, b)`` from what ``a`` and ``b`` keep
    (a gated product, a product, attention scores ``q @ k^T``)."""
    rebuild = functools.partial(_rebuild_pair, a=a.rebuild, n_a=len(a.tensors), b=b.rebuild, combine=combine)
    return Saved(tuple(a.tensors) + tuple(b.tensors), rebuild)


def save(ctx, *items: Saved) -> None:
    tensors: List[Optional[Tensor]] = []
    plan = []
    for item in items:
        plan.append((len(item.tensors), item.rebuild))
        tensors.extend(item.tensors)
    ctx.save_for_backward(*tensors)
    ctx.mesa_plan = plan


def no_double_backward() -> None:
    """Backward runs with autograd recording only under ``create_graph=True``.
    The rebuilt inputs are not connected to the originals, so a second
    derivative would be silently wrong: refuse it instead."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            "torch-mesa: double backward (create_graph=True) through a converted layer is not "
            "supported, since its inputs are kept compressed; keep the layers involved exact "
            "(MesaConfig(policy={pattern: None})) or call torch_mesa.restore_(model)"
        )


def load(ctx) -> List[Optional[Tensor]]:
    no_double_backward()
    tensors = ctx.saved_tensors
    out = []
    i = 0
    for n, rebuild in ctx.mesa_plan:
        out.append(rebuild(tensors[i : i + n]))
        i += n
    return out


def grad_by_recompute(
    fn: Callable[..., Tensor],
    inputs: Sequence[Optional[Tensor]],
    needs: Sequence[bool],
    grad_out: Tensor,
    autocast: AutocastState,
) -> List[Optional[Tensor]]:
    """Gradients of ``fn(*inputs)`` for the inputs with ``needs``: the op is run
    again on the rebuilt inputs under its original autocast state, and
    autograd differentiates it (cheap ops only: norms, softmax, attention)."""
    with torch.enable_grad():
        # Parameters are differentiated as themselves: a module's own forward
        # (see ops.recompute) reaches them through its attributes.
        leaves = [
            t
            if (t is None or not n or isinstance(t, torch.nn.Parameter))
            else t.detach().requires_grad_(True)
            for t, n in zip(inputs, needs)
        ]
        with autocast():
            out = fn(*leaves)
        wrt = [leaf for leaf, n in zip(leaves, needs) if n and leaf is not None]
        grads = iter(torch.autograd.grad(out, wrt, grad_out, allow_unused=True)) if wrt else iter(())
    return [next(grads) if (n and t is not None) else None for t, n in zip(inputs, needs)]


def run_with_kept(fn_cls, *args) -> Tensor:
    """``fn_cls.apply(*args)``, then attach to the output the ``Saved`` its
    forward left in ``ctx.mesa_out`` (the ctx is the output's ``grad_fn``)."""
    out = fn_cls.apply(*args)
    ctx = out.grad_fn
    saved = getattr(ctx, "mesa_out", None) if ctx is not None else None
    if saved is not None:
        del ctx.mesa_out
        mark_kept(out, saved)
    return out
