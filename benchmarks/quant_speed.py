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

``--rotation``: a bf16 query's q/k rotation in fp32 (the library's) against a bf16 product,
fidelity and time.

    python benchmarks/quant_speed.py --rotation

``--masks``: applying a kept 1-bit mask (a dropout's output and gradient, a ReLU's gradient)
three ways: unpacked to a boolean tensor and multiplied by ATen (``native_dropout_backward``, as
before commit b4caa53); unpacked and multiplied by its bytes read as uint8 (b4caa53); from its
packed bits in one compiled pass (``quant.apply_bits``, now). Warm (in a loop) and cold (each
after a few 512 x 512 products, as a step calls them); on the demo model's shapes and a ViT-S
block's, fp32 and bf16; each row checks all three give the same bits.

    python benchmarks/quant_speed.py --masks
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


def rotation_in_bf16(repeats: int) -> None:
    """A bf16 query kept rotated (8 bits, per head and channel, token scale) with the rotation
    in fp32, as the library does, against a bf16 product (which a CPU with bf16 matrix units
    runs several times faster, at the cost of two bf16 roundings): the kept query's SQNR on
    outlier-heavy data, and the time of the forward rotation. For deciding, not a setting."""
    from quant_study import sqnr  # (benchmarks/, the script's own folder)

    from torch_mesa.ops.recipes import rotation
    from torch_mesa.quant import reference as ref

    h = rotation(64, "cpu")
    print("| seed | SQNR, fp32 rotation (dB) | SQNR, bf16 rotation (dB) |")
    print("|---|---:|---:|")
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        q = torch.randn(16, 6, 197, 64, generator=g)
        q[..., torch.randperm(64, generator=g)[:2]] *= 10.0  # outlier channels
        q = q.bfloat16()
        cells = []
        for dtype in (torch.float32, torch.bfloat16):
            r = h.to(dtype)
            rotated = (q.to(dtype).reshape(-1, 64) @ r).reshape(q.shape)
            saved = ref.quantize(rotated, 8, (1, 3), 1, False, rows="scaled")
            y = ref.dequantize(saved, q.shape, torch.float32, 8, (1, 3), 1, rows="scaled")
            back = (y.to(dtype).reshape(-1, 64) @ r.t()).to(torch.bfloat16).reshape(q.shape)
            cells.append(sqnr(back, q))
        print(f"| {seed} | {cells[0]:.2f} | {cells[1]:.2f} |", flush=True)
    hb = h.bfloat16()
    fp32 = _median_ms(lambda: q.float().reshape(-1, 64) @ h, repeats)
    bf16 = _median_ms(lambda: q.reshape(-1, 64) @ hb, repeats)
    print(f"\nrotation of one (16, 6, 197, 64) query: fp32 (copy and product) {fp32:.2f} ms, bf16 product {bf16:.2f} ms")


MASK_SHAPES = {
    "demo MLP hidden (64, 17, 256)": (64, 17, 256),
    "demo attention map (64, 4, 17, 17)": (64, 4, 17, 17),
    "ViT-S MLP hidden (16, 197, 1536)": (16, 197, 1536),
}


def masks(repeats: int) -> None:
    """A dropout mask applied three ways: unpacked to a boolean tensor, then ATen's dropout
    backward (the library before commit b4caa53); unpacked, then multiplied by its bytes read
    as uint8 (b4caa53); from its packed bits in one compiled pass (``quant.apply_bits``, now).
    Median microseconds, warm and cold."""
    a = torch.randn(512, 512)

    def cold():  # (a product and fresh tensors in between, as in a step)
        for _ in range(4):
            (a @ a).sum()

    nothing = lambda: None  # noqa: E731
    print("| tensor | dtype | unpack + ATen, warm (us) | unpack + uint8 product, warm (us) | `apply_bits`, warm (us) "
          "| unpack + ATen, cold (us) | unpack + uint8 product, cold (us) | `apply_bits`, cold (us) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for name, shape in MASK_SHAPES.items():
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(shape).to(dtype)
            mask = torch.rand(shape) > 0.1
            packed = quant.pack_bits(mask)
            s = 1.0 / 0.9
            want = torch.ops.aten.native_dropout_backward(x, mask, s)
            ways = {
                "aten": lambda: torch.ops.aten.native_dropout_backward(x, quant.unpack_bits(packed, shape), s),
                "bytes": lambda: torch.mul(x, quant.unpack_bits(packed, shape).view(torch.uint8)).mul_(s),
                "bits": lambda: quant.apply_bits(x, packed, s),
            }
            for way, fn in ways.items():
                if not torch.equal(fn(), want):
                    raise AssertionError(f"{way} differs from native_dropout_backward: {name}, {dtype}")
            cells = [_median_us(fn, between, repeats) for between in (nothing, cold) for fn in ways.values()]
            print(f"| {name} | {str(dtype).replace('torch.', '')} | " + " | ".join(f"{c:.0f}" for c in cells) + " |",
                  flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--calls", action="store_true", help="the cost of a call on small tensors (see above)")
    p.add_argument("--rotation", action="store_true", help="the q/k rotation in fp32 against bf16 (see above)")
    p.add_argument("--masks", action="store_true", help="applying a kept 1-bit mask (see above)")
    args = p.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    torch.manual_seed(0)
    if args.calls:
        calls(max(args.repeats, 200))
        return 0
    if args.rotation:
        rotation_in_bf16(args.repeats)
        return 0
    if args.masks:
        masks(max(args.repeats, 200))
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
