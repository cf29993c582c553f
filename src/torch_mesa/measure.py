"""Where activation memory goes: the bytes a forward pass keeps for backward.

:func:`measure` runs one forward pass (and an optional loss) under
``torch.autograd.graph.saved_tensors_hooks`` and adds up the bytes of the
distinct storages autograd packs, attributed to the innermost module running
when each was packed. Storages of the model's parameters and buffers are left
out (they are kept anyway); a storage packed twice (a view, or torch-mesa's
keep-once sharing) counts once, for the module that packed it first.

A model from :func:`torch_mesa.compile` saves inside its compiled graphs,
with hooks switched off: its bytes are counted on the autograd graph after
the call instead (what each compiled graph and eager node holds), all under
``"<root>"``.

This is deterministic and device-independent: it counts what is kept, not
what the allocator happens to hold at the peak (for that, use
``torch.cuda.max_memory_allocated`` or the benchmarks' fresh-process RSS).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from .units import format_bytes

__all__ = ["MemoryReport", "live_tensor_bytes", "measure", "measure_call", "memory_in_use", "peak_since_reset",
           "process_memory", "reset_peak", "reset_peak_rss"]


@dataclass
class MemoryReport:
    """Bytes kept for backward, in total and per module (qualified names;
    ``"<loss>"`` for the loss function, ``"<root>"`` for the model itself)."""

    total_bytes: int
    by_module: Dict[str, int] = field(default_factory=dict)
    num_storages: int = 0

    def by_depth(self, depth: int) -> Dict[str, int]:
        """Totals per name prefix of ``depth`` components (``blocks.3`` at depth 2)."""
        out: Dict[str, int] = {}
        for name, n in self.by_module.items():
            key = ".".join(name.split(".")[:depth])
            out[key] = out.get(key, 0) + n
        return out

    def table(self, depth: Optional[int] = None, top: Optional[int] = None) -> str:
        rows = self.by_module if depth is None else self.by_depth(depth)
        items: List[Tuple[str, int]] = list(rows.items())
        if top is not None:
            items = sorted(items, key=lambda kv: -kv[1])[:top]
        width = max([len(k) for k, _ in items] + [6])
        lines = [f"{'module':<{width}}  {'kept for backward':>18}  {'share':>6}"]
        for name, n in items:
            share = n / self.total_bytes if self.total_bytes else 0.0
            lines.append(f"{name:<{width}}  {format_bytes(n):>18}  {share:>6.1%}")
        lines.append(f"{'total':<{width}}  {format_bytes(self.total_bytes):>18}  {'':>6}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table(depth=2)

    def to_dict(self) -> dict:
        return {"total_bytes": self.total_bytes, "by_module": dict(self.by_module)}




def _storage_key(t: torch.Tensor):
    try:
        st = t.untyped_storage()
        return (t.device, st.data_ptr()), st.nbytes()
    except (RuntimeError, NotImplementedError):  # no storage (e.g. sparse, nested)
        return None, 0


def _device_type(model: nn.Module, inputs) -> str:
    for t in list(inputs) + list(model.parameters()):
        if isinstance(t, torch.Tensor):
            return t.device.type
    return "cpu"


def measure(
    model: nn.Module,
    *inputs,
    loss_fn: Optional[Callable] = None,
    autocast_dtype: Optional[torch.dtype] = None,
    **kwargs,
) -> MemoryReport:
    """Bytes ``model(*inputs, **kwargs)`` keeps for backward, by module.

    Args:
        model: a converted or plain model (its train/eval mode is used as is).
        inputs, kwargs: what to call it with.
        loss_fn: optional ``loss_fn(output) -> loss``; what it keeps counts
            under ``"<loss>"``.
        autocast_dtype: run under ``torch.autocast`` with this dtype.
    """

    def run(m):
        out = m(*inputs, **kwargs)
        return loss_fn(out) if loss_fn is not None else out

    return measure_call(model, run, autocast_dtype=autocast_dtype, device_hint=inputs)


def _compiled(m: nn.Module) -> bool:
    return isinstance(m, torch._dynamo.eval_frame.OptimizedModule) or getattr(m, "_compiled_call_impl", None) is not None


def _hookable(model: nn.Module) -> List[nn.Module]:
    """The modules whose calls attribute bytes: all but those compiled with
    ``torch.compile`` (a whole model, or ``block.compile()``) and inside them,
    whose bytes go to the nearest module outside. Hooks added to a compiled
    module would make it recompile (or fail to, for a whole compiled model)."""
    out: List[nn.Module] = []

    def visit(m):
        if _compiled(m):
            return
        out.append(m)
        for c in m.children():
            visit(c)

    visit(model)
    return out


def measure_call(
    model: nn.Module,
    fn: Callable[[nn.Module], object],
    *,
    autocast_dtype: Optional[torch.dtype] = None,
    device_hint=(),
) -> MemoryReport:
    """Bytes kept for backward while ``fn(model)`` runs (a forward, and a
    loss if ``fn`` computes one), by module; what is kept outside every module
    of ``model`` counts under ``"<loss>"``. Compiled modules (``torch.compile``
    of the model or of its blocks) count as one: what they keep goes to the
    nearest module outside them (a whole compiled model: everything, its loss
    included, under ``"<root>"``)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"measure expects an nn.Module, got {type(model).__name__}")
    excluded = set()
    for t in list(model.parameters()) + list(model.buffers()):
        key, _ = _storage_key(t)
        if key is not None:
            excluded.add(key)
    names = {m: n for n, m in model.named_modules()}
    outside = "<root>" if _compiled(model) else "<loss>"  # (no hook sees a compiled model's calls)
    stack: List[str] = []
    seen = set()
    by_module: Dict[str, int] = {}

    def pre(module, args):
        stack.append(names.get(module) or "<root>")

    def post(module, args, out):
        if stack:
            stack.pop()

    def pack(t):
        key, nbytes = _storage_key(t)
        if key is not None and key not in excluded and key not in seen:
            seen.add(key)
            owner = stack[-1] if stack else outside
            by_module[owner] = by_module.get(owner, 0) + nbytes
        # (detached: a saved output kept with its grad_fn is a reference
        # cycle through C++, and this graph is dropped without a backward,
        # so it would never be reclaimed)
        return t.detach()

    if _compiled_saving(model) is not None:
        return _measure_compiled_saving(model, fn, excluded, autocast_dtype, device_hint)
    handles = []
    for m in _hookable(model):
        handles.append(m.register_forward_pre_hook(pre))
        handles.append(m.register_forward_hook(post, always_call=True))
    device_type = _device_type(model, device_hint)
    amp = (
        torch.autocast(device_type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else contextlib.nullcontext()
    )
    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), amp:
            out = fn(model)
        del out
    finally:
        for h in handles:
            h.remove()
    return MemoryReport(sum(by_module.values()), by_module, len(seen))


