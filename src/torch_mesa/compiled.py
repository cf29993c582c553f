"""Compiled saving: torch-mesa inside ``torch.compile``'s own graphs.

A plain (unconverted) model compiled with :func:`compile` keeps what its
backward needs in 8, 4 or 2 bits, with the quantizer written into the
compiled graphs themselves:

* PyTorch's AOTAutograd inlines saved-tensor hooks that are
  ``torch.fx.GraphModule``s: the pack hook becomes the epilogue of each
  compiled forward (after the partitioner has chosen what to keep), the
  unpack hook the prologue of the backward. Inductor fuses the quantizer's
  passes into the kernels around them, on CPU and GPU alike.
* The partitioner decides what to keep, and is asked to recompute every
  cheap op (``aggressive_recomputation``): a norm's output, an activation,
  the attention forward are rebuilt in backward from what is kept, so each
  value is kept once (what the eager path's keep-once does by hand).
* The forward is the compiled unconverted forward: the kept tensors are
  quantized copies made after the values are computed.

Which saved tensors are quantized, and how, follows the same
:class:`MesaConfig` as :func:`compress_`: bits, ``group_size``, head-wise
ranges for 4-d (batch, heads, tokens, head dim) tensors, rounding,
``token_scale``, per-module ``policy`` (read from the module each saved value
was computed in; ``None`` keeps it exact) and ``batch_norm``. A saved tensor
that cannot be shown to be safe to quantize is kept exact, and the plan
(:func:`plan`) says why: integer tensors, fp64, per-row statistics and other
small tensors, the auxiliary outputs of multi-output ops (an attention's
log-sum-exp, a norm's statistics), values the backward compares with a
threshold other than 0 (a clamp's bounds). Boolean masks are kept in 1 bit,
and a value its backward compares with 0 (ReLU's) keeps where it is
positive in 1 bit beside its codes.

What differs from the eager path (:func:`compress_`): ranges are dynamic
(``range_estimate="running"`` needs state carried between steps and is
refused), q/k rotation applies to the queries and keys of scaled-dot-product
attention ops only, and stochastic rounding's seed comes from
the tensor's own values (a compiled graph has no step counter). Code that runs
uncompiled inside the call (a graph break) keeps its tensors exact.
"""

from __future__ import annotations

import hashlib
import math
import operator
import re
import threading
import weakref
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from .config import MesaConfig, QuantSpec
from .quant import fused
from .quant import reference as R
from .units import format_bytes

__all__ = ["CompiledSaving", "SavedPlan", "compile", "plan", "saving_of", "supported"]

Tensor = torch.Tensor

MIN_NUMEL = 4096  # smaller saved tensors (statistics, biases' inputs of tiny layers) stay exact
_FORMAT = "torch-mesa compiled saving v1"  # part of the compile caches' key: bump when the numbers change


@dataclass(frozen=True)
class SavedPlan:
    """What one compiled graph keeps for one saved value."""

    node: str  # the value's name in the compiled forward graph
    module: str  # the module it was computed in ("" for the model itself)
    shape: Tuple[int, ...]
    dtype: torch.dtype
    kept: str  # "8 bits", "4 bits", "2 bits", "1 bit" or "exact"
    reason: str  # why exact, or the layout of the ranges
    exact_bytes: int
    kept_bytes: int


@dataclass(frozen=True)
class _Layout:
    shape: Tuple[int, ...]
    dtype: torch.dtype
    bits: int  # 1: a boolean mask
    axes: Tuple[int, ...] = ()
    group_size: Optional[int] = None
    rows: Optional[str] = None
    stochastic: bool = False
    perm: Optional[Tuple[int, ...]] = None  # memory order of the dimensions, where not the logical one
    rotate: bool = False  # kept rotated along the last dimension (attention queries and keys)
    # Sizes are symbolic (dynamic shapes): the kept tuple ends with an empty
    # tensor of the value's shape, which carries its sizes into the backward.
    symbolic: bool = False
    # Also kept: where the value is positive, 1 bit per element (its backward
    # compares it with 0: a ReLU's input or output; see _comparisons).
    positive: bool = False


def _module_name(node, key: str = "nn_module_stack") -> Tuple[str, Optional[type]]:
    """The innermost module a graph node was computed in (its qualified name
    relative to the compiled module) and its type; ``key``:
    ``"fwd_nn_module_stack"`` for a backward node (the module of the forward
    op it differentiates or recomputes)."""
    stack = node.meta.get(key) or {}
    if not stack:
        return "", None
    path, kind = list(stack.values())[-1]
    path = _ROOT.sub("", path)  # the compiled function's argument ("L['self']", "L['fn']", ...)
    if path.startswith("_orig_mod"):
        path = path[len("_orig_mod"):].lstrip(".")
    return path, kind if isinstance(kind, type) else None


_ROOT = re.compile(r"^(L\[[^\]]*\]|self)\.?")


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _hint(n) -> int:
    """A size as an int: a symbolic one (dynamic shapes) by the value it was
    traced with, without adding a guard."""
    if isinstance(n, torch.SymInt):
        return int(n.node.hint) if n.node.hint is not None else -1
    return int(n)


def _module_of(node, depth: int = 8) -> Tuple[str, Optional[type]]:
    """:func:`_module_name` of ``node``, or where it has none (a layout
    change the partitioner added, as the transposes a batched product's
    backward needs), of the value it was made from."""
    for _ in range(depth):
        if node.meta.get("nn_module_stack") or node.op != "call_function" or node.target not in _LAYOUT:
            return _module_name(node)
        node = node.args[0]
    return "", None


_aten = torch.ops.aten


def _optional_ops(*names: str) -> List[Any]:
    """Ops that not every PyTorch 2.x registers (at import time)."""
    out = []
    for name in names:
        try:
            ns, op, overload = name.split(".")
            out.append(getattr(getattr(getattr(torch.ops, ns), op), overload))
        except (AttributeError, RuntimeError):
            pass
    return out

