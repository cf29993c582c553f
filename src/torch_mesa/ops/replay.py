"""Running an op again in backward, under the conditions of its forward.

Norms, softmax and attention are differentiated by running them again on the
rebuilt inputs and letting autograd differentiate that
(:func:`grad_by_recompute`). The rerun must see what the forward saw: the
autocast state (:class:`AutocastState`) and, for attention dropout, the
random state (:class:`RngReplay`).
"""

from __future__ import annotations

import contextlib
from typing import Callable, List, Optional, Sequence

import torch

Tensor = torch.Tensor


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
            try:
                on = torch.is_autocast_enabled(self.device_type)
            except (RuntimeError, TypeError):  # a device type autocast does not know
                on = True
            if not on:
                return contextlib.nullcontext()  # (off already: entering autocast costs ~10 us of Python)
            try:
                return torch.autocast(self.device_type, enabled=False)
            except (RuntimeError, TypeError):  # (no autocast for it at all, e.g. "meta": nothing to turn off)
                return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=True)


class RngReplay:
    """The generator state a forward with dropout started from."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        if device.type == "cuda":
            self.state = torch.cuda.get_rng_state(device)
        else:
            self.state = torch.get_rng_state()

    def __enter__(self):
        devices = [self.device] if self.device.type == "cuda" else []
        self._fork = torch.random.fork_rng(devices=devices)
        self._fork.__enter__()
        if self.device.type == "cuda":
            torch.cuda.set_rng_state(self.state, self.device)
        else:
            torch.set_rng_state(self.state)

    def __exit__(self, *exc):
        return self._fork.__exit__(*exc)


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
