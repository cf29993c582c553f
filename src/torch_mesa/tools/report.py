"""`torch-mesa report MODEL`: where activation memory goes, before and after.

Builds the model (random weights), measures the bytes one training batch keeps
for backward with :func:`torch_mesa.measure`, converts it with
:func:`torch_mesa.compress_`, measures again, and prints one row per block or
layer (``--depth``), as a table, JSON or CSV.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
from typing import List, Optional

import torch

from torch_mesa import MesaConfig, compress_, measure
from torch_mesa.units import format_bytes
from .zoo import ModelError, parse_sizes, resolve

__all__ = ["run_report", "compare"]

_AMP = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def compare(spec, *, batch_size: int, bits: int, autocast: str, depth: int, device="cpu") -> dict:
    """Bytes kept for backward per row, before and after conversion."""
    dtype = _AMP[autocast]
    torch.manual_seed(0)
    model = spec.build().to(device)
    model.train()
    args, kwargs, target = spec.batch(batch_size, device)
    loss_fn = lambda out: spec.loss(out, target)  # noqa: E731
    before = measure(model, *args, loss_fn=loss_fn, autocast_dtype=dtype, **kwargs)
    with warnings_as_notes() as notes:
        conversion = compress_(model, MesaConfig(bits=bits))
    after = measure(model, *args, loss_fn=loss_fn, autocast_dtype=dtype, **kwargs)
    b, a = before.by_depth(depth), after.by_depth(depth)
    rows = [
        {"module": k, "before": b.get(k, 0), "after": a.get(k, 0)}
        for k in list(b) + [k for k in a if k not in b]
    ]
    return {
        "model": spec.name,
        "batch_size": batch_size,
        "bits": bits,
        "autocast": autocast,
        "rows": rows,
        "total_before": before.total_bytes,
        "total_after": after.total_bytes,
        "converted": conversion.counts(),
        "left_exact": [f"{n} ({t}): {r}" for n, t, r in conversion.skipped],
        "notes": notes,
    }


@contextlib.contextmanager
def warnings_as_notes():
    import warnings

    notes: List[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield notes
    notes.extend(str(w.message) for w in caught)




def _ratio(after: int, before: int) -> str:
    return f"{after / before:.3f}x" if before else "-"


def format_table(result: dict) -> str:
    rows = result["rows"]
    width = max([len(r["module"]) for r in rows] + [6])
    lines = [
        f"{result['model']}: bytes kept for backward by one batch of {result['batch_size']}"
        f" (autocast {result['autocast']}), before and after torch-mesa {result['bits']}-bit",
        "",
        f"{'module':<{width}}  {'before':>12}  {'after':>12}  {'ratio':>8}",
        f"{'-' * width}  {'-' * 12}  {'-' * 12}  {'-' * 8}",
    ]
    for r in rows:
        lines.append(
            f"{r['module']:<{width}}  {format_bytes(r['before']):>12}  {format_bytes(r['after']):>12}  "
            f"{_ratio(r['after'], r['before']):>8}"
        )
    tb, ta = result["total_before"], result["total_after"]
    lines.append(f"{'total':<{width}}  {format_bytes(tb):>12}  {format_bytes(ta):>12}  {_ratio(ta, tb):>8}")
    lines.append("")
    conv = ", ".join(f"{n} {k}" for k, n in sorted(result["converted"].items())) or "nothing"
    lines.append(f"converted: {conv}")
    if result["left_exact"]:
        shown = result["left_exact"][:8]
        more = len(result["left_exact"]) - len(shown)
        lines.append("left exact: " + "; ".join(shown) + (f"; ... and {more} more" if more > 0 else ""))
    for note in result["notes"]:
        lines.append(f"note: {note}")
    return "\n".join(lines)


def format_csv(result: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["module", "before_bytes", "after_bytes"])
    for r in result["rows"]:
        w.writerow([r["module"], r["before"], r["after"]])
    w.writerow(["total", result["total_before"], result["total_after"]])
    return buf.getvalue().rstrip("\n")


def run_report(
    model: str,
    *,
    batch_size: int = 8,
    seq_len: int = 512,
    image_size: int = 224,
    bits: int = 8,
    autocast: str = "none",
    depth: int = 2,
    fmt: str = "table",
    sizes: Optional[List[str]] = None,
    device: str = "cpu",
) -> str:
    if batch_size < 1:
        raise ModelError(f"--batch-size {batch_size} must be >= 1")
    if depth < 1:
        raise ModelError(f"--depth {depth} must be >= 1")
    MesaConfig(bits=bits)
    spec = resolve(model, image_size=image_size, seq_len=seq_len, sizes=parse_sizes(sizes or []))
    result = compare(spec, batch_size=batch_size, bits=bits, autocast=autocast, depth=depth, device=device)
    if fmt == "json":
        return json.dumps(result, indent=1)
    if fmt == "csv":
        return format_csv(result)
    return format_table(result)
