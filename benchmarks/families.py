"""Bytes kept for backward by real model families, unconverted vs torch-mesa 8-bit.

Models are built from their config classes at their real default sizes
(random weights, nothing downloaded) and measured under bf16 autocast with
``torch_mesa.measure`` (one forward pass plus the loss; deterministic, so a
CPU gives the same bytes as a GPU). Reported for the Transformer blocks and
for the whole model (embeddings, head and loss included).

    python benchmarks/families.py                 # all models, writes docs/benchmarks.md
    python benchmarks/families.py --only gpt2     # one of them
"""

import argparse
import sys
import time
from pathlib import Path

import torch

from torch_mesa import MesaConfig, compress_, measure
from torch_mesa.bench import device_name
from torch_mesa.zoo import ModelSpec, resolve

ROOT = Path(__file__).resolve().parent.parent

# name: (zoo spec, batch, sizes, prefix of the Transformer blocks)
MODELS = {
    "deit_small": ("timm:deit_small_patch16_224", 64, {}, "blocks."),
    "deit_base": ("timm:deit_base_patch16_224", 64, {}, "blocks."),
    "swin_tiny": ("timm:swin_tiny_patch4_window7_224", 64, {}, "layers."),
    "gpt2": ("hf:gpt2", 2, {}, "transformer.h."),
    # Llama-style at TinyLlama-1.1B's shape (the class default is 7B, more
    # than this machine's memory): RMSNorm, SwiGLU, rotary, 4 KV heads of 32.
    "llama_1b": ("hf:llama", 1, dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                                     num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
                                     max_position_embeddings=2048), "model.layers."),
}


def measure_pair(spec: ModelSpec, batch: int, prefix: str):
    torch.manual_seed(0)
    model = spec.build()
    model.train()
    args, kwargs, target = spec.batch(batch)
    loss_fn = lambda out: spec.loss(out, target)  # noqa: E731
    rows = {}
    for label in ("unconverted", "mesa8"):
        if label == "mesa8":
            compress_(model, MesaConfig(bits=8))
        r = measure(model, *args, loss_fn=loss_fn, autocast_dtype=torch.bfloat16, **kwargs)
        blocks = sum(v for k, v in r.by_module.items() if k.startswith(prefix))
        rows[label] = (blocks, r.total_bytes)
    del model
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=list(MODELS), action="append")
    p.add_argument("--docs", default=str(ROOT / "docs" / "benchmarks.md"))
    args = p.parse_args(argv)
    names = args.only or list(MODELS)
    lines = [
        "| model | batch x tokens | kept, blocks: unconverted (MiB) | torch-mesa 8-bit (MiB) | ratio | "
        "whole model: unconverted (MiB) | torch-mesa 8-bit (MiB) | ratio |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in names:
        target, batch, sizes, prefix = MODELS[name]
        t = time.time()
        spec = resolve(target, image_size=224, seq_len=1024, sizes=sizes)
        rows = measure_pair(spec, batch, prefix)
        (b0, t0), (b1, t1) = rows["unconverted"], rows["mesa8"]
        tokens = f"{batch} x {spec.seq_len}" if spec.kind == "tokens" else f"{batch} images"
        line = (f"| {spec.name} | {tokens} | {b0 / 2**20:,.1f} | {b1 / 2**20:,.1f} | {b1 / b0:.3f} | "
                f"{t0 / 2**20:,.1f} | {t1 / 2**20:,.1f} | {t1 / t0:.3f} |")
        lines.append(line)
        print(line, f"({time.time() - t:.0f} s)", flush=True)
    table = "\n".join(lines)
    print(table)
    if args.only is None:
        start, end = "<!-- families:start -->", "<!-- families:end -->"
        block = (f"{start}\n```\npython benchmarks/families.py\n```\n\nbf16 autocast, measured on "
                 f"{device_name('cpu')}, torch {torch.__version__}.\n\n{table}\n{end}")
        path = Path(args.docs)
        text = path.read_text()
        if start in text:
            before, rest = text.split(start, 1)
            text = before + block + rest.split(end, 1)[1]
        else:
            text = text.rstrip("\n") + "\n\n## Model families (bytes kept at 8 bits, bf16 autocast)\n\n" + block + "\n"
        path.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
