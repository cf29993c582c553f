"""Model families: which of their own module classes map to which torch-mesa op.

Everything standard is handled generically (``torch.nn`` layers by class,
functional calls by routing, see :mod:`torch_mesa.routing`). What is left
are a family's *own* layer classes; each family has a small declarative table
(:mod:`.transformers`, :mod:`.timm`) of :class:`Rule` entries naming a class
by its module and name and the kind of op it is:

* ``"norm"``: a normalisation of its input over the last dimension (its own
  ``forward`` is run exactly and recomputed in backward; the input is kept
  compressed relative to each row): ``LlamaRMSNorm``, timm ``LayerNorm``...
* ``"unary"``: a parameterless elementwise activation (same, without row
  normalisation): ``NewGELUActivation``, timm ``QuickGELU``...
* ``"linear_t"``: a linear layer with an ``(in, out)`` weight and a bias,
  like GPT-2's ``Conv1D`` (its own forward gives the output).
* ``"linear"``: an ``nn.Linear`` subclass whose own forward computes the
  same product its own way (Falcon's ``FalconLinear``).

Converting such a module installs a forward (an instance attribute, removed
by ``restore_``): the class, the parameters and the ``state_dict`` stay as
they are. Subclasses of ``nn.LayerNorm``/``nn.RMSNorm`` and of
``nn.GELU``/``nn.SiLU`` that bring their own forward are treated as
``"norm"``/``"unary"`` without a table entry.

The tables import nothing: a rule matches on ``type(m).__module__`` and
``type(m).__name__``, so timm and transformers are never imported here.
"""

from __future__ import annotations

import fnmatch
import functools
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import nn

from .. import ops
from ..routing.scope import inside_converted_model

__all__ = ["Rule", "RULES", "match", "install", "uninstall", "Forward"]


@dataclass(frozen=True)
class Rule:
    module_prefix: str  # prefix of type(m).__module__
    class_pattern: str  # fnmatch pattern on type(m).__name__
    kind: str  # "norm" | "unary" | "linear" | "linear_t"
    family: str = ""


# torch.nn's smooth activations beyond GELU/SiLU (which convert by class):
# their forward is run exactly and recomputed in backward from the kept
# input. Piecewise ones with kinks must not be recomputed from a quantized
# input (near a kink it takes the wrong branch: LeViT's stem gave cosine
# 0.9989 that way): ReLU6, Hardswish, Hardsigmoid and LeakyReLU have ops of
# their own that keep which piece applies exactly (nn.modules); Hardtanh
# stays exact.
_TORCH_ACTIVATIONS = tuple(
    Rule("torch.nn.modules.activation", name, "unary", "torch.nn")
    for name in ("Sigmoid", "Tanh", "Mish", "ELU", "CELU", "SELU", "Softplus")
)


def _rules() -> Tuple[Rule, ...]:
    from . import timm as _timm
    from . import transformers as _transformers

    return _transformers.RULES + _timm.RULES + _TORCH_ACTIVATIONS


RULES: Tuple[Rule, ...] = ()
_EXCLUDE: Tuple[Tuple[str, str], ...] = ()


def _generic_kind(module: nn.Module) -> Optional[str]:
    """Subclasses of standard norms/activations that bring their own forward."""
    for base, kind in _GENERIC:
        if isinstance(module, base) and type(module).forward is not base.forward:
            return kind
    return None


_GENERIC = tuple(
    (base, kind)
    for base, kind in ((nn.LayerNorm, "norm"), (getattr(nn, "RMSNorm", None), "norm"),
                       (nn.GELU, "unary"), (nn.SiLU, "unary"))
    if base is not None
)


def match(module: nn.Module) -> Optional[Tuple[str, str]]:
    """``(kind, family)`` of a module a table or a generic rule converts, or None."""
    global RULES, _EXCLUDE
    if not RULES:
        from . import transformers as _transformers

        RULES = _rules()
        _EXCLUDE = _transformers.EXCLUDE
    cls = type(module)
    mod, name = cls.__module__, cls.__name__
    if any(mod.startswith(p) and fnmatch.fnmatchcase(name, c) for p, c in _EXCLUDE):
        return None
    for rule in RULES:
        if mod.startswith(rule.module_prefix) and fnmatch.fnmatchcase(name, rule.class_pattern):
            if rule.kind == "unary" and any(True for _ in module.parameters(recurse=False)):
                return None  # an activation with parameters is not elementwise-only
            if getattr(module, "inplace", False):
                return None  # it would overwrite the input it keeps: left exact
            return rule.kind, rule.family
    kind = _generic_kind(module)
    return (kind, "torch.nn subclass") if kind else None


def _module_forward(x, *params, forward):
    return forward(x)


class Forward:
    """The forward installed on a converted family module (picklable)."""

    def __init__(self, module: nn.Module, kind: str) -> None:
        self.module = module
        self.kind = kind

    # run as Python under torch.compile: a norm or activation, one graph break
    # (see ops.saving.OpFunction)
    @torch._dynamo.disable
    def __call__(self, *args, **kwargs):
        m = self.module
        original = type(m).forward.__get__(m)
        if len(args) != 1 or kwargs or not inside_converted_model():
            # other arguments, or a module object shared with a model nobody
            # converted (transformers' module-level activations): as it is
            return original(*args, **kwargs)
        (x,) = args
        spec, states = m.mesa_spec, m.mesa_states
        if self.kind in ("linear", "linear_t"):
            return ops.linear(x, m.weight, m.bias, config=spec, states=states, forward_fn=original,
                              transposed=self.kind == "linear_t")
        fn = functools.partial(_module_forward, forward=original)
        params = [p for p in m.parameters(recurse=False)]
        return ops.recompute(fn, x, params, rows=self.kind == "norm", config=spec, states=states)


def install(module: nn.Module, kind: str, spec) -> None:
    module.mesa_spec = spec
    module.mesa_states = ops.RangeStates()
    module.forward = Forward(module, kind)


def uninstall(module: nn.Module) -> bool:
    fwd = module.__dict__.get("forward")
    if not isinstance(fwd, Forward):
        return False
    for attr in ("forward", "mesa_spec", "mesa_states"):
        module.__dict__.pop(attr, None)
    return True
