"""The fused quantizer: the reference's heavy loops compiled by ``torch.compile``.

Inductor turns the reference's chain of small eager kernels (float cast,
subtract, divide, round, clamp, cast, pack; and the per-channel reductions)
into fused loops: C++/OpenMP on CPU, Triton on GPU. Measured on a 2-core CPU
with ViT-S activations, this is what keeps the quantizer a small fraction of a
training step instead of costing about as much as the step
(benchmarks/quantizer.py, docs/benchmarks.md).

Only the passes over the activation are compiled: the per-channel min/max
(one read), the quantize-and-pack (one read, a 1/4..1/16-size write) and the
unpack-and-dequantize. The per-group bookkeeping in between works on one value
per channel and stays eager, exactly as in the reference, which is why the two
paths agree bit for bit with nearest rounding.

One compiled function is made per static setting (bits, rounding, dtype,
axis); shapes are left to Dynamo's automatic dynamic-shape handling. Where
compilation is unavailable (no C++ compiler, an unsupported platform), the
first failure emits one warning and the reference is used from then on.
"""

from __future__ import annotations

import functools
import types
import warnings
from typing import Callable, Optional

import torch

from . import reference as ref

_broken: Optional[str] = None  # why compilation was given up, if it was


def _compile(fn: Callable, tag: str) -> Callable:
    # Dynamo keeps compiled variants on the function's code object, at most 8
    # per code object. Each setting gets a code object of its own (same
    # bytecode, own name), so settings never evict one another.
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{tag}")
    own = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)
    return torch.compile(own, fullgraph=True, dynamic=None)


@functools.lru_cache(maxsize=None)
def _minmax(axis: int, per_tensor: bool) -> Callable:
    def minmax(x):
        return ref.channel_minmax(x, axis, per_tensor)

    return _compile(minmax, f"{axis}_{int(per_tensor)}")


@functools.lru_cache(maxsize=None)
def _codes(bits: int, stochastic: bool) -> Callable:
    def codes(x, lo_c, scale_c):
        return ref.quantize_codes(x, lo_c, scale_c, bits, stochastic)

    return _compile(codes, f"{bits}b_{int(stochastic)}")


@functools.lru_cache(maxsize=None)
def _dequant(dtype: torch.dtype, bits: int) -> Callable:
    def dequant(packed, lo_c, scale_c, shape):
        return ref.dequantize_codes(packed, lo_c, scale_c, shape, dtype, bits)

    return _compile(dequant, f"{str(dtype).replace('torch.', '')}_{bits}b")


def available() -> bool:
    """False once compilation failed and the reference is used instead."""
    return _broken is None


def _run(compiled: Callable, eager: Callable, *args):
    global _broken
    if _broken is None:
        try:
            return compiled(*args)
        except torch.OutOfMemoryError:
            raise
        except Exception as err:  # compiler errors come in many types
            # An error the eager code raises too is the input's fault, not the
            # compiler's: let it surface. Otherwise give up compiling for good.
            out = eager(*args)
            _broken = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"
            warnings.warn(
                "torch-mesa: compiling the fused quantizer failed; using the slower eager "
                f"reference from now on. Cause: {_broken}",
                RuntimeWarning,
                stacklevel=4,
            )
            return out
    return eager(*args)


def channel_minmax(x, axis, per_tensor):
    return _run(
        _minmax(axis, per_tensor), lambda t: ref.channel_minmax(t, axis, per_tensor), x
    )


def quantize_codes(x, lo_c, scale_c, bits, stochastic):
    return _run(
        _codes(bits, stochastic),
        lambda *a: ref.quantize_codes(*a, bits, stochastic),
        x,
        lo_c,
        scale_c,
    )


def dequantize_codes(packed, lo_c, scale_c, shape, dtype, bits):
    return _run(
        _dequant(dtype, bits),
        lambda p, lo, sc, sh: ref.dequantize_codes(p, lo, sc, sh, dtype, bits),
        packed,
        lo_c,
        scale_c,
        tuple(shape),
    )


def group_minmax(x, axis, group_size):
    cmin, cmax = channel_minmax(x, axis % x.dim(), group_size is None)
    return ref.groups_from_channels(cmin, cmax, group_size)


def quantize(x, bits, axis, group_size, stochastic):
    return ref.quantize(
        x, bits, axis, group_size, stochastic, minmax_fn=channel_minmax, codes_fn=quantize_codes
    )


def quantize_with_range(x, lo, hi, bits, axis, group_size, stochastic):
    return ref.quantize_with_range(
        x, lo, hi, bits, axis, group_size, stochastic, codes_fn=quantize_codes
    )


def dequantize(packed, lo, scale, shape, dtype, bits, axis, group_size):
    return ref.dequantize(
        packed, lo, scale, shape, dtype, bits, axis, group_size, dequantize_fn=dequantize_codes
    )
