"""The fused quantizer: the reference's passes over an activation, compiled.

Inductor turns the reference's chain of small eager kernels (float cast,
subtract, divide, round, clamp, cast, pack; the per-channel and per-row
reductions) into fused loops: C++/OpenMP on CPU, Triton on GPU. This is what
keeps the quantizer a small fraction of a training step instead of costing
about as much as the step (step times in docs/benchmarks.md).

Only the passes over the activation are compiled (:class:`Primitives` of
:mod:`.reference`): row statistics, per-channel magnitudes and min/max,
quantize-and-pack, unpack-and-dequantize. The per-group bookkeeping in between
works on one value per channel and stays eager, exactly as in the reference, so
the two paths agree bit for bit with nearest rounding. (Compiling that
bookkeeping too was tried: Inductor's CPU code for an indexed broadcast along
the innermost dimension read the wrong group in the tail of its vectorised
loop.)

One compiled function is made per static setting (dtype, rank, bits, rounding,
channel axes, row normalisation), each with a code object of its own, so
Dynamo's limit of 8 variants per code object is only spent on shapes and
strides (which its automatic dynamic-shape handling soon generalises). Where
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

    def __init__(self, fn: Callable, tag: str) -> None:
        self.fn, self.tag = fn, tag
        self.dynamic = False
        self.impl = self._make(None)

    def _make(self, dynamic):
        fn = self.fn
        name = f"{fn.__name__}_{self.tag}" + ("_dynamic" if dynamic else "")
        code = fn.__code__.replace(co_name=name)
        own = types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)
        return torch.compile(own, fullgraph=True, dynamic=dynamic)

    def __call__(self, *args):
        try:
            return self.impl(*args)
        except Exception as err:  # Dynamo's limit error has moved between modules
            if self.dynamic or "limit" not in f"{type(err).__name__} {err}".lower():
                raise
            self.dynamic = True
            self.impl = self._make(True)
            return self.impl(*args)


def _compile(fn: Callable, tag: str) -> Callable:
    return _Compiled(fn, tag)


def _key(x: torch.Tensor) -> str:
    return f"{str(x.dtype).replace('torch.', '')}_{x.dim()}d"


def _layout(per_channel: torch.Tensor) -> str:
    """Which dimensions carry ranges (the broadcast pattern of lo/scale):
    Dynamo specialises on size-1 dimensions, so each pattern gets its own
    compiled function instead of competing for one's variants."""
    return "c" + "".join("1" if n != 1 else "0" for n in per_channel.shape)


_FRAME = ("centre", "width", "chan")


def _frame_tag(frame: dict) -> str:
    """Which row-mode tensors a call passes (``"cw-"``: centre and width)."""
    return "".join(n[0] if frame.get(n) is not None else "-" for n in _FRAME)


def _frame_args(frame: dict) -> tuple:
    return tuple(frame[n] for n in _FRAME if frame.get(n) is not None)


def _frame_of(tag: str, args: tuple) -> dict:
    names = [n for n, c in zip(_FRAME, tag) if c != "-"]
    return dict(zip(names, args))


@functools.lru_cache(maxsize=None)
def _row_stats(key: str) -> Callable:
    def row_stats(x):
        return ref.row_stats(x)

    return _compile(row_stats, f"rows_{key}")


@functools.lru_cache(maxsize=None)
def _absmax(key: str, axes: tuple) -> Callable:
    def absmax(x):
        return ref.channel_absmax(x, axes)

    return _compile(absmax, f"absmax_{key}_{'_'.join(map(str, axes))}")


@functools.lru_cache(maxsize=None)
def _scaled_rows(key: str, layout: str) -> Callable:
    def scaled_rows(x, chan):
        return ref.scaled_row_stats(x, chan)

    return _compile(scaled_rows, f"scaledrows_{key}_{layout}")


