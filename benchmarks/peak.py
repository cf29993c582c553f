"""Peak memory of one training step, for a few ``torch-mesa bench`` configurations.

Each configuration in a fresh process (see ``torch_mesa.tools.bench.peak_memory``:
on CPU the resident-set high-water mark of the second step, with glibc
returning large freed blocks at once; on CUDA ``max_memory_allocated``),
without the rest of ``bench`` (bytes, fidelity, step times): for comparing
the peaks of designs whose other figures come from ``benchmarks/compile.py``.
It also gives the forward's and the backward's peaks apart, and what the
forward leaves held (what backward needs).

    python benchmarks/peak.py --configs baseline,baseline+compile,mesa8+compile,native8,native8+blocks
"""

import argparse
import sys

from torch_mesa.tools import bench


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="baseline,baseline+compile,mesa8+compile,native8,native8+blocks")
    p.add_argument("--model", default="vit:small")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", default="none")
    args = p.parse_args(argv)
    rows = {c: bench.peak_memory(args, c) for c in args.configs.split(",")}
    base = rows.get("baseline+compile") or next(iter(rows.values()))
    print(f"{args.model}, batch {args.batch_size}, autocast {args.amp}, {bench.device_name(args.device)}\n")
    print("| configuration | peak (MiB) | peak rise in a step (MiB) | rise vs unconverted, compiled |")
    print("|---|---:|---:|---:|")
    for c, r in rows.items():
        rise = r["peak"] - r["rest"]
        print(f"| {c} | {r['peak'] / 2**20:,.1f} | {rise / 2**20:,.1f} | "
              f"{rise / (base['peak'] - base['rest']):.2f}x |")
    if all("forward_peak" in r for r in rows.values()):  # each half of the step apart
        print("\nRises above what was held before the step (MiB):\n")
        print("| configuration | forward's peak | held after the forward | backward's peak |")
        print("|---|---:|---:|---:|")
        for c, r in rows.items():
            print(f"| {c} | " + " | ".join(f"{(r[k] - r['rest']) / 2**20:,.1f}"
                                           for k in ("forward_peak", "held", "backward_peak")) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
