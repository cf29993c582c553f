"""The fused quantizer: the reference, compiled whole.

Inductor turns the reference's chain of small eager kernels (float cast,
subtract, divide, round, clamp, cast, pack; the per-channel and per-row
reductions; the per-group bookkeeping and the running-range step) into a few
fused loops: C++/OpenMP on CPU, Triton on GPU. Keeping an activation is one
call of one compiled function (:func:`.reference.quantize_core`), expanding
it another (:func:`.reference.dequantize_core`): on small tensors the cost
of a call, not of the loops, is what a step pays, and the reference runs
about 40 small kernels per keep. Every statistic is a min or a max and the
rest is the same elementwise arithmetic, so with nearest rounding the two
paths agree bit for bit (tested).

One compiled function is made per static setting (dtype, rank, bits, channel
axes, grouping, row mode, rounding, running-range step), each with a code
object of its own, so Dynamo's limit of 8 variants per code object is only
spent on shapes and strides (which its automatic dynamic-shape handling soon
generalises). Where compilation is unavailable (no C++ compiler, an
unsupported platform), the first failure emits one warning and the
reference is used from then on.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import types
import warnings
from typing import Callable, Optional

import torch
from torch.utils._python_dispatch import _disable_current_modes

from . import reference as ref

_log = logging.getLogger(__name__)

_broken: Optional[str] = None  # why compilation was given up, if it was


class _Compiled:
    """One compiled function per setting.

    Two ways to run it, both Inductor's code:

    * *Direct*, for the first ``_DIRECT_LAYOUTS`` input layouts (sizes,
      strides, dtypes, devices and the plain Python arguments) a setting
      meets: the function is traced to an ATen graph for that exact layout
      and compiled by ``torch._inductor.compile``; a call looks the layout up
      in a dict and runs the compiled graph, with no Dynamo frame or guard
      evaluation. A small model's step makes dozens of keeps and expansions,
      each called cold between large kernels that evicted what the call
      path touches: in the demo model's step the wall time inside its 54
      calls fell from 12.1 to 6.2 ms (``benchmarks/quant_speed.py --calls``
      compares the two paths call by call). Training meets one or two
      layouts per setting.
    * *Through Dynamo*, for any further layout: compiled with every size
      dynamic, so the shapes of a varying workload (padded batches of any
      length) cost one more compilation, not one each. Where that trace
      fails (PyTorch 2.11's Dynamo, after the direct compiles), with sizes
      made dynamic as they vary instead (Dynamo's default: two more
      compilations), before the setting is given up for the eager reference.

    Each setting's Dynamo function gets a code object of its own (same
    bytecode, own name): Dynamo keeps at most 8 variants per code object
    (``recompile_limit``), so settings never evict one another, and the
    limit is not raised globally, which would change how users' own compiled
    code behaves. Where the direct compile is unavailable (an older PyTorch)
    or fails, the setting goes through Dynamo only.
    """

    def __init__(self, fn: Callable, tag: str, serial: bool = False) -> None:
        self.fn, self.tag, self.serial = fn, tag, serial
        self.direct: Optional[dict] = {}  # (None once a direct compile failed)
        self.dynamic = False
        self.automatic = False  # (every size dynamic failed: sizes made dynamic as they vary)
        self.impl = None

    def _make(self, dynamic):
        fn = self.fn
        name = f"{fn.__name__}_{self.tag}" + ("_serial" if self.serial else "") + ("_dynamic" if dynamic else "")
        code = fn.__code__.replace(co_name=name)
        own = types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)
        return torch.compile(own, fullgraph=True, dynamic=dynamic, options=_options(self.serial))

    def _compile_direct(self, args):
        import torch._inductor as inductor
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.fx.experimental.proxy_tensor import make_fx
        from torch.fx.experimental.symbolic_shapes import ShapeEnv
        from torch.utils import _pytree as pytree

        where = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
        tree = []

        def flat(*tensors):
            full = list(args)
            for i, t in zip(where, tensors):
                full[i] = t
            out, spec = pytree.tree_flatten(self.fn(*full))
            tree.append(spec)
            return out

        # Traced on fake tensors of these exact sizes, from a mode with a
        # shape environment: without one, Inductor's and AOTAutograd's caches
        # are bypassed and every process would compile from scratch.
        mode = FakeTensorMode(shape_env=ShapeEnv())
        fakes = [mode.from_tensor(args[i], static_shapes=True) for i in where]
        with torch.no_grad(), mode:  # (in the mode: tensors made inside, aranges, are fake too)
            graph = make_fx(flat, tracing_mode="real")(*fakes)
        with _quiet_codegen():
            compiled = inductor.compile(graph, fakes, options=_options(self.serial))
        spec = tree[0]

        def call(args):
            return pytree.tree_unflatten(compiled(*[args[i] for i in where]), spec)

        return call

    def __call__(self, *args):
        if _DIRECT and self.direct is not None:
            key = tuple(_layout(a, args[:i]) for i, a in enumerate(args))
            call = self.direct.get(key)
            if call is None and len(self.direct) < _DIRECT_LAYOUTS:
                try:
                    call = self.direct[key] = self._compile_direct(args)
                except Exception as err:  # (compiler errors come in many types) Dynamo from now on
                    _log.info("torch-mesa: %s is compiled through Dynamo (the direct compile failed: %s)",
                              self.tag, _summary(err))
                    self.direct = None
            if call is not None:
                return call(args)
            if self.impl is None:  # (direct layouts used up: sizes vary, so dynamic from the start)
                self.dynamic = True
        if self.impl is None:
            self.impl = self._make(True if self.dynamic else None)
        # (a view's base goes into Dynamo's guards too: a flat view of a
        # feature map would guard on the map's shape; detached, it has none)
        args = tuple(a.detach() if isinstance(a, torch.Tensor) and a._base is not None else a for a in args)
        try:
            with _quiet_codegen():
                return self.impl(*args)
        except torch.OutOfMemoryError:
            raise
        except Exception as err:  # Dynamo's limit error has moved between modules
            if not self.dynamic and "limit" in f"{type(err).__name__} {err}".lower():
                self.dynamic = True
                self.impl = self._make(True)
                return self.impl(*args)
            if not self.dynamic or self.automatic:
                raise
            # PyTorch 2.11's Dynamo failed to trace some settings with every
            # size dynamic once they had been compiled directly ("RuntimeError
            # when making fake tensor call", a reshape of a reduced tensor),
            # where sizes marked dynamic as they vary (Dynamo's default)
            # compile: try that before giving the setting up for the eager
            # reference.
            _log.info("torch-mesa: %s is compiled with sizes made dynamic as they vary (every size dynamic "
                      "failed: %s)", self.tag, _summary(err))
            self.automatic = True
            self.impl = self._make(None)
            with _quiet_codegen():
                return self.impl(*args)


@contextlib.contextmanager
def _quiet_codegen():
    """Inductor's C++ code generator warns of every loop that reads fp16 and
    bf16 together ("bf16 and fp16 are mixed in the scheduler node"): an fp16
    tensor kept with the token scale, whose row widths are bf16, makes one
    per graph. The keep is tested bit for bit against the eager reference in
    fp16 too, so a user training in fp16 is not shown it; any other warning
    passes, and the filter holds only while the quantizer compiles."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="bf16 and fp16 are mixed", category=UserWarning)
        yield


