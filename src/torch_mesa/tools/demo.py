"""`torch-mesa demo`: train a small ViT twice, unconverted and converted.

The data is scikit-learn's bundled handwritten digits (1,797 8x8 images, no
download). The model is the reference Vision Transformer of
:mod:`torch_mesa.tools.models` with 2x2 patches (17 tokens). Both runs start from
the same weights and see the same batches in the same order; the only
difference is ``torch_mesa.compress_``. Reported side by side:

* bytes kept for backward by one training batch (``torch_mesa.measure``);
* peak memory of one training step, measured in a fresh process per run
  (CUDA: ``max_memory_allocated``; CPU: rise of the resident set, VmHWM);
* median step time;
* final test accuracy (held-out 20% of the digits).

A PNG figure shows both loss curves and the bytes kept per block.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from torch_mesa.units import format_bytes
from torch_mesa import MesaConfig, compress_, measure
from torch_mesa.measure import memory_in_use, peak_since_reset, reset_peak
from .models import VisionTransformer

__all__ = ["DemoResult", "run_demo"]


class MissingDependency(RuntimeError):
    """An optional dependency is not installed (the CLI prints one line, exit 2)."""


def _require(module: str, extra: str = "demo"):
    try:
        return __import__(module)
    except ImportError:
        raise MissingDependency(
            f"{module} is not installed; run: pip install 'torch-mesa[{extra}]'"
        ) from None


def load_digits(seed: int = 0):
    """scikit-learn's digits as (N, 1, 8, 8) float tensors in [0, 1], split 80/20."""
    datasets = _require("sklearn.datasets").datasets
    data = datasets.load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    n_test = len(y) // 5
    return (x[n_test:], y[n_test:]), (x[:n_test], y[:n_test])


def build_model(seed: int = 0, depth: int = 4, dim: int = 64, heads: int = 4) -> VisionTransformer:
    torch.manual_seed(seed)
    return VisionTransformer(
        image_size=8, patch_size=2, in_chans=1, num_classes=10, dim=dim, depth=depth, heads=heads, drop=0.1
    )


@dataclass
class RunResult:
    name: str
    losses: List[float] = field(default_factory=list)
    step_times: List[float] = field(default_factory=list)
    test_accuracy: float = 0.0
    kept_bytes: int = 0
    kept_by_block: Dict[str, int] = field(default_factory=dict)
    peak_bytes: Optional[int] = None

    @property
    def median_step(self) -> float:
        return statistics.median(self.step_times) if self.step_times else float("nan")


@dataclass
class DemoResult:
    runs: List[RunResult]
    figure: Optional[Path]
    table: str
    out_dir: Path


def _train(model, train, test, *, epochs, batch_size, lr, device, seed, progress, label) -> RunResult:
    x, y = train
    result = RunResult(label)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps_per_epoch = (len(y) + batch_size - 1) // batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # same dropout masks in both runs
    bar = progress(total=epochs * steps_per_epoch, desc=label)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=g)
        for i in range(steps_per_epoch):
            idx = order[i * batch_size:(i + 1) * batch_size]
            xb, yb = x[idx].to(device), y[idx].to(device)
            t = time.perf_counter()
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            result.step_times.append(time.perf_counter() - t)
            sched.step()
            result.losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.eval()
    with torch.no_grad():
        pred = model(test[0].to(device)).argmax(-1).cpu()
    result.test_accuracy = (pred == test[1]).float().mean().item()
    return result


def _peak_child(bits: Optional[int], batch_size: int, device: str, seed: int) -> int:
    """Run one training step in a fresh process; return its peak memory rise."""
    code = (
        "import sys, json; from torch_mesa.tools.demo import _peak_of_one_step; "
        f"print(json.dumps(_peak_of_one_step({bits!r}, {batch_size}, {device!r}, {seed})))"
    )
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")  # freed blocks go back at once
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    return int(json.loads(res.stdout.strip().splitlines()[-1]))


def _peak_of_one_step(bits: Optional[int], batch_size: int, device: str, seed: int) -> int:
    dev = torch.device(device)
    model = build_model(seed).to(dev)
    if bits is not None:
        compress_(model, MesaConfig(bits=bits))
    x = torch.rand(batch_size, 1, 8, 8, device=dev)
    y = torch.randint(0, 10, (batch_size,), device=dev)
    # a warm-up step (compiles the quantizer), then the rise during a second
    # step (CPU: of the resident set, glibc returning freed blocks at once,
    # see _peak_child)
    F.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)
    before = memory_in_use(dev)
    reset_peak(dev)
    F.cross_entropy(model(x), y).backward()
    return max(0, peak_since_reset(dev) - before)




