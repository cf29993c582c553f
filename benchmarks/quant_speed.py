"""The compiled quantizer's own speed: keeping and expanding the tensors a ViT-S block keeps.

For each tensor shape a ViT-S/16 block keeps at batch 16 (the MLP's hidden activation, a
(tokens, 384) activation, one head-wise query), each dtype and each row mode (none, "row" for
norm inputs, "scaled" = the token scale), the median time of one keep (``quant.compress``,
8 bits, per-channel ranges) and one expand, against one copy of the tensor (``clone``: the
floor of a pass that reads and writes it). CPU, 2 threads. For finding and checking the
quantizer's cost; the step-level effect is in benchmarks/step_profile.py.

    python benchmarks/quant_speed.py

``--calls``: the cost of one call on the small tensors the demo model keeps (batch 64, 17 tokens,
64 wide), where the call costs more than the loops: a keep and its expand, warm (called in a loop)
and cold (after a 512x512 product, as a step calls them between its large kernels), each compiled
graph run directly (the default) and through Dynamo, side by side.

    python benchmarks/quant_speed.py --calls
"""

import argparse
import statistics
import sys
import time

import torch

from torch_mesa import quant
from torch_mesa.quant import fused

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


CALL_SHAPES = {
    "norm input (64, 17, 64), row": ((64, 17, 64), (2,), "row"),
    "MLP hidden (64, 17, 256), scaled": ((64, 17, 256), (2,), "scaled"),
    "q, k, v per head (3, 64, 4, 17, 16)": ((3, 64, 4, 17, 16), (0, 2, 4), None),
}


def _median_us(fn, between, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        between()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6


def _fresh_compiled(direct: bool) -> None:
    fused._DIRECT = direct
    for made in (fused._quantize, fused._dequantize):
        made.cache_clear()


def calls(repeats: int) -> None:
    big = torch.randn(512, 512)

    def cold():
        big @ big

    print("| tensor | path | keep, warm (us) | keep, cold (us) | expand, warm (us) | expand, cold (us) |")
    print("|---|---|---:|---:|---:|---:|")
    default = fused._DIRECT
    try:
        for name, (shape, axes, rows) in CALL_SHAPES.items():
            x = torch.nn.functional.gelu(torch.randn(shape))
            for direct in (True, False):
                _fresh_compiled(direct)

                def keep():
                    return quant.compress(x, 8, axes, 1, False, None, "compiled", rows=rows)

                kept, layout = keep()
                for _ in range(5):
                    keep()
                    quant.expand(kept, layout)
                cells = [_median_us(f, b, repeats) for f in (keep, lambda: quant.expand(kept, layout))
                         for b in (lambda: None, cold)]
                print(f"| {name} | {'direct' if direct else 'Dynamo'} | "
                      + " | ".join(f"{c:.0f}" for c in cells) + " |", flush=True)
    finally:
        _fresh_compiled(default)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--calls", action="store_true", help="the cost of a call on small tensors (see above)")
    args = p.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    torch.manual_seed(0)
    if args.calls:
        calls(max(args.repeats, 200))
        return 0
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
