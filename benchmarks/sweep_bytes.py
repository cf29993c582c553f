"""Bytes kept for backward across the test sweep's Hugging Face architectures.

Every token-input architecture of ``tests/test_sweep.py``'s ``HF`` table
(decoders, encoders, encoder-decoders; image models are left out) is built at
a small but realistically shaped width (hidden 256, 4 heads of 64, feed-forward
1024, 2 layers, vocabulary 1000, dropout 0; random weights, nothing
downloaded), in train mode, and measured with ``torch_mesa.measure`` under
bf16 autocast on one sequence of 512 tokens (attention mask all ones), with
the model's own LM loss where it accepts labels (else the mean square of its
main output): unconverted, then converted with the default ``MesaConfig``
(8 bits). "Blocks" are the modules inside the model's repeated layers (every
child of an ``nn.ModuleList``, e.g. ``model.layers.0``); the whole-model ratio
includes embeddings, head and loss.

    python benchmarks/sweep_bytes.py                  # all, writes docs/benchmarks.md
    python benchmarks/sweep_bytes.py --only gpt2-sdpa --trace
                                                      # one, and where its converted bytes come from

The quantizer runs as the eager reference (``TORCH_MESA_KERNEL=reference``
unless set): the compiled kernel produces the same codes, so the same bytes,
and compiling it for ~140 models would dominate the run.
"""

import argparse
import gc
import inspect
import os
import sys
import time
import traceback
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("TORCH_MESA_KERNEL", "reference")

import torch  # noqa: E402
from torch import nn  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import transformers  # noqa: E402
import test_sweep as sweep  # noqa: E402  (the HF table, BASE, _zero_dropout, _main, _HEADS)

from torch_mesa import MesaConfig, compress_, measure, restore_  # noqa: E402

SEQ, BATCH, VOCAB, HIDDEN, HEADS, HEAD_DIM, FFN, LAYERS, POSITIONS = 512, 1, 1000, 256, 4, 64, 1024, 2, 1024
FLAG = 0.35

# size fields, by family spelling: set wherever the config has the field
GROUPS = [
    (("hidden_size", "n_embd", "d_model", "dim", "emb_dim", "word_embed_proj_dim"), HIDDEN),
    (("intermediate_size", "ffn_dim", "d_ff", "n_inner", "dff", "hidden_dim", "d_inner", "encoder_ffn_dim",
      "decoder_ffn_dim", "intermediate_size_mlp", "moe_intermediate_size", "shared_expert_intermediate_size"), FFN),
    (("num_attention_heads", "n_head", "n_heads", "num_heads", "attention_heads", "encoder_attention_heads",
      "decoder_attention_heads", "num_encoder_attention_heads", "num_decoder_attention_heads"), HEADS),
    (("head_dim", "d_kv", "d_head", "kv_channels"), HEAD_DIM),
    (("num_hidden_layers", "n_layer", "num_layers", "n_layers", "encoder_layers", "decoder_layers",
      "num_encoder_layers", "num_decoder_layers"), LAYERS),
    (("max_position_embeddings", "n_positions", "max_encoder_position_embeddings",
      "max_decoder_position_embeddings"), POSITIONS),
]

# the sweep's tiny values of other fields, scaled to this width and length
# (windows near 1/4 of the sequence); applied when the sweep sets the field
SCALED = dict(sliding_window=128, local_attention=128, attention_chunk_size=128, attention_window_size=128,
              local_radius=127, rotary_dim=32, embedding_size=128, kv_lora_rank=128, q_lora_rank=192,
              qk_rope_head_dim=32, qk_nope_head_dim=32, v_head_dim=64, lru_width=HIDDEN, mamba_d_state=16,
              laurel_rank=64, hidden_size_per_layer_input=32, entity_emb_size=HIDDEN, expansion_ratio=4,
              relative_attention_num_buckets=32, num_buckets=32, relative_max_distance=128,
              input_embedding_size=128, output_embedding_size=HIDDEN)