def make_table(base: RunResult, mesa: RunResult, bits: int) -> str:
    rows = [
        ("bytes kept for backward (1 batch)", format_bytes(base.kept_bytes), format_bytes(mesa.kept_bytes),
         f"{mesa.kept_bytes / base.kept_bytes:.2f}x" if base.kept_bytes else "n/a"),
        ("peak memory of a step (rise)", format_bytes(base.peak_bytes), format_bytes(mesa.peak_bytes),
         f"{mesa.peak_bytes / base.peak_bytes:.2f}x" if base.peak_bytes and mesa.peak_bytes else "n/a"),
        ("median step time", f"{base.median_step * 1e3:.1f} ms", f"{mesa.median_step * 1e3:.1f} ms",
         f"{mesa.median_step / base.median_step:.2f}x"),
        ("final training loss (last 10 steps)", f"{statistics.mean(base.losses[-10:]):.4f}",
         f"{statistics.mean(mesa.losses[-10:]):.4f}", ""),
        ("test accuracy", f"{base.test_accuracy:.2%}", f"{mesa.test_accuracy:.2%}",
         f"{(mesa.test_accuracy - base.test_accuracy) * 100:+.2f} pts"),
    ]
    head = ("", "unconverted", f"torch-mesa {bits}-bit", "mesa / unconverted")
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(4)]
    line = lambda r: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(head), "  ".join("-" * w for w in widths)] + [line(r) for r in rows])


def make_figure(base: RunResult, mesa: RunResult, bits: int, path: Path) -> Path:
    matplotlib = _require("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    smooth = lambda v, k=10: [statistics.mean(v[max(0, i - k + 1):i + 1]) for i in range(len(v))]
    ax1.plot(smooth(base.losses), label=f"unconverted (test acc {base.test_accuracy:.1%})")
    ax1.plot(smooth(mesa.losses), label=f"torch-mesa {bits}-bit (test acc {mesa.test_accuracy:.1%})",
             linestyle="--")
    ax1.set_xlabel("step")
    ax1.set_ylabel("training loss (moving average of 10)")
    ax1.set_yscale("log")
    ax1.set_title("Same training, same accuracy")
    ax1.legend()
    blocks = list(base.kept_by_block)
    xs = range(len(blocks))
    ax2.bar([i - 0.2 for i in xs], [base.kept_by_block[b] / 2**10 for b in blocks], 0.4, label="unconverted")
    ax2.bar([i + 0.2 for i in xs], [mesa.kept_by_block.get(b, 0) / 2**10 for b in blocks], 0.4,
            label=f"torch-mesa {bits}-bit")
    ax2.set_xticks(list(xs))
    ax2.set_xticklabels(blocks, rotation=30, ha="right")
    ax2.set_ylabel("KiB kept for backward (one batch)")
    ax2.set_title("Activation memory per block")
    ax2.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _by_block(report) -> Dict[str, int]:
    out: Dict[str, int] = {}
    for name, n in report.by_module.items():
        parts = name.split(".")
        key = ".".join(parts[:2]) if parts[0] == "blocks" else parts[0]
        out[key] = out.get(key, 0) + n
    return out


def run_demo(
    *,
    epochs: int = 30,
    bits: int = 8,
    batch_size: int = 64,
    lr: float = 3e-3,
    device: str = "cpu",
    out_dir: str = "mesa-out",
    seed: int = 0,
    measure_peak: bool = True,
    progress=None,
    log=print,
) -> DemoResult:
    """Train unconverted and converted; return results, table and figure path."""
    if epochs < 1:
        raise ValueError(f"epochs={epochs} must be >= 1")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    MesaConfig(bits=bits)  # validates bits with a clear message
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but no CUDA device is available; use --device cpu")
    if progress is None:
        progress = _require("tqdm").tqdm
    _require("matplotlib")
    train, test = load_digits(seed)
    log(f"digits: {len(train[1])} training and {len(test[1])} test images (8x8, scikit-learn)")
    base_model = build_model(seed).to(dev)
    mesa_model = copy.deepcopy(base_model)
    report = compress_(mesa_model, MesaConfig(bits=bits))
    log(f"converted {report.num_converted} layers to keep {bits}-bit activations")

    xb, yb = train[0][:batch_size].to(dev), train[1][:batch_size].to(dev)
    runs = []
    for model, label in ((base_model, "unconverted"), (mesa_model, f"torch-mesa {bits}-bit")):
        model.train()
        kept = measure(model, xb, loss_fn=lambda out: F.cross_entropy(out, yb))
        res = _train(model, train, test, epochs=epochs, batch_size=batch_size, lr=lr, device=dev,
                     seed=seed, progress=progress, label=label)
        res.kept_bytes, res.kept_by_block = kept.total_bytes, _by_block(kept)
        runs.append(res)
    if measure_peak:
        runs[0].peak_bytes = _peak_child(None, batch_size, device, seed)
        runs[1].peak_bytes = _peak_child(bits, batch_size, device, seed)
    table = make_table(runs[0], runs[1], bits)
    out = Path(out_dir)
    figure = make_figure(runs[0], runs[1], bits, out / "demo.png")
    (out / "demo.json").write_text(json.dumps({
        "bits": bits, "epochs": epochs, "batch_size": batch_size, "device": device, "seed": seed,
        "torch": torch.__version__,
        "runs": [{"name": r.name, "test_accuracy": r.test_accuracy, "kept_bytes": r.kept_bytes,
                  "peak_bytes": r.peak_bytes, "median_step_s": r.median_step, "losses": r.losses,
                  "kept_by_block": r.kept_by_block} for r in runs],
    }, indent=1))
    return DemoResult(runs, figure, table, out)
