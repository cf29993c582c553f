"""What each quantizer choice of the training-quality study costs and buys.

On three models (below), each 8-bit setting is measured side by side
against the unconverted model: bytes kept for backward by the blocks, step
time (configurations interleaved round-robin, median of the repeats) and the
gradient cosine of every parameter against the exact gradients (same weights
and batch, fp32).

* ``default``: ``MesaConfig()`` (zero point, token scale, q/k rotation);
* ``no rotation``: ``qk_rotation=False``;
* ``no token scale``: ``token_scale=False``;
* ``neither``: both off (the quantizer as it first landed, plus the zero point);
* ``stochastic``: the default with stochastic rounding.

Models: ``vit`` (ViT-S/16 layout, batch 16, random init), ``llama`` (width
256, 4 layers, 4 x 256 tokens, random init) and ``trained-llama`` (the
convergence benchmark's character-level Llama after its exact training run:
gradient fidelity where attention is trained and sharp).

    python benchmarks/ablation.py                      # all models, fp32 and bf16 autocast (about 20 minutes)
    python benchmarks/ablation.py --models vit --amp bf16 --repeats 5
    python benchmarks/ablation.py --docs docs/benchmarks.md
"""

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from torch_mesa import MesaConfig, compress_
from torch_mesa.measure import measure_call
from torch_mesa.tools.bench import device_name, replace_section

SETTINGS = {
    "default": {},
    "no rotation": {"qk_rotation": False},
    "no token scale": {"token_scale": False},
    "neither": {"qk_rotation": False, "token_scale": False},
    "stochastic": {"rounding": "stochastic"},
}


def vit():
    from torch_mesa.tools.models import vit_small

    torch.manual_seed(0)
    model = vit_small(num_classes=100)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 3, 224, 224, generator=g), torch.randint(0, 100, (16,), generator=g)
    return model, (lambda m: F.cross_entropy(m(x).float(), y)), "blocks."


def llama():
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = transformers.LlamaForCausalLM(cfg)
    model.config._attn_implementation = "sdpa"
    ids = torch.randint(0, 512, (4, 256), generator=torch.Generator().manual_seed(0))

    def loss(m):
        logits = m(input_ids=ids).logits
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())

    return model, loss, "model.layers."


_TRAINED = {}


def trained_llama():
    """The convergence benchmark's character-level Llama (4 layers, width 128,
    head dim 32, SDPA, rotary, grouped-query attention) after its exact
    training run (seed 0, 300 steps): trained attention, where the q/k
    choices matter. Trained once per process."""
    import convergence

    task = convergence.TASKS["llama"]()
    if "llama" not in _TRAINED:
        model = task.build(0)
        model.train()
        print("  training the character-level Llama exactly (about two minutes)...", flush=True)
        convergence.fit(task, model, 0, task.steps)
        _TRAINED["llama"] = {k: v.clone() for k, v in model.state_dict().items()}
    model = task.build(0)
    model.load_state_dict(_TRAINED["llama"])
    batch = task.batch(10**6, 0)
    return model, (lambda m: task.loss(m, batch)), "model.layers."


MODELS = {"vit": vit, "llama": llama, "trained-llama": trained_llama}


def build(model_name: str, setting):
    model, loss, prefix = MODELS[model_name]()
    model.train()
    if setting is not None:
        compress_(model, MesaConfig(**SETTINGS[setting]))
    return model, loss, prefix


def grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss(model).backward()
    return {n: p.grad.detach().double().flatten() for n, p in model.named_parameters() if p.grad is not None}


def run(model_name: str, amp: str, repeats: int) -> list:
    dtype = {"none": None, "bf16": torch.bfloat16}[amp]
    names = [None] + list(SETTINGS)
    built = {s: build(model_name, s) for s in names}
    rows = {s: {} for s in names}
    # bytes kept by the blocks
    for s, (model, loss, prefix) in built.items():
        rep = measure_call(model, loss, autocast_dtype=dtype)
        rows[s]["bytes"] = sum(v for k, v in rep.by_module.items() if k.startswith(prefix))
    # gradients (fp32, same weights and batch)
    exact = grads(*built[None][:2])
    for s in SETTINGS:
        g = grads(*built[s][:2])
        cos = [F.cosine_similarity(g[n], e, 0).item() for n, e in exact.items() if e.norm() > 0 and n in g]
        rows[s]["worst"], rows[s]["median"] = min(cos), statistics.median(cos)

    def step(s):
        model, loss, _ = built[s]
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            out = loss(model)
        out.backward()
        model.zero_grad(set_to_none=True)

    for s in names:  # warm-up: compilation, allocator
        step(s)
        step(s)
    times = {s: [] for s in names}
    for r in range(repeats):
        for s in names:
            t = time.perf_counter()
            step(s)
            times[s].append(time.perf_counter() - t)
        print(f"  {model_name} {amp}: repeat {r + 1}/{repeats}", flush=True)
    base_t, base_b = statistics.median(times[None]), rows[None]["bytes"]
    out = []
    for s in SETTINGS:
        out.append({"model": model_name, "amp": amp, "setting": s, "ratio": rows[s]["bytes"] / base_b,
                    "time": statistics.median(times[s]) / base_t, "worst": rows[s]["worst"],
                    "median": rows[s]["median"]})
    return out


def markdown(results, command: str) -> str:
    lines = [f"```\n{command}\n```", "",
             f"8 bits, measured on {device_name('cpu')}, torch {torch.__version__}; "
             "ratios against the unconverted model in the same run.", "",
             "| model | autocast | setting | kept, blocks | step time | worst gradient cosine | median cosine |",
             "|---|---|---|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['model']} | {r['amp']} | {r['setting']} | {r['ratio']:.3f}x | {r['time']:.2f}x "
                     f"| {r['worst']:.5f} | {r['median']:.6f} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="vit,llama,trained-llama")
    p.add_argument("--amp", default="none,bf16")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--docs", default=None)
    args = p.parse_args(argv)
    results = []
    for m in args.models.split(","):
        for amp in args.amp.split(","):
            results += run(m, amp, args.repeats)
    text = markdown(results, ("python benchmarks/ablation.py " + " ".join(argv if argv is not None
                                                                       else sys.argv[1:])).strip())
    print(text)
    if args.docs:
        replace_section(args.docs, "ablation", text, heading="Quantizer choices: cost and benefit")


if __name__ == "__main__":
    main()