_LAYOUT = {_aten.view.default, _aten.reshape.default, _aten._unsafe_view.default, _aten.permute.default,
           _aten.transpose.int, _aten.t.default, _aten.expand.default, _aten.clone.default, _aten.alias.default}


def _uses(bw_graph, name: str, follow: Callable):
    """Each use ``(value, user)`` of the saved value ``name`` in the backward
    graph ``bw_graph`` (None: none), and of what is computed from it through
    the ops ``follow(user, derived)`` accepts (``derived``: the values
    reached so far): the walk the rules below share."""
    start = None if bw_graph is None else next(
        (n for n in bw_graph.find_nodes(op="placeholder") if n.name == name), None)
    todo, derived = ([start] if start is not None else []), {start}
    while todo:
        n = todo.pop()
        for u in n.users:
            if u.op != "call_function":
                continue
            yield n, u
            if u not in derived and follow(u, derived):
                derived.add(u)
                todo.append(u)


# Ops a value's error passes through unchanged in kind (layouts, sums and
# products with other values): followed when looking for what a kept value feeds.
_PASS_THROUGH = _LAYOUT | {
    _aten.unsqueeze.default, _aten.squeeze.dim, _aten.squeeze.default, _aten.slice.Tensor, _aten.select.int,
    _aten.add.Tensor, _aten.sub.Tensor, _aten.mul.Tensor, _aten.div.Tensor, _aten.neg.default,
    _aten._to_copy.default, _aten.where.self, _aten.where.ScalarSelf, _aten.where.ScalarOther,
    _aten.clamp.default, _aten.clamp_min.default, _aten.clamp_max.default, _aten.maximum.default,
    _aten.minimum.default, _aten.cat.default, torch.ops.prims.convert_element_type.default,
    *_optional_ops("prims.fma.default"),
}
_PRODUCTS = {_aten.mul.Tensor, _aten.div.Tensor}
# Ops that exponentiate their input: an absolute error d becomes a relative
# error of e**d (a score range of 30 at 8 bits: 12%), so what reaches them is kept exact.
_EXPONENTIAL = {_aten.exp.default, _aten.exp2.default, _aten.expm1.default, _aten.pow.Tensor_Tensor,
                _aten._softmax.default, _aten._log_softmax.default, _aten.logsumexp.default}


def _arithmetic(u, derived) -> bool:
    # (x * x stops: exp(-x**2 / 2), GELU's derivative, is bounded, not amplifying)
    return u.target in _PASS_THROUGH and not (u.target in _PRODUCTS and sum(a in derived for a in u.args) > 1)


def _feeds_exponential(bw_graph, name: str) -> bool:
    """Whether the backward graph exponentiates the saved value ``name``
    (a softmax or log-softmax recomputed from its input, a loss's
    ``exp(log_probs)``), directly or through layout and pointwise arithmetic."""
    return any(u.target in _EXPONENTIAL for _, u in _uses(bw_graph, name, _arithmetic))


# Ops whose result near 0 turns a small absolute error of their input into
# an unbounded one (1/x, log x, sqrt x's derivative).
_DIVIDING = {_aten.reciprocal.default, _aten.rsqrt.default, _aten.sqrt.default, _aten.log.default,
             _aten.log2.default, _aten.log10.default, _aten.log1p.default}
# Step functions: an error near a step flips the result by a whole step
# (sign(z) from -1 to 1). Comparisons are not among them: a ReLU's mask
# flips only where its input, and so its output, is near 0.
_JUMPS = set(_optional_ops(
    "aten.round.default", "aten.round.decimals", "aten.floor.default", "aten.ceil.default", "aten.trunc.default",
    "aten.sign.default", "aten.sgn.default", "aten.frac.default", "aten.remainder.Tensor",
    "aten.remainder.Scalar", "aten.fmod.Tensor", "aten.fmod.Scalar", "aten.div.Tensor_mode",
    "aten.floor_divide.default"))


def _amplified(bw_graph, name: str) -> Optional[str]:
    """Why the backward graph would amplify the saved value ``name``'s
    quantization error without bound, if it does: it divides by the value
    or by a pointwise function of it (``a / softplus(z)``, ``x ** -1``),
    takes its logarithm or root (where the value is near 0 a quantization
    step is a large relative error), or recomputes a step function of it
    (``sign``, ``round``, ``remainder``). Reductions (a norm's variance)
    stop the search: they average errors."""
    for n, u in _uses(bw_graph, name, _pointwise):
        if u.target in _DIVIDING or (u.target is _aten.div.Tensor and len(u.args) > 1 and u.args[1] is n) or (
                u.target is _aten.pow.Tensor_Scalar and isinstance(u.args[1], (int, float)) and u.args[1] < 1):
            return "backward divides by it (or a function of it) or takes its log or root: unbounded error near 0"
        if u.target in _JUMPS:
            return "backward recomputes a step function of it (round, sign, remainder): an error flips a step"
    return None


# Backward ops that compare a value with a threshold: ReLU's, leaky ReLU's,
# hardtanh's and the like, and the comparisons of decomposed clamps and kinks.
_COMPARISONS = set(_optional_ops(
    "aten.threshold_backward.default", "aten.leaky_relu_backward.default", "aten.hardtanh_backward.default",
    "aten.hardswish_backward.default", "aten.hardsigmoid_backward.default",
    "aten.gt.Scalar", "aten.ge.Scalar", "aten.lt.Scalar", "aten.le.Scalar", "aten.eq.Scalar", "aten.ne.Scalar",
    "aten.gt.Tensor", "aten.ge.Tensor", "aten.lt.Tensor", "aten.le.Tensor", "aten.eq.Tensor", "aten.ne.Tensor"))
