"""The ``torch-mesa`` command line (also ``python -m torch_mesa``).

    torch-mesa demo      train a small ViT on scikit-learn's digits, unconverted
                         and converted; print a table, write a PNG figure
    torch-mesa report    where a model's activation memory goes, before/after
    torch-mesa bench     side-by-side benchmark (saved bytes, peak, time, fidelity)
    torch-mesa verify    exact vs converted on one batch: forward, every gradient,
                         bytes, fallbacks; exits 1 when a gradient is below the bar

Bad input (unknown names, bad sizes, missing optional packages) prints one
line saying what is wrong and what to type or install, and exits with 2.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

__all__ = ["main"]


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit code 2."""


def _demo(args) -> int:
    from . import demo

    result = demo.run_demo(
        epochs=args.epochs,
        bits=args.bits,
        batch_size=args.batch_size,
        lr=args.lr,
        device=args.device,
        out_dir=args.out,
        seed=args.seed,
        measure_peak=not args.no_peak,
    )
    print()
    print(result.table)
    print()
    print(f"figure: {result.figure}")
    print(f"numbers: {result.out_dir / 'demo.json'}")
    return 0


def _report(args) -> int:
    from . import report

    text = report.run_report(
        args.model,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        image_size=args.image_size,
        bits=args.bits,
        autocast=args.autocast,
        depth=args.depth,
        fmt=args.format,
        sizes=args.size,
    )
    print(text)
    return 0


def _verify(args) -> int:
    import json

    import torch

    from torch_mesa import MesaConfig, verify
    from .zoo import parse_sizes, resolve

    spec = resolve(args.model, image_size=args.image_size, seq_len=args.seq_len, sizes=parse_sizes(args.size))
    torch.manual_seed(args.seed)
    model = spec.build()
    model.train()
    inputs, kwargs, target = spec.batch(args.batch_size, seed=args.seed)
    amp = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.autocast]
    report = verify(
        model,
        lambda m: spec.loss(m(*inputs, **kwargs), target),
        config=MesaConfig(bits=args.bits),
        threshold=args.threshold,
        by_op=not args.no_by_op,
        autocast_dtype=amp,
        seed=args.seed,
    )
    print(json.dumps(report.to_dict(), indent=1) if args.format == "json" else report)
    return 0 if report.ok else 1


def _bench(args) -> int:
    from . import bench

    if args.suite == "mesa":
        return bench.run_mesa_suite(args)
    return bench.run_bench(args)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="torch-mesa",
        description="Train Transformers with less memory: 8/4/2-bit activations kept for backward.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    d = sub.add_parser("demo", help="train a small ViT on the bundled digits, with and without torch-mesa")
    d.add_argument("--epochs", type=int, default=30, help="training epochs per run (default 30)")
    d.add_argument("--bits", type=int, default=8, help="8, 4 or 2 (default 8)")
    d.add_argument("--batch-size", type=int, default=64)
    d.add_argument("--lr", type=float, default=3e-3)
    d.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    d.add_argument("--out", default="mesa-out", help="folder for demo.png and demo.json")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--no-peak", action="store_true", help="skip the fresh-process peak-memory runs")
    d.set_defaults(func=_demo)

    r = sub.add_parser(
        "report",
        help="activation memory per block/layer, before and after conversion",
        description=(
            "MODEL is 'vit:small' (built-in reference ViT: tiny/small/base), "
            "'timm:NAME' (e.g. timm:deit_base_patch16_224), 'hf:FAMILY' "
            "(gpt2, llama, bert, vit; sizes via --size KEY=VALUE), a local "
            "config.json path, or 'package.module:function' returning a model."
        ),
    )
    r.add_argument("model")
    r.add_argument("--batch-size", type=int, default=8)
    r.add_argument("--seq-len", type=int, default=512, help="tokens, for language models")
    r.add_argument("--image-size", type=int, default=224, help="pixels, for vision models")
    r.add_argument("--bits", type=int, default=8)
    r.add_argument("--autocast", choices=["none", "bf16", "fp16"], default="none")
    r.add_argument("--depth", type=int, default=2, help="name components per row (blocks.3 = 2)")
    r.add_argument("--format", choices=["table", "json", "csv"], default="table")
    r.add_argument("--size", action="append", default=[], metavar="KEY=VALUE",
                   help="config overrides for hf: models, e.g. --size num_hidden_layers=4")
    r.set_defaults(func=_report)

    v = sub.add_parser(
        "verify",
        help="exact vs converted on one batch: forward, every gradient, bytes, fallbacks",
        description="MODEL as for 'report'. Exit code 0 when the forward is identical and every "
        "gradient reaches --threshold, 1 otherwise, 2 on bad input.",
    )
    v.add_argument("model")
    v.add_argument("--batch-size", type=int, default=2)
    v.add_argument("--seq-len", type=int, default=128, help="tokens, for language models")
    v.add_argument("--image-size", type=int, default=224, help="pixels, for vision models")
    v.add_argument("--bits", type=int, default=8)
    v.add_argument("--threshold", type=float, default=0.999, help="gradient cosine every parameter must reach")
    v.add_argument("--autocast", choices=["none", "bf16", "fp16"], default="none")
    v.add_argument("--no-by-op", action="store_true", help="skip the per-op error breakdown")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--format", choices=["table", "json"], default="table")
    v.add_argument("--size", action="append", default=[], metavar="KEY=VALUE",
                   help="config overrides for hf: models, e.g. --size num_hidden_layers=2")
    v.set_defaults(func=_verify)

    b = sub.add_parser("bench", help="side-by-side benchmark; appends to a CSV, rewrites docs/benchmarks.md")
    b.add_argument("--model", default="vit:small")
    b.add_argument("--suite", choices=["mesa"], default=None,
                   help="Mesa's model set (DeiT-Ti/S/B, Swin-T, PVT-v2-b1): bytes and peak memory, "
                        "beside Mesa's published ratios")
    b.add_argument("--batch-size", type=int, default=16)
    b.add_argument("--image-size", type=int, default=224)
    b.add_argument("--seq-len", type=int, default=512)
    b.add_argument("--labels", action="store_true",
                   help="language models: pass labels and use the model's own loss, as Hugging Face's trainers "
                        "do (a converted causal LM then runs its fused head and loss)")
    b.add_argument("--device", default="cpu")
    b.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none")
    b.add_argument("--repeats", type=int, default=5)
    b.add_argument("--configs", default="baseline,checkpoint,mesa8,mesa4,mesa8+checkpoint",
                   help="comma-separated; also baseline+compile, checkpoint+compile, mesa8+compile and "
                        "budget (compiled with activation_memory_budget)")
    b.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the compiled rows")
    b.add_argument("--skip-peak", action="store_true")
    b.add_argument("--csv", default="benchmarks/results.csv")
    b.add_argument("--docs", default=None, help="Markdown file to rewrite with the results table")
    b.set_defaults(func=_bench)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    parser = _parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from .demo import MissingDependency

    try:
        return args.func(args)
    except (UsageError, MissingDependency, ValueError) as err:
        print(f"torch-mesa {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
