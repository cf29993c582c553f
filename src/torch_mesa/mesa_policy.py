"""Policy files of the original Mesa, read into a :class:`MesaConfig`.

The original Mesa (Pan et al., 2021) turns compression on per layer with a
text file of ``on <tag>:`` sections::

    on gelu:
        by_index: all      # every GELU layer ...
        enable: True       # ... is compressed
        level: 256         # with 256 levels (8 bits)
        ema_decay: 0.9     # running range estimates
        by_index: 1 2      # then GELU layers 1 and 2 ...
        enable: False      # ... are kept exact

:func:`config_from_mesa_policy` (``MesaConfig.from_mesa_policy``) reads such
a file and returns a config whose ``policy`` holds one exact-name entry per
layer of the model that the file speaks for. The semantics follow Mesa's
``read_policy``/``deploy_on_init``; ``docs/mesa_policy.md`` lists every
rule, the mapping of tags onto torch-mesa modules and where the two differ.

The file decides every layer of Mesa's eight tags (a layer it never enables
stays exact, as in Mesa, where converted layers start disabled); ``base``
decides everything Mesa had no tag for (dropout, SiLU, RMSNorm, the calls of
modules that are not attention) and the fields the file does not set.
"""

from __future__ import annotations

import functools
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

from torch import nn

from .config import MesaConfig

__all__ = ["MesaPolicy", "MesaPolicyError", "TAGS", "config_from_mesa_policy", "mesa_layers", "read_mesa_policy"]

#: Mesa's layer tags that name layers (``on <tag>:``).
TAGS = ("fc", "conv", "gelu", "bn", "relu", "softmax", "matmul", "layernorm")
# Tags Mesa's deploy_on_init knows but no Mesa layer carries: sections for
# them never applied to anything.
_LAYERLESS = ("eltwise", "shuffle", "concat", "norm")
# Mesa levels -> torch-mesa bits.
_LEVELS = {256: 8, 16: 4, 4: 2}
# What each Mesa layer's policy update reaches: softmax and matmul layers had
# two quantizers (one per saved operand), the others one.
_SUBS = {"softmax": ("softmax-1", "softmax-2"), "matmul": ("matmul-1", "matmul-2")}
# Attributes of Mesa's quantizer mixin; a policy key naming one of them (or an
# attribute of the layer itself) was set on the layer by Mesa.
_QUANT_ATTRIBUTES = frozenset({
    "enable", "iteration", "quant_groups", "level", "tag", "index", "ema_decay", "clip_val",
    "shift", "args", "string", "repr", "logger", "requires_grad", "verbose", "items",
    "update_quantization_parameter", "forward", "restore", "backward",
})
_TRUE, _FALSE = ("True", "true"), ("False", "false")


class MesaPolicyError(ValueError):
    """A Mesa policy file that cannot be read, or cannot be mapped onto the model."""


# ---------------------------------------------------------------- parsing
@dataclass
class _Setting:
    key: str  # "enable" | "level" | "ema_decay"
    value: Union[bool, int, float]
    line: int


@dataclass
class _Block:
    """One ``by_index`` block: selectors, then the settings that follow."""

    line: int
    by_index: Union[None, str, Tuple[int, ...]] = None  # None, "all" or indices
    index_line: int = 0
    by_tag: Union[None, str, Tuple[str, ...]] = None  # one word (Mesa: substring test) or several
    settings: List[_Setting] = field(default_factory=list)
    has_setting: bool = False  # any non-selector key seen (Mesa's "valid")


@dataclass
class _Section:
    line: int
    blocks: List[_Block] = field(default_factory=list)


@dataclass
class MesaPolicy:
    """A parsed policy file: the section in force for each tag, and the
    warnings reading it gave (Mesa's silent no-ops)."""

    path: str
    sections: Dict[str, _Section]
    warnings: List[str]


@functools.lru_cache(maxsize=None)
def _canonical_layer(tag: str) -> nn.Module:
    """A stand-in for the Mesa layer of ``tag`` (whose attributes a policy key could set)."""
    return {
        "fc": lambda: nn.Linear(1, 1),
        "conv": lambda: nn.Conv2d(1, 1, 1),
        "gelu": nn.GELU,
        "bn": lambda: nn.BatchNorm2d(1),
        "relu": nn.ReLU,
        "layernorm": lambda: nn.LayerNorm(1),
    }.get(tag, nn.Module)()  # softmax/matmul: their quantizers are plain modules


