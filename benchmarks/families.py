"""Bytes kept for backward by real model families, unconverted vs torch-mesa 8-bit.

Models are built from their config classes at their real default sizes
(random weights, nothing downloaded) and measured under bf16 autocast with
``torch_mesa.measure`` (one forward pass plus the loss). Reported for the
Transformer blocks and for the whole model (embeddings, head and loss
included). Where PyTorch's attention falls back to its math kernel (on CPU
with a mask), the unconverted model keeps N x N attention maps that a
FlashAttention-style kernel (as on GPU) would not: those bytes are shown,
and the ratio is also given against the baseline without them.

    python benchmarks/families.py                 # all models, writes docs/benchmarks.md
    python benchmarks/families.py --only gpt2     # one of them
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from torch_mesa import MesaConfig, compress_, measure
from torch_mesa.tools.bench import device_name, replace_section
from torch_mesa.tools.zoo import ModelSpec, resolve

ROOT = Path(__file__).resolve().parent.parent

# name: (zoo spec, batch, sizes, prefix of the Transformer blocks)
MODELS = {
    "deit_small": ("timm:deit_small_patch16_224", 64, {}, "blocks."),
    "deit_base": ("timm:deit_base_patch16_224", 64, {}, "blocks."),
    "swin_tiny": ("timm:swin_tiny_patch4_window7_224", 64, {}, "layers."),
    "gpt2": ("hf:gpt2", 2, {}, "transformer.h."),
    # nn.MultiheadAttention's functional forward inside (its calls routed since commit dfcbe9e)
    "tv_vit_b16": ("torchvision.models:vit_b_16", 64, {}, "encoder.layers."),
    # Llama-style at a published small Llama's shape (SmolLM-135M: 30 layers,
    # width 576, 9 heads, 3 KV heads, SwiGLU 1536, RMSNorm, rotary); the class
    # default is 7B, beyond this machine's 24 GiB.
    "llama_135m": ("hf:llama", 2, dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                       num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                                       max_position_embeddings=2048, tie_word_embeddings=True),
                   "model.layers."),
}


def attention_map_bytes(model, args, kwargs, loss_fn, prefix) -> int:
    """Bytes of the saved tensors inside the blocks shaped like attention maps
    (..., N, N), as (B, H, N, N) or, in PyTorch's math kernel, (B*H, N, N):
    what a kernel that keeps no maps (FlashAttention-style) saves the baseline. PyTorch's CPU SDPA keeps them whenever it falls back to its
    math kernel (a mask, or bf16 with a mask), as these models do here."""
    from torch.overrides import TorchFunctionMode

    masks = set()  # attention masks are inputs every kernel keeps: not maps

    class RecordMasks(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is torch.nn.functional.scaled_dot_product_attention:
                mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
                if isinstance(mask, torch.Tensor):
                    masks.add(mask.untyped_storage().data_ptr())
            return func(*args, **kwargs)

    seen, total, inside = set(), 0, [0]
    handles = []
    for name, m in model.named_modules():
        if name.startswith(prefix):  # count only inside the Transformer blocks
            handles.append(m.register_forward_pre_hook(lambda *a: inside.__setitem__(0, inside[0] + 1)))
            handles.append(m.register_forward_hook(lambda *a: inside.__setitem__(0, inside[0] - 1)))

    def pack(t):
        nonlocal total
        if inside[0] and t.dim() >= 3 and t.shape[-1] == t.shape[-2] and t.shape[-1] >= 8:
            key = t.untyped_storage().data_ptr()
            if key not in seen and key not in masks:
                seen.add(key)
                total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16), \
            RecordMasks():
        out = model(*args, **kwargs)
        loss_fn(out)
    for h in handles:
        h.remove()
    return total


def measure_pair(spec: ModelSpec, batch: int, prefix: str):
    torch.manual_seed(0)
    model = spec.build()
    model.train()
    args, kwargs, target = spec.batch(batch)
    loss_fn = lambda out: spec.loss(out, target)  # noqa: E731
    rows = {"maps": attention_map_bytes(model, args, kwargs, loss_fn, prefix)}
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
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:  # one model per process: memory from one does not linger into the next
        target, batch, sizes, prefix = MODELS[args.child]
        spec = resolve(target, image_size=224, seq_len=1024, sizes=sizes)
        rows = measure_pair(spec, batch, prefix)
        print(json.dumps({"name": spec.name, "kind": spec.kind, "seq_len": spec.seq_len, **rows}))
        return 0
    names = args.only or list(MODELS)
    lines = [
        "| model | batch | kept, blocks: unconverted (MiB) | torch-mesa 8-bit (MiB) | ratio | "
        "of which attention maps (MiB) | ratio vs a map-free baseline | "
        "whole model: unconverted (MiB) | torch-mesa 8-bit (MiB) | ratio |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in names:
        batch = MODELS[name][1]
        t = time.time()
        res = subprocess.run([sys.executable, __file__, "--child", name], capture_output=True, text=True)
        if res.returncode != 0:
            raise SystemExit(f"{name} failed:\n{res.stderr[-3000:]}")
        rows = json.loads(res.stdout.strip().splitlines()[-1])
        (b0, t0), (b1, t1), maps = rows["unconverted"], rows["mesa8"], rows["maps"]
        tokens = f"{batch} x {rows['seq_len']} tokens" if rows["kind"] == "tokens" else f"{batch} images"
        line = (f"| {rows['name']} | {tokens} | {b0 / 2**20:,.1f} | {b1 / 2**20:,.1f} | {b1 / b0:.3f} | "
                f"{maps / 2**20:,.1f} | {b1 / (b0 - maps):.3f} | "
                f"{t0 / 2**20:,.1f} | {t1 / 2**20:,.1f} | {t1 / t0:.3f} |")
        lines.append(line)
        print(line, f"({time.time() - t:.0f} s)", flush=True)
    table = "\n".join(lines)
    print(table)
    if args.only is None:
        replace_section(args.docs, "families",
                        f"```\npython benchmarks/families.py\n```\n\nbf16 autocast, measured on "
                        f"{device_name('cpu')}, torch {torch.__version__}.\n\n{table}",
                        heading="Model families (bytes kept at 8 bits, bf16 autocast)")


if __name__ == "__main__":
    sys.exit(main())
