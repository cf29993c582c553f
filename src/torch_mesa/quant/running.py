"""Running range estimates (Mesa's moving averages) and where they live.

A :class:`RunningRange` is the estimate of one kept tensor: an exponential
moving average of its per-group min and range. :class:`RangeStates` holds
one per input slot of an op ("input", "q", "gate"...); converted modules and
the routing scope own them. Neither is in a ``state_dict`` (checkpoints stay
plain).

Once per training step. An estimate is updated by the forward that keeps a
tensor. A forward recomputed during backward (activation checkpointing) uses
the estimate without updating it, *unless* the step's own forward never kept
anything: reentrant checkpointing runs the first forward without grad, so
there the recompute is the only forward that keeps, and it updates.
"""

from __future__ import annotations

import functools
from typing import Any, Dict, Optional, Tuple

import torch

Tensor = torch.Tensor

__all__ = ["RunningRange", "RangeStates"]


def in_backward() -> bool:
    """True while autograd's engine runs a backward pass on this thread."""
    graph_task = getattr(torch._C, "_current_graph_task_id", None)
    return graph_task is not None and graph_task() != -1


class RunningRange:
    """Mesa's running range estimate of one saved tensor: an exponential moving
    average of the per-group min and range. Updated without host
    synchronisation; a step whose statistics are not finite leaves the
    estimate unchanged.
    """

    __slots__ = ("lo", "span", "momentum", "updated_in_forward")

    def __init__(self, momentum: float) -> None:
        self.lo: Optional[Tensor] = None
        self.span: Optional[Tensor] = None
        self.momentum = momentum
        # True between a forward that updated the estimate and the backward
        # that follows it (see the module docstring).
        self.updated_in_forward = False

    def plan(self, groups: int, device) -> Tuple[str, Tensor, Tensor, Tensor]:
        """What this step does with the estimate, for ``groups`` ranges on
        ``device``: ``("update", lo, span, momentum)`` (a moving-average step;
        the first step, or a new layout, starts from zeros with momentum 0,
        which gives this step's statistics exactly) or ``("use", lo, span,
        momentum)`` (a forward recomputed during backward after a forward
        that updated: use, do not update). ``momentum`` is a 0-dim fp32
        tensor: one compiled quantizer serves every momentum and the first
        step. :func:`step` computes it; :meth:`commit` stores the update."""
        fresh = self.lo is None or tuple(self.lo.shape) != (groups,) or self.lo.device != torch.device(device)
        backward = in_backward()
        if not fresh and backward and self.updated_in_forward:
            self.updated_in_forward = False
            return "use", self.lo, self.span, _momentum(self.momentum, device)
        self.updated_in_forward = not backward
        if fresh:
            zeros = torch.zeros(groups, dtype=torch.float32, device=device)
            return "update", zeros, zeros, _momentum(0.0, device)
        return "update", self.lo, self.span, _momentum(self.momentum, device)

    def commit(self, lo: Tensor, span: Tensor) -> None:
        self.lo, self.span = lo, span

    def reset(self) -> None:
        self.lo = self.span = None
        self.updated_in_forward = False


def _momentum(m: float, device) -> Tensor:
    return _momentum_on(float(m), torch.device(device))


@functools.lru_cache(maxsize=64)
def _momentum_on(m: float, device: torch.device) -> Tensor:
    # (fp32 as a Python float multiplying an fp32 tensor would be; 1 - m
    # is taken from it, as the reference and the compiled path both do.
    # Made once per value and device, not per keep: on a GPU each would be
    # a copy from the host. Never changed in place.)
    return torch.tensor(m, dtype=torch.float32, device=device)


def step(mode: str, momentum: Tensor, cur_lo: Tensor, cur_hi: Tensor, lo: Tensor, span: Tensor):
    """One step of a running estimate (a pure function: the fused quantizer
    compiles it with the rest). Returns ``(lo, hi, new)``: the range to
    quantize with, and the new ``(lo, span)`` estimate (empty for "use").
    A step whose statistics are not finite leaves the estimate unchanged,
    and its non-finite groups keep their own range, so NaN/Inf reaches the
    gradient instead of being replaced by in-range values."""
    cur_span = cur_hi - cur_lo
    ok = torch.isfinite(cur_lo) & torch.isfinite(cur_span)
    new: Tuple[Tensor, ...] = ()
    if mode == "update":
        keep = 1 - momentum
        lo = torch.where(ok, momentum * lo + keep * cur_lo, lo)
        span = torch.where(ok, momentum * span + keep * cur_span, span)
        new = (lo, span)
    return torch.where(ok, lo, cur_lo), torch.where(ok, lo + span, cur_hi), new


class RangeStates:
    """Running range estimates of an op's kept inputs, one per input slot."""

    def __init__(self) -> None:
        self.slots: Dict[Any, RunningRange] = {}

    def get(self, spec, slot: Any) -> Optional[RunningRange]:
        """The estimate of ``slot`` under ``spec`` (a QuantSpec); None for
        dynamic ranges."""
        if not spec.running:
            return None
        r = self.slots.get(slot)
        if r is None or r.momentum != spec.momentum:
            r = self.slots[slot] = RunningRange(spec.momentum)
        return r

    def reset(self) -> None:
        self.slots.clear()