def _summary(err: Exception) -> str:
    """A compiler error in one line: its type and the first line of its message."""
    return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"


def _layout(arg, before) -> tuple:
    """What a graph compiled for ``arg`` assumed of it: sizes, strides, dtype
    and device, and which earlier argument it is, if it is one (a running
    estimate's first step passes one zero tensor as both the low end and the
    span; the compiled graph then reads one input for both, so it must not
    serve two different tensors); plain Python values as they are."""
    if not isinstance(arg, torch.Tensor):
        return arg
    same = next((i for i, b in enumerate(before) if b is arg), -1)
    return arg.shape, arg.stride(), arg.dtype, arg.device, same


# How many input layouts of one setting are compiled directly (see _Compiled);
# _DIRECT = False sends every call through Dynamo (for comparing the two).
_DIRECT_LAYOUTS = 2
_DIRECT = True


def _compile(fn: Callable, tag: str, serial: bool = False) -> Callable:
    return _Compiled(fn, tag, serial)


# Tensors under this many elements are kept and expanded by code compiled
# for one thread. A compiled keep makes four passes (statistics, then codes),
# each an OpenMP loop ending in a barrier: on a 2-core machine shared with
# other work, a thread that waits at a barrier for one that is not running
# waited a scheduler time slice, several milliseconds, for passes that take
# tens of microseconds on one core (a (64, 17, 64) keep: 0.3 ms on one thread
# against 48 ms on two, measured side by side under load). ATen runs its
# one-pass ops in one thread below 32768 elements per thread.
_SERIAL_NUMEL = 1 << 19


