"""Convergence benchmark: does converted training end where exact training ends?

Real training runs, exact against torch-mesa at 8, 4 and 2 bits, several
seeds each. A seed sets the initialisation and the batch order; the exact and
converted runs of one seed start from the same weights and see the same
batches. Reported per task and setting: the final validation loss of every
run, their mean and spread, the gap to the exact mean, and whether it is
within the target (8 bits: 1% of the exact mean, or the exact runs' own seed
spread where that is larger; 4 bits: 2%). After each exact run, the
converted model's gradients on the *trained* weights are compared with the
exact ones (``torch_mesa.verify``, 8 bits): the worst parameter cosine.

Tasks (all data ships with an installed package or is generated here):

* ``llama``: a character-level Llama-style LM (transformers
  ``LlamaForCausalLM``: RMSNorm, SwiGLU, rotary, grouped-query SDPA attention)
  on the English definitions of the ImageNet synsets that ship with timm
  (1.7 MB of text; the last 10% held out).
* ``gpt2``: the same corpus and schedule with a GPT-2-style model (LayerNorm,
  GELU MLP, learned positions, eager attention).
* ``bert``: a BERT-style encoder (post-LayerNorm, eager attention)
  classifying scikit-learn's digits read as 64-pixel token sequences.
* ``vit``: the demo's ViT (4 blocks, width 64) on scikit-learn's digits.

    python benchmarks/convergence.py --workers 2          # everything (about an hour on 2 cores)
    python benchmarks/convergence.py --tasks llama --settings 'exact;8' --seeds 0,1,2
    python benchmarks/convergence.py --docs docs/benchmarks.md --figure docs/convergence.png

``--settings`` takes ``exact``, ``8``, ``4``, ``2`` (bits with the default
config), a JSON MesaConfig (``'{"bits": 8, "rounding": "stochastic"}'``) or
the control ``noise:0.001`` (exact training with unbiased gradient noise of
0.1% of each gradient's norm), separated by ``;``. ``--workers 2`` runs two trainings at a time, one thread
each. Results are appended to ``--out`` (JSON lines) as they finish, and runs
already there are not repeated, so an interrupted benchmark resumes.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import List, Optional

import torch
import torch.nn.functional as F

import torch_mesa
from torch_mesa.tools.bench import replace_section

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"8": 0.01, "4": 0.02}  # relative gap to the exact mean


# ---------------------------------------------------------------- data
def corpus_text() -> str:
    """English definitions of the ImageNet synsets, from timm's package data."""
    import timm

    path = Path(timm.__file__).parent / "data" / "_info" / "imagenet_synset_to_definition.txt"
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        parts = line.split("\t", 1)
        if len(parts) == 2 and parts[1].strip():
            lines.append(parts[1].strip())
    return "\n".join(lines)


_CORPUS = None


def char_data():
    """(train ids, validation ids, vocabulary size)."""
    global _CORPUS
    if _CORPUS is None:
        text = corpus_text()
        chars = sorted(set(text))
        stoi = {c: i for i, c in enumerate(chars)}
        data = torch.tensor([stoi[c] for c in text], dtype=torch.long)
        n_val = len(data) // 10
        _CORPUS = (data[:-n_val], data[-n_val:], len(chars) + 1)  # one spare id (kept: results were measured so)
    return _CORPUS


# ---------------------------------------------------------------- tasks
class Task:
    name = ""
    steps = 300
    lr = 3e-3
    batch_size = 16

    def build(self, seed: int) -> torch.nn.Module:
        raise NotImplementedError

    def batch(self, step: int, seed: int):
        raise NotImplementedError

    def loss(self, model, batch) -> torch.Tensor:
        raise NotImplementedError

    def val_batches(self) -> list:
        raise NotImplementedError