@functools.lru_cache(maxsize=None)
def _minmax(key: str, axes: tuple, per_tensor: bool, tag: str) -> Callable:
    def minmax(x, *frame):
        return ref.channel_minmax(x, axes, per_tensor, **_frame_of(tag, frame))

    axes_tag = "_".join(map(str, axes))
    return _compile(minmax, f"{key}_{axes_tag}_{int(per_tensor)}_{tag.replace('-', 'x')}")


@functools.lru_cache(maxsize=None)
def _codes(key: str, layout: str, bits: int, stochastic: bool, tag: str) -> Callable:
    if stochastic:

        def codes(x, lo_c, scale_c, seed, *frame):
            return ref.quantize_codes(x, lo_c, scale_c, bits, seed, **_frame_of(tag, frame))

    else:

        def codes(x, lo_c, scale_c, *frame):
            return ref.quantize_codes(x, lo_c, scale_c, bits, None, **_frame_of(tag, frame))

    return _compile(codes, f"{key}_{layout}_{bits}b_{int(stochastic)}_{tag.replace('-', 'x')}")


@functools.lru_cache(maxsize=None)
def _dequant(dtype: torch.dtype, ndim: int, layout: str, bits: int, tag: str) -> Callable:
    def dequant(packed, lo_c, scale_c, shape, *frame):
        return ref.dequantize_codes(packed, lo_c, scale_c, shape, dtype, bits, **_frame_of(tag, frame))

    name = f"{str(dtype).replace('torch.', '')}_{ndim}d_{layout}_{bits}b_{tag.replace('-', 'x')}"
    return _compile(dequant, name)


def available() -> bool:
    """False once compilation failed somewhere and the reference was used."""
    return _broken is None


_failed = set()  # compiled functions that failed: the reference runs instead


def _run(compiled: Callable, eager: Callable, *args):
    global _broken
    # (detached: whether an input requires grad changes nothing here, and
    # Dynamo would compile a variant for each)
    args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    if compiled not in _failed:
        try:
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


def row_stats(x):
    return _run(_row_stats(_key(x)), ref.row_stats, x)


def channel_absmax(x, axes):
    return _run(_absmax(_key(x), tuple(axes)), lambda t: ref.channel_absmax(t, axes), x)


def scaled_row_stats(x, chan):
    return _run(_scaled_rows(_key(x), _layout(chan)), ref.scaled_row_stats, x, chan)


def channel_minmax(x, axes, per_tensor, **frame):
    tag = _frame_tag(frame)
    return _run(
        _minmax(_key(x), tuple(axes), per_tensor, tag),
        lambda t, *f: ref.channel_minmax(t, axes, per_tensor, **_frame_of(tag, f)),
        x,
        *_frame_args(frame),
    )


def quantize_codes(x, lo_c, scale_c, bits, seed=None, **frame):
    tag = _frame_tag(frame)
    lead = () if seed is None else (seed,)

    def eager(t, lo, sc, *rest):
        s, f = (rest[0], rest[1:]) if lead else (None, rest)
        return ref.quantize_codes(t, lo, sc, bits, s, **_frame_of(tag, f))

    return _run(
        _codes(_key(x), _layout(lo_c), bits, seed is not None, tag),
        eager,
        x,
        lo_c,
        scale_c,
        *lead,
        *_frame_args(frame),
    )


def dequantize_codes(packed, lo_c, scale_c, shape, dtype, bits, **frame):
    tag = _frame_tag(frame)
    return _run(
        _dequant(dtype, len(shape), _layout(lo_c), bits, tag),
        lambda p, lo, sc, sh, *f: ref.dequantize_codes(p, lo, sc, sh, dtype, bits, **_frame_of(tag, f)),
        packed,
        lo_c,
        scale_c,
        tuple(shape),
        *_frame_args(frame),
    )


PRIMS = ref.Primitives(row_stats, channel_minmax, quantize_codes, dequantize_codes, channel_absmax,
                       scaled_row_stats)
