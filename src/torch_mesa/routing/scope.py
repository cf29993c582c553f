"""The routing scope: which module is running, and the mode that routes.

Models compute attention with functions, not modules: ``q @ k.transpose(-2, -1)``,
``F.softmax``, ``F.scaled_dot_product_attention``; many also call
``F.linear``/``F.layer_norm``/``F.gelu`` directly, and gated MLPs multiply two
activations (``act(gate) * up``). The original Mesa made its
users rewrite that code by hand. Here, :func:`compress_` installs a
:class:`Scope` on the model: forward hooks on every module that was not
converted keep a stack of the modules currently running, and while the
outermost one runs with autograd recording, a ``TorchFunctionMode`` routes
those calls (:mod:`.calls`) to the ops in :mod:`torch_mesa.ops`, with the
policy (bits, or exact) of the innermost running module.

Only calls made *directly* in a module's ``forward`` (or helpers it calls) are
routed: calls inside a converted layer, inside PyTorch's own composite
functions (``F.multi_head_attention_forward``), or under ``no_grad`` run as
PyTorch runs them. Running range estimates of routed calls are kept per
(module, call index) on the scope; a module that makes its calls in a
different order from step to step should use dynamic ranges.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch.overrides import TorchFunctionMode

from ..config import MesaConfig, QuantSpec
from ..quant.running import RangeStates
from . import calls

__all__ = ["Scope"]


_HANDLERS: Optional[Dict[Callable, Callable]] = None


class _Frame:
    __slots__ = ("name", "calls")

    def __init__(self, name: str) -> None:
        self.name = name
        self.calls = 0


class _Mode(TorchFunctionMode):
    def __init__(self, scope: "Scope") -> None:
        super().__init__()
        self.scope = scope

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = _HANDLERS.get(func)  # type: ignore[union-attr]
        scope = self.scope
        if handler is not None and scope.stack and torch.is_grad_enabled():
            frame = scope.stack[-1]
            spec = scope.spec_for(frame.name)
            if spec is not None:
                slot = frame.calls
                frame.calls += 1
                states = scope.states_for(frame.name, slot) if spec.running else None
                out = handler(spec, states, args, kwargs)
                if out is not NotImplemented:
                    scope.routed += 1
                    return out
        return func(*args, **kwargs)


class Scope:
    """Routes functional calls of a converted model (see module docstring)."""

    def __init__(
        self,
        config: MesaConfig,
        names: Dict[torch.nn.Module, str],
        exact: Tuple[str, ...] = (),
    ) -> None:
        global _HANDLERS
        if _HANDLERS is None:
            _HANDLERS = calls.handlers()
        self.config = config
        self.stack: List[_Frame] = []
        self.routed = 0  # calls routed so far (for reports and tests)
        # Modules left exact by filter_fn route nothing either.
        self._specs: Dict[str, Optional[QuantSpec]] = {name: None for name in exact}
        self._states: Dict[Tuple[str, int], RangeStates] = {}
        self._mode: Optional[_Mode] = None
        self._handles = []
        for module, name in names.items():
            self._handles.append(module.register_forward_pre_hook(self._make_pre(name)))
            self._handles.append(module.register_forward_hook(self._post, always_call=True))

    def _make_pre(self, name: str):
        return _PreHook(self, name)

    def enter(self, name: str) -> None:
        if not self.stack and torch.is_grad_enabled():
            self._mode = _Mode(self)
            self._mode.__enter__()
        self.stack.append(_Frame(name))

    def _post(self, module, args, output):
        self.exit()
        return None

    def exit(self) -> None:
        if self.stack:
            self.stack.pop()
        if not self.stack and self._mode is not None:
            mode, self._mode = self._mode, None
            mode.__exit__(None, None, None)

    def spec_for(self, name: str) -> Optional[QuantSpec]:
        if name not in self._specs:
            self._specs[name] = self.config.resolve(name)
        return self._specs[name]

    def states_for(self, name: str, slot: int) -> RangeStates:
        key = (name, slot)
        if key not in self._states:
            self._states[key] = RangeStates()
        return self._states[key]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        while self.stack:
            self.exit()

    def __getstate__(self):
        state = self.__dict__.copy()
        state["stack"], state["_mode"] = [], None
        return state


class _PreHook:
    """A picklable forward pre-hook (a closure would not survive torch.save)."""

    def __init__(self, scope: Scope, name: str) -> None:
        self.scope, self.name = scope, name

    def __call__(self, module, args):
        self.scope.enter(self.name)
        return None