def _realize_divisors(graph) -> None:
    """Inductor pass: every reciprocal of at most an eighth of the graph's
    largest tensor (a channel's, row's or group's divisor) is computed once
    into a buffer of its own. Left to itself, Inductor inlines such a small
    pointwise result into each loop that reads it, so every element paid a
    vector division again, once for each divisor, in each of the passes over
    the tensor: the division :func:`.reference._inverse` exists to avoid.
    The token-scaled keep of ViT-S's bf16 MLP activation took about a
    quarter less time (``benchmarks/quant_speed.py``; figures in
    docs/benchmarks.md). The size bound leaves a model's own elementwise
    reciprocal to Inductor where the quantizer is inlined into a model's
    graphs (``torch_mesa.compile``); the quantizer's own reciprocals are all
    within it (tested)."""
    def numel(node):
        val = node.meta.get("val")
        return _size_hint(val.numel()) if isinstance(val, torch.Tensor) else 0

    largest = max((numel(n) for n in graph.nodes), default=0)
    for node in graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.aten.reciprocal.default \
                and 0 < 8 * numel(node) <= largest:
            node.meta["inductor_realize_to_strides"] = True


def _size_hint(n) -> int:
    """An int, or a symbolic size's value in the example inputs (0 where
    this PyTorch cannot say: then nothing counts as small)."""
    if isinstance(n, int):
        return n
    from torch.fx.experimental import symbolic_shapes

    # (newest name first: 2.11 still has hint_int, and warns on every call of it)
    hint = next((getattr(symbolic_shapes, name) for name in ("optimization_hint", "size_hint", "hint_int")
                 if hasattr(symbolic_shapes, name)), None)
    try:
        return int(hint(n, fallback=0)) if hint is not None else 0
    except Exception:  # (a size with no hint)
        return 0


def _pass_class():
    """Inductor's base class for a custom pass (whose ``uuid`` its caches key
    on), or ``object`` where this PyTorch has none (then no pass is used)."""
    try:
        from torch._inductor.custom_graph_pass import CustomGraphPass
    except ImportError:
        return object
    return CustomGraphPass


class _RealizeDivisors(_pass_class()):
    """:func:`_realize_divisors` as Inductor's post-grad pass."""

    def __call__(self, graph) -> None:
        _realize_divisors(graph)

    def uuid(self):
        return "torch-mesa: reciprocals realized, 2"


@functools.lru_cache(maxsize=None)
def _options(serial: bool) -> Optional[dict]:
    """Inductor's options for the quantizer's graphs (None: the defaults):
    the pass :func:`_realize_divisors`, where this PyTorch takes custom
    passes; ``emulate_precision_casts`` (no cast to a narrower dtype and back
    elided: a second guard for the token scale's bf16 widths, which
    :func:`.reference._bf16_exact` rounds on their bits); ``cpp.threads`` = 1
    for small tensors (``serial``, see :func:`_serial`)."""
    from torch._inductor import config

    options: dict = {"cpp.threads": 1} if serial else {}
    if hasattr(config, "emulate_precision_casts"):
        options["emulate_precision_casts"] = True
    if _RealizeDivisors.__bases__ != (object,) and hasattr(config, "post_grad_custom_post_pass"):
        options["post_grad_custom_post_pass"] = _RealizeDivisors()
    return options or None


def _serial(numel: int, device: torch.device) -> bool:
    return device.type == "cpu" and numel < _SERIAL_NUMEL


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _setting_tag(*parts) -> str:
    return "_".join(str(p) for p in parts).translate(str.maketrans("(), .-", "______"))


