"""Language-model head and loss: what the fused cross-entropy saves.

A causal LM with a large vocabulary keeps its ``(tokens, vocabulary)``
logits for backward, in bf16 and again in float32 for the loss; at a 128k
vocabulary they outweigh the Transformer blocks. ``torch_mesa.compress_``
on a Hugging Face causal LM computes the head and the loss with
``torch_mesa.ops.linear_cross_entropy`` (logits made block by block, never
kept). Measured here, on models built from their config classes (random
weights, nothing downloaded):

1. a Llama-style model with a 128256-token vocabulary at 2048 tokens (few,
   narrow layers so that it fits a CPU): bytes kept for backward by the whole
   model under bf16 autocast, unconverted, converted, and converted with
   ``MesaConfig(fused_loss=False)``; in fp32, the converted model's loss and
   gradients against the unconverted one's (same weights, same batch);
2. the same with ``peft`` LoRA adapters on every projection (32000 tokens,
   1024 tokens a sequence): bytes kept and the adapters' gradients;
3. peak memory of one training step of the 128k model, each configuration
   in a fresh process: unconverted, Hugging Face activation checkpointing,
   torch-mesa;
4. the op alone against ``F.cross_entropy(F.linear(x, w).float(), t)``:
   peak memory (fresh processes) and time of forward + backward.

    python benchmarks/lm_loss.py --docs docs/benchmarks.md   # about 10-15 min on 2 CPU cores
    python benchmarks/lm_loss.py --quick                     # tiny sizes, a smoke test
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from torch_mesa import MesaConfig, compress_
from torch_mesa.tools.bench import device_name, replace_section
from torch_mesa.measure import measure_call, process_memory, reset_peak_rss
from torch_mesa.ops import linear_cross_entropy

ROOT = Path(__file__).resolve().parent.parent
BF16 = torch.bfloat16
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# Model shape shared by parts 1-3 (the layers of a small Llama, reduced in
# number to fit 2 cores and 24 GiB), vocabulary and length per part.
_SHAPE = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=2, num_attention_heads=8,
              num_key_value_heads=2, tie_word_embeddings=False)
SIZES = {
    "full": {
        "lm": dict(_SHAPE, vocab_size=128256, seq=2048),
        "lora": dict(_SHAPE, vocab_size=32000, seq=1024),
        "loss": dict(tokens=2048, hidden=512, vocabs=[32000, 128256]),
        "repeats": 3,
    },
    "quick": {
        "lm": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, tie_word_embeddings=False, vocab_size=1000, seq=64),
        "lora": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, tie_word_embeddings=False, vocab_size=500, seq=32),
        "loss": dict(tokens=128, hidden=64, vocabs=[1000]),
        "repeats": 1,
    },
}
PEAK_CONFIGS = ("unconverted", "checkpointing", "torch-mesa")
LOSS_CONFIGS = ("full logits", "fused, x exact", "fused, x 8-bit")
# --quick runs the quantizer's eager reference (kernel="reference"): same
# bytes, no compilation, so the smoke test takes seconds. Full runs use the
# default (compiled) kernel.
_KERNEL = {"full": {}, "quick": {"kernel": "reference"}}
TARGETS = {"bytes": 0.20, "loss_rel": 1e-5, "cos": 0.999, "lora_bytes": 0.30, "lora_cos": 0.999}


# ----------------------------------------------------------------- building
def build_llama(sizes: dict, seed: int = 0):
    import transformers

    cfg = {k: v for k, v in sizes.items() if k != "seq"}
    config = transformers.LlamaConfig(max_position_embeddings=sizes["seq"], **cfg)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    model.train()
    return model


def token_batch(sizes: dict, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, sizes["vocab_size"], (1, sizes["seq"]), generator=g)


def lm_loss(ids, seen=None):
    """The training loss; ``seen["fused"]``: whether the call ran fused (no logits returned)."""
    def run(m):
        out = m(input_ids=ids, labels=ids)
        if seen is not None:
            seen["fused"] = out.logits is None
        return out.loss
    return run


def mesa_config(mode: str, **kw) -> MesaConfig:
    return MesaConfig(**_KERNEL[mode], **kw)


def converted(model, config):
    """A converted deep copy of ``model`` (the original stays as it is)."""
    conv = copy.deepcopy(model)
    compress_(conv, config)
    return conv


def grads_of(model, ids, only=None) -> dict:
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    out = {n: p.grad.detach().double().flatten().clone() for n, p in model.named_parameters()
           if p.grad is not None and (only is None or only in n)}
    model.zero_grad(set_to_none=True)
    return {"loss": loss.item(), "grads": out}


def compare(ref: dict, got: dict):
    """Relative loss difference and the worst per-parameter gradient cosine
    (parameters whose reference gradient is nonzero), with its parameter."""
    rel = abs(got["loss"] - ref["loss"]) / abs(ref["loss"])
    worst, where, n = 1.0, "", 0
    for name, g0 in ref["grads"].items():
        g1 = got["grads"].get(name)
        if g1 is None:
            return rel, -1.0, f"{name} (no gradient when converted)", n
        if g0.norm() == 0:
            continue
        n += 1
        c = F.cosine_similarity(g1, g0, dim=0).item()
        if c < worst:
            worst, where = c, name
    return rel, worst, where, n


def grouped(report) -> dict:
    """Bytes kept, by part of a Llama causal LM."""
    out = {"embedding": 0, "blocks": 0, "head + loss": 0}
    for name, n in report.by_module.items():
        if "embed_tokens" in name:
            out["embedding"] += n
        elif ".layers." in name:
            out["blocks"] += n
        else:  # lm_head, the final norm, <loss>, <root>: everything after the blocks
            out["head + loss"] += n
    return out


# ---------------------------------------------------------- part 1: the 128k LM
def part_lm(mode: str, progress) -> dict:
    s = SIZES[mode]
    sizes = s["lm"]
    ids = token_batch(sizes)
    model = build_llama(sizes)
    res = {"bytes": {}, "groups": {}, "top": {}}
    for label, cfg in (("unconverted", "plain"), ("torch-mesa 8-bit", mesa_config(mode)),
                       ("torch-mesa 8-bit, fused_loss=False", mesa_config(mode, fused_loss=False))):
        m = model if cfg == "plain" else converted(model, cfg)
        seen = {}
        r = measure_call(m, lm_loss(ids, seen), autocast_dtype=BF16)
        fused = seen["fused"]
        res["bytes"][label] = r.total_bytes
        res["groups"][label] = grouped(r)
        res["top"][label] = sorted(r.by_module.items(), key=lambda kv: -kv[1])[:6]
        res.setdefault("fused", {})[label] = fused
        if m is not model:
            del m
        gc.collect()
        progress(f"  bytes kept, {label}: {r.total_bytes / 2**20:,.1f} MiB (fused head and loss: {fused})")
    # fp32: the converted model against the unconverted one, same weights and batch
    ref = grads_of(model, ids)
    conv = converted(model, mesa_config(mode))
    got = grads_of(conv, ids)
    del conv
    gc.collect()
    rel, worst, where, n = compare(ref, got)
    res.update(loss_ref=ref["loss"], loss_conv=got["loss"], loss_rel=rel, worst_cos=worst, worst_at=where,
               n_params=n, median_cos=statistics.median(
                   F.cosine_similarity(got["grads"][k], g, dim=0).item()
                   for k, g in ref["grads"].items() if g.norm() > 0))
    progress(f"  fp32: loss rel. diff {rel:.2e}, worst gradient cosine {worst:.6f} ({where})")
    del model, ref, got
    gc.collect()
    return res


# ---------------------------------------------------------------- part 2: LoRA
def build_lora(sizes: dict):
    import peft

    base = build_llama(sizes)
    lora = peft.get_peft_model(base, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                     target_modules=LORA_TARGETS))
    torch.manual_seed(2)
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:  # nonzero adapters: lora_A's gradients carry information
                p.normal_(0.0, 0.02)
    lora.train()
    return lora


def part_lora(mode: str, progress) -> dict:
    sizes = SIZES[mode]["lora"]
    ids = token_batch(sizes)
    lora = build_lora(sizes)
    conv = converted(lora, mesa_config(mode))
    res = {"fused": {}}
    for label, m in (("unconverted", lora), ("torch-mesa 8-bit", conv)):
        seen = {}
        r = measure_call(m, lm_loss(ids, seen), autocast_dtype=BF16)
        res[label] = r.total_bytes
        res["fused"][label] = seen["fused"]
        res.setdefault("groups", {})[label] = grouped(r)
        progress(f"  LoRA bytes kept, {label}: {r.total_bytes / 2**20:,.1f} MiB")
    ref, got = grads_of(lora, ids, only="lora_"), grads_of(conv, ids, only="lora_")
    rel, worst, where, n = compare(ref, got)
    res.update(loss_rel=rel, worst_cos=worst, worst_at=where, n_params=n,
               trainable=sum(p.numel() for p in lora.parameters() if p.requires_grad))
    progress(f"  LoRA fp32: loss rel. diff {rel:.2e}, worst adapter gradient cosine {worst:.6f} ({where})")
    del lora, conv
    gc.collect()
    return res


# ---------------------------------------------------- fresh-process peak memory
def _child_env():
    # glibc hands large freed blocks back at once, so the resident set follows
    # what is allocated (as in torch_mesa.tools.bench's peak memory)
    return dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")


def start_child(argv) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__] + argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=_child_env())


def child_result(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"child {' '.join(proc.args[1:])} failed:\n{err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1])


def measure_peak(step) -> dict:
    """One warm-up step (one-time costs: compilation, allocator, caches), then
    the resident set before a second step and its high-water mark during it."""
    step()
    gc.collect()
    rest = process_memory("VmRSS")
    reset_peak_rss()
    if process_memory("VmHWM") > rest + (64 << 20):
        raise RuntimeError("could not reset the resident-set high-water mark (/proc/self/clear_refs)")
    t = time.perf_counter()
    step()
    return {"peak": process_memory("VmHWM"), "rest": rest, "step_s": time.perf_counter() - t}


def child_lm(mode: str, config: str) -> dict:
    sizes = SIZES[mode]["lm"]
    model = build_llama(sizes)
    if config == "checkpointing":
        (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    elif config == "torch-mesa":
        compress_(model, mesa_config(mode))
    ids = token_batch(sizes)

    def step():
        with torch.autocast("cpu", dtype=BF16):
            out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        model.zero_grad(set_to_none=True)

    return measure_peak(step)


class HeadAndLoss(nn.Module):
    """The head's weight and one way of computing its loss (part 4)."""

    def __init__(self, vocab: int, hidden: int, config: str, mesa: MesaConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(vocab, hidden) * hidden ** -0.5)
        self.config, self.mesa = config, mesa

    def forward(self, x, t):
        if self.config == "full logits":
            return F.cross_entropy(F.linear(x, self.weight).float(), t)
        if self.config == "fused, x exact":
            return linear_cross_entropy(x, self.weight, t, keep_exact=True)
        return linear_cross_entropy(x, self.weight, t, config=self.mesa)