# Ops whose result is positive exactly where their input is.
_SIGN_KEEPING = _LAYOUT | {_aten.relu.default, _aten._to_copy.default, torch.ops.prims.convert_element_type.default}


def _keeps_sign(u, derived) -> bool:
    """``u`` is positive exactly where its input from ``derived`` is: a
    layout change, a dtype conversion, ``relu``, or a product with (or a
    quotient by) a positive number."""
    if u.target in _SIGN_KEEPING:
        return True
    if u.target in (_aten.mul.Tensor, _aten.div.Tensor) and len(u.args) == 2:
        other = u.args[1] if u.args[0] in derived else (u.args[0] if u.target is _aten.mul.Tensor else None)
        return isinstance(other, (int, float)) and other > 0
    return False


def _sign_test(n, u) -> bool:
    """Whether ``u`` tests ``n`` against 0 as ``n > 0`` (or its negation)."""
    name = getattr(u.target, "__name__", "")
    if name.startswith("threshold_backward"):
        return len(u.args) > 2 and u.args[1] is n and u.args[2] == 0
    if name.startswith("leaky_relu_backward"):
        return len(u.args) > 1 and u.args[1] is n
    if name in ("gt.Scalar", "le.Scalar"):
        return u.args[0] is n and u.args[1] == 0
    return False


def _of_itself(u, derived) -> bool:
    """A function of one value alone: layout changes, dtype conversions,
    and pointwise ops whose other operands are numbers (``x * 3``,
    ``x.clamp(0, 1)``). A path through other tensors (a batch norm's
    statistics, a bias) is not followed: see :func:`_comparisons`."""
    return u.target in _SIGN_KEEPING or (
        torch.Tag.pointwise in getattr(u.target, "tags", ()) and len(u.all_input_nodes) == 1)


def _comparisons(bw_graph, name: str) -> Optional[str]:
    """How the backward graph compares the saved value ``name`` (through
    pointwise recomputation) with a threshold: None (it does not), "sign"
    (only as ``> 0``, through ops that keep the sign: ReLU's gradient) or
    "threshold" (any other threshold or path: a clamp's bounds, ReLU6's 6,
    hardtanh's -1 and 1, ReLU after a bias).

    Quantized, a value near a threshold can land on its other side, and the
    gradient there jumps by the derivative's step (the whole gradient, for
    ReLU at 0): ``x.clamp(0, 1)`` between two Linears gave fc1 a gradient
    cosine of 0.974 kept at 8 bits, a ReLU MLP 0.9958 (the eager conversion,
    which keeps such masks exactly: 0.99997). A sign test is kept exact by 1
    more bit per element (``_Layout.positive``; the zero point makes 0
    exact); any other comparison keeps the value exact. Only comparisons of
    a function of the value alone are found (:func:`_of_itself`): a ReLU
    after a batch norm compares the convolution's output with a threshold
    per channel computed from statistics, and such values stay quantized
    (every CNN's convolution outputs would otherwise be kept exact); a
    known limit."""
    signs = {u for n, u in _uses(bw_graph, name, _keeps_sign) if _sign_test(n, u)}
    compared = {u for _, u in _uses(bw_graph, name, _of_itself) if u.target in _COMPARISONS}
    if not compared:
        return None
    return "sign" if compared <= signs else "threshold"


def _pointwise(u, derived) -> bool:
    """Layout and arithmetic, and single-input pointwise functions (softplus, clamp, abs)."""
    return u.target in _PASS_THROUGH or (
        torch.Tag.pointwise in getattr(u.target, "tags", ()) and len(u.all_input_nodes) == 1)


_STOP = {_aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.baddbmm.default,
         _aten.convolution.default, _aten.convolution_backward.default}


def _consumers(bw_graph, name: str, depth: int = 6) -> List[Tuple[str, Optional[type]]]:
    """The modules (name, type) whose backward uses the saved value ``name``: the modules
    of the backward nodes it reaches through recomputation (pointwise and
    layout ops, up to ``depth`` steps), up to and including the first
    products (a layer's gradient computation)."""
    start = None if bw_graph is None else next(
        (n for n in bw_graph.find_nodes(op="placeholder") if n.name == name), None)
    if start is None:
        return []
    out, frontier, seen = [], [start], {start}
    for _ in range(depth):
        nxt = []
        for n in frontier:
            for u in n.users:
                if u in seen or u.op != "call_function":
                    continue
                seen.add(u)
                for key in ("nn_module_stack", "fwd_nn_module_stack"):
                    if u.meta.get(key):
                        out.append(_module_name(u, key))
                if u.target not in _STOP:
                    nxt.append(u)
        frontier = nxt
    return out


_SPLITS = set(_optional_ops("aten.unbind.int", "aten.split.Tensor", "aten.split_with_sizes.default",
                            "aten.chunk.default", "aten.unsafe_split.Tensor",
                            "aten.unsafe_split_with_sizes.default", "aten.tensor_split.sections"))


_ATTENTION = set(_optional_ops(
    "aten._scaled_dot_product_flash_attention_for_cpu.default", "aten._scaled_dot_product_flash_attention.default",
    "aten._scaled_dot_product_efficient_attention.default", "aten._scaled_dot_product_cudnn_attention.default",
    "aten._scaled_dot_product_flash_attention_for_cpu_backward.default",
    "aten._scaled_dot_product_flash_attention_backward.default",
    "aten._scaled_dot_product_efficient_attention_backward.default",
    "aten._scaled_dot_product_cudnn_attention_backward.default"))


def _arguments(node) -> Dict[str, Any]:
    """An op's node's arguments by their names in the op's schema (given by
    position or by keyword)."""
    schema = getattr(node.target, "_schema", None)
    return {a.name: node.args[i] if i < len(node.args) else node.kwargs.get(a.name, a.default_value)
            for i, a in enumerate(schema.arguments if schema is not None else ())}


