"""Soak: train a small converted model for many steps; memory must stay flat.

Trains the reference ViT (width 96, depth 4, 32 px, 65 tokens, batch 16, dropout ``--dropout``,
default 0.1) converted at 8 bits for ``--steps`` steps (default 2,000) and samples, every
``--every`` steps:

* live tensor bytes: the distinct storages of every tensor reachable from
  Python (gc), which includes anything a cache or statistic would accumulate;
* the resident set (VmRSS).

After warm-up (the first sample), both must stay flat: a cache or running
statistic that grew with steps would show as a slope. Prints a table, the
growth from the first to the last sample, and writes ``soak.png`` if
matplotlib is installed.

    python benchmarks/soak.py [--steps 2000] [--range running] [--dropout 0]
"""

import argparse
import gc
import sys
import time

import torch
import torch.nn.functional as F

import torch_mesa
from torch_mesa.measure import live_tensor_bytes, process_memory
from torch_mesa.tools.models import VisionTransformer


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--every", type=int, default=200)
    p.add_argument("--range", choices=["dynamic", "running"], default="running")
    p.add_argument("--png", default="soak.png")
    p.add_argument("--plain", action="store_true", help="do not convert (the reference for RSS drift)")
    p.add_argument("--dropout", type=float, default=0.1,
                   help="the model's dropout; attention with and without it runs different code (0 found a leak "
                        "the default missed)")
    args = p.parse_args(argv)

    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=4, num_classes=10, dim=96, depth=4, heads=3,
                              drop=args.dropout)
    if not args.plain:
        torch_mesa.compress_(model, torch_mesa.MesaConfig(range_estimate=args.range))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    samples = []
    t0 = time.time()
    for step in range(1, args.steps + 1):
        x = torch.randn(16, 3, 32, 32, generator=g)
        y = torch.randint(0, 10, (16,), generator=g)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % args.every == 0:
            del loss
            gc.collect()
            samples.append((step, live_tensor_bytes(), process_memory("VmRSS"), len(gc.get_objects())))
            print(f"step {step:5d}  live tensors {samples[-1][1] / 2**20:8.2f} MiB  "
                  f"RSS {samples[-1][2] / 2**20:8.1f} MiB  Python objects {samples[-1][3]:,}  "
                  f"({time.time() - t0:.0f} s)", flush=True)
    first, last = samples[0], samples[-1]
    live_growth = last[1] - first[1]
    rss_growth = last[2] - first[2]
    print(f"\nfrom step {first[0]} to {last[0]}: live tensor bytes {live_growth / 2**20:+.3f} MiB, "
          f"RSS {rss_growth / 2**20:+.1f} MiB, Python objects {last[3] - first[3]:+,}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.plot([s[0] for s in samples], [s[1] / 2**20 for s in samples], label="live tensors (MiB)")
        ax.plot([s[0] for s in samples], [s[2] / 2**20 for s in samples], label="resident set (MiB)")
        ax.set_xlabel("training step")
        ax.set_ylim(bottom=0)
        what = "unconverted" if args.plain else f"converted, {args.range} ranges"
        ax.set_title(f"Soak: ViT {what}, {args.steps} steps")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.png, dpi=110)
        print(f"figure: {args.png}")
    except ImportError:
        pass
    return 0 if live_growth == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
