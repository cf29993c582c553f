"""torch.compile with torch-mesa: bytes kept and step time, eager and compiled.

ViT-S/16 (the reference ViT of ``torch-mesa bench``), batch 16, 224 x 224,
on this machine, for fp32 and bf16 autocast: the unconverted model eager and
compiled (``torch.compile(model)``, Inductor), and torch-mesa 8-bit eager and
compiled. Bytes kept for backward: ``torch_mesa.measure`` (which adds no
hooks to compiled modules). Step time: forward, loss and backward, the median of
``--repeats`` interleaved repeats after two warm-up steps (which compile).

    python benchmarks/compile.py --docs docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time

import torch

from torch_mesa import measure
from torch_mesa.tools import bench
from torch_mesa.tools.zoo import resolve

CONFIGS = ("unconverted", "unconverted, compiled", "torch-mesa 8-bit", "torch-mesa 8-bit, compiled")


def kept(model, spec, batch, amp):
    args, kwargs, target = batch
    return measure(model, *args, loss_fn=lambda out: spec.loss(out, target), autocast_dtype=bench._AMP[amp],
                   **kwargs).total_bytes


def run(amp, args, progress):
    spec = resolve("vit:small", image_size=224, seq_len=128)
    batch = spec.batch(args.batch_size, "cpu")
    models = {}
    for c in CONFIGS:
        m = bench.build(spec, "mesa8" if c.startswith("torch-mesa") else "baseline", "cpu")
        models[c] = torch.compile(m) if c.endswith("compiled") else m
    rows = {}
    for c, m in models.items():
        t = time.perf_counter()
        for _ in range(2):  # warm-up; compiles
            bench.train_step(m, spec, batch, "cpu", amp)
        progress(f"  {amp} {c}: warm-up {time.perf_counter() - t:.0f} s")
        rows[c] = {"kept": kept(m, spec, batch, amp), "times": []}
    for r in range(args.repeats):
        for c, m in models.items():
            t = time.perf_counter()
            bench.train_step(m, spec, batch, "cpu", amp)
            rows[c]["times"].append(time.perf_counter() - t)
        progress(f"  {amp}: repeat {r + 1}/{args.repeats}")
    for row in rows.values():
        row["step"] = statistics.median(row["times"])
    return rows


def table(results):
    lines = ["| autocast | configuration | kept (MiB) | ratio to unconverted | ratio to unconverted, compiled | "
             "step time (s) | ratio to unconverted | ratio to unconverted, compiled |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for amp, rows in results.items():
        base, cbase = rows[CONFIGS[0]], rows[CONFIGS[1]]
        for c, r in rows.items():
            lines.append(f"| {amp} | {c} | {r['kept'] / 2**20:,.1f} | {r['kept'] / base['kept']:.3f} | "
                         f"{r['kept'] / cbase['kept']:.3f} | {r['step']:.3f} | {r['step'] / base['step']:.2f}x | "
                         f"{r['step'] / cbase['step']:.2f}x |")
    out = "\n".join(lines)
    # the targets for compiled ViT-S: bytes <= 0.16x (fp32) / 0.26x (bf16)
    # of the compiled unconverted model, step time <= 1.10x
    goals = []
    for amp, rows in results.items():
        r, cbase = rows[CONFIGS[3]], rows[CONFIGS[1]]
        bar = 0.16 if amp == "none" else 0.26
        kept, step = r["kept"] / cbase["kept"], r["step"] / cbase["step"]
        goals.append(f"autocast {amp}: bytes {kept:.3f}x (target <= {bar}x, {'met' if kept <= bar else 'not met'}), "
                     f"step time {step:.2f}x (target <= 1.10x, {'met' if step <= 1.10 else 'not met'})")
    return out + "\n\nCompiled torch-mesa against the compiled unconverted model: " + "; ".join(goals) + "."


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--amp", default="none,bf16", help="comma-separated: none, bf16")
    p.add_argument("--docs", help="write the results into this Markdown file")
    args = p.parse_args(argv)
    start = time.time()
    results = {amp: run(amp, args, lambda s: print(s, flush=True)) for amp in args.amp.split(",")}
    body = table(results)
    print(body)
    if args.docs:
        command = "python benchmarks/compile.py --docs docs/benchmarks.md"
        head = (f"ViT-S/16, batch {args.batch_size}, 224 x 224, on {platform.machine()} CPU, "
                f"{torch.get_num_threads()} threads; torch {torch.__version__}, commit {bench._commit()}, "
                f"{datetime.date.today()}; step time is the median of {args.repeats} interleaved repeats; "
                f"the whole command took {(time.time() - start) / 60:.1f} min. Compiled: `torch.compile(model)`, "
                "Inductor. A converted model compiles with one graph break per converted op (docs/design.md, "
                "\"torch.compile\"): the code between them compiles, the ops run as in eager. Dynamo's "
                "recompile limit (8) leaves blocks 9-12 of the converted model uncompiled (docs/design.md).")
        bench.replace_section(args.docs, "compile", f"```\n{command}\n```\n\n{head}\n\n{body}",
                              heading="torch.compile")
    return 0


if __name__ == "__main__":
    sys.exit(main())