def _attention_roles(bw_graph, name: str, through=_LAYOUT) -> set:
    """The arguments (by schema name: ``query``, ``key``, ``attn_mask``,
    ...) as which the saved value ``name`` enters scaled-dot-product ops in
    backward (the recomputed forward or the backward op), through the ops
    ``through`` (layout changes; or arithmetic too: a bias added to a mask)."""
    return {arg for n, u in _uses(bw_graph, name, lambda u, derived: u.target in through) if u.target in _ATTENTION
            for arg, value in _arguments(u).items() if value is n}


_MASKS = {"attn_mask", "attn_bias"}


def _gets_gradient(node, bw_graph) -> bool:
    """Whether the forward graph's input ``node`` receives a gradient from the
    backward (a block's hidden state), rather than being only read (an
    attention mask, rotary tables: shared by every block and held by the
    caller anyway)."""
    if bw_graph is None:
        return False
    match = re.fullmatch(r"primals_(\d+)", node.name)
    if match is None:
        return False
    grads = next(iter(bw_graph.find_nodes(op="output"))).args[0]
    i = int(match.group(1)) - 1
    return i < len(grads) and grads[i] is not None


def _hadamard(d: int, device) -> Tensor:
    """The orthonormal ``d x d`` Hadamard matrix (``d`` a power of 2), made
    with tensor ops so that it is computed inside the compiled graph: entry
    (i, j) is ``(-1) ** popcount(i & j) / sqrt(d)``."""
    i = torch.arange(d, device=device)
    both = i[:, None] & i[None, :]
    parity = torch.zeros_like(both)
    for b in range(max(1, (d - 1).bit_length())):
        parity = parity ^ ((both >> b) & 1)
    return (1 - 2 * parity).to(torch.float32) / math.sqrt(d)


def _auxiliary_output(node) -> bool:
    """A non-first output of a multi-output op: statistics (an attention's
    log-sum-exp, a norm's mean and inverse deviation), indices, seeds. Not
    the parts of a split (q, k and v out of one projection)."""
    if node.op != "call_function" or node.target is not operator.getitem or len(node.args) < 2:
        return False
    parent = node.args[0]
    if isinstance(parent, torch.fx.Node) and parent.op == "call_function" and parent.target in _SPLITS:
        return False
    return node.args[1] != 0