# per architecture, last
CASE = {
    "gpt_neo": dict(window_size=256),
    "dbrx": dict(ffn_config=dict(ffn_hidden_size=FFN, moe_num_experts=4, moe_top_k=2)),
    "minimax": dict(block_size=64),
    "deberta-v2": dict(position_buckets=256, max_relative_positions=SEQ),
    "convbert": dict(embedding_size=HIDDEN),
    # MobileBERT's bottleneck: blocks of width 128 (its own 1:4 of 512) inside a 256 stream
    "mobilebert": dict(true_hidden_size=128, intra_bottleneck_size=128, intermediate_size=512,
                       num_feedforward_networks=4),
    "canine": dict(downsampling_rate=4, num_hash_functions=4, num_hash_buckets=1024, local_transformer_stride=128),
    "big_bird": dict(block_size=32, num_random_blocks=2),  # block-sparse needs > 9 blocks: 512 / 32
    "longformer": dict(attention_window=128),
    "led": dict(attention_window=[128] * LAYERS),
    "switch_transformers": dict(expert_capacity=SEQ),  # no token dropped by capacity
    "nllb-moe": dict(expert_capacity=SEQ),
}


def token_cases():
    """(ids measured, {id: reason} left out) of the sweep's HF table."""
    cases, skipped = [], {}
    for case, (model_type, overrides, head, attn, *inputs) in sweep.HF.items():
        if head == "image" or "Image" in head or (inputs and inputs[0].startswith("image")):
            skipped[case] = "image input"
        else:
            cases.append(case)
    return cases, skipped


def build(case):
    """The sweep's model for ``case`` at this benchmark's sizes; (model, kind, config kwargs)."""
    model_type, overrides, head, attn, *inputs = sweep.HF[case]
    dropped = {k for k, v in overrides.items() if v is None}
    kw = dict(sweep.BASE)
    kw.update(overrides)
    kw = {k: v for k, v in kw.items() if v is not None}
    default = transformers.AutoConfig.for_model(model_type)
    fields = set(vars(default)) | set(type(default).attribute_map)
    mla = "kv_lora_rank" in kw
    for keys, value in GROUPS:
        for k in keys:
            if k in dropped or (mla and k == "head_dim"):
                continue
            if k in fields or k in kw:
                current = kw.get(k, getattr(default, k, None))
                kw[k] = [value] * len(current) if isinstance(current, list) else value
    for k, v in SCALED.items():
        if kw.get(k) is not None:
            kw[k] = v
    for k, v in list(kw.items()):
        if "vocab_size" in k and v == sweep.VOCAB:
            kw[k] = VOCAB
    kw.update(CASE.get(case, {}))
    cfg = sweep._zero_dropout(transformers.AutoConfig.for_model(model_type, **kw))
    if attn is not None:
        cfg._attn_implementation = attn
    torch.manual_seed(0)
    cls = getattr(transformers, sweep._HEADS[head]) if head in sweep._HEADS else getattr(transformers, head)
    model = cls.from_config(cfg) if head in sweep._HEADS else cls(cfg)
    if attn is not None and hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(attn)
    for m in model.modules():
        if isinstance(m, nn.Dropout) and m.p > 0:
            raise RuntimeError(f"dropout left at {m.p}")
    kind = inputs[0] if inputs else head
    return model.train(), kind, kw