def loss_inputs(mode: str, vocab: int, config: str):
    s = SIZES[mode]["loss"]
    torch.manual_seed(0)
    module = HeadAndLoss(vocab, s["hidden"], config, mesa_config(mode))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(s["tokens"], s["hidden"], generator=g).requires_grad_()
    t = torch.randint(0, vocab, (s["tokens"],), generator=g)
    return module, x, t


def loss_step(module, x, t):
    with torch.autocast("cpu", dtype=BF16):
        loss = module(x, t)
    loss.backward()
    module.weight.grad = x.grad = None


def child_loss(mode: str, vocab: int, config: str) -> dict:
    module, x, t = loss_inputs(mode, vocab, config)
    return measure_peak(lambda: loss_step(module, x, t))


def peaks(argv_of, configs, repeats, progress, what, parallel=False) -> dict:
    """Median over ``repeats`` rounds of a fresh process per configuration,
    the configurations side by side in each round, one process at a time
    (``parallel``, for --quick only: all of a round's at once)."""
    runs = {c: [] for c in configs}
    for r in range(repeats):
        if parallel:
            procs = {c: start_child(argv_of(c)) for c in configs}
            for c in configs:
                runs[c].append(child_result(procs[c]))
        else:
            for c in configs:
                runs[c].append(child_result(start_child(argv_of(c))))
        progress(f"  {what}: round {r + 1}/{repeats}: " + ", ".join(
            f"{c} {(v[-1]['peak'] - v[-1]['rest']) / 2**20:,.0f} MiB" for c, v in runs.items()))
    return {c: {"rise": statistics.median(x["peak"] - x["rest"] for x in v),
                "peak": statistics.median(x["peak"] for x in v),
                "step_s": statistics.median(x["step_s"] for x in v),
                "rises": [x["peak"] - x["rest"] for x in v]} for c, v in runs.items()}