class CompiledSaving:
    """The pack and unpack graphs for one :class:`MesaConfig`, and what they
    decided. ``with saving:`` installs them for the calls inside (a compiled
    model must be called inside it; :func:`compile` does this for you).

    ``prefix``: the qualified name the compiled module has in the model the
    config's policy was written for (regional compilation compiles one block's
    code for all blocks)."""

    def __init__(self, config: Optional[MesaConfig] = None, prefix: str = "") -> None:
        config = MesaConfig() if config is None else config
        if not isinstance(config, MesaConfig):
            raise TypeError(f"config must be a torch_mesa.MesaConfig, got {type(config).__name__}")
        if config.range_estimate == "running":
            raise ValueError(
                "range_estimate='running' keeps a range estimate between steps, which a compiled graph "
                "cannot carry; compiled saving computes each tensor's range in the kernel that quantizes "
                "it: use MesaConfig(range_estimate='dynamic') (the default)"
            )
        self.config = config
        self.prefix = prefix
        # Per compile (frame, count), per saved value: what was decided. Only
        # the newest compile of each frame is kept: a recompile's graph
        # replaces the older one in the plan, and the older layouts are no
        # longer needed (both hooks are traced when a graph is compiled).
        self._entries: Dict[Tuple[Any, int], Dict[str, Tuple[Optional[_Layout], SavedPlan]]] = {}
        self._lock = threading.Lock()
        self._local = threading.local()  # per thread: the hooks entered, and the hooks they hide
        key = hashlib.sha256(f"{_FORMAT}|{config.to_dict()}|{prefix}".encode()).hexdigest()
        ref = weakref.ref(self)
        self.pack = _hook_graph(lambda x: ref()._pack(x), "mesa_pack", key)
        self.unpack = _hook_graph(lambda p: ref()._unpack(p), "mesa_unpack", key)

    @property
    def decisions(self) -> Dict[Tuple[int, str], SavedPlan]:
        with self._lock:
            return {(g, n): e[1] for g, entries in self._entries.items() for n, e in entries.items()}

    # ---------------------------------------------------------------- hooks
    def __enter__(self) -> "CompiledSaving":
        stack = self._stack()
        outer = torch._C._autograd._top_saved_tensors_default_hooks(True)
        cm = torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)
        cm.__enter__()
        stack.append((cm, outer))
        return self

    def __exit__(self, *exc) -> None:
        stack = self._stack()
        if stack:  # (unbalanced where another pre-hook raised before ours ran)
            stack.pop()[0].__exit__(*exc)

    def _stack(self) -> list:
        if not hasattr(self._local, "stack"):
            self._local.stack = []
        return self._local.stack

    def _context(self):
        from torch._functorch._aot_autograd.graph_compile import _get_saved_tensor_hook_context

        return _get_saved_tensor_hook_context()

    def _pack(self, x: Tensor):
        ctx = self._context()
        if ctx is None:  # uncompiled code inside the call (a graph break): kept exact, or by the hooks ours hide
            stack = self._stack()
            outer = stack[-1][1] if stack else None
            # (detached: kept with its grad_fn, a saved output is a reference
            # cycle through C++ that a graph dropped without a backward never frees)
            return x.detach() if outer is None else _Outer(outer[0](x), outer[1])
        node = ctx["_node"]
        module, kind = _module_of(node)
        name = _join(self.prefix, module)
        layout, reason = self._choose(x, node, name, kind, ctx.get("_bw_graph"))
        out = x if layout is None else _quantize(x, layout)
        kept = "exact" if layout is None else ("1 bit" if layout.bits == 1 else f"{layout.bits} bits")
        parts = out if isinstance(out, tuple) else (out,)  # (a symbolic layout's size carrier is empty)
        entry = SavedPlan(node.name, name, _ints(x.shape), x.dtype, kept, reason,
                          _hint(x.numel()) * x.element_size(), sum(_hint(t.numel()) * t.element_size() for t in parts))
        key = _compile_key(ctx)
        with self._lock:
            if key not in self._entries and key[0] is not None:
                for older in [k for k in self._entries if k[0] == key[0] and k[1] < key[1]]:
                    del self._entries[older]
            self._entries.setdefault(key, {})[node.name] = (layout, entry)
        return out

    def _unpack(self, packed):
        ctx = self._context()
        if ctx is None:
            return packed.unpack(packed.value) if isinstance(packed, _Outer) else packed
        with self._lock:
            layout = self._entries.get(_compile_key(ctx), {}).get(ctx["_node"].name, (None,))[0]
        if layout is None:
            return packed
        return _dequantize(packed, layout)

    # ------------------------------------------------------------ decisions
    def _choose(self, x: Tensor, node, name: str, kind: Optional[type], bw_graph) -> Tuple[Optional[_Layout], str]:
        spec: Optional[QuantSpec] = self.config.resolve(name)
        shape = tuple(x.shape)
        if spec is None:
            return None, "kept exact by policy"
        if _batch_norm(kind) and not spec.batch_norm:
            return None, "batch norm (MesaConfig.batch_norm=False)"
        for used_by, used_kind in _consumers(bw_graph, node.name):
            full = _join(self.prefix, used_by)
            used_spec = self.config.resolve(full)
            if used_spec is None:
                return None, f"kept exact by policy (used in the backward of {full})"
            if _batch_norm(used_kind) and not used_spec.batch_norm:
                return None, f"input of a batch norm ({full}; MesaConfig.batch_norm=False)"
        if node.op == "placeholder" and not _gets_gradient(node, bw_graph):
            return None, ("an input that gets no gradient (a mask or table the blocks share, a frozen "
                          "embedding's output): kept as it is, which its caller holds anyway")
        if x.dtype == torch.bool:
            if x.numel() < MIN_NUMEL:
                return None, "small mask"
            return _Layout(_ints(shape), x.dtype, 1, symbolic=_symbolic(shape)), "mask, 1 bit per element"
        if not x.is_floating_point():
            return None, f"{x.dtype} values (indices, counts) are kept exact"
        if x.dtype == torch.float64:
            return None, "float64 is kept exact"
        if x.element_size() < 2:
            return None, f"{x.dtype} is already 8 bits or fewer"
        if _auxiliary_output(node):
            return None, "auxiliary output of a multi-output op (statistics)"
        if x.dim() < 2 or shape[-1] == 1 or x.numel() < MIN_NUMEL:
            return None, "small tensor or per-row statistic"
        if _feeds_exponential(bw_graph, node.name):
            return None, "backward exponentiates it (softmax logits): its error would grow exponentially"
        why = _amplified(bw_graph, node.name)
        if why:
            return None, why
        if _attention_roles(bw_graph, node.name, _PASS_THROUGH) & _MASKS:
            return None, ("an attention's mask or bias: attention exponentiates it (its error would grow "
                          "exponentially; masked positions hold -inf or the dtype's minimum)")
        head_wise = spec.head_wise and x.dim() == 4
        axes = (1, 3) if head_wise else (x.dim() - 1,)
        rows = "scaled" if spec.token_scale else None
        perm = _memory_order(x)
        if perm is not None:  # quantize in memory order; the channel axes move with their dimensions
            axes = tuple(sorted(perm.index(a) for a in axes))
        d = shape[-1]
        rotate = bool(spec.qk_rotation and isinstance(d, int) and 2 <= d <= 256 and d & (d - 1) == 0
                      and _attention_roles(bw_graph, node.name) & {"query", "key"})
        compared = _comparisons(bw_graph, node.name)
        if compared == "threshold":
            return None, ("backward compares it with a threshold (a clamp's bounds, a piecewise activation's kink): "
                          "an error near it flips the branch")
        positive = compared == "sign"
        layout = _Layout(_ints(shape), x.dtype, spec.bits, axes, spec.group_size, rows, spec.stochastic, perm,
                         rotate, _symbolic(shape), positive)
        how = ("per head and channel" if head_wise else "per channel") if spec.group_size == 1 else (
            f"groups of {spec.group_size} channels" + (" per head" if head_wise else ""))
        if rotate:
            how += ", rotated (attention query/key)"
        if spec.stochastic:
            how += ", stochastic rounding"
        if positive:
            how += ", where positive in 1 bit (compared with 0 in backward)"
        return layout, how + (", token scale" if rows else "")

    def plan(self) -> List[SavedPlan]:
        """What the graphs compiled so far keep, one entry per saved value
        (of each compiled code's newest compile)."""
        return list(self.decisions.values())


def _batch_norm(kind: Optional[type]) -> bool:
    return kind is not None and issubclass(kind, nn.modules.batchnorm._BatchNorm)


def _compile_key(ctx) -> Tuple[Any, int]:
    """The compile a hook is traced in: (Dynamo frame, compile count), or
    where there is none, (None, the forward graph's id)."""
    from torch._guards import CompileContext

    cid = CompileContext.current_compile_id()
    if cid is None or cid.frame_id is None:
        return None, id(ctx["_fw_graph"])
    return cid.frame_id, cid.frame_compile_id or 0


class _Outer:
    """A tensor packed by the saved-tensor hooks that ours hide (the caller's
    ``save_on_cpu``, a non-reentrant checkpoint), for code that runs
    uncompiled inside the call."""

    __slots__ = ("value", "unpack")

    def __init__(self, value, unpack) -> None:
        self.value, self.unpack = value, unpack