class CharLM(Task):
    seq_len = 128

    def __init__(self, kind: str):
        self.name = kind

    def build(self, seed):
        import transformers

        _, _, vocab = char_data()
        torch.manual_seed(seed)
        if self.name == "gpt2":
            cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=self.seq_len, n_embd=128, n_layer=4,
                                          n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
            model = transformers.GPT2LMHeadModel(cfg)
            attn = "eager"
        else:
            cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=128, intermediate_size=344,
                                           num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                           max_position_embeddings=self.seq_len)
            model = transformers.LlamaForCausalLM(cfg)
            attn = "sdpa"
        model.config._attn_implementation = attn
        return model

    def batch(self, step, seed):
        train, _, _ = char_data()
        g = torch.Generator().manual_seed(seed * 100003 + step)
        starts = torch.randint(0, len(train) - self.seq_len - 1, (self.batch_size,), generator=g)
        return torch.stack([train[s:s + self.seq_len] for s in starts.tolist()])

    def loss(self, model, ids):
        logits = model(input_ids=ids).logits
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))

    def val_batches(self):
        _, val, _ = char_data()
        n = self.seq_len
        starts = torch.arange(0, len(val) - n - 1, (len(val) - n - 1) // 64)[:64]
        ids = torch.stack([val[s:s + n] for s in starts.tolist()])
        return [ids[i:i + 32] for i in range(0, len(ids), 32)]


class DigitsTask(Task):
    """A classification task on scikit-learn's digits: batches drawn by the
    seed and the step from ``train_set``, validation on all of ``test_set``."""

    batch_size = 64

    def batch(self, step, seed):
        x, y = self.train_set
        g = torch.Generator().manual_seed(seed * 100003 + step)
        idx = torch.randint(0, len(y), (self.batch_size,), generator=g)
        return x[idx], y[idx]

    def val_batches(self):
        x, y = self.test_set
        return [(x[i:i + 128], y[i:i + 128]) for i in range(0, len(y), 128)]


class DigitsBERT(DigitsTask):
    """A BERT-style encoder (transformers ``BertForSequenceClassification``:
    post-LayerNorm, GELU, learned positions, eager attention) classifying
    scikit-learn's digits read as sequences: a class token, then the 64
    pixels as tokens of their 17 intensity levels. (A character-level
    masked-LM stayed at the unigram plateau, loss 3.0, for 600 steps in every
    setting tried, exact training included, so it could not tell anything.)"""

    name = "bert"
    steps = 1000
    lr = 1e-3

    def __init__(self):
        from torch_mesa.tools.demo import load_digits

        (x, y), (xt, yt) = load_digits(seed=0)
        cls = lambda n: torch.full((n, 1), 17, dtype=torch.long)  # noqa: E731
        self.train_set = (torch.cat([cls(len(y)), (x.flatten(1) * 16).round().long()], 1), y)
        self.test_set = (torch.cat([cls(len(yt)), (xt.flatten(1) * 16).round().long()], 1), yt)

    def build(self, seed):
        import transformers

        torch.manual_seed(seed)
        cfg = transformers.BertConfig(vocab_size=18, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                                      intermediate_size=256, max_position_embeddings=65, num_labels=10,
                                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        model = transformers.BertForSequenceClassification(cfg)
        model.config._attn_implementation = "eager"
        return model

    def loss(self, model, batch):
        x, y = batch
        return F.cross_entropy(model(input_ids=x).logits, y)


class DigitsViT(DigitsTask):
    """The demo's ViT on scikit-learn's digits (classification)."""

    name = "vit"
    steps = 450

    def __init__(self):
        from torch_mesa.tools.demo import load_digits

        self.train_set, self.test_set = load_digits(seed=0)

    def build(self, seed):
        from torch_mesa.tools.demo import build_model

        model = build_model(seed=seed)
        for m in model.modules():  # dropout off: runs differ by the conversion only
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        return model

    def loss(self, model, batch):
        x, y = batch
        return F.cross_entropy(model(x), y)


TASKS = {"llama": lambda: CharLM("llama"), "gpt2": lambda: CharLM("gpt2"), "bert": DigitsBERT, "vit": DigitsViT}


# ---------------------------------------------------------------- runs
def parse_setting(s: str) -> Optional[torch_mesa.MesaConfig]:
    if s == "exact" or s.startswith("noise:"):
        return None
    if s.isdigit():
        return torch_mesa.MesaConfig(bits=int(s))
    return torch_mesa.MesaConfig.from_dict(json.loads(s))


def add_gradient_noise(model, scale: float) -> None:
    """The control setting ``noise:SCALE``: exact training whose gradients
    get unbiased Gaussian noise, each parameter's of norm ``scale`` times its
    gradient's norm (a fixed generator, so runs repeat). A task that ends
    worse under 0.1% of noise is sensitive to any perturbation of its
    trajectory, not to quantization in particular."""
    g = torch.Generator().manual_seed(1234)

    def hook(grad):
        return grad + scale * grad.norm() / grad.numel() ** 0.5 * torch.randn(grad.shape, generator=g)

    for p in model.parameters():
        if p.requires_grad:
            p.register_hook(hook)


def _validate(task, model) -> float:
    model.eval()
    with torch.no_grad():
        vals = [task.loss(model, b).item() for b in task.val_batches()]
    model.train()
    return statistics.fmean(vals)


def fit(task, model, seed: int, steps: int) -> List[float]:
    """Train ``model`` on ``task`` for ``steps`` steps (AdamW, linear warm-up
    over the first 5%, then cosine; gradients clipped to norm 1); returns the
    training loss of every step."""
    opt = torch.optim.AdamW(model.parameters(), lr=task.lr, weight_decay=0.01, betas=(0.9, 0.95))
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    curve = []
    for step in range(steps):
        loss = task.loss(model, task.batch(step, seed))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        curve.append(round(loss.item(), 5))
    return curve


def train(task_name: str, setting: str, seed: int, steps: Optional[int] = None, threads: int = 0) -> dict:
    """One training run; returns its record (final validation loss, curve)."""
    if threads:
        torch.set_num_threads(threads)
    task = TASKS[task_name]()
    steps = steps or task.steps
    model = task.build(seed)
    model.train()
    cfg = parse_setting(setting)
    if setting.startswith("noise:"):
        add_gradient_noise(model, float(setting[len("noise:"):]))
    if cfg is not None:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch_mesa.compress_(model, cfg)
    t0 = time.perf_counter()
    curve = fit(task, model, seed, steps)
    record = {"task": task_name, "setting": setting, "seed": seed, "steps": steps, "val_loss": _validate(task, model),
              "seconds": round(time.perf_counter() - t0, 1), "curve": curve}
    if setting == "exact":
        # gradient fidelity of the default 8-bit conversion on the trained weights
        batch = task.batch(10**6, seed)
        report = torch_mesa.verify(model, lambda m: task.loss(m, batch), by_op=True)
        worst = report.worst
        record["trained_worst_cosine"] = worst.cosine if worst else 1.0
        record["trained_worst_param"] = worst.name if worst else ""
        record["trained_by_op"] = {k: v[0] for k, v in report.by_op.items()}
    return record


def _key(r) -> tuple:
    return (r["task"], r["setting"], r["seed"], r["steps"])


def load_results(path: Path) -> List[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------- report
def summarize(results: List[dict]) -> List[dict]:
    """One row per task and setting. Gaps are taken against the exact runs of
    the same seeds (all of them when a setting has every seed); the target
    allows the exact runs' spread over all seeds."""
    rows = []
    for task in dict.fromkeys(r["task"] for r in results):
        runs = [r for r in results if r["task"] == task]
        exact_by_seed = {r["seed"]: r["val_loss"] for r in runs if r["setting"] == "exact"}
        if not exact_by_seed:
            continue
        e_spread = max(exact_by_seed.values()) - min(exact_by_seed.values())
        fid = [r["trained_worst_cosine"] for r in runs if r["setting"] == "exact" and "trained_worst_cosine" in r]
        for setting in dict.fromkeys(r["setting"] for r in runs):
            mine = [r for r in runs if r["setting"] == setting]
            vals = [r["val_loss"] for r in mine]
            mean = statistics.fmean(vals)
            seeds = [r["seed"] for r in mine if r["seed"] in exact_by_seed] or list(exact_by_seed)
            e_mean = statistics.fmean(exact_by_seed[s] for s in seeds)
            target = TARGETS.get(setting)
            met = spread_only = None
            if target is not None and setting != "exact":
                met = mean - e_mean <= max(target * e_mean, e_spread)
                spread_only = met and mean - e_mean > target * e_mean
            paired = [r["val_loss"] - exact_by_seed[r["seed"]] for r in mine if r["seed"] in exact_by_seed]
            rows.append({"task": task, "setting": setting, "n": len(vals), "mean": mean, "min": min(vals),
                         "max": max(vals), "gap": (mean - e_mean) / e_mean, "exact_spread": e_spread,
                         "train_end": statistics.fmean(statistics.fmean(r["curve"][-max(1, len(r["curve"]) // 20):])
                                                       for r in mine),
                         "target": target, "met": met, "spread_only": spread_only,
                         "worse_seeds": sum(d > 0 for d in paired), "paired_seeds": len(paired),
                         "trained_worst_cosine": min(fid) if fid and setting == "exact" else None})
    return rows


def markdown(rows: List[dict], command: str) -> str:
    lines = [
        f"`{command}`",
        "",
        "| task | setting | seeds | final val loss, mean (min-max) | vs exact, same seeds | above exact, same seed "
        "| final training loss | target | met |",
        "|---|---|---:|---|---:|---:|---:|---|---|",
    ]
    for r in rows:
        target = "" if r["target"] is None else f"<= {r['target']:.0%} or exact spread ({r['exact_spread']:.3f})"
        met = "" if r["met"] is None else ("**no**" if not r["met"] else
                                           "only through the spread" if r["spread_only"] else "yes")
        gap = "" if r["setting"] == "exact" else f"{r['gap']:+.2%}"
        worse = "" if r["setting"] == "exact" else f"{r['worse_seeds']} of {r['paired_seeds']}"
        lines.append(f"| {r['task']} | {r['setting']} | {r['n']} | {r['mean']:.4f} ({r['min']:.4f}-{r['max']:.4f}) "
                     f"| {gap} | {worse} | {r['train_end']:.4f} | {target} | {met} |")
    lines += ["", "Final training loss: the mean over the last 5% of steps and over seeds. "
              "\"above exact, same seed\": in how many seeds the run ended above the exact run of the same seed."]
    fid = [r for r in rows if r["trained_worst_cosine"] is not None]
    if fid:
        lines += ["", "Worst parameter gradient cosine of the 8-bit conversion on the trained weights "
                  "(`torch_mesa.verify` after each exact run; the worst over seeds): "
                  + ", ".join(f"{r['task']} {r['trained_worst_cosine']:.5f}" for r in fid) + "."]
    return "\n".join(lines)


def figure(results: List[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter, NullFormatter

    tasks = list(dict.fromkeys(r["task"] for r in results))
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.4), squeeze=False)
    colors = {"8": "tab:blue", "4": "tab:orange", "2": "tab:red"}
    for ax, task in zip(axes[0], tasks):
        runs = [r for r in results if r["task"] == task]
        exact = [r["curve"] for r in runs if r["setting"] == "exact"]
        if exact:
            n = min(len(c) for c in exact)
            smooth = [_smooth(c[:n]) for c in exact]
            lo = [min(c[i] for c in smooth) for i in range(n)]
            hi = [max(c[i] for c in smooth) for i in range(n)]
            ax.fill_between(range(n), lo, hi, color="0.6", alpha=0.5, label="exact (all seeds)")
        styles = iter([":", "--", "-.", (0, (1, 3))] * 4)
        for setting in dict.fromkeys(r["setting"] for r in runs if r["setting"] != "exact"):
            control = setting.startswith("noise:")
            ls = next(styles) if control else "-"
            for i, r in enumerate(x for x in runs if x["setting"] == setting):
                label = None
                if i == 0:
                    label = (f"torch-mesa {setting}-bit" if setting.isdigit() else
                             f"control: exact + {float(setting[6:]) * 100:g}% gradient noise" if control else setting)
                ax.plot(_smooth(r["curve"]), color="k" if control else colors.get(setting, "tab:green"),
                        lw=0.8, ls=ls, label=label)
        ax.set_title(task)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (smoothed, log scale)")
        ax.set_yscale("log")
        smoothed = [_smooth(r["curve"]) for r in runs]
        low = min(min(c[len(c) // 2:]) for c in smoothed)
        high = max(c[len(c) // 10] for c in smoothed)
        ax.set_ylim(low * 0.85, high * 1.15)
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(FormatStrFormatter("%g") if high < 3 * low else NullFormatter())
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _smooth(curve, k: int = 20):
    out, acc = [], 0.0
    for i, v in enumerate(curve):
        acc += v
        if i >= k:
            acc -= curve[i - k]
        out.append(acc / min(i + 1, k))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default="llama,gpt2,bert,vit")
    p.add_argument("--settings", default="exact;8;4;2")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=None, help="override every task's step count")
    p.add_argument("--workers", type=int, default=1, help="trainings at a time (one thread each if > 1)")
    p.add_argument("--out", default="benchmarks/convergence.jsonl")
    p.add_argument("--docs", default=None, help="Markdown file whose convergence section is rewritten")
    p.add_argument("--figure", default=None, help="PNG: exact runs as a band, converted runs as lines")
    args = p.parse_args(argv)
    out = Path(args.out)
    done = {_key(r) for r in load_results(out)}
    jobs = []
    for task in args.tasks.split(","):
        steps = args.steps or TASKS[task]().steps
        for setting in args.settings.split(";"):
            for seed in [int(s) for s in args.seeds.split(",")]:
                if (task, setting, seed, steps) not in done:
                    jobs.append((task, setting, seed, steps))
    print(f"{len(jobs)} runs to do ({len(done)} already in {out})", flush=True)
    threads = 1 if args.workers > 1 else 0

    def record(r):
        with out.open("a") as f:
            f.write(json.dumps(r) + "\n")
        extra = f", trained worst cosine {r['trained_worst_cosine']:.5f}" if "trained_worst_cosine" in r else ""
        print(f"{r['task']:6s} {r['setting']:8s} seed {r['seed']}: val loss {r['val_loss']:.4f} "
              f"({r['seconds']:.0f} s{extra})", flush=True)

    if args.workers > 1:
        with ProcessPoolExecutor(args.workers) as pool:
            for r in pool.map(_run_job, [(j, threads) for j in jobs]):
                record(r)
    else:
        for j in jobs:
            record(_run_job((j, threads)))
    results = [r for r in load_results(out) if r["task"] in args.tasks.split(",")]
    rows = summarize(results)
    command = "python benchmarks/convergence.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = markdown(rows, command.strip())
    print("\n" + text)
    if args.figure:
        figure(results, Path(args.figure))
        text += f"\n\n![convergence: exact runs as a band, converted runs as lines]({Path(args.figure).name})"
    if args.docs:
        replace_section(args.docs, "convergence", text, heading="Convergence")


def _run_job(job):
    (task, setting, seed, steps), threads = job
    return train(task, setting, seed, steps, threads)


if __name__ == "__main__":
    main()
