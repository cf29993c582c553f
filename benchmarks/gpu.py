"""Everything only a GPU shows, in one run: for a session lent a GPU machine.

1. Checks on CUDA: the fused quantizer compiled to Triton against the eager
   reference, bit for bit, in every row mode; and ``torch_mesa.verify`` of a
   DeiT-S and a Llama-style model on the GPU, fp32 and bf16 autocast
   (forward identical, every gradient cosine, bytes kept). The test suite
   itself runs on CPU (CI has no GPU).
2. The GPU benchmark: DeiT-B, batch 128, bf16 autocast, unconverted vs
   torch-mesa 8-bit: bytes kept, peak memory of a training step
   (``max_memory_allocated``) and throughput, side by side
   (``torch-mesa bench``; the original Mesa reported 0.49x peak memory);
   then Mesa's whole results table at its batch 128
   (``torch-mesa bench --suite mesa``), its published ratios beside ours.

Writes ``gpu.json`` and ``gpu.md`` (the benchmark section, device named) to
``--out`` (default ``$OUT`` or ``gpu-out``); copy the section into
docs/benchmarks.md.

    python benchmarks/gpu.py                   # on the GPU machine
    python benchmarks/gpu.py --quick           # smaller batch, fewer repeats (a dry run)
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch


def _run(cmd, log):
    print("$", " ".join(cmd), flush=True)
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    log.append({"cmd": cmd, "rc": proc.returncode, "seconds": round(time.perf_counter() - t, 1),
                "tail": (proc.stdout + proc.stderr)[-4000:]})
    print(proc.stdout[-3000:], proc.stderr[-2000:], flush=True)
    return proc.returncode


def fused_matches_reference_on_cuda() -> dict:
    """The Triton quantizer equals the eager reference bit for bit (nearest)."""
    from torch_mesa.quant import fused
    from torch_mesa.quant import reference as ref

    out = {}
    for rows in (None, "row", "scaled"):
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(4, 6, 197, 64, device="cuda").to(dtype)
            a = ref.quantize(x, 8, (1, 3), 1, False, rows=rows)
            b = ref.quantize(x, 8, (1, 3), 1, False, rows=rows, prims=fused.PRIMS)
            out[f"{rows}-{dtype}"] = all(torch.equal(u, v) for u, v in zip(a, b))
    return out


def verify_on_cuda() -> dict:
    """torch_mesa.verify on a few models, on the GPU, fp32 and bf16 autocast."""
    import timm
    import transformers

    import torch_mesa

    out = {}
    torch.manual_seed(0)
    vit = timm.create_model("deit_small_patch16_224", pretrained=False, num_classes=10).cuda()
    x = torch.randn(8, 3, 224, 224, device="cuda")
    cfg = transformers.LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=1000, max_position_embeddings=512)
    llama = transformers.LlamaForCausalLM(cfg).cuda()
    ids = torch.randint(0, 1000, (2, 512), device="cuda")
    for name, model, inputs in (("deit_small", vit, x), ("llama", llama, {"input_ids": ids, "labels": ids})):
        for amp in (None, torch.bfloat16):
            r = torch_mesa.verify(model, inputs, autocast_dtype=amp, by_op=False)
            out[f"{name}-{amp}"] = {"ok": r.ok, "forward_equal": r.forward_equal,
                                    "worst_cosine": r.worst.cosine if r.worst else 1.0,
                                    "kept_ratio": r.kept_converted / max(1, r.kept_exact)}
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", "gpu-out"))
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to do here (every CPU check runs in the test suite)")
        return 2
    device = torch.cuda.get_device_name(0)
    result = {"device": device, "torch": torch.__version__, "log": []}
    print(f"# {device}, torch {torch.__version__}", flush=True)
    result["fused_equals_reference"] = fused_matches_reference_on_cuda()
    result["verify"] = verify_on_cuda()
    batch = "16" if args.quick else "128"
    repeats = "3" if args.quick else "10"
    docs = out / "gpu.md"
    docs.write_text(f"## GPU ({device})\n\n")
    rc = _run([sys.executable, "-m", "torch_mesa", "bench", "--model", "timm:deit_base_patch16_224",
               "--batch-size", batch, "--device", "cuda", "--amp", "bf16",
               "--configs", "baseline,checkpoint,mesa8,baseline+compile,mesa8+compile,native8,native8+blocks",
               "--repeats", repeats, "--csv", str(out / "results.csv"), "--docs", str(docs)], result["log"])
    result["bench_rc"] = rc
    # Mesa's results table (DeiT-Ti/S/B, Swin-T, PVT-v2-b1) at Mesa's batch 128
    result["mesa_suite_rc"] = _run([sys.executable, "-m", "torch_mesa", "bench", "--suite", "mesa",
                                    "--batch-size", batch, "--device", "cuda", "--amp", "bf16",
                                    "--docs", str(docs)], result["log"])
    (out / "gpu.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "log"}, indent=1))
    ok = rc == 0 and result["mesa_suite_rc"] == 0 and all(result["fused_equals_reference"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