# -------------------------------------------------------- part 4: the op alone
def part_loss(mode: str, repeats: int, progress) -> dict:
    out = {}
    for vocab in SIZES[mode]["loss"]["vocabs"]:
        row = {c: {} for c in LOSS_CONFIGS}
        inputs = {c: loss_inputs(mode, vocab, c) for c in LOSS_CONFIGS}
        ref = None
        for c, (module, x, t) in inputs.items():
            # bytes kept for backward (x and t are inputs here, so x counts when kept)
            r = measure_call(module, lambda m: m(x, t), autocast_dtype=BF16)
            row[c]["kept"] = r.total_bytes
            with torch.autocast("cpu", dtype=BF16):
                loss = module(x, t)
            loss.backward()
            row[c]["loss"] = loss.item()
            gw, gx = module.weight.grad.double().flatten(), x.grad.double().flatten()
            module.weight.grad = x.grad = None
            if ref is None:
                ref = (loss.item(), gw, gx)
            else:
                row[c]["loss_rel"] = abs(loss.item() - ref[0]) / abs(ref[0])
                row[c]["cos_w"] = F.cosine_similarity(gw, ref[1], dim=0).item()
                row[c]["cos_x"] = F.cosine_similarity(gx, ref[2], dim=0).item()
        times = {c: [] for c in LOSS_CONFIGS}
        for _ in range(repeats):  # the step above (gradients) was the warm-up
            for c, args in inputs.items():
                t0 = time.perf_counter()
                loss_step(*args)
                times[c].append(time.perf_counter() - t0)
        for c in LOSS_CONFIGS:
            row[c]["time_s"] = statistics.median(times[c])
        del inputs
        gc.collect()
        pk = peaks(lambda c: ["--child", "loss", "--mode", mode, "--vocab", str(vocab), "--config", c],
                   LOSS_CONFIGS, repeats, progress, f"op alone, vocabulary {vocab}", parallel=mode == "quick")
        for c in LOSS_CONFIGS:
            row[c].update(pk[c])
        out[vocab] = row
        progress(f"  op alone, vocabulary {vocab}: " + ", ".join(
            f"{c}: {row[c]['time_s']:.2f} s" for c in LOSS_CONFIGS))
    return out