def _mesa_sets(key: str, tag: str) -> bool:
    """True when Mesa's ``update_quantization_parameter`` would have set ``key``
    on a layer of ``tag`` (it sets every key naming an existing attribute)."""
    if key in _QUANT_ATTRIBUTES:
        return True
    if tag == "relu" and key in ("dim", "keep_tensor"):
        return True
    return hasattr(_canonical_layer(tag), key)


def _tokens(value: str) -> List[str]:
    return [t for t in re.split(r"[\s,]+", value) if t]


def read_mesa_policy(path: Union[str, "os.PathLike[str]"]) -> MesaPolicy:
    """Parse a Mesa policy file (no model needed).

    Raises:
        FileNotFoundError: ``path`` is not a file.
        MesaPolicyError: a malformed line, an unknown tag, a value that is
            not what its key takes, or a key Mesa applied that torch-mesa
            cannot (``quant_groups``...), with the file and line.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Mesa policy file not found: {path!r}")
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()

    sections: Dict[str, _Section] = {}
    notes: List[str] = []
    current: Optional[_Section] = None  # the section lines go to
    current_tags: Tuple[str, ...] = ()
    outside = True  # before the first header
    block: Optional[_Block] = None

    def err(line: int, msg: str) -> MesaPolicyError:
        return MesaPolicyError(f"{path}:{line}: {msg}")

    def note(line: int, msg: str) -> None:
        notes.append(f"{path}:{line}: {msg}")

    for lineno, raw in enumerate(lines, 1):
        text = raw.split("#", 1)[0].strip()
        if not text:
            continue
        if text.count(":") != 1:
            raise err(lineno, f"malformed line {raw.strip()!r}: expected 'on <tag>:' or 'key: value' "
                              "(one ':' per line; '#' starts a comment)")
        key, _, value = (s.strip() for s in text.partition(":"))
        words = key.split()
        if "on" in words:  # a section header, as Mesa recognises one
            tags = [w for w in words if w != "on"]
            if not tags:
                raise err(lineno, f"section header {raw.strip()!r} names no layer tag; "
                                  f"expected 'on <tag>:' with a tag among {', '.join(TAGS)}")
            for t in tags:
                if t not in TAGS and t not in _LAYERLESS:
                    hint = f" (tags are lower case: {t.lower()!r})" if t.lower() in TAGS else ""
                    raise err(lineno, f"unknown layer tag {t!r}{hint}; Mesa's tags are {', '.join(TAGS)}")
            if value:
                bad = [t for t in _tokens(value) if not re.fullmatch(r"-?\d+", t)]
                if bad:
                    raise err(lineno, f"section header {raw.strip()!r}: after 'on <tag>:' Mesa takes "
                                      f"epoch numbers (its deploy_on_epoch triggers), got {bad[0]!r}")
                note(lineno, f"epoch triggers {value!r} ignored: they schedule Mesa's deploy_on_epoch, "
                             "which has no torch-mesa counterpart; the section applies from the start")
            current = _Section(lineno)
            current_tags = tuple(t for t in tags if t in TAGS)
            for t in tags:
                if t in _LAYERLESS:
                    note(lineno, f"tag {t!r}: no Mesa layer carries it, so Mesa applied this "
                                 "section to nothing; ignored")
                elif t in sections:
                    note(lineno, f"a second 'on {t}:' section: it replaces the one at line "
                                 f"{sections[t].line} entirely (as Mesa's read_policy does)")
                    sections[t] = current
                else:
                    sections[t] = current
            outside = False
            block = None
            continue
        if len(words) != 1:
            raise err(lineno, f"malformed key {key!r}: keys are one word ('by_index', 'enable', "
                              "'level', 'ema_decay'...), sections start with 'on <tag>:'")
        if outside:
            note(lineno, f"{key!r} is outside any 'on <tag>:' section; ignored (as Mesa does)")
            continue
        if not current_tags:  # a section of layerless tags only: nothing applies
            continue
        if "by_" in key:  # a selector; after a setting, it opens the next block
            if block is None or block.has_setting:
                block = _Block(lineno)
                current.blocks.append(block)
            if key == "by_index":
                if block.by_index is not None:
                    note(lineno, f"by_index replaces the by_index of line {block.index_line} before "
                                 "any setting applied to it (as in Mesa, only the later one counts)")
                block.by_index = _parse_index(value, lambda m: err(lineno, m))
                block.index_line = lineno
            elif key == "by_tag":
                toks = _tokens(value)
                if not toks:
                    raise err(lineno, "by_tag needs a value (e.g. 'by_tag: matmul-1')")
                block.by_tag = toks[0] if len(toks) == 1 else tuple(toks)
            else:
                note(lineno, f"selector {key!r} ignored: Mesa selects layers by 'by_index' "
                             "(and 'by_tag') only")
            continue
        if block is None:
            note(lineno, f"{key!r} comes before the section's first 'by_index'; Mesa ignores it, "
                         "and so does torch-mesa")
            continue
        block.has_setting = True
        if key in ("enable", "level", "ema_decay"):
            block.settings.append(_Setting(key, _parse_value(key, value, lambda m: err(lineno, m)), lineno))
        elif key == "quant_groups":
            raise err(lineno, "quant_groups has no per-layer counterpart in a torch-mesa policy: "
                              "torch-mesa sets how many channels share one range with "
                              "MesaConfig(group_size=..., head_wise=...) (pass it as base=); remove "
                              "this line (see docs/mesa_policy.md, 'Quantization groups')")
        elif any(_mesa_sets(key, t) for t in current_tags):
            raise err(lineno, f"Mesa sets the layer attribute {key!r} from this line; torch-mesa has "
                              "no counterpart for it; remove the line (torch-mesa reads by_index, "
                              "by_tag, enable, level and ema_decay)")
        else:
            note(lineno, f"key {key!r} ignored: Mesa's layers have no such attribute, so Mesa "
                         "ignored it too")

    for tag, sec in sections.items():
        for b in sec.blocks:
            if b.by_index is None and b.has_setting:
                note(b.line, f"'on {tag}:' block without by_index: Mesa applies it to no layer; ignored")
    # One note per line of a section shared by several tags.
    notes = list(dict.fromkeys(notes))
    return MesaPolicy(path, sections, notes)


def _parse_index(value: str, err) -> Union[str, Tuple[int, ...]]:
    toks = _tokens(value)
    if not toks:
        raise err("by_index needs 'all' or layer indices (e.g. 'by_index: 0 3 5')")
    if "all" in toks:
        if len(toks) != 1:
            raise err(f"by_index {value!r}: 'all' stands alone (Mesa matches nothing otherwise)")
        return "all"
    out = []
    for t in toks:
        if not re.fullmatch(r"-?\d+", t):
            raise err(f"by_index {value!r}: {t!r} is not a layer index; use 'all' or integers "
                      "separated by spaces or commas")
        out.append(int(t))
    return tuple(out)


def _parse_value(key: str, value: str, err) -> Union[bool, int, float]:
    toks = _tokens(value)
    if len(toks) != 1:
        raise err(f"{key} takes one value, got {value!r}")
    (v,) = toks
    if key == "enable":
        if v in _TRUE:
            return True
        if v in _FALSE:
            return False
        raise err(f"enable: {v!r} must be True or False")
    if key == "level":
        if not re.fullmatch(r"\d+", v):
            raise err(f"level: {v!r} must be a number of quantization levels (256, 16 or 4)")
        return int(v)
    try:
        return float(v)
    except ValueError:
        raise err(f"ema_decay: {v!r} must be a number in [0, 1) (the weight of the previous "
                  "running estimate, e.g. 0.9)") from None


# ------------------------------------------------------------ the model side
def _linear_family(module: nn.Module) -> bool:
    from . import integrations

    kind = integrations.match(module)
    return kind is not None and kind[0] in ("linear", "linear_t")


def _gelu_like(module: nn.Module) -> bool:
    if isinstance(module, nn.GELU):
        return True
    return "gelu" in type(module).__name__.lower() and not any(True for _ in module.children())


_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _leaf_tag(module: nn.Module) -> Optional[str]:
    if isinstance(module, nn.Linear) or _linear_family(module):
        return "fc"
    if isinstance(module, _CONV):
        return "conv"
    if isinstance(module, _BN):
        return "bn"
    if isinstance(module, nn.ReLU):
        return "relu"
    if isinstance(module, nn.LayerNorm):
        return "layernorm"
    if isinstance(module, nn.Softmax):
        return "softmax"
    if _gelu_like(module):
        return "gelu"
    return None


def _inside(name: str, parent: str) -> bool:
    """``name`` is a module strictly inside the module ``parent``."""
    return (parent == "" and name != "") or name.startswith(parent + ".")


def mesa_layers(model: nn.Module) -> Dict[str, List[str]]:
    """The model's layers of each Mesa tag, in ``model.modules()`` order: the
    qualified name of layer ``i`` of ``tag`` is ``mesa_layers(model)[tag][i]``
    (``by_index: i`` in a policy file).

    * ``fc``: ``nn.Linear`` and its subclasses, and the linear layers of model
      families torch-mesa converts as such (GPT-2's ``Conv1D``).
    * ``conv``: ``nn.Conv1d/2d/3d``; ``bn``: ``nn.BatchNorm1d/2d/3d``;
      ``relu``: ``nn.ReLU``; ``layernorm``: ``nn.LayerNorm`` and subclasses.
    * ``gelu``: ``nn.GELU`` and leaf modules whose class name contains
      "gelu" (any case: transformers' ``GELUActivation``, timm's ``QuickGELU``).
    * attention modules: modules whose class name ends in ``Attention`` and
      that hold no other such module (``BertSelfAttention``, not
      ``BertAttention``). Mesa's ``softmax`` and ``matmul`` layers were
      modules placed inside them; here they are calls the attention module
      makes, routed with its setting.
    * ``softmax``: each ``nn.Softmax`` module, and each attention module that
      holds none (its functional softmax).
    * ``matmul``: two per attention module (``q @ k^T`` at ``2i``, ``attn @
      v`` at ``2i + 1``, as Mesa's DeiT registers its two ``MatMul`` modules);
      both name the attention module.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"mesa_layers expects an nn.Module, got {type(model).__name__}")
    named = list(model.named_modules())
    leaf = {n: _leaf_tag(m) for n, m in named}
    candidates = [n for n, m in named if leaf[n] is None and type(m).__name__.endswith("Attention")]
    attention = [n for n in candidates if not any(_inside(o, n) for o in candidates)]
    softmax_modules = [n for n, t in leaf.items() if t == "softmax"]
    out: Dict[str, List[str]] = {t: [] for t in TAGS}
    attention_set = set(attention)
    for n, _ in named:
        t = leaf[n]
        if t is not None:
            out[t].append(n)
        elif n in attention_set:
            if not any(_inside(s, n) for s in softmax_modules):
                out["softmax"].append(n)
            out["matmul"] += [n, n]
    return out


_ATTENTION_RULE = ("softmax layers are nn.Softmax modules and attention modules (class name ending "
                   "in 'Attention', innermost) without one; matmul layers are two per attention module")


# --------------------------------------------------------------- applying
@dataclass
class _LayerState:
    """One Mesa quantizer: what the policy set on it, with the line that set it."""

    enable: Tuple[bool, int] = (False, 0)  # Mesa layers start disabled
    level: Optional[Tuple[int, int]] = None
    ema_decay: Optional[Tuple[float, int]] = None


def _by_tag_matches(sub: str, by_tag: Union[None, str, Tuple[str, ...]]) -> bool:
    if by_tag is None:
        return True
    return sub in by_tag  # one word: Mesa's substring test; several: membership


_Result = Optional[Tuple[int, Optional[float]]]  # None (exact) or (bits, ema_decay or None)


def _resolve_layer(path: str, tag: str, index: int, subs: Sequence[_LayerState],
                   default_bits: int) -> Tuple[_Result, str]:
    """The setting of one Mesa layer, and a description for messages."""
    if not all(s.enable[0] for s in subs):  # Mesa's softmax/matmul need both quantizers on
        return None, "exact"
    results = []
    for s in subs:
        if s.level is None:
            bits = default_bits
        else:
            level, line = s.level
            if level not in _LEVELS:
                raise MesaPolicyError(
                    f"{path}:{line}: level {level} (for {tag} layer {index}) has no torch-mesa "
                    "counterpart: torch-mesa keeps 8, 4 or 2 bits per value, Mesa's level 256, 16 "
                    "or 4; use one of those, or 'enable: False' to keep the layer exact")
            bits = _LEVELS[level]
        ema = None
        if s.ema_decay is not None:
            ema, line = s.ema_decay
            if not 0.0 <= ema < 1.0:
                raise MesaPolicyError(
                    f"{path}:{line}: ema_decay {ema} (for {tag} layer {index}) must be in [0, 1): "
                    "the weight of the previous running estimate")
        results.append((bits, ema))
    if len(set(results)) > 1:
        raise MesaPolicyError(
            f"{path}: {tag} layer {index}: its two operands ({', '.join(_SUBS[tag])}, set apart "
            f"with by_tag) get different settings {results[0]} and {results[1]} (bits, ema_decay); "
            "torch-mesa keeps both with one setting")
    return results[0], _describe(results[0])


def _describe(result: _Result) -> str:
    if result is None:
        return "exact"
    bits, ema = result
    return f"{bits} bits" + (f", ema_decay {ema}" if ema is not None else "")


def _escape(name: str) -> str:
    """An fnmatch pattern matching exactly ``name`` (the model itself: ``*``,
    which holds for all of it, as its own entry would)."""
    if not name:
        return "*"
    return re.sub(r"([*?\[])", r"[\1]", name)


def config_from_mesa_policy(path: Union[str, "os.PathLike[str]"], model: nn.Module, *,
                            base: Optional[MesaConfig] = None, _stacklevel: int = 2) -> MesaConfig:
    """``MesaConfig.from_mesa_policy``: see its docstring and docs/mesa_policy.md."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"from_mesa_policy needs the model the policy is for (an nn.Module), "
                        f"got {type(model).__name__}")
    if base is None:
        base = MesaConfig()
    if not isinstance(base, MesaConfig):
        raise TypeError(f"base must be a MesaConfig, got {type(base).__name__}")
    policy = read_mesa_policy(path)
    path = policy.path
    notes = list(policy.warnings)
    layers = mesa_layers(model)
    default_bits = base.bits if base.bits is not None else 8

    decided: Dict[str, List[Tuple[str, int, _Result, str]]] = {}
    for tag in TAGS:
        names = layers[tag]
        n = len(names)
        subs = _SUBS.get(tag, (tag,))
        states = [[_LayerState() for _ in subs] for _ in range(n)]
        section = policy.sections.get(tag)
        for block in section.blocks if section is not None else ():
            if block.by_index is None:
                continue
            if block.by_index == "all":
                indices: Sequence[int] = range(n)
                if n == 0 and block.settings:
                    notes.append(f"{path}:{block.index_line}: 'on {tag}:' by_index all: this model "
                                 f"has no {tag} layers; nothing to apply"
                                 + (f" ({_ATTENTION_RULE})" if tag in _SUBS else ""))
            else:
                indices = block.by_index
                bad = [i for i in indices if not 0 <= i < n]
                if bad:
                    have = (f"this model has {n} {tag} layers (indices 0 to {n - 1})" if n
                            else f"this model has no {tag} layers")
                    if tag in _SUBS:
                        have += f"; {_ATTENTION_RULE}"
                    raise MesaPolicyError(
                        f"{path}:{block.index_line}: 'on {tag}:' by_index {bad[0]} is out of range: "
                        f"{have}; torch_mesa.mesa_policy.mesa_layers(model) lists them")
            if not block.settings:
                continue
            chosen = [k for k, s in enumerate(subs) if _by_tag_matches(s, block.by_tag)]
            for i in indices:
                for k in chosen:
                    st = states[i][k]
                    for s in block.settings:
                        setattr(st, s.key, (s.value, s.line))
        for i, name in enumerate(names):
            result, desc = _resolve_layer(path, tag, i, states[i], default_bits)
            decided.setdefault(name, []).append((tag, i, result, desc))

    entries = []
    mixed = []
    for name, _ in model.named_modules():
        if name not in decided:
            continue
        parts = decided[name]
        on = {r for _, _, r, _ in parts if r is not None}
        if len(on) > 1:
            what = "; ".join(f"{t} layer {i}: {d}" for t, i, r, d in parts if r is not None)
            raise MesaPolicyError(
                f"{path}: {name or '<model>'} ({type(model.get_submodule(name)).__name__}) makes the "
                f"calls of several Mesa layers, which torch-mesa keeps with one setting, but the file "
                f"gives them different ones ({what}); give them the same level and ema_decay")
        if not on:
            entries.append((_escape(name), None))
            continue
        (result,) = on
        if any(r is None for _, _, r, _ in parts):
            mixed.append(f"{name or '<model>'} (" + ", ".join(f"{t} {i}: {d}" for t, i, _, d in parts) + ")")
        bits, ema = result
        overrides = {
            "bits": bits,
            "range_estimate": "running" if ema is not None else base.range_estimate,
            "momentum": ema if ema is not None else base.momentum,
        }
        if any(t == "bn" for t, _, r, _ in parts if r is not None):
            overrides["batch_norm"] = True  # Mesa compressed the batch norms the file enables
        entries.append((_escape(name), overrides))
    if mixed:
        notes.append(
            f"{path}: softmax and matmul are calls of one attention module in torch-mesa, kept with "
            f"one setting; the file enables only some of them in {len(mixed)} module(s), which are "
            f"compressed: {'; '.join(mixed[:4])}{' ...' if len(mixed) > 4 else ''}")

    ours = {p for p, _ in entries}
    kept = [(p, o) for p, o in base.policy if p not in ours]
    for msg in notes:
        warnings.warn(f"torch-mesa: Mesa policy {msg}", UserWarning, stacklevel=_stacklevel)
    return base.replace(policy=kept + entries)
