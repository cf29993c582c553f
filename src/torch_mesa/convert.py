"""compress_ / restore_: convert a model in place, and back.

``compress_`` walks the model once. Each standard layer with a torch-mesa op
(Linear, LayerNorm, RMSNorm, GELU, SiLU, Softmax, Dropout) has its class
switched to the converted subclass (same object, same Parameters, same hooks:
``state_dict`` keys and tensors are unchanged). A model family's own norm,
activation and linear classes listed in :mod:`torch_mesa.integrations` get a
converted forward instead (an instance attribute; the class stays). Every other module gets the
forward hooks of a :class:`~torch_mesa.routing.Scope`, which routes the
functional calls it makes (attention, ``F.linear``...) to the same ops. The
returned :class:`ConversionReport` says what was converted, what was left
exact and why; converting nothing warns.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

from torch import nn

from . import integrations
from .integrations import causal_lm
from .config import MesaConfig
from .routing import Scope
from .nn.modules import CONVERTIBLE, MesaModule
from .ops import RangeStates

__all__ = ["ConversionReport", "compress_", "config_of", "restore_", "is_compressed"]

_SCOPE_ATTR = "_mesa_scope"
_ORIGINAL_CLASS = "_mesa_original_class"


@dataclass
class ConversionReport:
    """What :func:`compress_` did.

    Attributes:
        converted: ``(name, original type, bits)`` of each converted layer.
        skipped: ``(name, type, reason)`` of each layer left exact.
        unmatched_patterns: policy patterns that matched no module name.
        routed_modules: modules whose functional calls (attention, ``F.*``)
            are routed to torch-mesa ops while autograd records.
        plan: what happens to every module, by qualified name (``""`` is the
            model itself): ``"converted (8 bits)"``, ``"routes its calls (8
            bits)"``, ``"exact: kept exact by policy"``... (:meth:`table`).
        fused_losses: causal LMs whose head and loss run as one
            :func:`~torch_mesa.ops.linear_cross_entropy` in calls with labels
            (see :mod:`torch_mesa.integrations.causal_lm`); the plan says why
            any other causal LM keeps its own.
    """

    converted: List[Tuple[str, str, int]] = field(default_factory=list)
    skipped: List[Tuple[str, str, str]] = field(default_factory=list)
    unmatched_patterns: List[str] = field(default_factory=list)
    routed_modules: int = 0
    plan: Dict[str, str] = field(default_factory=dict)
    fused_losses: List[str] = field(default_factory=list)

    def table(self) -> str:
        """One line per module: its name, type and what happens to it."""
        width = max([len(n) for n in self.plan] + [8])
        return "\n".join(f"{n or '<root>':<{width}}  {what}" for n, what in self.plan.items())

    @property
    def num_converted(self) -> int:
        return len(self.converted)

    def counts(self) -> dict:
        out: dict = {}
        for _, kind, _ in self.converted:
            out[kind] = out.get(kind, 0) + 1
        return out

    def __str__(self) -> str:
        lines = [f"torch-mesa: converted {self.num_converted} layers"]
        for kind, n in sorted(self.counts().items()):
            lines.append(f"  {kind:<12} {n}")
        bits = sorted({b for _, _, b in self.converted})
        if bits:
            lines.append(f"  bits: {', '.join(map(str, bits))}")
        lines.append(
            f"  functional calls (attention, F.*) routed inside {self.routed_modules} other modules"
        )
        for name in self.fused_losses:
            lines.append(f"  head and loss of {name or '<root>'}: fused, logits never kept (calls with labels)")
        for name, what in self.plan.items():
            if "head and loss are the model's own" in what:
                lines.append(f"  {name or '<root>'}: {what.split('; ', 1)[-1]}")
        exact_scopes = [n for n, what in self.plan.items() if what.endswith("routes no call (exact by policy)")]
        if exact_scopes:
            lines.append(f"kept exact by policy with every call inside: {len(exact_scopes)} modules")
            for name in exact_scopes[:10]:
                lines.append(f"  {name or '<root>'}")
            if len(exact_scopes) > 10:
                lines.append(f"  ... and {len(exact_scopes) - 10} more (report.table() lists every module)")
        if self.skipped:
            lines.append(f"left exact: {len(self.skipped)}")
            for name, kind, reason in self.skipped[:20]:
                lines.append(f"  {name or '<root>'} ({kind}): {reason}")
            if len(self.skipped) > 20:
                lines.append(f"  ... and {len(self.skipped) - 20} more")
        for p in self.unmatched_patterns:
            lines.append(f"policy pattern {p!r} matched no module")
        lines.append("measure the bytes kept for backward with torch_mesa.measure(model, inputs)")
        return "\n".join(lines)


def _converted_layer(m: nn.Module) -> bool:
    return isinstance(m, MesaModule) or isinstance(m.__dict__.get("forward"), integrations.Forward)


def is_compressed(model: nn.Module) -> bool:
    """True for a model (or part of one) converted by :func:`compress_`. A
    layer object shared with another converted model (transformers'
    module-level activation instances) does not make a model converted."""
    return _converted_layer(model) or any(hasattr(m, _SCOPE_ATTR) for m in model.modules())


def config_of(model: nn.Module) -> Optional[MesaConfig]:
    """The :class:`MesaConfig` ``model`` was converted with (None: not converted)."""
    scope = getattr(model, _SCOPE_ATTR, None)
    return scope.config if scope is not None else None


class _SavePretrained:
    """Installed as ``save_pretrained`` on a converted model that has one
    (Hugging Face, peft): saves as before, then writes the torch-mesa config
    (and running estimates) beside the weights (:mod:`torch_mesa.checkpoint`)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, save_directory, *args, **kwargs):
        out = type(self.model).save_pretrained(self.model, save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            from .checkpoint import save_conversion

            save_conversion(self.model, str(save_directory))
        return out


def compress_(
    model: nn.Module,
    config: Optional[MesaConfig] = None,
    *,
    filter_fn: Optional[Callable[[nn.Module, str], bool]] = None,
) -> ConversionReport:
    """Convert ``model`` in place to keep activations compressed for backward.

    Args:
        model: any ``nn.Module``.
        config: a :class:`MesaConfig` (default: 8 bits, head-wise attention).
        filter_fn: ``filter_fn(module, name) -> bool``; modules for which it
            returns False are left exact (their functional calls too).

    Returns:
        A :class:`ConversionReport`.

    Raises:
        TypeError: ``model`` is not a module or ``config`` not a MesaConfig.
        ValueError: ``model`` is already converted (call ``restore_`` first).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"compress_ expects an nn.Module, got {type(model).__name__}")
    if config is None:
        config = MesaConfig()
    if not isinstance(config, MesaConfig):
        raise TypeError(
            f"config must be a torch_mesa.MesaConfig, got {type(config).__name__}; "
            "e.g. compress_(model, MesaConfig(bits=4))"
        )
    if is_compressed(model):
        raise ValueError(
            "this model is already converted by torch-mesa; call torch_mesa.restore_(model) "
            "before converting it again with another config"
        )

    report = ConversionReport()
    names = dict(model.named_modules(remove_duplicate=True))
    used_patterns = set()
    hooked = {}
    filtered: List[str] = []
    for name, module in names.items():
        used_patterns.update(config.matching_patterns(name))
        kind = type(module)
        tag = f"{kind.__name__}: "
        if filter_fn is not None and not filter_fn(module, name):
            filtered.append(name)
            if kind in CONVERTIBLE or not list(module.children()):
                report.skipped.append((name, kind.__name__, "filter_fn returned False"))
            hooked[module] = name
            report.plan[name] = tag + "exact (filter_fn returned False); routes no call"
            continue
        if _converted_layer(module):
            # one layer object in two models, converted with the other one
            # (it compresses whenever a converted model runs it)
            report.plan[name] = tag + "converted already, as part of another model that shares this object"
            continue
        spec = config.resolve(name)
        target = CONVERTIBLE.get(kind)
        if target is not None and issubclass(kind, nn.modules.batchnorm._BatchNorm) and (
                spec is None or not spec.batch_norm):
            target = None  # batch norms convert on request only (MesaConfig.batch_norm)
        family = integrations.match(module) if target is None else None
        if target is None and family is None:
            # Its functional calls are routed with its own spec (or none).
            hooked[module] = name
            calls = "routes no call (exact by policy)" if spec is None else f"routes its calls ({spec.bits} bits)"
            report.plan[name] = tag + calls
            base = next((b for b in CONVERTIBLE if isinstance(module, b)), None)
            if base is not None and kind.forward is base.forward and spec is not None \
                    and not isinstance(module, nn.modules.batchnorm._BatchNorm):
                # Not left exact: the base class's forward makes one call
                # (F.linear), which is routed. (MultiheadAttention's out_proj,
                # such a subclass, is never called at all: the attention
                # uses its weight in a routed F.linear.)
                report.plan[name] = tag + f"not converted as a layer (a subclass of nn.{base.__name__}); " + calls
            elif not list(module.children()) and _worth_listing(module):
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    reason = "batch norms convert with MesaConfig(batch_norm=True) only (see its docstring)"
                elif base is not None:
                    reason = f"subclass of nn.{base.__name__} with its own forward"
                else:
                    reason = "no torch-mesa op for this layer type"
                report.skipped.append((name, kind.__name__, reason))
                report.plan[name] = tag + f"exact ({reason}); " + calls
            continue
        if spec is None:
            # Hooked too: the calls its forward makes (F.linear inside
            # nn.Linear) must not be routed with an enclosing module's spec.
            hooked[module] = name
            report.skipped.append((name, kind.__name__, "kept exact by policy"))
            report.plan[name] = tag + "exact (kept exact by policy); routes no call"
            continue
        report.plan[name] = tag + f"converted ({spec.bits} bits)"
        if target is not None:
            setattr(module, _ORIGINAL_CLASS, kind)
            module.__class__ = target
            module.mesa_spec = spec
            module.mesa_states = RangeStates()
            if getattr(target, "exact_in_place", False) and getattr(module, "inplace", False):
                reason = "inplace=True: PyTorch's own op, in place (docs/design.md, \"What an op keeps: recipes\")"
                report.plan[name] = tag + f"exact ({reason})"
                report.skipped.append((name, kind.__name__, reason))
                continue
        else:
            integrations.install(module, family[0], spec)
        report.converted.append((name, kind.__name__, spec.bits))

    _fuse_losses(names, config, report, filtered)

    # The model itself always opens the scope, converted layer or not: its
    # converted layers compress only while a converted model runs.
    hooked.setdefault(model, "")
    scope = Scope(config, hooked, exact=tuple(filtered))
    object.__setattr__(model, _SCOPE_ATTR, scope)
    if callable(getattr(type(model), "save_pretrained", None)):
        object.__setattr__(model, "save_pretrained", _SavePretrained(model))
    report.routed_modules = len(hooked)
    report.unmatched_patterns = [p for p, _ in config.policy if p not in used_patterns]
    for p in report.unmatched_patterns:
        warnings.warn(
            f"torch-mesa: policy pattern {p!r} matched no module name "
            "(names look like 'blocks.0.attn.qkv'; see model.named_modules())",
            UserWarning,
            stacklevel=2,
        )
    if not report.converted:
        warnings.warn(
            "torch-mesa: compress_ converted no layer (no nn.Linear/Conv/LayerNorm/RMSNorm/GELU/SiLU/ReLU/"
            "Softmax/Dropout, or all excluded by policy/filter_fn); only functional "
            "calls inside the model's own modules will be compressed",
            UserWarning,
            stacklevel=2,
        )
    return report


def _fuse_losses(names: Dict[str, nn.Module], config: MesaConfig, report: ConversionReport,
                 filtered: List[str]) -> None:
    """Causal LMs of the table get their head and loss fused (unless
    ``fused_loss=False``, or the model is left exact); others say why not."""
    for name, module in names.items():
        rule, reason = causal_lm.match(module)
        if rule is None and not reason:
            continue
        if not config.fused_loss:
            reason = "its head and loss are the model's own: MesaConfig(fused_loss=False)"
        elif name in filtered or config.resolve(name) is None:
            reason = "its head and loss are the model's own: the model is kept exact"
        if rule is None or reason:
            report.plan[name] = report.plan.get(name, "") + "; " + reason
            continue
        causal_lm.install(module, rule)
        report.fused_losses.append(name)
        report.plan[name] = report.plan.get(name, "") + "; head and loss fused (linear_cross_entropy)"


_LISTED_WORDS = ("Norm", "Act", "GELU", "GLU", "Swish", "Attention", "Linear", "Conv1D", "Softmax")


def _worth_listing(module: nn.Module) -> bool:
    """Leaves the report lists as left exact: anything with parameters except
    embeddings (which keep only indices), and parameterless layers that look
    like activations, norms or attention."""
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return False
    if any(True for _ in module.parameters(recurse=False)):
        return True
    cls = type(module)
    return cls.__module__ == "torch.nn.modules.activation" or any(w in cls.__name__ for w in _LISTED_WORDS)


def restore_(model: nn.Module) -> int:
    """Undo :func:`compress_` in place; returns the number of layers restored.

    Raises:
        ValueError: ``model`` was not converted by torch-mesa.
    """
    scope = getattr(model, _SCOPE_ATTR, None)
    converted = [m for m in model.modules() if isinstance(m, MesaModule)]
    if scope is None and not is_compressed(model):
        raise ValueError("restore_: this model was not converted by torch_mesa.compress_")
    families = sum(integrations.uninstall(m) for m in model.modules())
    for m in model.modules():
        causal_lm.uninstall(m)
    if scope is not None:
        scope.remove()
        object.__delattr__(model, _SCOPE_ATTR)
    if isinstance(model.__dict__.get("save_pretrained"), _SavePretrained):
        del model.__dict__["save_pretrained"]
    for module in converted:
        module.__class__ = getattr(module, _ORIGINAL_CLASS)
        for attr in (_ORIGINAL_CLASS, "mesa_spec", "mesa_states"):
            module.__dict__.pop(attr, None)
    return len(converted) + families
