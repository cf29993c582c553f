"""What compiled saving's step time is made of: ViT-S/16 compiled by ``torch_mesa.compile``
with parts of the quantizer switched off, side by side with the compiled unconverted model.

Each variant is a ``MesaConfig`` (the q/k rotation off, the token scale off, both off); every
model is compiled by block (the default), warmed up with two steps, then all are timed in
interleaved repeats (median). Ratios are to the compiled unconverted model in the same run.
For deciding where the compiled step's cost beyond the unconverted one goes, not a target.

    python benchmarks/compile_ablation.py --amp none,bf16
"""

import argparse
import sys

import torch

import torch_mesa
from torch_mesa import MesaConfig
from torch_mesa.tools import bench
from torch_mesa.tools.zoo import resolve

VARIANTS = {
    "compiled saving (default)": MesaConfig(),
    "no q/k rotation": MesaConfig(qk_rotation=False),
    "no token scale": MesaConfig(token_scale=False),
    "neither": MesaConfig(qk_rotation=False, token_scale=False),
}


def run(amp: str, args) -> dict:
    spec = resolve("vit:small", image_size=224, seq_len=128)
    batch = spec.batch(args.batch_size, "cpu")
    models = {}
    for name, cfg in [("unconverted, compiled", None), *VARIANTS.items()]:
        torch.manual_seed(0)
        m = bench.build(spec, "baseline", "cpu")
        models[name] = torch.compile(m) if cfg is None else torch_mesa.compile(m, cfg)
    return bench.timed(models, spec, batch, "cpu", amp, args.repeats, None)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--amp", default="none,bf16", help="comma-separated: none, bf16")
    args = p.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    print(f"ViT-S/16, batch {args.batch_size}, {bench.device_name('cpu')}, torch {torch.__version__}, "
          f"median of {args.repeats} interleaved repeats\n")
    print("| autocast | configuration | step (s) | ratio to unconverted, compiled |")
    print("|---|---|---:|---:|")
    for amp in args.amp.split(","):
        medians = run(amp, args)
        base = medians["unconverted, compiled"]
        for name, t in medians.items():
            print(f"| {amp} | {name} | {t:.3f} | {t / base:.3f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
