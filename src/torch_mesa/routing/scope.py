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
routed: calls inside a converted layer or under ``no_grad`` run as PyTorch
runs them. PyTorch's composite ``F.multi_head_attention_forward`` (what
``nn.MultiheadAttention``, ``nn.Transformer*`` layers and torchvision's ViT
call) runs its own Python code with the mode on, so the calls inside it are
routed too (:func:`.calls.composite_body`). Running range estimates of routed calls are kept per
(module, call index) on the scope; a module that makes its calls in a
different order from step to step should use dynamic ranges.
"""

from __future__ import annotations

import threading
from typing import Callable, Dict, List, Optional, Tuple

import torch

from ..config import MesaConfig, QuantSpec
from ..quant.running import RangeStates, in_backward
from ..ops.recipes import mark_channels_first
from ..ops.saving import RoutingMode
from . import calls

__all__ = ["Scope"]


_HANDLERS: Optional[Dict[Callable, Callable]] = None
# Layers left unconverted (batch norms by default, convolutions exact by
# policy) whose output is a feature map (N, C, *spatial)
_FEATURE_MAP_LAYERS = (
    torch.nn.modules.conv._ConvNd, torch.nn.modules.batchnorm._NormBase, torch.nn.GroupNorm,
    torch.nn.modules.pooling._MaxPoolNd, torch.nn.modules.pooling._AvgPoolNd,
    torch.nn.modules.pooling._AdaptiveAvgPoolNd, torch.nn.modules.pooling._AdaptiveMaxPoolNd,
)
_running = threading.local()  # how many converted models' forwards run on this thread


def inside_converted_model() -> bool:
    """True while the forward of a model converted by ``compress_`` runs on
    this thread, or a backward pass does (activation checkpointing recomputes
    a layer's forward there, and model families checkpoint ``forward`` with
    the module's hooks outside it). Converted layers compress only then: a
    layer object shared with another, unconverted model (transformers'
    module-level activation instances) runs there exactly as PyTorch runs it."""
    return getattr(_running, "depth", 0) > 0 or in_backward()


class _Frame:
    __slots__ = ("name", "calls")

    def __init__(self, name: str) -> None:
        self.name = name
        self.calls = 0


def _func_name(func) -> str:
    name = getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)
    module = getattr(func, "__module__", None) or ""
    if module.startswith("torch.nn.functional"):
        return f"F.{name}"
    return name if "." in name or not module.startswith("torch") else f"torch.{name}"


class _Mode(RoutingMode):
    def __init__(self, scope: "Scope") -> None:
        super().__init__()
        self.scope = scope

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = _HANDLERS.get(func)  # type: ignore[union-attr]
        if handler is not None and torch.is_grad_enabled():
            out = self._route(handler, func, args, kwargs)
            if out is not _NOT_ROUTED:
                return out
        elif func in calls.COMPOSITES and torch.is_grad_enabled() and self._routes():
            body = calls.composite_body(func)
            if body is not None:
                with self:  # (back on the stack: the calls inside are routed)
                    return body(*args, **kwargs)
        return func(*args, **kwargs)

    def _routes(self) -> bool:
        """Whether calls made now would be routed (a module with a spec runs)."""
        return self._innermost()[1] is not None

    def _innermost(self):
        """The innermost running module's frame and its spec (None, None: none runs)."""
        stack = self.scope.stack
        if not stack:
            return None, None
        return stack[-1], self.scope.spec_for(stack[-1].name)

    # Under torch.compile, Dynamo traces the lines above and stops at this
    # call (one graph break per routed call, as at a converted layer): the
    # routing reads Python state (the stack of running modules, per-module
    # specs and range estimates by name) that a traced graph would guard on
    # and recompile for, module after module.
    @torch._dynamo.disable
    def _route(self, handler, func, args, kwargs):
        scope = self.scope
        frame, spec = self._innermost()
        if spec is None:
            return _NOT_ROUTED
        slot = frame.calls
        frame.calls += 1
        states = scope.states_for(frame.name, slot) if spec.running else None
        out = handler(spec, states, args, kwargs)
        if isinstance(out, calls.Fallback):
            scope.fell_back(frame.name, _func_name(func), out.reason)
            return _NOT_ROUTED
        if out is NotImplemented:
            return _NOT_ROUTED
        scope.routed += 1
        return out


_NOT_ROUTED = object()
# Dynamo inlines __torch_function__ into the user's frame it traces, and at a
# routed call breaks that frame there; the call then enters
# __torch_function__ as a frame of its own, which must not be compiled on its
# own (it would be, once per argument pattern, up to the recompile limit).
_skip_code = getattr(torch._dynamo.eval_frame, "skip_code", None)  # (not in every PyTorch 2.x)
if _skip_code is not None:
    _skip_code(_Mode.__torch_function__.__code__)


class Scope:
    """Routes functional calls of a converted model (see module docstring).

    The stack of running modules and the mode are per thread (threads that
    run one model, as ``nn.DataParallel`` does, each route their own calls).
    ``fallbacks`` counts the routed calls that ran as PyTorch runs them
    because their op was not written for an argument, by
    ``(module, function, reason)``.
    """

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
        self._local = threading.local()
        self.routed = 0  # calls routed so far (for reports and tests)
        self.fallbacks: Dict[Tuple[str, str, str], int] = {}
        # Modules left exact by policy or filter_fn route nothing either.
        self._specs: Dict[str, Optional[QuantSpec]] = {name: None for name in exact}
        self._states: Dict[Tuple[str, int], RangeStates] = {}
        self._handles = []
        for module, name in names.items():
            self._handles.append(module.register_forward_pre_hook(_PreHook(self, name)))
            self._handles.append(module.register_forward_hook(self._post, always_call=True))

    @property
    def stack(self) -> List[_Frame]:
        local = self._local
        try:
            return local.stack
        except AttributeError:
            local.stack, local.mode = [], None
            return local.stack

    def enter(self, name: str) -> None:
        stack = self.stack
        if not stack:
            _running.depth = getattr(_running, "depth", 0) + 1
            if torch.is_grad_enabled():
                mode = _Mode(self)
                mode.__enter__()
                self._local.mode = mode
        stack.append(_Frame(name))

    @torch._dynamo.disable  # (see _Mode._route)
    def _post(self, module, args, output):
        self.exit()
        if isinstance(module, _FEATURE_MAP_LAYERS):
            mark_channels_first(output)  # (N, C, *spatial): see mark_channels_first
        return None

    def exit(self) -> None:
        stack = self.stack
        if not stack:
            return
        stack.pop()
        if not stack:
            _running.depth -= 1
            mode = self._local.mode
            if mode is not None:
                self._local.mode = None
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

    def fell_back(self, module: str, func: str, reason: str) -> None:
        key = (module, func, reason)
        self.fallbacks[key] = self.fallbacks.get(key, 0) + 1

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        while self.stack:
            self.exit()

    def __getstate__(self):
        state = self.__dict__.copy()
        del state["_local"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._local = threading.local()


class _PreHook:
    """A picklable forward pre-hook (a closure would not survive torch.save)."""

    def __init__(self, scope: Scope, name: str) -> None:
        self.scope, self.name = scope, name

    @torch._dynamo.disable  # (see _Mode._route)
    def __call__(self, module, args):
        self.scope.enter(self.name)
        return None
