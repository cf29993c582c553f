"""Benchmark the reference ViT: unconverted, checkpointing, torch-mesa 8/4 bits.

A thin wrapper over ``torch-mesa bench`` (see :mod:`torch_mesa.tools.bench`), with
the settings of the core-engine targets: ViT-S/16 layout (depth 12, width
384, 6 heads, 197 tokens), batch 16, fp32, CPU. Extra arguments are passed
on, e.g. ``--amp bf16`` or ``--model vit:base --batch-size 128 --device cuda``.

    python benchmarks/vit.py
"""

import sys

from torch_mesa.tools.cli import main

if __name__ == "__main__":
    argv = ["bench", "--model", "vit:small", "--batch-size", "16", "--docs", "docs/benchmarks.md"]
    sys.exit(main(argv + sys.argv[1:]))
