"""The compiled quantizer's own speed: keeping and expanding the tensors a ViT-S block keeps.

For each tensor shape a ViT-S/16 block keeps at batch 16 (the MLP's hidden activation, a
(tokens, 384) activation, one head-wise query), each dtype and each row mode (none, "row" for
norm inputs, "scaled" = the token scale), the median time of one keep (``quant.compress``,
8 bits, per-channel ranges) and one expand, against one copy of the tensor (``clone``: the
floor of a pass that reads and writes it). CPU, 2 threads. For finding and checking the
quantizer's cost; the step-level effect is in benchmarks/step_profile.py.

    python benchmarks/quant_speed.py
"""

import argparse
import statistics
import sys
import time

import torch

from torch_mesa import quant

SHAPES = {
    "MLP hidden (16, 197, 1536)": ((16, 197, 1536), (2,), 1, False),
    "activation (16, 197, 384)": ((16, 197, 384), (2,), 1, False),
    "query, per head and channel (16, 6, 197, 64)": ((16, 6, 197, 64), (1, 3), 1, True),
}


def _median_ms(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=30)
    args = p.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    torch.manual_seed(0)
    print("| tensor | dtype | rows | copy (ms) | keep (ms) | expand (ms) |")
    print("|---|---|---|---:|---:|---:|")
    for name, (shape, axes, group, heads) in SHAPES.items():
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.nn.functional.gelu(torch.randn(shape) * 2)
            x[..., 3] *= 20  # an outlier channel
            x = x.to(dtype)
            for rows in ([None, "scaled"] if heads else [None, "row", "scaled"]):
                kept, layout = quant.compress(x, 8, axes, group, False, None, "compiled", rows=rows)
                copy = _median_ms(lambda: x.clone(), args.repeats)
                keep = _median_ms(lambda: quant.compress(x, 8, axes, group, False, None, "compiled", rows=rows),
                                  args.repeats)
                expand = _median_ms(lambda: quant.expand(kept, layout), args.repeats)
                print(f"| {name} | {str(dtype).replace('torch.', '')} | {rows or 'none'} | {copy:.2f} | "
                      f"{keep:.2f} | {expand:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