def _compiled_saving(model: nn.Module):
    """The compiled saving of a model from :func:`torch_mesa.compile`, or of
    a module inside it (a wrapper), if any: its graphs save their tensors
    with saved-tensor hooks switched off, out of reach of the hooks this
    module counts with."""
    return next((m._mesa_saving for m in model.modules() if getattr(m, "_mesa_saving", None) is not None), None)


def _saved_in_graph(roots) -> List[torch.Tensor]:
    """Every tensor the autograd graph behind ``roots`` holds for backward:
    compiled graphs' (what their pack epilogue returned) and eager nodes'
    (unpacked: eager code inside a compiled-saving call keeps them exact)."""
    out: List[torch.Tensor] = []
    seen = set()
    stack = [r.grad_fn for r in roots if isinstance(r, torch.Tensor) and r.grad_fn is not None]
    while stack:
        f = stack.pop()
        if f is None or f in seen:
            continue
        seen.add(f)
        if hasattr(f, "saved_tensors"):  # custom autograd functions (compiled graphs among them)
            out.extend(t for t in f.saved_tensors if isinstance(t, torch.Tensor))
            out.extend(t for t in getattr(f, "_tensors_no_vc_check", ()) if isinstance(t, torch.Tensor))
        for a in dir(f):
            if a.startswith("_saved_"):
                v = getattr(f, a)
                vs = v if isinstance(v, (tuple, list)) else (v,)
                out.extend(t for t in vs if isinstance(t, torch.Tensor))
        stack.extend(nf for nf, _ in f.next_functions)
    return out


def _measure_compiled_saving(model, fn, excluded, autocast_dtype, device_hint) -> MemoryReport:
    """Bytes kept by a model from :func:`torch_mesa.compile`: its compiled
    graphs save their (quantized) tensors with saved-tensor hooks switched
    off, so they are counted on the autograd graph after the call, all under
    ``"<root>"``."""
    device_type = _device_type(model, device_hint)
    amp = (
        torch.autocast(device_type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else contextlib.nullcontext()
    )
    with torch.enable_grad(), amp:
        out = fn(model)
    roots = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
    if not roots and hasattr(out, "values"):  # (a mapping pytree does not know)
        roots = [t for t in out.values() if isinstance(t, torch.Tensor)]
    seen, total = set(), 0
    for t in _saved_in_graph(roots):
        key, nbytes = _storage_key(t)
        if key is not None and key not in excluded and key not in seen:
            seen.add(key)
            total += nbytes
    del out, roots
    return MemoryReport(total, {"<root>": total} if total else {}, len(seen))


def process_memory(field: str = "VmRSS") -> int:
    """A memory figure of this process from /proc (Linux): ``VmRSS`` (resident
    now) or ``VmHWM`` (resident high-water mark), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> None:
    """Reset ``VmHWM`` to the current resident set, where the kernel allows it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def memory_in_use(device) -> int:
    """Bytes in use now on ``device``: CUDA's allocated memory, else this
    process's resident set."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated()
    return process_memory("VmRSS")


def reset_peak(device) -> None:
    """Start a new peak for :func:`peak_since_reset` on ``device``."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        reset_peak_rss()


def peak_since_reset(device) -> int:
    """The highest :func:`memory_in_use` since :func:`reset_peak` (CPU: the
    resident-set high-water mark)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return process_memory("VmHWM")


def live_tensor_bytes() -> int:
    """Bytes of every distinct storage of a tensor Python can reach (after a
    collection), fake and meta tensors aside (compiler caches hold those):
    flat from step to step unless something keeps what a step made."""
    import gc

    gc.collect()
    sizes = {}
    for obj in gc.get_objects():
        try:
            # (type(), not isinstance: some objects answer isinstance through a
            # deprecated module attribute, with a warning)
            if issubclass(type(obj), torch.Tensor) and type(obj).__name__ != "FakeTensor" \
                    and obj.device.type != "meta":
                st = obj.untyped_storage()
                sizes[st.data_ptr()] = st.nbytes()
        except (RuntimeError, ReferenceError):
            continue
    return sum(sizes.values())