def _ints(shape) -> Tuple[int, ...]:
    """A shape with symbolic sizes replaced by their hints: kept layouts
    never hold a compile's symbols (nor its shape environment) alive."""
    return tuple(_hint(n) for n in shape)


def _symbolic(shape) -> bool:
    return any(isinstance(n, torch.SymInt) for n in shape)


def _memory_order(x: Tensor) -> Optional[Tuple[int, ...]]:
    """The order of ``x``'s dimensions in memory (largest stride first) where
    it is not the logical one and the last dimension is still innermost (q,
    k and v taken out of one projection: (B, H, N, D) laid out as
    (B, N, H, D)); else None. What is kept expands to that order, so the
    backward's views of the saved value stay valid (a contiguous expansion
    of a permuted value would not be viewable the same way)."""
    if x.dim() < 3 or x.is_contiguous():
        return None
    strides = x.stride()
    perm = tuple(sorted(range(x.dim()), key=lambda d: (-strides[d], d)))
    if perm[-1] != x.dim() - 1 or perm == tuple(range(x.dim())):
        return None
    return perm


def _quantize(x: Tensor, layout: _Layout):
    # kept after the codes: where the value is positive, then its sizes
    tail = (x.new_empty((*x.shape, 0)),) if layout.symbolic else ()
    if layout.bits == 1:
        return (R.pack_bits(x),) + tail
    if layout.positive:
        tail = (R.pack_bits(x > 0),) + tail
    if layout.perm is not None:
        x = x.permute(layout.perm)
    if layout.rotate:
        x = R.rotate_last(x, _hadamard(x.shape[-1], x.device))
    out = R.quantize_core(x, _seed_of(x) if layout.stochastic else None, None, None, None, bits=layout.bits,
                          axes=layout.axes, group_size=layout.group_size, rows=layout.rows, running=None)
    return tuple(out) + tail


def _dequantize(packed, layout: _Layout) -> Tensor:
    shape = layout.shape
    if layout.symbolic:
        shape, packed = tuple(packed[-1].shape[:-1]), packed[:-1]
    if layout.bits == 1:
        return R.unpack_bits(packed[0], shape)
    if layout.positive:
        positive, packed = R.unpack_bits(packed[-1], shape), packed[:-1]
        out = _dequantize(packed, dataclasses.replace(layout, positive=False, symbolic=False, shape=shape))
        # positive exactly where the value was: the smallest normal number
        # where it rounded to 0 or below, and 0 where it rounded above
        return torch.where(positive, out.clamp_min(torch.finfo(out.dtype).tiny), out.clamp_max(0))
    if layout.perm is not None:
        shape = tuple(shape[d] for d in layout.perm)
    out = R.dequantize_core(tuple(packed), shape=shape, dtype=torch.float32 if layout.rotate else layout.dtype,
                            bits=layout.bits, axes=layout.axes, group_size=layout.group_size, rows=layout.rows)
    if layout.rotate:
        out = R.rotate_last(out, _hadamard(shape[-1], out.device).t()).to(layout.dtype)
    if layout.perm is not None:
        inverse = [0] * len(layout.perm)
        for i, d in enumerate(layout.perm):
            inverse[d] = i
        out = out.permute(inverse)
    return out


def _seed_of(x: Tensor) -> Tensor:
    """A seed for stochastic rounding from the tensor's values (the bit
    pattern of their sum): different each step, computed in the graph."""
    s = x.float().sum().reshape(1).view(torch.int32).to(torch.int64)
    return (s & 0x7FFFFFFF).reshape(())


def _hook_graph(fn: Callable, name: str, cache_key: str) -> torch.fx.GraphModule:
    """``fn`` as a one-node GraphModule, which AOTAutograd retraces into the
    compiled graphs; the cache key lets the compile caches reuse them."""
    fn.__name__ = fn.__qualname__ = name
    g = torch.fx.Graph()
    x = g.placeholder("x")
    node = g.call_function(fn, (x,))
    node.meta["is_wrapped"] = True
    node.meta["user_cache_hash"] = f"{name}-{cache_key}"
    g.output(node)
    return torch.fx.GraphModule(nn.Module(), g, name)


# ------------------------------------------------------------------ compile
def supported() -> bool:
    """Whether this PyTorch inlines GraphModule saved-tensor hooks into
    compiled graphs and tells them which value they pack."""
    try:
        from torch._functorch._aot_autograd import graph_compile, utils
    except ImportError:
        return False
    return hasattr(utils, "saved_tensors_hooks_are_inlineable") and hasattr(
        graph_compile, "_get_saved_tensor_hook_context") and hasattr(torch._functorch.config, "joint_custom_pass")

def _keep_probabilities(gm, joint_inputs):
    """Joint-graph pass: the partitioner must keep a softmax's ``exp`` output
    (probabilities, in [0, 1]: 8 bits keep them well) rather than recompute
    it from the scores, whose quantization error ``exp`` would amplify (the
    scores would then be kept exact, see :func:`_feeds_exponential`); and
    every random draw (:func:`_random`)."""
    from torch.utils.checkpoint import CheckpointPolicy

    backward = {n for n in gm.graph.find_nodes(op="placeholder") if _tangent(n)}
    for node in gm.graph.nodes:  # (topological order: what depends on a tangent is backward)
        if node not in backward and any(a in backward for a in node.all_input_nodes):
            backward.add(node)
        elif node.op == "call_function" and node not in backward and (
                node.target is _aten.exp.default or _random(node)):
            node.meta["recompute"] = CheckpointPolicy.MUST_SAVE
    return gm


def _tangent(node) -> bool:
    """A joint or backward graph's input that receives an incoming gradient."""
    return node.op == "placeholder" and node.name.startswith("tangents")


