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

    def update(self, cur_lo: Tensor, cur_hi: Tensor) -> Tuple[Tensor, Tensor]:
        cur_span = cur_hi - cur_lo
        ok = torch.isfinite(cur_lo) & torch.isfinite(cur_span)
        fresh = self.lo is None or self.lo.shape != cur_lo.shape or self.lo.device != cur_lo.device
        backward = in_backward()
        if not fresh and backward and self.updated_in_forward:
            # A forward recomputed during backward (non-reentrant activation
            # checkpointing) after a forward that updated: use, do not update.
            self.updated_in_forward = False
            lo = torch.where(ok, self.lo, cur_lo)
            return lo, torch.where(ok, self.lo + self.span, cur_hi)
        self.updated_in_forward = not backward
        if fresh:
            # First step (or a new layout): start from the current statistics.
            self.lo = torch.where(ok, cur_lo, torch.zeros_like(cur_lo))
            self.span = torch.where(ok, cur_span, torch.zeros_like(cur_span))
        else:
            m = self.momentum
            self.lo = torch.where(ok, m * self.lo + (1 - m) * cur_lo, self.lo)
            self.span = torch.where(ok, m * self.span + (1 - m) * cur_span, self.span)
        # A non-finite group this step gets a non-finite range, so its NaN/Inf
        # reaches the gradient instead of being replaced by in-range values.
        lo = torch.where(ok, self.lo, cur_lo)
        hi = torch.where(ok, self.lo + self.span, cur_hi)
        return lo, hi

    def reset(self) -> None:
        self.lo = self.span = None
        self.updated_in_forward = False


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
