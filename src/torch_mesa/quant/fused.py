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
import math
import types
import warnings
from typing import Callable, Optional

import torch

from . import reference as ref

_broken: Optional[str] = None  # why compilation was given up, if it was


class _Compiled:
    """One compiled function per setting, with a code object of its own.

    Dynamo keeps compiled variants on the function's code object, at most 8
    per code object (``recompile_limit``), specialising on shapes first. Each
    setting gets its own code object (same bytecode, own name), so settings
    never evict one another; should one setting still meet more than 8
    shape/stride variants, it is recompiled once with every size dynamic
    (a little slower per call, never recompiled again) instead of raising
    the limit globally, which would change how users' own compiled code
    behaves.
    """

    def __init__(self, fn: Callable, tag: str, serial: bool = False) -> None:
        self.fn, self.tag, self.serial = fn, tag, serial
        self.dynamic = False
        self.impl = self._make(None)

    def _make(self, dynamic):
        fn = self.fn
        name = f"{fn.__name__}_{self.tag}" + ("_serial" if self.serial else "") + ("_dynamic" if dynamic else "")
        code = fn.__code__.replace(co_name=name)
        own = types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)
        return torch.compile(own, fullgraph=True, dynamic=dynamic, options=_SERIAL if self.serial else None)

    def __call__(self, *args):
        try:
            return self.impl(*args)
        except Exception as err:  # Dynamo's limit error has moved between modules
            if self.dynamic or "limit" not in f"{type(err).__name__} {err}".lower():
                raise
            self.dynamic = True
            self.impl = self._make(True)
            return self.impl(*args)


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
_SERIAL = {"cpp.threads": 1}


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


def _run(compiled: Callable, eager: Callable, *args):
    global _broken
    # (detached: whether an input requires grad changes nothing here, and
    # Dynamo would compile a variant for each)
    args = tuple(a.detach() if isinstance(a, torch.Tensor) and a.requires_grad else a for a in args)
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
                _broken = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"
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
    def unpack_bits(shape, packed):
        # (as uint8: Inductor's CPU stores of bool are about 4x slower; the
        # 0/1 bytes are reinterpreted as bool outside)
        return ref.unpack(packed, 1, math.prod(shape)).reshape(shape)

    return _compile(unpack_bits, f"bits_{ndim}d", serial)


def pack_bits(mask):
    """:func:`.reference.pack_bits`, compiled."""
    return _run(_pack_bits(mask.dim(), _serial(mask.numel(), mask.device)), ref.pack_bits, mask)


def unpack_bits(packed, shape):
    """:func:`.reference.unpack_bits`, compiled."""
    shape = tuple(shape)
    codes = _run(_unpack_bits(len(shape), _serial(math.prod(shape), packed.device)), lambda sh, p: ref.unpack(p, 1, math.prod(sh)).reshape(sh), shape, packed)
    return codes.view(torch.bool)
