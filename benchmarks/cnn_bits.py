"""CNNs at 8, 4 and 2 bits: bytes kept by ResNet-50, and whether a small
ResNet still trains.

Two parts, both with batch norms converted (``MesaConfig(batch_norm=True)``;
8 bits also with the default ``batch_norm=False``):

1. **ResNet-50 memory and gradients.** timm ``resnet50`` (random weights,
   fp32, train mode), one batch of ImageNet-sized images with random labels
   and a cross-entropy loss, one ``torch_mesa.verify`` per setting. Bytes
   kept for backward (verify measures both models with
   ``torch_mesa.measure.measure_call``: one forward pass plus the loss),
   unconverted and converted, as ratios to the unconverted model, and broken
   down by module type; every parameter's gradient cosine against the
   unconverted model's, same weights and batch, worst, median and by stage.
   The model is built with ``zero_init_last=False``: timm's default
   zero-initialises the last batch norm of every residual block, which makes
   112 of ResNet-50's 161 parameter gradients exactly zero at initialisation
   and leaves them uncompared.
2. **Convergence on digits.** A small ResNet-style CNN (conv-BN-ReLU stem, three
   residual blocks of conv-BN-ReLU-conv-BN plus shortcut, a max pool, global
   average pool, linear head) on scikit-learn's digits upsampled to 16x16,
   trained exact and converted at 8, 4 and 2 bits, three seeds each, with the
   convergence benchmark's protocol (``benchmarks/convergence.py``: AdamW,
   warm-up then cosine, gradients clipped to 1; the same seed gives the same
   initial weights and batches in every setting). Reported: final validation
   loss and accuracy on the 359 held-out digits, their mean and spread over
   seeds, and the gap to exact. After each exact run, ``torch_mesa.verify`` on
   the trained weights gives the worst gradient cosine at each bit width.

    python benchmarks/cnn_bits.py --docs docs/benchmarks.md   # about 9 minutes on 2 cores
    python benchmarks/cnn_bits.py --quick                     # smoke test: small sizes, eager quantizer

``--quick`` shrinks everything (ResNet-50 at 32x32, batch 2; digits: one
seed, 20 steps, exact and 2 bits) and runs the quantizer as its eager reference
(``kernel="reference"``, which keeps the same bytes) so that nothing compiles;
it never writes the docs.
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing
import statistics
import subprocess
import sys
import time
import warnings
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

import torch_mesa
from torch_mesa import MesaConfig
from torch_mesa.tools.bench import device_name, replace_section

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import convergence  # noqa: E402  (the training protocol of the convergence benchmark)

TARGET_2BIT = 0.10  # bytes kept at 2 bits, as a fraction of the unconverted fp32 model's

# label: (bits, batch_norm); None: unconverted
RESNET_SETTINGS = {
    "unconverted, fp32": None,
    "8 bits, batch_norm=False (default)": (8, False),
    "8 bits": (8, True),
    "4 bits": (4, True),
    "2 bits": (2, True),
}
TRAIN_SETTINGS = ("exact", "8", "4", "2")


def mesa_config(bits: int, batch_norm: bool = True, quick: bool = False) -> MesaConfig:
    return MesaConfig(bits=bits, batch_norm=batch_norm, kernel="reference" if quick else "auto")


def _convert(model: nn.Module, config: MesaConfig) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # what stays exact is reported through the bytes
        torch_mesa.compress_(model, config)


# ---------------------------------------------------------------- part 1: ResNet-50
def build_resnet50() -> nn.Module:
    import timm

    torch.manual_seed(0)
    model = timm.create_model("resnet50", pretrained=False, zero_init_last=False)
    return model.train()


def image_batch(batch: int, size: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=g), torch.randint(0, 1000, (batch,), generator=g)


def module_kind(module: Optional[nn.Module], name: str) -> str:
    if module is None:
        return name  # "<loss>", "<root>"
    kind = type(module).__name__
    return kind[4:] if kind.startswith("Mesa") else kind


def stage(name: str) -> str:
    """ResNet-50 parameter name -> its stage: stem, layer1-4, head."""
    top = name.split(".")[0]
    return "stem" if top in ("conv1", "bn1") else "head" if top == "fc" else top


def resnet_part(batch: int, size: int, quick: bool, progress=print) -> dict:
    """One ``torch_mesa.verify`` per converted setting, on the same weights and
    batch: bytes kept by both models (verify measures them with
    ``measure_call``, one forward pass plus the loss), by module type, and
    every parameter's gradient cosine."""
    x, y = image_batch(batch, size)
    kinds = {name: module_kind(m, name) for name, m in build_resnet50().named_modules()}
    bytes_, fidelity = {}, {}
    for label, setting in RESNET_SETTINGS.items():
        if setting is None:
            continue
        t = time.perf_counter()
        report = torch_mesa.verify(build_resnet50(), lambda m: F.cross_entropy(m(x), y),
                                   config=mesa_config(*setting, quick=quick), by_op=False)
        for key, col in (("unconverted, fp32", 0), (label, 1)):
            by_kind = Counter()
            for name, both in report.kept_by_module.items():
                by_kind[kinds.get(name, name)] += both[col]
            total = report.kept_exact if col == 0 else report.kept_converted
            assert sum(by_kind.values()) == total and bytes_.get(key, {}).get("total", total) == total
            bytes_[key] = {"total": total, "by_kind": dict(by_kind)}
        judged = [q for q in report.params if not q.zero]
        weights = [q for q in judged if q.name.endswith("weight")]
        stages = {}
        for q in weights:
            stages.setdefault(stage(q.name), []).append(q.cosine)
        worst = report.worst
        fidelity[label] = {"worst": worst.cosine, "worst_param": worst.name, "worst_db": worst.sqnr_db,
                           "median": statistics.median(q.cosine for q in weights), "judged": len(judged),
                           "below": sum(q.cosine < 0.999 for q in judged), "forward_equal": report.forward_equal,
                           "stages": {k: statistics.median(v) for k, v in stages.items()}}
        if not report.forward_equal:
            raise SystemExit(f"{label}: the converted forward differs from the unconverted one")
        progress(f"  {label:36s} kept {report.kept_converted / 2**20:7.1f} of {report.kept_exact / 2**20:.1f} MiB "
                 f"({report.kept_converted / report.kept_exact:.3f}x); worst cosine {worst.cosine:.5f} "
                 f"({worst.name}), median of the weights {fidelity[label]['median']:.5f} "
                 f"({time.perf_counter() - t:.0f} s)")
    order = list(RESNET_SETTINGS)
    return {"bytes": {k: bytes_[k] for k in order}, "fidelity": fidelity}