def batch(model, kind):
    """(kwargs, loss_fn, what the loss is)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (BATCH, SEQ), generator=g)
    kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    takes_labels = "labels" in inspect.signature(model.forward).parameters
    if kind == "seq2seq":
        target = torch.randint(3, VOCAB, (BATCH, SEQ), generator=g)
        kwargs["labels" if takes_labels else "decoder_input_ids"] = target
    elif takes_labels and kind in ("causal", "masked"):
        kwargs["labels"] = ids

    def loss_fn(out):
        loss = getattr(out, "loss", None)
        return loss if loss is not None else sweep._main(out).float().square().mean()

    return kwargs, loss_fn, "labels" in kwargs


def block_prefixes(model):
    return [f"{n}.{c}" if n else c for n, m in model.named_modules() if isinstance(m, nn.ModuleList)
            for c, _ in m.named_children()]


def in_blocks(name, prefixes):
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def kept(model, kwargs, loss_fn, dtype=torch.bfloat16):
    torch.manual_seed(0)
    r = measure(model, loss_fn=loss_fn, autocast_dtype=dtype, **kwargs)
    prefixes = block_prefixes(model)
    return sum(v for k, v in r.by_module.items() if in_blocks(k, prefixes)), r.total_bytes


def _why(e):
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0][:140]}"


def trace(model, kwargs, loss_fn, dtype=torch.bfloat16, top=12):
    """Bytes of the large (numel > 10000) non-uint8 tensors kept, by the line
    of model source (transformers) that saved them, with the torch_mesa line
    under it if any, and whether the saving module is inside the blocks."""
    by_line, seen = defaultdict(lambda: [0, 0, set()]), set()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    params |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    names = {m: n for n, m in model.named_modules()}
    prefixes, stack = block_prefixes(model), []

    def pack(t):
        if t.numel() > 10000 and t.dtype != torch.uint8:
            key = t.untyped_storage().data_ptr()
            if key not in seen and key not in params:
                seen.add(key)
                frames = traceback.extract_stack()[:-1]
                src = [f for f in frames if "/transformers/" in f.filename]
                mesa = [f for f in frames if "/torch_mesa/" in f.filename]
                where = (f"{Path(src[-1].filename).name}:{src[-1].lineno} {src[-1].line.strip()}" if src else "?")
                if mesa:
                    where += f"  [{Path(mesa[-1].filename).name}:{mesa[-1].lineno} {mesa[-1].line.strip()}]"
                where = ("blocks  " if stack and in_blocks(stack[-1], prefixes) else "outside ") + where
                rec = by_line[where]
                rec[0] += t.untyped_storage().nbytes()
                rec[1] += 1
                rec[2].add(f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}")
        return t

    def pre(module, args):
        stack.append(names[module])

    def post(module, args, out):
        stack.pop()

    handles = []
    for m in names:
        handles.append(m.register_forward_pre_hook(pre))
        handles.append(m.register_forward_hook(post, always_call=True))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = loss_fn(model(**kwargs))
        del loss
    finally:
        for h in handles:
            h.remove()
    rows = sorted(by_line.items(), key=lambda kv: -kv[1][0])[:top]
    return [f"{b / 2**20:8.2f} MiB  x{n:<3} {where}  {sorted(shapes)[:3]}" for where, (b, n, shapes) in rows]


def run_case(case, do_trace=False):
    t = time.time()
    try:
        model, kind, _ = build(case)
    except Exception as e:  # noqa: BLE001
        return dict(case=case, skipped=f"does not build at these sizes: {_why(e)}")
    kwargs, loss_fn, own_loss = batch(model, kind)
    dtype, fallback = torch.bfloat16, None
    try:
        try:
            b0, t0 = kept(model, kwargs, loss_fn)
        except Exception as e:  # noqa: BLE001  (the model's own code, before any conversion)
            dtype, fallback = None, _why(e)
            b0, t0 = kept(model, kwargs, loss_fn, dtype)
        compress_(model, MesaConfig())
        b1, t1 = kept(model, kwargs, loss_fn, dtype)
        lines = trace(model, kwargs, loss_fn, dtype) if do_trace else []
    except Exception as e:  # noqa: BLE001
        return dict(case=case, skipped=f"fails{' (also in fp32)' if fallback else ''}: {_why(e)}")
    finally:
        # restore_: some models share module instances with others (XLM's and
        # Flaubert's activation is transformers' module-level ``gelu``)
        restore_(model)
        del model
        gc.collect()
    return dict(case=case, model_type=sweep.HF[case][0], blocks=(b0, b1), total=(t0, t1), own_loss=own_loss,
                kind=kind, trace=lines, seconds=time.time() - t, fallback=fallback)


def table(results, skipped):
    done = sorted((r for r in results if "skipped" not in r), key=lambda r: -r["blocks"][1] / max(r["blocks"][0], 1))
    lines = ["| model type (sweep id) | blocks: unconverted (MiB) | converted (MiB) | ratio | whole-model ratio | note |",
             "|---|---:|---:|---:|---:|---|"]
    for r in done:
        (b0, b1), (t0, t1) = r["blocks"], r["total"]
        ratio = b1 / b0 if b0 else float("nan")
        notes = []
        if ratio > FLAG:
            notes.append(f"**above {FLAG}x**")
        if r["fallback"]:
            notes.append(f"fp32: the unconverted model fails under bf16 autocast "
                         f"({r['fallback'].split(':')[0]} in transformers)")
        if not r["own_loss"]:
            notes.append("loss: mean square of output")
        name = r["model_type"] if r["case"] == r["model_type"] else f"{r['model_type']} ({r['case']})"
        lines.append(f"| {name} | {b0 / 2**20:,.2f} | {b1 / 2**20:,.2f} | {ratio:.3f} | {t1 / t0:.3f} | "
                     f"{'; '.join(notes)} |")
    out = "\n".join(lines)
    fails = [r for r in results if "skipped" in r]
    if fails or skipped:
        out += "\n\nNot measured:\n\n" + "\n".join(f"- {r['case']}: {r['skipped']}" for r in fails)
        images = [c for c, why in skipped.items() if why == "image input"]
        if images:
            out += ("\n" if fails else "") + f"- image models (not token input): {', '.join(images)}"
    return out


def write_docs(path, command, text):
    from torch_mesa.tools.bench import device_name, replace_section

    body = (f"```\n{command}\n```\n\nEach architecture of the test sweep's `HF` table with token inputs, "
            f"built at hidden {HIDDEN}, {HEADS} heads of {HEAD_DIM}, feed-forward {FFN}, {LAYERS} layers, vocabulary "
            f"{VOCAB}, dropout 0, train mode; batch {BATCH} x {SEQ} tokens, bf16 autocast; default `MesaConfig` "
            f"(8 bits), quantizer run as the eager reference (`TORCH_MESA_KERNEL=reference`: the compiled kernel "
            f"keeps the same bytes). Blocks: modules inside `nn.ModuleList` children. Loss: the model's own LM loss (labels = "
            f"the inputs) unless noted. Measured on {device_name('cpu')}, torch {torch.__version__}, transformers "
            f"{transformers.__version__}.\n\n{text}")
    replace_section(path, "sweep-bytes", body, heading="Swept architectures (bytes kept, bf16 autocast, 512 tokens)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cases, skipped = token_cases()
    p.add_argument("--only", action="append", choices=cases, metavar="NAME", help="a sweep id (repeatable)")
    p.add_argument("--docs", default=str(ROOT / "docs" / "benchmarks.md"))
    p.add_argument("--trace", action="store_true",
                   help="print which source lines save large non-uint8 tensors in the converted model")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    results = []
    for case in args.only or cases:
        r = run_case(case, do_trace=args.trace)
        results.append(r)
        if "skipped" in r:
            print(f"{case}: skipped ({r['skipped']})", flush=True)
        else:
            (b0, b1), (t0, t1) = r["blocks"], r["total"]
            print(f"{case}: blocks {b0 / 2**20:.2f} -> {b1 / 2**20:.2f} MiB ({b1 / b0:.3f}x), "
                  f"whole {t1 / t0:.3f}x ({r['seconds']:.0f} s)", flush=True)
            for line in r["trace"]:
                print("   ", line)
    text = table(results, {} if args.only else skipped)
    print("\n" + text)
    if not args.only:
        write_docs(args.docs, "python benchmarks/sweep_bytes.py", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