@functools.lru_cache(maxsize=None)
def _quantize(dtype: torch.dtype, ndim: int, bits: int, axes: tuple, group_size, rows, running,
              stochastic: bool, serial: bool = False) -> Callable:
    settings = dict(bits=bits, axes=axes, group_size=group_size, rows=rows, running=running)

    # (the optional tensors are passed or not by setting, so no None reaches the compiled code)
    def quantize(x, *extra):
        seed = extra[0] if stochastic else None
        state = extra[len(extra) - 3:] if running is not None else (None, None, None)
        return ref.quantize_core(x, seed, *state, **settings)

    return _compile(quantize, _setting_tag("q", _dtype_name(dtype), ndim, bits, axes, group_size, rows, running,
                                           int(stochastic)), serial)


@functools.lru_cache(maxsize=None)
def _dequantize(shape_rank: int, dtype: torch.dtype, bits: int, axes: tuple, group_size, rows,
                serial: bool = False) -> Callable:
    def dequantize(shape, *saved):
        return ref.dequantize_core(saved, shape=shape, dtype=dtype, bits=bits, axes=axes, group_size=group_size,
                                   rows=rows)

    return _compile(dequantize, _setting_tag("dq", shape_rank, _dtype_name(dtype), bits, axes, group_size, rows),
                    serial)


def available() -> bool:
    """False once compilation failed somewhere and the reference was used."""
    return _broken is None


_failed = set()  # compiled functions that failed: the reference runs instead


@contextlib.contextmanager
def _no_function_modes():
    """Every ``TorchFunctionMode`` off (the routing scope's, a user's): the
    quantizer's own tensor ops are nobody else's business, and Dynamo would
    trace a mode's Python and guard on its state, recompiling as it changes."""
    if not torch._C._len_torch_function_stack():
        yield
        return
    modes = []
    while torch._C._len_torch_function_stack():
        modes.append(torch._C._pop_torch_function_stack())
    try:
        yield
    finally:
        for mode in reversed(modes):
            torch._C._push_on_torch_function_stack(mode)


def without_data(*args) -> bool:
    """Whether any tensor among ``args`` has no data a compiled kernel or a
    data-dependent check could read: a fake tensor (a ``FakeTensorMode``,
    tracing), a meta tensor, or another subclass that holds its data
    elsewhere. Inductor's kernels read raw pointers: given a fake tensor,
    the process crashed (segmentation fault)."""
    plain = (torch.Tensor, torch.nn.Parameter)
    return any(isinstance(a, torch.Tensor) and (a.device.type == "meta" or type(a) not in plain) for a in args)


def _run(compiled: Callable, eager: Callable, *args):
    global _broken
    # (detached: whether an input requires grad changes nothing here, and
    # Dynamo would compile a variant for each)
    args = tuple(a.detach() if isinstance(a, torch.Tensor) and a.requires_grad else a for a in args)
    if without_data(*args):
        return eager(*args)  # (the reference's ops, which any mode or subclass handles)
    if compiled not in _failed:
        try:
            if not torch._C._len_torch_function_stack():  # (the usual case: ops step out of the routing mode)
                return compiled(*args)
            with _no_function_modes():
                return compiled(*args)
        except torch.OutOfMemoryError:
            raise
        except Exception as err:  # compiler errors come in many types
            # An error the eager code raises too is the input's fault, not the
            # compiler's: let it surface. Otherwise use the reference for this
            # function from now on, and say so once.
            out = eager(*args)
            _failed.add(compiled)
            if _broken is None:
                _broken = _summary(err)
                warnings.warn(
                    "torch-mesa: compiling the fused quantizer failed; using the slower eager "
                    f"reference where it failed. Cause: {_broken}",
                    RuntimeWarning,
                    stacklevel=4,
                )
            return out
    return eager(*args)


def _quantize_core(x, seed, run_lo, run_span, momentum, *, bits, axes, group_size, rows, running):
    compiled = _quantize(x.dtype, x.dim(), bits, axes, group_size, rows, running, seed is not None,
                         _serial(x.numel(), x.device))
    extra = ((seed,) if seed is not None else ()) + ((run_lo, run_span, momentum) if running is not None else ())
    return _run(compiled, lambda t, *e: ref.quantize_core(
        t, seed, run_lo, run_span, momentum, bits=bits, axes=axes, group_size=group_size, rows=rows,
        running=running), x, *extra)


def quantize(x, bits, axes, group_size, stochastic, *, rows=None, running=None):
    """:func:`.reference.quantize`, compiled."""
    return ref.quantize_with(_quantize_core, x, bits, axes, group_size, stochastic, rows, running)