def _random(node) -> bool:
    """A random draw (dropout's and drop-path's ``bernoulli``, ``rand``):
    with aggressive recomputation the partitioner would redraw it in
    backward, a different mask than the forward's (wrong gradients, measured
    on timm's Swin); it must be kept."""
    if node.target in _ATTENTION:  # random only with dropout; else its forward reruns in backward
        p = _arguments(node).get("dropout_p", 0.0)
        return not (isinstance(p, (int, float)) and p == 0)
    return torch.Tag.nondeterministic_seeded in getattr(node.target, "tags", ())


def _inductor_recomputing(gm, example_inputs, *, inputs_too: bool = False, mode: Optional[str] = None,
                          options: Optional[dict] = None):
    """Inductor, with the partitioner asked to recompute every cheap op in
    backward rather than keep its output (norm outputs, activations, the
    attention forward): then each value is kept once, and quantized once.
    Softmax probabilities are the exception (:func:`_keep_probabilities`).

    ``inputs_too``: the hooks pack the graph's inputs too (not parameters
    and buffers), not only its intermediates: a block's input is the
    previous block's output, which only autograd holds once that block has
    run, so keeping it quantized frees it.

    ``mode``/``options``: ``torch.compile``'s, which it passes to a backend
    given as a function; they become Inductor settings, as with Inductor."""
    patches = dict(torch._inductor.list_mode_options(mode)) if mode else {}
    patches.update(options or {})
    with torch._functorch.config.patch(aggressive_recomputation=True, joint_custom_pass=_keep_probabilities,
                                       saved_tensors_hooks_filtering_mode="no_static" if inputs_too else "donated"):
        return _compile_fx(gm, example_inputs, **({"options": patches} if patches else {}))


def _compile_fx(gm, example_inputs, options: Optional[dict] = None):
    """Inductor with the settings ``options`` (the tests swap in
    ``aot_eager_decomp_partition``: the same tracing, partitioner and inlined
    hooks, without code generation), the backward's expansions of kept
    values moved to their first use (:func:`_sink_expansions`; before a
    post-grad pass of the caller's own, if any)."""
    from torch._inductor.compile_fx import compile_fx

    patches = dict(options or {})
    patches["post_grad_custom_post_pass"] = _SinkExpansions(patches.get("post_grad_custom_post_pass"))
    return compile_fx(gm, example_inputs, config_patches=patches)


def _writes(n) -> bool:
    """Whether ``n`` changes state: impure, and not only random (the
    attention forward that the backward reruns takes a dropout argument and
    counts as random; random ops are never moved, and moving other ops past
    one changes no draw). Treated as a write, the first such rerun pulled
    every block's expansions ahead of it: the whole model's backward peak
    rose from 0.32x to 0.42x of the compiled unconverted model's."""
    try:
        return n.is_impure(impure_random=False)
    except TypeError:  # (a PyTorch without the argument)
        return n.is_impure()


def _sink_expansions(graph: torch.fx.Graph) -> None:
    """In a backward graph, move every op computed from the kept values
    alone, not from the incoming gradients (above all, the expansion of each
    kept value, which AOTAutograd puts at the start of the backward, and the
    forward ops recomputed from them), to just before its first use. Else a
    whole model's backward expands every block's values before it needs the
    first (measured: the step's peak rose 0.44x of the compiled unconverted
    model's where block by block it rose 0.21x). Nothing moves past an
    impure op (a write); the order of everything else, and the values, are
    unchanged. One pass over the graph."""
    inputs = graph.find_nodes(op="placeholder")
    if not any(_tangent(n) for n in inputs):
        return  # a forward graph
    kept = {n for n in inputs if not _tangent(n)}
    movable = set()
    for n in graph.nodes:
        if n.op == "call_function" and not n.is_impure() and not _random(n) \
                and all(a in kept or a in movable for a in n.all_input_nodes):
            movable.add(n)
    emitted, new, pending = set(), [], []

    def emit(root) -> None:  # root, after the movable values it needs that are not placed yet
        stack = [(root, False)]
        while stack:
            n, ready = stack.pop()
            if n in emitted:
                continue
            if ready:
                emitted.add(n)
                new.append(n)
                continue
            stack.append((n, True))
            stack.extend((a, False) for a in reversed(n.all_input_nodes) if a in movable and a not in emitted)

    for n in graph.nodes:
        if n in movable:
            pending.append(n)
            continue
        if n.op != "placeholder" and _writes(n):  # a write: what was computed before it stays before it
            for p in pending:
                emit(p)
            pending = []
        emit(n)
    for p in pending:
        emit(p)
    if new != list(graph.nodes):
        for before, n in zip(new, new[1:]):
            if before.next is not n:
                before.append(n)


class _SinkExpansions(fused._pass_class()):
    """:func:`_sink_expansions` as Inductor's post-grad pass, with the
    quantizer's divisors computed once (``fused._realize_divisors``), then
    ``then`` (a caller's own pass); the uuid keys the compile caches."""

    def __init__(self, then=None) -> None:
        self.then = then

    def __call__(self, graph: torch.fx.Graph) -> None:
        _sink_expansions(graph)
        fused._realize_divisors(graph)
        if self.then is not None:
            self.then(graph)

    def uuid(self):
        then = None if self.then is None else (self.then.uuid() if hasattr(self.then, "uuid") else repr(self.then))
        return f"{_FORMAT}|sink-expansions-5|{then}"


def _inductor_recomputing_blocks(gm, example_inputs, **kwargs):
    """:func:`_inductor_recomputing` for one block (its inputs kept too),
    with ``torch.compile``'s ``mode``/``options`` as they come."""
    return _inductor_recomputing(gm, example_inputs, inputs_too=True, **kwargs)


def _enter(saving: CompiledSaving):
    def pre(module, args, kwargs=None):
        saving.__enter__()

    def post(module, args, *rest):
        saving.__exit__(None, None, None)

    return pre, post


