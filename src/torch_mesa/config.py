"""MesaConfig: what to keep for backward, and how compactly.

A config is a frozen, validated recipe that can be logged (``to_dict``), compared
and reloaded (``MesaConfig.from_dict``). ``resolve(name)`` turns it into the
:class:`QuantSpec` of one module: the base fields, then every ``policy`` entry
whose pattern matches the module's qualified name, in the order given (a later
match overrides an earlier one). A policy value of ``None`` keeps that module
exact (not converted at all).
"""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Tuple

__all__ = ["MesaConfig", "QuantSpec"]

_BITS = (8, 4, 2)
_ROUNDING = ("nearest", "stochastic")
_RANGES = ("dynamic", "running")
_KERNELS = ("auto", "compiled", "reference")
# Fields a policy entry may override (all but the policy itself).
_OVERRIDABLE = (
    "bits",
    "group_size",
    "head_wise",
    "rounding",
    "range_estimate",
    "momentum",
    "keep_once",
    "kernel",
    "token_scale",
    "qk_rotation",
    "batch_norm",
)


@dataclass(frozen=True)
class QuantSpec:
    """The resolved settings of one converted module (internal)."""

    bits: int
    group_size: Optional[int]
    head_wise: bool
    stochastic: bool
    running: bool
    momentum: float
    keep_once: bool
    kernel: str
    token_scale: bool = True
    qk_rotation: bool = True
    batch_norm: bool = False


def _check_bits(value: Any, where: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"{where}bits must be an int (8, 4 or 2) or None, got {type(value).__name__} {value!r}"
        )
    if value not in _BITS:
        raise ValueError(
            f"{where}bits={value!r} is not supported; use 8, 4 or 2 "
            "(or None to keep the layer exact)"
        )


def _check_fields(values: Mapping[str, Any], where: str = "") -> None:
    if "bits" in values:
        _check_bits(values["bits"], where)
    if "group_size" in values:
        gs = values["group_size"]
        if gs is not None and (isinstance(gs, bool) or not isinstance(gs, int)):
            raise TypeError(
                f"{where}group_size must be a positive int or None (one range per tensor), "
                f"got {type(gs).__name__} {gs!r}"
            )
        if gs is not None and gs < 1:
            raise ValueError(
                f"{where}group_size={gs!r} must be >= 1 (channels that share one range), "
                "or None for one range per tensor"
            )
    if "head_wise" in values and not isinstance(values["head_wise"], bool):
        raise TypeError(f"{where}head_wise must be True or False, got {values['head_wise']!r}")
    if "rounding" in values:
        r = values["rounding"]
        if r is not None and r not in _ROUNDING:
            raise ValueError(
                f"{where}rounding={r!r} is not supported; use 'nearest', 'stochastic', "
                "or None (nearest at 8 bits, stochastic below)"
            )
    if "range_estimate" in values and values["range_estimate"] not in _RANGES:
        raise ValueError(
            f"{where}range_estimate={values['range_estimate']!r} is not supported; use "
            "'dynamic' (min/max of each tensor) or 'running' (moving average across steps)"
        )
    if "momentum" in values:
        m = values["momentum"]
        if isinstance(m, bool) or not isinstance(m, (int, float)):
            raise TypeError(f"{where}momentum must be a float in [0, 1), got {m!r}")
        if not 0.0 <= float(m) < 1.0:
            raise ValueError(
                f"{where}momentum={m!r} must be in [0, 1): the weight of the old running range "
                "(0.9 keeps 90% of the previous estimate each step)"
            )
    for flag in ("keep_once", "token_scale", "qk_rotation", "batch_norm"):
        if flag in values and not isinstance(values[flag], bool):
            raise TypeError(f"{where}{flag} must be True or False, got {values[flag]!r}")
    if "kernel" in values and values["kernel"] not in _KERNELS:
        raise ValueError(
            f"{where}kernel={values['kernel']!r} is not supported; use 'auto' (compiled when "
            "available), 'compiled' or 'reference' (eager PyTorch)"
        )


def _lineage(name: str) -> Tuple[str, ...]:
    """``"a.b.c"`` -> ``("a", "a.b", "a.b.c")``: a module and those containing it."""
    if not name:
        return ("",)
    parts = name.split(".")
    return tuple(".".join(parts[: i + 1]) for i in range(len(parts)))