def dequantize(saved, shape, dtype, bits, axes, group_size, *, rows=None):
    """:func:`.reference.dequantize`, compiled."""
    shape = tuple(shape)
    axes = ref.normalize_axes(axes, len(shape))
    compiled = _dequantize(len(shape), dtype, bits, axes, group_size, rows,
                           _serial(math.prod(shape), saved[0].device))
    return _run(compiled, lambda sh, *sv: ref.dequantize_core(
        sv, shape=sh, dtype=dtype, bits=bits, axes=axes, group_size=group_size, rows=rows), shape, *saved)


@functools.lru_cache(maxsize=None)
def _pack_bits(ndim: int, serial: bool = False) -> Callable:
    def pack_bits(mask):
        return ref.pack_bits(mask)

    return _compile(pack_bits, f"bits_{ndim}d", serial)


@functools.lru_cache(maxsize=None)
def _unpack_bits(ndim: int, serial: bool = False) -> Callable:
    def unpack_bits(n, packed):
        # (as uint8: Inductor's CPU stores of bool are about 4x slower; the
        # 0/1 bytes are reinterpreted as bool outside)
        return ref.unpack(packed, 1, n)

    return _compile(unpack_bits, f"bits_{ndim}d", serial)


@functools.lru_cache(maxsize=None)
def _apply_bits(ndim: int, dtype: torch.dtype, serial: bool = False) -> Callable:
    # (one setting per dtype, as the quantizer's: every dropout probability
    # and every layer's mask of a dtype share it, and a setting that serves
    # too many layouts ends in Dynamo's recompile limit)
    def apply_bits(x, packed, scale):
        return ref.apply_bits(x, packed, scale)

    return _compile(apply_bits, f"bits_{ndim}d_{_dtype_name(dtype)}_scaled", serial)


_scales: dict = {}


def _scale_tensor(scale: float, x) -> torch.Tensor:
    """``scale`` as a 0-dim tensor of the dtype :func:`.reference.apply_bits`
    computes in, on ``x``'s device: an input of the compiled graph, not a
    constant of it. As a constant, every dropout probability compiled a graph
    of its own (about 1.4 s each on a 2-core CPU): a schedule that changes
    ``p`` every step would have compiled every step. The product is the same
    either way (a Python float is rounded to that dtype too)."""
    wide = ref.product_dtype(x.dtype)
    key = (scale, wide, x.device)
    t = _scales.get(key)
    if t is None:
        with _disable_current_modes():  # (a real tensor even when first made under a FakeTensorMode)
            t = torch.tensor(scale, dtype=wide, device=x.device)
        if len(_scales) < 256:  # (bounded: a schedule of probabilities makes new ones without end)
            _scales[key] = t
    return t


# A mask's bits follow its tensor's elements in row-major order, so the
# compiled mask functions take the tensor as one flat dimension and the
# caller's view gives the result its shape back. Compiled for the shape
# itself, the reshapes to and from eight-element rows made Dynamo guard on
# how the sizes divide: a CNN's masks, one shape per feature map, used up
# the recompile limit (8) of the one setting they share, and the rest ran
# the eager reference. (The settings are still one per rank, so that each
# rank's first layouts are compiled directly: see _Compiled.) The flat
# tensor is a view where the tensor is contiguous, else the copy the
# reference's reshape makes too; its base is dropped before Dynamo sees it.


def apply_bits(x, packed, scale):
    """:func:`.reference.apply_bits`, compiled: one pass over ``x`` and the bits."""
    scale = float(scale)
    out = _run(_apply_bits(x.dim(), x.dtype, _serial(x.numel(), x.device)),
               lambda t, p, _: ref.apply_bits(t, p, scale), x.reshape(-1), packed, _scale_tensor(scale, x))
    return out.view(x.shape)


def pack_bits(mask):
    """:func:`.reference.pack_bits`, compiled."""
    return _run(_pack_bits(mask.dim(), _serial(mask.numel(), mask.device)), ref.pack_bits, mask.reshape(-1))


def unpack_bits(packed, shape):
    """:func:`.reference.unpack_bits`, compiled."""
    n = math.prod(shape)
    codes = _run(_unpack_bits(len(shape), _serial(n, packed.device)), lambda k, p: ref.unpack(p, 1, k), n, packed)
    return codes.view(torch.bool).view(tuple(shape))
