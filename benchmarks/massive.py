"""Tokens far larger than the rest: what the token-scaled keep loses.

Trained language models carry massive activations: a few tokens (the start
token, delimiters) thousands of times the others in a few channels (Sun et
al., arXiv 2402.17762), and every later norm divides such a token's gradient
by its huge norm. This measures, at 8 bits with the default configuration:

* a Linear's input on constructed patterns (Gaussian, outlier channels,
  token norms varying, one token 1000x, tokens at 300 in two channels, the
  same after a norm, and mixtures), the weight gradient's SQNR and its worst
  column (one input channel) against the exact gradient, with the output
  gradient random everywhere ("carried") and with the large tokens' output
  gradients 1000x smaller ("sink");
* a Llama (transformers, hidden 256, 2 layers) whose first down projection
  makes the start token massive in two channels, 2 x 256 tokens: the worst
  parameter gradient cosine from ``torch_mesa.verify``.

    python benchmarks/massive.py [--no-model]

Run it against another commit of the library with ``PYTHONPATH`` set to that
commit's ``src`` (a ``git worktree``).
"""

import argparse
import math
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import torch_mesa
from torch_mesa import MesaConfig
from torch_mesa.ops import recipes

B, N = 4, 128
PATTERNS = ["plain", "chan", "tokscale", "tok1000", "massive", "postnorm", "chan+massive+tokscale",
            "chan+postnorm+tokscale"]
LABELS = {
    "plain": "Gaussian",
    "chan": "outlier channels 20x",
    "tokscale": "token norms varying (lognormal, sigma 1.2)",
    "tok1000": "one token 1000x",
    "massive": "tokens at 300 in two channels (1 in 31)",
    "postnorm": "the same after a norm",
    "chan+massive+tokscale": "outlier channels + tokens at 300 + norms varying",
    "chan+postnorm+tokscale": "outlier channels + after a norm + norms varying",
}


def pattern(kind, c, seed=0):
    """(x, large): a (B, N, c) Linear input and the mask of its large tokens."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, c, generator=g)
    large = torch.zeros(B, N, dtype=torch.bool)
    if "chan" in kind:
        x[..., torch.randperm(c, generator=torch.Generator().manual_seed(99))[: max(1, c // 64)]] *= 20
    two = torch.randperm(c, generator=torch.Generator().manual_seed(98))[:2]
    if "tok1000" in kind:
        x[0, 5] *= 1000
        large[0, 5] = True
    if "massive" in kind:
        for t in [0] + list(range(7, N, 31)):
            x[:, t, two] = 300.0
            large[:, t] = True
    if "postnorm" in kind:  # after an RMS norm: the two entries ~ sqrt(c / 2), the token's other values small
        for t in [0] + list(range(7, N, 31)):
            x[:, t] *= 0.05
            x[:, t, two] = (c / 2) ** 0.5
            large[:, t] = True
    if "tokscale" in kind:
        x = x * torch.exp(torch.randn(B, N, 1, generator=g) * 1.2)
    return x, large


def sqnr(got, want):
    noise = (got.double() - want.double()).pow(2).sum().item()
    return math.inf if noise == 0 else 10 * math.log10(want.double().pow(2).sum().item() / noise)


def linear_row(kind, c):
    x, large = pattern(kind, c)
    kept = recipes.quantized(x, MesaConfig().resolve("linear"), op="linear")
    rebuilt = kept.rebuild(kept.tensors)
    go = torch.randn(B, N, c, generator=torch.Generator().manual_seed(5))
    cells = []
    for sink in (False, True):
        g = go.clone()
        if sink:
            g[large] *= 1e-3
        want = g.reshape(-1, c).t() @ x.reshape(-1, c)
        got = g.reshape(-1, c).t() @ rebuilt.reshape(-1, c)
        worst = F.cosine_similarity(got.double(), want.double(), dim=0).min().item()
        cells.append(f"{sqnr(got, want):.1f} / {worst:.4f}")
    return cells


def llama_worst(value, tokens=256):
    import transformers

    cfg = transformers.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=64, vocab_size=100,
                                   max_position_embeddings=tokens)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)

    def massive(module, args):
        x = args[0].clone()
        x[:, 0, 7], x[:, 0, 300] = value, -value
        return (x,)

    model.model.layers[0].mlp.down_proj.register_forward_pre_hook(massive)
    ids = torch.randint(1, 100, (2, tokens), generator=torch.Generator().manual_seed(0))
    report = torch_mesa.verify(model, {"input_ids": ids, "labels": ids}, loss_fn=lambda out: out.loss, by_op=False,
                               remedy=False)
    worst = min(report.params, key=lambda p: p.cosine)
    return worst.name, worst.cosine, report.ok


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--no-model", action="store_true", help="only the constructed patterns")
    args = p.parse_args()
    torch.set_num_threads(1)
    start = time.time()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=torch_mesa.__path__[0]).stdout.strip()
    print(f"torch-mesa at {torch_mesa.__path__[0]} (commit {commit or 'unknown'}), torch {torch.__version__}\n")
    print("Linear weight gradient at 8 bits: SQNR (dB) / worst column's cosine\n")
    print("| pattern | channels | gradient carried | large tokens' gradient 1000x smaller |")
    print("|---|---:|---:|---:|")
    for c in (64, 512):
        for kind in PATTERNS:
            carried, sink = linear_row(kind, c)
            print(f"| {LABELS[kind]} | {c} | {carried} | {sink} |", flush=True)
    if not args.no_model:
        print("\nLlama, start token massive in two channels of the first down projection's input, 2 x 256 tokens\n")
        print("| massive value | worst parameter | cosine | verify |")
        print("|---:|---|---:|---|")
        for value in (300.0, 1000.0, 3000.0):
            name, cos, ok = llama_worst(value)
            print(f"| {value:g} | {name} | {cos:.6f} | {'OK' if ok else 'FAILED'} |", flush=True)
    print(f"\n({time.time() - start:.0f} s)")


if __name__ == "__main__":
    sys.exit(main())