@dataclass(frozen=True)
class MesaConfig:
    """How converted layers keep their activations for backward.

    Args:
        bits: 8 (default), 4 or 2 bits per saved value; ``None`` keeps layers exact.
        group_size: channels (along the last dimension) that share one
            quantization range, reduced over all tokens of the batch. The
            default, 1, is one range per channel: it costs 8 bytes per channel
            per tensor and isolates outlier channels. ``None`` means one range
            per tensor (per head for attention tensors).
        head_wise: tensors with a head dimension (attention q, k, v, scores)
            never share a range across heads (Mesa's head-wise quantization);
            within a head, ``group_size`` channels share one.
        rounding: ``"nearest"`` or ``"stochastic"`` (unbiased); ``None`` picks
            nearest at 8 bits and stochastic below.
        range_estimate: ``"dynamic"`` (min/max of the current tensor, per group)
            or ``"running"`` (exponential moving average of per-group min and
            range across steps, as in Mesa). Values outside the range saturate.
        momentum: weight of the previous running estimate (``"running"`` only).
        keep_once: when a converted op's output is what the next converted op
            keeps (LayerNorm -> Linear, GELU -> Linear, softmax -> matmul),
            keep it once and recompute the cheap step in backward.
        kernel: ``"auto"`` (compiled quantizer, falling back to the reference
            with one warning), ``"compiled"`` or ``"reference"``.
        token_scale: before the per-channel ranges apply, scale each channel
            by its largest magnitude (for a token's channels, at most 8
            times their mean magnitude, so that a few massive tokens do not
            set it alone) and then each token (each token of each head for
            attention tensors) by its own: a token much smaller or larger
            than the rest of the batch (a class token, a token with a large
            norm, a start token with massive activations) keeps its
            precision, and so do the others. Costs one bfloat16 (2 bytes) per
            token and tensor (for q, k, v: per token and head). Norm inputs
            are always quantized relative to each token's own centre and
            width.
        qk_rotation: keep attention queries and keys rotated along the head
            dimension by a fixed orthonormal matrix (Hadamard), which leaves
            ``q @ k^T`` unchanged and spreads outlier channels (rotary pairs
            of trained models) over all channels before quantizing; costs one
            head-dim x head-dim product per token and head, no memory.
        batch_norm: convert batch norms too (their input kept per channel,
            the normalisation recomputed in backward). Off by default: a batch
            norm whose output reaches the loss only through a path that
            undoes its scale (ReLU, a depthwise convolution, another batch
            norm: MobileNetV3, EfficientFormerV2, LeViT) has a weight
            gradient that is almost 0, and the rebuilt input's error
            dominates it (cosine 0.09 on MobileNetV3 at initialisation;
            that gradient exists only through the batch norms' eps, and
            ``verify`` reports such parameters apart, "~0 (eps)");
            elsewhere (ResNets) gradients stay within cosine 0.9999. Turn it
            on for CNNs where ``verify`` says so: it is most of their bytes.
        fused_loss: Hugging Face causal LMs of the families in
            :mod:`torch_mesa.integrations.causal_lm` compute their head and
            loss with :func:`torch_mesa.ops.linear_cross_entropy` when called
            with ``labels`` while autograd records: the logits are never kept
            (nor made whole), and the output's ``logits`` is ``None`` in those
            calls. ``False`` keeps the model's own head and loss.
        policy: per-module overrides, ``{pattern: overrides}``; patterns are
            :mod:`fnmatch` patterns on qualified module names (``"head"``,
            ``"blocks.0"``, ``"*.mlp.*"``), overrides a dict of the fields
            above, or ``None`` to keep matching modules exact. An entry holds
            for everything inside a matching module too: its layers and the
            functional calls (attention, ``F.*``) its modules make.
    """

    bits: Optional[int] = 8
    group_size: Optional[int] = 1
    head_wise: bool = True
    rounding: Optional[str] = None
    range_estimate: str = "dynamic"
    momentum: float = 0.9
    keep_once: bool = True
    kernel: str = "auto"
    token_scale: bool = True
    qk_rotation: bool = True
    batch_norm: bool = False
    fused_loss: bool = True
    policy: Tuple[Tuple[str, Optional[Tuple[Tuple[str, Any], ...]]], ...] = field(default=())

    def __post_init__(self) -> None:
        _check_fields({f: getattr(self, f) for f in _OVERRIDABLE})
        if not isinstance(self.fused_loss, bool):
            raise TypeError(f"fused_loss must be True or False, got {self.fused_loss!r}")
        object.__setattr__(self, "momentum", float(self.momentum))
        object.__setattr__(self, "policy", self._normalize_policy(self.policy))

    @staticmethod
    def _normalize_policy(policy: Any) -> Tuple:
        if policy is None:
            return ()
        if isinstance(policy, Mapping):
            items = list(policy.items())
        elif isinstance(policy, (list, tuple)):
            items = []
            for entry in policy:
                if not (isinstance(entry, (list, tuple)) and len(entry) == 2):
                    raise TypeError(
                        "policy entries must be (pattern, overrides) pairs, got "
                        f"{entry!r}; e.g. policy={{'head': None, '*.mlp.*': {{'bits': 4}}}}"
                    )
                items.append(tuple(entry))
        else:
            raise TypeError(
                f"policy must be a mapping {{pattern: overrides or None}}, got {type(policy).__name__}"
            )
        out = []
        for pattern, overrides in items:
            if not isinstance(pattern, str) or not pattern:
                raise TypeError(f"policy pattern must be a non-empty string, got {pattern!r}")
            if overrides is None:
                out.append((pattern, None))
                continue
            if isinstance(overrides, MesaConfig):
                overrides = {f: getattr(overrides, f) for f in _OVERRIDABLE}
            if isinstance(overrides, tuple):
                overrides = dict(overrides)
            if not isinstance(overrides, Mapping):
                raise TypeError(
                    f"policy[{pattern!r}] must be a dict of field overrides or None, "
                    f"got {type(overrides).__name__}"
                )
            unknown = sorted(set(overrides) - set(_OVERRIDABLE))
            if unknown:
                raise ValueError(
                    f"policy[{pattern!r}] has unknown field(s) {unknown}; allowed: {list(_OVERRIDABLE)}"
                )
            _check_fields(overrides, where=f"policy[{pattern!r}].")
            out.append((pattern, tuple(sorted(overrides.items()))))
        return tuple(out)

    # ------------------------------------------------------------------ use
    def matching_patterns(self, name: str) -> Tuple[str, ...]:
        """Policy patterns that apply to the module ``name``: those matching its
        own name or the name of a module that contains it."""
        lineage = _lineage(name)
        return tuple(p for p, _ in self.policy if any(fnmatch.fnmatchcase(n, p) for n in lineage))

    def resolve(self, name: str) -> Optional[QuantSpec]:
        """The spec for the module called ``name``, or ``None`` to keep it exact.

        A policy entry applies to every module whose own name, or the name of
        a module containing it, matches its pattern (``{"blocks.0": None}``
        keeps all of ``blocks.0`` exact, its layers and the calls its modules
        make); entries apply in the order given, a later one overriding an
        earlier one.
        """
        values = {f: getattr(self, f) for f in _OVERRIDABLE}
        for pattern, overrides in self.policy:
            if any(fnmatch.fnmatchcase(n, pattern) for n in _lineage(name)):
                if overrides is None:
                    values["bits"] = None
                else:
                    values.update(dict(overrides))
        if values["bits"] is None:
            return None
        rounding = values["rounding"] or ("nearest" if values["bits"] == 8 else "stochastic")
        return QuantSpec(
            bits=values["bits"],
            group_size=values["group_size"],
            head_wise=values["head_wise"],
            stochastic=rounding == "stochastic",
            running=values["range_estimate"] == "running",
            momentum=values["momentum"],
            keep_once=values["keep_once"],
            kernel=values["kernel"],
            token_scale=values["token_scale"],
            qk_rotation=values["qk_rotation"],
            batch_norm=values["batch_norm"],
        )

    # ------------------------------------------------------------ serialise
    def to_dict(self) -> dict:
        d = {f: getattr(self, f) for f in _OVERRIDABLE}
        d["fused_loss"] = self.fused_loss
        d["policy"] = {p: (None if o is None else dict(o)) for p, o in self.policy}
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "MesaConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown MesaConfig field(s) {unknown}; allowed: {sorted(known)}")
        return cls(**dict(d))

    @classmethod
    def from_mesa_policy(cls, path: Any, model: Any, *, base: Optional["MesaConfig"] = None) -> "MesaConfig":
        """A config that does on ``model`` what a policy file of the original
        Mesa did (``ms.policy.deploy_on_init(model, path)``)::

            cfg = MesaConfig.from_mesa_policy("policy.txt", model)
            torch_mesa.compress_(model, cfg)

        The file is read as Mesa's ``read_policy`` reads it: ``on <tag>:``
        sections (``#`` comments; a later section for the same tag replaces
        an earlier one); in a section, ``by_index: all`` or ``by_index: 1 2``
        (optionally ``by_tag``) opens a block and the ``enable``/``level``/
        ``ema_decay`` lines after it apply to those layers; later blocks
        override earlier ones. Layer ``i`` of a tag is the ``i``-th module of
        that tag in ``model.modules()`` order
        (:func:`torch_mesa.mesa_policy.mesa_layers` lists them): ``fc``
        nn.Linear (and subclasses, GPT-2's Conv1D), ``conv`` nn.Conv1d/2d/3d,
        ``bn`` nn.BatchNorm1d/2d/3d, ``relu`` nn.ReLU, ``layernorm``
        nn.LayerNorm, ``gelu`` nn.GELU and GELU-named activation classes;
        ``softmax`` each nn.Softmax and each innermost attention module
        (class name ending in "Attention") without one, ``matmul`` two per
        attention module (``q @ k^T``, ``attn @ v``): softmax and matmul are
        calls the attention module makes, routed with its one setting.

        The result is ``base`` (default ``MesaConfig()``) with one exact-name
        policy entry per layer of those tags appended to ``base.policy``:
        ``None`` (exact) where the file does not enable the layer (Mesa's
        layers start disabled), else ``bits`` from ``level`` (256 -> 8,
        16 -> 4, 4 -> 2; ``base.bits``, or 8, when not given) and
        ``range_estimate="running", momentum=ema_decay`` where ``ema_decay``
        is given (``base``'s range estimate otherwise). Everything Mesa had
        no tag for (dropout, SiLU, RMSNorm, other modules' calls) and the
        other fields (``group_size``, ``head_wise``, ``rounding``...) follow
        ``base``: ``base=MesaConfig(bits=None)`` compresses only what the
        file enables.

        Quantization groups are not in the file: Mesa's ``quant_groups``
        (``ms.policy.convert_by_num_groups(model, g)``) split each tensor's
        channels into ``g`` contiguous groups with one range each (attention
        tensors: along heads, so ``g = num_heads`` is one range per head);
        ``convert_by_group_size(model, s)`` gave Linear/LayerNorm/Conv2d/
        BatchNorm2d inputs groups of ``s`` channels. torch-mesa's
        ``group_size`` is the channels per range: ``convert_by_group_size(m,
        s)`` is ``base=MesaConfig(group_size=s)``, ``g`` groups of a
        ``C``-channel tensor are ``group_size=C // g``, one range per tensor
        is ``group_size=None``, and ``head_wise=True`` (the default) keeps one
        range per head for attention tensors. The default ``group_size=1``
        (one range per channel) is finer than any Mesa setting.

        Raises:
            FileNotFoundError: ``path`` is not a file.
            torch_mesa.mesa_policy.MesaPolicyError (a ValueError): with the
                file and line: a malformed line, an unknown tag, a bad value,
                a level other than 256/16/4, an index out of range for this
                model (the message says how many layers of the tag it has),
                a key Mesa applied that has no counterpart (``quant_groups``),
                or layers torch-mesa keeps with one setting given different
                ones. Keys Mesa itself ignored (``fp_forward``, ``stable``...)
                and Mesa's other silent no-ops only warn.

        See ``docs/mesa_policy.md``.
        """
        from .mesa_policy import config_from_mesa_policy

        return config_from_mesa_policy(path, model, base=base, _stacklevel=3)

    def replace(self, **changes: Any) -> "MesaConfig":
        return dataclasses.replace(self, **changes)