def _install(module: nn.Module, saving: CompiledSaving) -> None:
    pre, post = _enter(saving)
    module.register_forward_pre_hook(pre)
    module.register_forward_hook(post, always_call=True)
    object.__setattr__(module, "_mesa_saving", saving)


def _check_uniform(config: MesaConfig, blocks_name: str, blocks: nn.Module) -> None:
    names = [_join(blocks_name, str(i)) for i in range(len(blocks))]
    rel = [n for n, _ in blocks[0].named_modules()]
    first = [config.resolve(_join(names[0], r)) for r in rel]
    for name in names[1:]:
        other = [config.resolve(_join(name, r)) for r in rel]
        if other != first:
            raise ValueError(
                f"the config's policy treats {name} differently from {names[0]}; blocks compiled one by one "
                "share one compiled graph, so their settings must agree: compile the whole model "
                "(torch_mesa.compile(model, config)) or make the policy the same for every block"
            )


def find_blocks(model: nn.Module) -> Tuple[str, nn.Module]:
    """The ModuleList/Sequential of Transformer blocks: the largest container
    whose children all have the same type (and have parameters), with its
    qualified name. Raises ValueError where there is none."""
    best = None
    for name, module in model.named_modules():
        if isinstance(module, (nn.ModuleList, nn.Sequential)) and len(module) >= 2:
            kinds = {type(c) for c in module}
            if len(kinds) == 1 and any(True for _ in module[0].parameters()):
                if best is None or len(module) > len(best[1]):
                    best = (name, module)
    if best is None:
        raise ValueError("found no list of Transformer blocks (a ModuleList or Sequential of one block type) "
                         "in this model")
    return best


def compile(model: nn.Module, config: Optional[MesaConfig] = None, *, blocks: Optional[bool] = None,
            **compile_kwargs) -> nn.Module:
    """``torch.compile`` a model so that its compiled graphs keep what backward
    needs in ``config.bits`` bits (see the module docstring).

    Args:
        model: a plain model. A model converted by :func:`compress_` is
            restored in place first (its config is used when ``config`` is
            None): compiled graphs quantize what they keep themselves.
        config: a :class:`MesaConfig` (default: 8 bits).
        blocks: compile each Transformer block on its own (regional
            compilation, as with FSDP2: one compiled graph shared by all
            blocks, compiled once) instead of the whole model; the rest of
            the model runs eagerly and keeps its tensors exact. ``None``
            (default): by block where the model has a list of blocks that
            the config treats alike, else whole. By block compiles about 8x
            faster and peaks lower (docs/benchmarks.md, "Compiled saving").
        compile_kwargs: passed to ``torch.compile`` (``mode``, ``dynamic``,
            ``fullgraph``, ``options``); the backend is Inductor.

    Returns:
        The compiled model (``torch.compile``'s wrapper), or with
        ``blocks=True`` the model itself, its blocks compiled. Its state dict
        is the plain model's. Call it as usual; :func:`plan` lists what its
        graphs keep.
    """
    from .convert import config_of, is_compressed, restore_

    if not isinstance(model, nn.Module):
        raise TypeError(f"torch_mesa.compile expects an nn.Module, got {type(model).__name__}")
    if not supported():
        raise RuntimeError(
            f"torch_mesa.compile needs a PyTorch whose AOTAutograd inlines saved-tensor hooks into compiled "
            f"graphs (2.14 has it; this is {torch.__version__}); convert the model with torch_mesa.compress_ "
            "instead, which works with torch.compile too (one graph break per converted op)"
        )
    if "backend" in compile_kwargs:
        raise TypeError("torch_mesa.compile uses Inductor (the quantizer is fused by it); drop backend=")
    if is_compressed(model):
        config = config if config is not None else config_of(model)
        restore_(model)
    config = MesaConfig() if config is None else config
    if blocks is None:
        try:
            name, container = find_blocks(model)
            _check_uniform(config, name, container)
            blocks = True
        except ValueError:
            blocks = False
    if not blocks:
        saving = CompiledSaving(config)
        compiled = torch.compile(model, backend=_inductor_recomputing, **compile_kwargs)
        _install(compiled, saving)
        return compiled
    name, container = find_blocks(model)
    _check_uniform(config, name, container)
    saving = CompiledSaving(config, prefix=_join(name, "0"))
    for block in container:
        block.compile(backend=_inductor_recomputing_blocks, **compile_kwargs)
    _install(model, saving)
    return model


def saving_of(model: nn.Module) -> Optional[CompiledSaving]:
    """The :class:`CompiledSaving` of a model from :func:`compile`, or None."""
    return getattr(model, "_mesa_saving", None)


def plan(model: nn.Module) -> str:
    """What the graphs of a model from :func:`compile` keep (after its first
    forward has compiled them): each saved value, its module, how it is kept
    and why, with totals."""
    saving = saving_of(model)
    if saving is None:
        raise ValueError("this model was not compiled by torch_mesa.compile")
    entries = saving.plan()
    if not entries:
        return "nothing compiled yet: run a forward pass with gradients first"
    lines = ["| value | module | shape | dtype | kept | why | exact | kept |", "|---|---|---|---|---|---|---:|---:|"]
    for e in entries:
        lines.append(f"| {e.node} | {e.module or '(model)'} | {tuple(e.shape)} | {str(e.dtype).replace('torch.', '')} "
                     f"| {e.kept} | {e.reason} | {format_bytes(e.exact_bytes)} | {format_bytes(e.kept_bytes)} |")
    exact = sum(e.exact_bytes for e in entries)
    kept = sum(e.kept_bytes for e in entries)
    lines.append(f"\n{len(entries)} saved values in the compiled graphs: {format_bytes(exact)} exact, "
                 f"{format_bytes(kept)} kept ({kept / max(exact, 1):.3f}x)")
    return "\n".join(lines)