# ---------------------------------------------------------------- part 2: digits
class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the input (through a 1x1 conv-BN where
    the shape changes), then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = (nn.Identity() if stride == 1 and cin == cout else
                         nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))
        self.act2 = nn.ReLU(inplace=True)

    def forward(self, x):
        residual = self.shortcut(x)
        return self.act2(self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x))))) + residual)


def small_resnet(width: int = 32) -> nn.Module:
    """16x16x1 -> stem (width) -> block -> max pool (8x8) -> block, stride 2
    (2 x width, 4x4) -> block -> global average -> 10 classes."""
    return nn.Sequential(
        nn.Conv2d(1, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
        BasicBlock(width, width),
        nn.MaxPool2d(2),
        BasicBlock(width, 2 * width, stride=2),
        BasicBlock(2 * width, 2 * width),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, 10),
    )


class DigitsCNN(convergence.DigitsTask):
    """scikit-learn's digits (1,438 training, 359 validation images: the
    convergence benchmark's split), upsampled bilinearly from 8x8 to 16x16."""

    name = "cnn"
    steps = 300
    lr = 2e-3
    batch_size = 64

    def __init__(self):
        from torch_mesa.tools.demo import load_digits

        up = lambda x: F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)  # noqa: E731
        (x, y), (xt, yt) = load_digits(seed=0)
        self.train_set, self.test_set = (up(x), y), (up(xt), yt)

    def build(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return small_resnet()

    def loss(self, model, batch):
        x, y = batch
        return F.cross_entropy(model(x), y)


def evaluate(task: DigitsCNN, model: nn.Module):
    """(validation loss, validation accuracy) over the whole held-out set."""
    model.eval()
    x, y = task.test_set
    with torch.no_grad():
        logits = torch.cat([model(x[i:i + 128]) for i in range(0, len(y), 128)])
    model.train()
    return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


def train_run(job) -> dict:
    setting, seed, steps, quick = job
    verify_bits = (2,) if quick else (8, 4, 2)
    torch.set_num_threads(1)
    task = DigitsCNN()
    model = task.build(seed).train()
    if setting != "exact":
        _convert(model, mesa_config(int(setting), quick=quick))
    t = time.perf_counter()
    curve = convergence.fit(task, model, seed, steps)
    val_loss, val_acc = evaluate(task, model)
    record = {"setting": setting, "seed": seed, "val_loss": val_loss, "val_acc": val_acc,
              "train_end": statistics.fmean(curve[-max(1, steps // 20):]),
              "seconds": time.perf_counter() - t}
    if setting == "exact":  # gradient fidelity on the trained weights, each bit width
        batch = task.batch(10**6, seed)
        record["trained_cos"] = {}
        for bits in verify_bits:
            report = torch_mesa.verify(model, lambda m: task.loss(m, batch), config=mesa_config(bits, quick=quick),
                                       by_op=False)
            record["trained_cos"][str(bits)] = report.worst.cosine
    return record


def digits_runs(settings, seeds, steps, workers, quick, progress=print) -> List[dict]:
    jobs = [(s, seed, steps, quick) for seed in seeds for s in settings]
    results = []

    def done(r):
        results.append(r)
        extra = (", trained worst cosine " + ", ".join(f"{b} bits {c:.5f}" for b, c in r["trained_cos"].items())
                 if "trained_cos" in r else "")
        progress(f"  digits {r['setting']:5s} seed {r['seed']}: val loss {r['val_loss']:.4f}, "
                 f"accuracy {r['val_acc']:.2%} ({r['seconds']:.0f} s{extra})")

    # Each run in a fresh process (spawned, one thread): stochastic rounding
    # draws its seeds from a per-process call counter mixed with the seed, so
    # a run repeats exactly only when nothing ran before it in its process.
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                             max_tasks_per_child=1) as pool:
        for r in pool.map(train_run, jobs):
            done(r)
    return results


def summarize_digits(results: List[dict], settings) -> List[dict]:
    exact = {r["seed"]: r for r in results if r["setting"] == "exact"}
    e_spread = max(r["val_loss"] for r in exact.values()) - min(r["val_loss"] for r in exact.values())
    rows = []
    for setting in settings:
        mine = [r for r in results if r["setting"] == setting]
        loss = [r["val_loss"] for r in mine]
        acc = [r["val_acc"] for r in mine]
        e_loss = statistics.fmean(exact[r["seed"]]["val_loss"] for r in mine)
        e_acc = statistics.fmean(exact[r["seed"]]["val_acc"] for r in mine)
        target = convergence.TARGETS.get(setting)
        gap = statistics.fmean(loss) - e_loss
        rows.append({"setting": setting, "n": len(mine), "loss": loss, "acc": acc,
                     "gap": gap / e_loss, "acc_gap": statistics.fmean(acc) - e_acc,
                     "worse": sum(r["val_loss"] > exact[r["seed"]]["val_loss"] for r in mine),
                     "train_end": statistics.fmean(r["train_end"] for r in mine),
                     "target": target, "exact_spread": e_spread,
                     "met": None if target is None else gap <= max(target * e_loss, e_spread),
                     "spread_only": target is not None and target * e_loss < gap <= e_spread})
    return rows


# ---------------------------------------------------------------- report
def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f}"


def _spread(vals, fmt) -> str:
    return f"{fmt(statistics.fmean(vals))} ({fmt(min(vals))}-{fmt(max(vals))})"


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=ROOT, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def markdown(a, command: str, minutes: float) -> str:
    import timm

    base = a["bytes"]["unconverted, fp32"]["total"]
    two = a["bytes"]["2 bits"]["total"] / base
    lines = [
        f"```\n{command}\n```",
        "",
        f"Measured on {device_name('cpu')}; torch {torch.__version__}, timm {timm.__version__}, "
        f"commit {_commit()}, {datetime.date.today().isoformat()}; the whole command took {minutes:.1f} min. "
        "All converted settings convert batch norms (`MesaConfig(batch_norm=True)`) unless the row says "
        "otherwise; 8 bits round to nearest, 4 and 2 bits stochastically (the defaults).",
        "",
        f"**ResNet-50** (timm `resnet50`, random weights built with `zero_init_last=False`, train mode, fp32). "
        f"One `torch_mesa.verify` per setting on one batch of {a['batch']} images at {a['size']}x{a['size']} "
        f"(random inputs and labels, cross-entropy loss): bytes kept for backward by the unconverted and the "
        f"converted model (`torch_mesa.measure.measure_call` of one forward pass plus the loss; the ratio does "
        f"not depend on the batch), and every parameter's gradient against the unconverted model's (same "
        f"weights and batch): the worst parameter, and the median over the weights (convolutions, batch "
        f"norms, head; the biases' gradients use no kept activation of their own and stay near exact). "
        f"timm's default `zero_init_last=True` would start every residual branch at zero, leaving 112 of the "
        f"161 gradients exactly zero at initialisation and uncompared.",
        "",
        "| setting | kept (MiB) | ratio to fp32 | reduction | worst gradient cosine (parameter) | "
        "worst SQNR (dB) | median cosine, weights | parameters below 0.999 |",
        "|---|---:|---:|---:|---|---:|---:|---:|",
    ]
    for label, b in a["bytes"].items():
        f = a["fidelity"].get(label)
        cos = "" if f is None else f"{f['worst']:.5f} (`{f['worst_param']}`)"
        db = "" if f is None else f"{f['worst_db']:.1f}"
        med = "" if f is None else f"{f['median']:.5f}"
        below = "" if f is None else f"{f['below']} of {f['judged']}"
        lines.append(f"| {label} | {_mib(b['total'])} | {b['total'] / base:.3f} | {base / b['total']:.1f}x | "
                     f"{cos} | {db} | {med} | {below} |")
    order = ["stem", "layer1", "layer2", "layer3", "layer4", "head"]
    stages = sorted(next(iter(a["fidelity"].values()))["stages"], key=lambda k: (order + [k]).index(k))
    lines += ["", "Median gradient cosine of the weights by stage (the error a quantized activation adds "
              "to the gradient compounds as the gradient flows back towards the stem):", "",
              "| setting | " + " | ".join(stages) + " |", "|---|" + "---:|" * len(stages)]
    for label, f in a["fidelity"].items():
        lines.append(f"| {label} | " + " | ".join(f"{f['stages'][k]:.4f}" for k in stages) + " |")
    lines += ["", f"Target: 2 bits <= {TARGET_2BIT:.2f}x of fp32: measured {two:.3f}x "
              f"({1 / two:.1f}x less), **{'met' if two <= TARGET_2BIT else 'not met'}**.", "",
              "Kept for backward by module type (MiB, share of the setting's total):", ""]
    kinds = sorted({k for b in a["bytes"].values() for k in b["by_kind"]},
                   key=lambda k: -max(b["by_kind"].get(k, 0) for b in a["bytes"].values()))
    labels = list(a["bytes"])
    lines += ["| module type | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
    small = [k for k in kinds if all(a["bytes"][lab]["by_kind"].get(k, 0) < 0.05 * 2**20 for lab in labels)]
    groups = [(k, [k]) for k in kinds if k not in small]
    if small:
        groups.append(("other (" + ", ".join(small) + ")", small))
    for title, members in groups:
        cells = []
        for lab in labels:
            n = sum(a["bytes"][lab]["by_kind"].get(k, 0) for k in members)
            cells.append(f"{_mib(n)} ({n / a['bytes'][lab]['total']:.0%})")
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    lines.append("| total | " + " | ".join(_mib(a["bytes"][lab]["total"]) for lab in labels) + " |")
    lines += ["", "A storage that several modules keep counts once, for the first module that keeps it: "
              "unconverted, a convolution's input is the output the in-place ReLU before it already keeps, "
              "which is why unconverted convolutions show so little.", ""]

    lines += [
        f"**Digits, small ResNet** (the CNN of `benchmarks/cnn_bits.py`, {a['params']:,} parameters: "
        "conv-BN-ReLU stem at width 32, three residual blocks, max pool, widths 32-64; scikit-learn's digits "
        f"upsampled to 16x16). {a['steps']} steps of batch 64, AdamW lr {DigitsCNN.lr:g}, "
        f"the convergence benchmark's schedule; seeds {', '.join(map(str, a['seeds']))}, each run in a fresh "
        "process (stochastic rounding draws its seeds from a per-process call counter mixed with the seed, "
        "so a run repeats exactly only in a fresh process). "
        f"Validation on the {a['n_val']} held-out digits at the end.",
        "",
        "| setting | seeds | final val loss, mean (min-max) | vs exact, same seeds | above exact, same seed | "
        "val accuracy, mean (min-max) | vs exact (points) | final training loss | target | met |",
        "|---|---:|---|---:|---:|---|---:|---:|---|---|",
    ]
    for r in a["digits"]:
        exact = r["setting"] == "exact"
        target = "" if r["target"] is None else f"<= {r['target']:.0%} or exact spread ({r['exact_spread']:.3f})"
        met = "" if r["met"] is None else ("**no**" if not r["met"] else
                                           "only through the spread" if r["spread_only"] else "yes")
        name, gap, worse, acc_gap = "exact", "", "", ""
        if not exact:
            name, gap = f"{r['setting']} bits", f"{r['gap']:+.2%}"
            worse, acc_gap = f"{r['worse']} of {r['n']}", f"{100 * r['acc_gap']:+.2f}"
        loss = _spread(r["loss"], lambda v: f"{v:.4f}")
        acc = _spread(r["acc"], lambda v: f"{v:.2%}")
        lines.append(f"| {name} | {r['n']} | {loss} | {gap} | {worse} | {acc} | {acc_gap} | {r['train_end']:.4f} "
                     f"| {target} | {met} |")
    cos = a["trained_cos"]
    lines += ["", "Final training loss: the mean over the last 5% of steps and over seeds. Targets as in the "
              "convergence benchmark (8 bits: within 1% of the exact mean, 4 bits: 2%, or within the exact seeds' "
              "spread); none at 2 bits. Worst parameter gradient cosine on the trained exact weights "
              "(`torch_mesa.verify` after each exact run, one training batch; the worst over seeds): "
              + ", ".join(f"{b} bits {c:.5f}" for b, c in cos.items()) + "."]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke test: small sizes, seconds to a minute")
    p.add_argument("--batch", type=int, default=None, help="ResNet-50 batch (default 8)")
    p.add_argument("--size", type=int, default=None, help="ResNet-50 image size (default 224)")
    p.add_argument("--steps", type=int, default=None, help="digits training steps (default 300)")
    p.add_argument("--seeds", default=None, help="digits seeds (default 0,1,2)")
    p.add_argument("--workers", type=int, default=2, help="digits trainings at a time, one thread each")
    p.add_argument("--docs", default=None, help="Markdown file whose cnn_bits section is rewritten")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    quick = args.quick
    if quick and args.docs:
        p.error("--quick never writes the docs")
    size = args.size or (32 if quick else 224)
    batch = args.batch or (2 if quick else 8)
    steps = args.steps or (20 if quick else DigitsCNN.steps)
    seeds = [int(s) for s in (args.seeds or ("0" if quick else "0,1,2")).split(",")]
    settings = ("exact", "2") if quick else TRAIN_SETTINGS

    print(f"ResNet-50: bytes kept and gradients at batch {batch}, {size}x{size}", flush=True)
    res = {"batch": batch, "size": size, "steps": steps, "seeds": seeds,
           "params": sum(q.numel() for q in small_resnet().parameters()), "n_val": len(DigitsCNN().test_set[1])}
    res.update(resnet_part(batch, size, quick))
    print(f"digits: {len(settings)} settings x {len(seeds)} seeds, {steps} steps", flush=True)
    runs = digits_runs(settings, seeds, steps, args.workers, quick)
    res["digits"] = summarize_digits(runs, settings)
    exact_runs = [r for r in runs if "trained_cos" in r]
    res["trained_cos"] = {b: min(r["trained_cos"][b] for r in exact_runs) for b in exact_runs[0]["trained_cos"]}
    minutes = (time.perf_counter() - t0) / 60
    command = "python benchmarks/cnn_bits.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = markdown(res, command.strip(), minutes)
    print("\n" + text)
    two = res["bytes"]["2 bits"]["total"] / res["bytes"]["unconverted, fp32"]["total"]
    print(f"\n2 bits: {two:.3f}x of fp32 (target <= {TARGET_2BIT}); took {minutes:.1f} min")
    if args.docs:
        replace_section(args.docs, "cnn_bits", text, heading="CNNs at 8, 4 and 2 bits")
    return 0


if __name__ == "__main__":
    sys.exit(main())