# ------------------------------------------------------------------- report
def mib(n) -> str:
    return f"{n / 2**20:,.1f}"


def yes(ok: bool) -> str:
    return "yes" if ok else "**no**"


def markdown(res: dict, command: str, mode: str) -> str:
    s = SIZES[mode]
    lm, lo, ls = s["lm"], s["lora"], s["loss"]
    import transformers

    try:
        import peft
        peft_version = peft.__version__
    except ImportError:  # pragma: no cover
        peft_version = "?"
    shape = (f"{lm['num_hidden_layers']} layers, width {lm['hidden_size']}, SwiGLU {lm['intermediate_size']}, "
             f"{lm['num_attention_heads']} heads, {lm['num_key_value_heads']} KV heads, untied head, SDPA")
    L = [f"```\n{command}\n```", "",
         f"Measured on {device_name('cpu')}; torch {torch.__version__}, transformers {transformers.__version__}, "
         f"peft {peft_version}; total run {res['runtime_s'] / 60:.1f} min, load average "
         f"{res['load'][0]:.1f} at the start and {res['load'][1]:.1f} at the end (other jobs share this "
         f"machine: times are indicative, bytes and peak memory are not affected). Models are "
         f"`transformers.LlamaConfig` / `LlamaForCausalLM` with random weights: {shape}"
         + (" (the layers reduced in number from a real Llama's to fit this machine; the head and its "
            "vocabulary are full size). " if mode == "full" else
            ". **--quick: tiny sizes, one round, fresh processes run at once, the quantizer's eager reference "
            "kernel; the numbers only show that the benchmark runs.** ")
         + "Batch 1. Loss: `model(input_ids=ids, labels=ids).loss`, Hugging Face's shifted cross-entropy. "
         "torch-mesa: `compress_(model)`, default `MesaConfig` (8 bits).", ""]

    # part 1
    p = res["lm"]
    b0 = p["bytes"]["unconverted"]
    L += [f"**Bytes kept for backward**, whole model (embedding, blocks, head and loss), bf16 autocast, "
          f"vocabulary {lm['vocab_size']:,}, {lm['seq']:,} tokens (`torch_mesa.measure.measure_call`):", "",
          "| configuration | kept (MiB) | ratio | embedding (MiB) | blocks (MiB) | final norm, head and loss (MiB) |",
          "|---|---:|---:|---:|---:|---:|"]
    for label, n in p["bytes"].items():
        g = p["groups"][label]
        L.append(f"| {label} | {mib(n)} | {n / b0:.3f} | {mib(g['embedding'])} | {mib(g['blocks'])} | "
                 f"{mib(g['head + loss'])} |")
    ratio = p["bytes"]["torch-mesa 8-bit"] / b0
    L += ["", f"fp32 (no autocast), converted against unconverted, same weights and batch: loss "
              f"{p['loss_conv']:.6f} vs {p['loss_ref']:.6f}, relative difference {p['loss_rel']:.1e}; "
              f"worst per-parameter gradient cosine {p['worst_cos']:.6f} (`{p['worst_at']}`), median "
              f"{p['median_cos']:.6f}, over {p['n_params']} parameters.", ""]

    # part 2
    q = res["lora"]
    r0, r1 = q["unconverted"], q["torch-mesa 8-bit"]
    L += [f"**LoRA** (`peft` {peft_version}, `LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0)` on q, k, v, o, "
          f"gate, up and down projections, {q['trainable']:,} trainable parameters; `lora_B` set to "
          f"N(0, 0.02) so that `lora_A`'s gradients are informative), vocabulary {lo['vocab_size']:,}, "
          f"{lo['seq']:,} tokens, `compress_` applied to the `PeftModel`. Bytes kept under bf16 autocast; "
          f"gradients in fp32:", "",
          "| configuration | kept (MiB) | ratio | blocks (MiB) | final norm, head and loss (MiB) |",
          "|---|---:|---:|---:|---:|"]
    for label in ("unconverted", "torch-mesa 8-bit"):
        g = q["groups"][label]
        L.append(f"| LoRA, {label} | {mib(q[label])} | {q[label] / r0:.3f} | {mib(g['blocks'])} | "
                 f"{mib(g['head + loss'])} |")
    L += ["", f"Adapters' gradients, converted against unconverted: worst cosine {q['worst_cos']:.6f} "
              f"(`{q['worst_at']}`) over {q['n_params']} LoRA parameters; loss relative difference "
              f"{q['loss_rel']:.1e}.", ""]

    # part 3
    pk = res["peak"]
    base = pk["unconverted"]["rise"]
    L += [f"**Peak memory of one training step** (forward and backward under bf16 autocast, gradients "
          f"allocated, no optimizer) of the {lm['vocab_size']:,}-token model at {lm['seq']:,} tokens. Each "
          f"configuration runs in a fresh process (glibc returning freed blocks at once, "
          f"`MALLOC_MMAP_THRESHOLD_=65536`): model and batch built, one warm-up step, then the resident-set "
          f"high-water mark (`VmHWM`) during a second step minus the resident set just before it "
          f"(`VmRSS`: weights, runtime). Configurations side by side in each round; median of "
          f"{s['repeats']} rounds. Checkpointing: Hugging Face's `activation_checkpointing_enable()` "
          f"(`gradient_checkpointing_enable()`), non-reentrant `torch.utils.checkpoint` per layer.", "",
          "| configuration | peak rise in a step (MiB) | ratio | rounds (MiB) | peak resident (MiB) | step time (s) |",
          "|---|---:|---:|---|---:|---:|"]
    for c, v in pk.items():
        L.append(f"| {c} | {mib(v['rise'])} | {v['rise'] / base:.2f}x | "
                 f"{', '.join(f'{x / 2**20:,.0f}' for x in v['rises'])} | {mib(v['peak'])} | {v['step_s']:.1f} |")
    L.append("")

    # part 4
    L += [f"**The op alone**: `linear_cross_entropy(x, w, t)` against "
          f"`F.cross_entropy(F.linear(x, w).float(), t)` on full logits; x {ls['tokens']:,} x {ls['hidden']} "
          f"float32 (requires grad), w vocabulary x {ls['hidden']} float32 parameter, under bf16 autocast. "
          f"\"x exact\": `keep_exact=True` (the fusion alone); \"x 8-bit\": the default, x kept in 8 bits. "
          f"Peak rise: fresh process per configuration as above, median of {s['repeats']}; time: "
          f"forward + backward in one process, configurations interleaved, median of {s['repeats']} after "
          f"a warm-up (the step that gives the gradients); gradient cosines against the full-logits run.", "",
          "| vocabulary | computation | kept (MiB) | peak rise (MiB) | ratio | time (s) | ratio | "
          "loss rel. diff | cosine, dw | cosine, dx |",
          "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for vocab, row in res["loss"].items():
        f0 = row["full logits"]
        for c, v in row.items():
            extra = ("| | | |" if c == "full logits" else
                     f"| {v['loss_rel']:.1e} | {v['cos_w']:.6f} | {v['cos_x']:.6f} |")
            L.append(f"| {int(vocab):,} | {c} | {mib(v['kept'])} | {mib(v['rise'])} | "
                     f"{v['rise'] / f0['rise']:.2f}x | {v['time_s']:.2f} | {v['time_s'] / f0['time_s']:.2f}x {extra}")
    L.append("")

    # targets
    t = TARGETS
    L += ["| target | measured | met |", "|---|---:|---|",
          f"| whole model, bytes kept, converted / unconverted <= {t['bytes']:.2f}x (128k vocabulary) | "
          f"{ratio:.3f}x | {yes(ratio <= t['bytes'])} |",
          f"| fp32 loss, relative difference <= {t['loss_rel']:.0e} | {p['loss_rel']:.1e} | "
          f"{yes(p['loss_rel'] <= t['loss_rel'])} |",
          f"| fp32 worst gradient cosine >= {t['cos']} | {p['worst_cos']:.6f} | {yes(p['worst_cos'] >= t['cos'])} |",
          f"| LoRA, bytes kept <= {t['lora_bytes']:.2f}x | {r1 / r0:.3f}x | {yes(r1 / r0 <= t['lora_bytes'])} |",
          f"| LoRA, worst adapter gradient cosine >= {t['lora_cos']} | {q['worst_cos']:.6f} | "
          f"{yes(q['worst_cos'] >= t['lora_cos'])} |"]
    return "\n".join(L)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, one round: a smoke test of seconds")
    p.add_argument("--docs", help="write the section into this Markdown file (e.g. docs/benchmarks.md)")
    p.add_argument("--child", choices=["lm", "loss"], help=argparse.SUPPRESS)
    p.add_argument("--mode", default="full", help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child == "lm":
        print(json.dumps(child_lm(args.mode, args.config)))
        return 0
    if args.child == "loss":
        print(json.dumps(child_loss(args.mode, args.vocab, args.config)))
        return 0

    mode = "quick" if args.quick else "full"
    s = SIZES[mode]
    start = time.time()

    def progress(msg):
        print(f"[{time.time() - start:6.0f} s] {msg}", flush=True)

    progress(f"lm_loss benchmark ({mode}) on {device_name('cpu')}, torch {torch.__version__}")
    load0 = os.getloadavg()[0]
    res = {"lm": part_lm(mode, progress), "lora": part_lora(mode, progress)}
    res["peak"] = peaks(lambda c: ["--child", "lm", "--mode", mode, "--config", c], PEAK_CONFIGS,
                        s["repeats"], progress, f"training step, vocabulary {s['lm']['vocab_size']}",
                        parallel=args.quick)
    res["loss"] = part_loss(mode, s["repeats"], progress)
    res["runtime_s"] = time.time() - start
    res["load"] = (load0, os.getloadavg()[0])
    command = "python benchmarks/lm_loss.py" + (" --quick" if args.quick else "") + (
        f" --docs {args.docs}" if args.docs else "")
    text = markdown(res, command, mode)
    print(text)
    if args.docs:
        replace_section(args.docs, "lm_loss", text, heading="Language-model head and loss")
        progress(f"wrote {args.docs}")
    return res


if __name__ == "__main__":
    out = main()
    sys.exit(out if isinstance(out, int) else 0)
