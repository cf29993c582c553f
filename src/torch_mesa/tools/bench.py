"""`torch-mesa bench`: unconverted vs checkpointing vs torch-mesa, side by side.

For one model (any name :mod:`torch_mesa.tools.zoo` accepts) and each configuration

* ``baseline``: the model as built;
* ``checkpoint``: ``torch.utils.checkpoint`` around each Transformer block;
* ``mesa8`` / ``mesa4``: ``torch_mesa.compress_`` at 8 / 4 bits;
* ``mesa8+checkpoint``: both;
* ``baseline+compile``, ``checkpoint+compile``, ``mesa8+compile``: the same
  under ``torch.compile``; ``budget``: compiled with AOTAutograd's
  ``activation_memory_budget`` (recomputes instead of compressing);
* ``native8`` / ``native8+blocks``: ``torch_mesa.compile`` (compiled saving:
  the quantizer inside the compiled graphs), whole model or block by block,

it measures, in one process with the configurations interleaved:

* bytes kept for backward (``torch_mesa.measure``; a checkpointed block keeps
  its inputs), for the blocks and for the whole model, at the run's autocast
  setting;
* median training-step time over ``--repeats`` and its ratio to the baseline;
* peak memory of a training step after a warm-up step (see
  :func:`peak_memory`), absolute (weights and runtime included) and as the
  rise above what was held just before the step;
* gradient fidelity: worst and median per-parameter cosine similarity and the
  worst SQNR (dB) against the baseline's gradient (same weights and batch).

Results are appended to a CSV (with date, machine, device, torch version and
commit) and, with ``--docs FILE``, written into FILE between markers for this
model, device and autocast setting, with the command that produced them.
"""

from __future__ import annotations

import argparse
import dataclasses
import csv
import gc
import datetime
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from torch_mesa import MesaConfig, compress_, measure
from torch_mesa.verify import cosine
from torch_mesa.compiled import compile as mesa_compile
from torch_mesa.compiled import find_blocks as _find_blocks
from torch_mesa.measure import memory_in_use, peak_since_reset, reset_peak
from .zoo import ModelError, resolve

__all__ = ["run_bench", "run_mesa_suite"]

ALL_CONFIGS = ("baseline", "checkpoint", "mesa8", "mesa4", "mesa8+checkpoint",
               # compiled (torch.compile of the whole model, Inductor unless
               # --compile-backend says otherwise); "budget": compiled with
               # AOTAutograd's activation_memory_budget, the peer that
               # recomputes instead of compressing
               "baseline+compile", "checkpoint+compile", "mesa8+compile", "budget",
               # torch_mesa.compile: the quantizer inside the compiled graphs,
               # of the whole model or of each block (regional compilation)
               "native8", "native8+blocks")
BUDGET = 0.5  # the activation memory budget of the "budget" row (a fraction of the full)
COMPILE_BACKEND = "inductor"
_AMP = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Checkpointed(nn.Module):
    """Recomputes ``block`` in backward (non-reentrant ``torch.utils.checkpoint``,
    which keeps the block's inputs through autograd, where ``measure`` sees them)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, *args, **kwargs):
        return checkpoint(self.block, *args, use_reentrant=False, **kwargs)


def find_blocks(model: nn.Module):
    """The ModuleList/Sequential of Transformer blocks (see
    :func:`torch_mesa.compiled.find_blocks`)."""
    try:
        return _find_blocks(model)
    except ValueError as e:
        raise ModelError(str(e)) from None


def budget_backend(gm, example_inputs):
    """Inductor with ``activation_memory_budget`` set while it partitions the
    forward and backward: it then recomputes the cheapest activations until
    what is kept fits that fraction. A backend of its own, not a setting
    around the call: Dynamo would otherwise reuse another compiled model's
    graphs for the same code (its cache checks the backend)."""
    from torch._inductor.compile_fx import compile_fx

    with torch._functorch.config.patch(activation_memory_budget=BUDGET):
        return compile_fx(gm, example_inputs)


def build(spec, config: str, device) -> nn.Module:
    torch.manual_seed(0)
    model = spec.build().to(device)
    model.train()
    if config.startswith("native"):
        return mesa_compile(model, MesaConfig(bits=8), blocks=config.endswith("+blocks"))
    if config.startswith("mesa"):
        compress_(model, MesaConfig(bits=4 if config.startswith("mesa4") else 8))
    if "checkpoint" in config:
        _, blocks = find_blocks(model)
        for i in range(len(blocks)):
            blocks[i] = Checkpointed(blocks[i])
    if config.endswith("+compile"):
        model = torch.compile(model, backend=COMPILE_BACKEND)
    elif config == "budget":
        model = torch.compile(model, backend=budget_backend)
    return model


def _is_compiled(config: str) -> bool:
    return config.endswith("+compile") or config == "budget" or config.startswith("native")


def _autocast(device: str, amp: str):
    dtype = _AMP[amp]
    return torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None)


def train_step(model, spec, batch, device, amp):
    args, kwargs, target = batch
    with _autocast(device, amp):
        loss = spec.loss(model(*args, **kwargs), target)
    loss.backward()
    model.zero_grad(set_to_none=True)


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def kept_bytes(model, spec, batch, amp) -> Dict[str, int]:
    args, kwargs, target = batch
    report = measure(model, *args, loss_fn=lambda out: spec.loss(out, target),
                     autocast_dtype=_AMP[amp], **kwargs)
    if report.by_module.keys() <= {"<root>"} or any(
            isinstance(m, torch._dynamo.eval_frame.OptimizedModule) for m in model.modules()):
        return {"blocks": None, "total": report.total_bytes}  # no per-module split inside compiled code
    blocks_name, _ = find_blocks(model)
    prefix = blocks_name + "."
    blocks = sum(v for k, v in report.by_module.items() if k.startswith(prefix))
    return {"blocks": blocks, "total": report.total_bytes}


def fidelity(spec, batch, device, configs) -> Dict[str, dict]:
    args, kwargs, target = batch
    grads = {}
    for config in ["baseline"] + [c for c in configs if c.startswith(("mesa", "native"))]:
        model = build(spec, config, device)
        spec.loss(model(*args, **kwargs), target).backward()
        grads[config] = {n.replace("_orig_mod.", ""): p.grad.detach().double().flatten()
                         for n, p in model.named_parameters() if p.grad is not None}  # (names as uncompiled)
    out = {}
    for config, g in grads.items():
        if config == "baseline":
            continue
        cos, dbs = [], []
        for n, exact in grads["baseline"].items():
            if n not in g or exact.norm() == 0:
                continue
            cos.append(cosine(g[n], exact))
            noise = (g[n] - exact).pow(2).sum().item()
            dbs.append(math.inf if noise == 0 else 10 * math.log10(exact.pow(2).sum().item() / noise))
        out[config] = {"worst_cos": min(cos), "median_cos": statistics.median(cos), "worst_db": min(dbs)}
    return out


def step_times(spec, batch, device, amp, configs, repeats, progress=print) -> Dict[str, float]:
    models = {c: build(spec, c, device) for c in configs}
    return timed(models, spec, batch, device, amp, repeats, progress)


def timed(models: Dict[str, nn.Module], spec, batch, device, amp, repeats, progress=print) -> Dict[str, float]:
    """Median step time (s) of each model: two warm-up steps each (compilation,
    allocator, caches), then ``repeats`` rounds of one step of each in turn
    (interleaved, so a change of load on a shared machine touches all alike)."""
    for m in models.values():
        for _ in range(2):
            train_step(m, spec, batch, device, amp)
    times: Dict[str, List[float]] = {c: [] for c in models}
    for r in range(repeats):
        for c, m in models.items():
            _sync(device)
            t = time.perf_counter()
            train_step(m, spec, batch, device, amp)
            _sync(device)
            times[c].append(time.perf_counter() - t)
        if progress is not None:
            progress(f"  timing: repeat {r + 1}/{repeats} done")
    return {c: statistics.median(v) for c, v in times.items()}


def peak_memory(args, config: str) -> Dict[str, int]:
    """``{"peak": bytes, "rest": bytes, ...}`` of one training step after a
    warm-up step, in a fresh process per configuration (so nothing an
    earlier measurement left behind counts): the highest memory during the
    step, what was held just before it (weights, runtime), and the forward's
    and the backward's peaks apart. CUDA: the allocator's statistics. CPU:
    the resident set, with glibc returning large freed blocks to the system
    at once (``MALLOC_MMAP_THRESHOLD_``) and its high-water mark reset after
    the warm-up (``/proc/self/clear_refs``), so compilation and the warm-up
    step do not count."""
    if torch.device(args.device).type == "cuda" and torch.cuda.is_initialized():
        torch.cuda.empty_cache()  # (this process's cached blocks would sit beside the child's)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    cmd = [sys.executable, "-m", "torch_mesa.tools.bench", "--peak-child", config] + _child_argv(args)
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"peak-memory run of {config} failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _child_argv(args) -> List[str]:
    return ["--model", args.model, "--batch-size", str(args.batch_size), "--image-size",
            str(args.image_size), "--seq-len", str(args.seq_len), "--device", args.device, "--amp", args.amp,
            "--compile-backend", COMPILE_BACKEND] + (["--labels"] if getattr(args, "labels", False) else [])


def _spec(args):
    spec = resolve(args.model, image_size=args.image_size, seq_len=args.seq_len)
    if getattr(args, "labels", False):
        if spec.kind != "tokens":
            raise ModelError(f"--labels is for language models; {spec.name} takes images")
        spec = dataclasses.replace(spec, labels=True)
    return spec


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name(device: str) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.machine()} CPU, {os.cpu_count()} cores"


def _mib(n) -> str:
    return "–" if n is None else f"{n / 2**20:,.1f}"


def format_markdown(results: dict) -> str:
    rows = results["rows"]
    base = rows["baseline"]
    amp = results["amp"]
    lines = [
        "| configuration | kept, blocks (MiB) | ratio | kept, whole model (MiB) | ratio | "
        "step time (s) | ratio | peak memory (MiB) | ratio | peak rise in a step (MiB) | ratio |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c, r in rows.items():
        peak, rise = r.get("peak"), r.get("rise")
        ratio = lambda a, b: f"{a / b:.2f}x" if a is not None and b else "–"  # noqa: E731
        blocks_ratio = "–" if r["blocks"] is None else f"{r['blocks'] / base['blocks']:.3f}"
        lines.append(
            f"| {c} | {_mib(r['blocks'])} | {blocks_ratio} | {_mib(r['total'])} | "
            f"{r['total'] / base['total']:.3f} | {r['step_s']:.3f} | {r['step_s'] / base['step_s']:.2f}x | "
            f"{_mib(peak)} | {ratio(peak, base.get('peak'))} | {_mib(rise)} | {ratio(rise, base.get('rise'))} |"
        )
    if results["fidelity"]:
        lines += ["", "| gradient fidelity (vs exact, fp32) | worst cosine | median cosine | worst SQNR (dB) |",
                  "|---|---:|---:|---:|"]
        for c, f in results["fidelity"].items():
            lines.append(f"| {c} | {f['worst_cos']:.5f} | {f['median_cos']:.5f} | {f['worst_db']:.1f} |")
    head = (f"{results['model']}, batch {results['batch_size']}, autocast {amp}, on {results['device']}; "
            f"torch {results['torch']}, commit {results['commit']}, {results['date'][:10]}; "
            f"step time is the median of {results['repeats']} interleaved repeats.")
    if results.get("labels"):
        head += (" Loss: the model's own, from `labels` (the input ids), as Hugging Face's trainers run it: "
                 "a converted causal LM's fused head and loss.")
    if any(_is_compiled(c) for c in rows):
        head += (f" `+compile`: `torch.compile(model)` ({results.get('compile_backend', COMPILE_BACKEND)}), "
                 "compilation in the warm-up; `budget`: compiled by Inductor with "
                 f"`torch._functorch.config.activation_memory_budget={BUDGET}`. Compiled rows have no "
                 "per-block split of the bytes.")
    return head + "\n\n" + "\n".join(lines)


def replace_section(path, name: str, body: str, heading: Optional[str] = None) -> None:
    """Write ``body`` between the markers ``<!-- NAME:start -->`` and
    ``<!-- NAME:end -->`` of the Markdown file ``path``, replacing what was
    there; where the markers are missing, append them (under ``## heading``
    when given). Benchmarks keep their tables current this way."""
    path = Path(path)
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{body}\n{end}"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if start in text and end in text:
        before, rest = text.split(start, 1)
        text = before + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + (f"## {heading}\n\n" if heading else "") + block + "\n"
    path.write_text(text)


def update_docs(path: Path, results: dict, command: str) -> None:
    key = f"{results['model']}|{results['device_kind']}|{results['amp']}|b{results['batch_size']}"
    key += "|labels" if results.get("labels") else ""
    replace_section(path, f"bench:{key}", f"```\n{command}\n```\n\n{format_markdown(results)}")


def run_bench(args, progress=print) -> int:
    if args.batch_size < 1 or args.repeats < 1:
        raise ModelError("--batch-size and --repeats must be >= 1")
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in configs if c not in ALL_CONFIGS]
    if unknown or "baseline" not in configs:
        raise ModelError(f"--configs must include baseline and only {', '.join(ALL_CONFIGS)}; got {args.configs!r}")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        raise ModelError("--device cuda but no CUDA device is available")
    global COMPILE_BACKEND
    COMPILE_BACKEND = getattr(args, "compile_backend", None) or COMPILE_BACKEND
    spec = _spec(args)
    batch = spec.batch(args.batch_size, args.device)
    progress(f"# {spec.name}, batch {args.batch_size}, {args.device} ({device_name(args.device)}), "
             f"autocast {args.amp}, torch {torch.__version__}")
    rows: Dict[str, dict] = {}
    for c in configs:
        try:
            rows[c] = kept_bytes(build(spec, c, args.device), spec, batch, args.amp)
        except TypeError as err:
            if spec.labels and "labels" in str(err):
                raise ModelError(f"--labels: {spec.name} takes no labels ({err})") from None
            raise
    progress("  bytes kept for backward: measured")
    fid = fidelity(spec, batch, args.device, configs)
    progress("  gradient fidelity: measured")
    for c, t in step_times(spec, batch, args.device, args.amp, configs, args.repeats, progress).items():
        rows[c]["step_s"] = t
    if not args.skip_peak:
        for c in configs:
            mem = peak_memory(args, c)
            rows[c]["peak"], rows[c]["rise"] = mem["peak"], mem["peak"] - mem["rest"]
        progress("  peak memory: measured")
    results = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.node(), "device": device_name(args.device),
        "device_kind": torch.device(args.device).type, "torch": torch.__version__, "commit": _commit(),
        "model": spec.name, "batch_size": args.batch_size, "amp": args.amp, "repeats": args.repeats,
        "rows": rows, "fidelity": fid, "compile_backend": COMPILE_BACKEND, "labels": spec.labels,
    }
    print(format_markdown(results))
    path = Path(args.csv)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(["date", "machine", "device", "torch", "commit", "model", "batch_size", "amp",
                        "repeats", "config", "metrics"])
        meta = [results[k] for k in ("date", "machine", "device", "torch", "commit", "model", "batch_size",
                                     "amp", "repeats")]
        for c, r in rows.items():
            w.writerow(meta + [c, json.dumps({**r, **fid.get(c, {}), **({"labels": True} if spec.labels else {})})])
    if args.docs:
        command = "torch-mesa " + " ".join(shlex.quote(a) for a in getattr(args, "argv", None) or ["bench"])
        update_docs(Path(args.docs), results, command.strip())
        progress(f"  wrote {args.docs}")
    return 0


# Mesa's model set and its published training memory (MB, unconverted -> Mesa),
# from the original repository's README and the paper (Pan et al., 2021): one
# GPU, batch 128, 224 x 224, under AMP. Mesa's PVT-Ti is PVT v1; timm builds
# PVT v2, whose b1 is the closest in size (13 M parameters, as PVT-Ti).
MESA_SUITE = (
    ("DeiT-Ti", "timm:deit_tiny_patch16_224", (4171, 1858)),
    ("DeiT-S", "timm:deit_small_patch16_224", (8459, 3840)),
    ("DeiT-B", "timm:deit_base_patch16_224", (17691, 8616)),
    ("Swin-T", "timm:swin_tiny_patch4_window7_224", (11812, 5371)),
    ("PVT-v2-b1 (Mesa: PVT-Ti, v1)", "timm:pvt_v2_b1", (7800, 3782)),
)


def run_mesa_suite(args, progress=print) -> int:
    """``torch-mesa bench --suite mesa``: Mesa's results table, side by side.
    Per model: bytes kept for backward by the whole model and the peak memory
    of a training step above what is held before it (activations,
    gradients, temporaries; a fresh process each, see :func:`peak_memory`),
    unconverted
    vs torch-mesa 8-bit, with Mesa's published memory ratio beside ours."""
    if getattr(args, "labels", False):
        raise ModelError("--labels is for language models; --suite mesa runs Mesa's image models")
    rows = []
    for label, name, (before, after) in MESA_SUITE:
        sub = argparse.Namespace(**{**vars(args), "model": name})
        spec = _spec(sub)
        batch = spec.batch(args.batch_size, args.device)
        kept = {c: kept_bytes(build(spec, c, args.device), spec, batch, args.amp)["total"]
                for c in ("baseline", "mesa8")}
        peak = {}
        if not args.skip_peak:
            for c in ("baseline", "mesa8"):
                mem = peak_memory(sub, c)
                peak[c] = mem["peak"] - mem["rest"]
        rows.append((label, kept, peak, after / before))
        progress(f"  {label}: kept {kept['mesa8'] / kept['baseline']:.3f}x"
                 + (f", peak {peak['mesa8'] / peak['baseline']:.3f}x" if peak else ""))
    lines = [f"batch {args.batch_size}, {args.image_size} x {args.image_size}, autocast {args.amp}, on {device_name(args.device)}; "
             f"torch {torch.__version__}, commit {_commit()}. Mesa's column is its published training memory "
             "(one GPU, batch 128, AMP; weights and optimizer included), a different machine and batch: compare "
             "ratios, not megabytes. Peak rise: the highest memory during a training step above what was held "
             "just before it (weights, runtime). On CPU, PyTorch's attention falls back to a kernel that keeps "
             "N x N maps under some settings, which the unconverted columns include.",
             "",
             "| model | kept for backward, unconverted (MiB) | torch-mesa 8-bit (MiB) | ratio | "
             "peak rise in a step, unconverted (MiB) | torch-mesa 8-bit (MiB) | ratio | Mesa, published ratio |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for label, kept, peak, published in rows:
        pk = (f"{_mib(peak['baseline'])} | {_mib(peak['mesa8'])} | {peak['mesa8'] / peak['baseline']:.3f}"
              if peak else "– | – | –")
        lines.append(f"| {label} | {_mib(kept['baseline'])} | {_mib(kept['mesa8'])} | "
                     f"{kept['mesa8'] / kept['baseline']:.3f} | {pk} | {published:.3f} |")
    body = "\n".join(lines)
    print(body)
    if args.docs:
        command = "torch-mesa " + " ".join(shlex.quote(a) for a in getattr(args, "argv", None) or ["bench"])
        replace_section(Path(args.docs), f"bench:mesa-suite|{torch.device(args.device).type}",
                        f"```\n{command.strip()}\n```\n\n{body}", heading="Mesa's results table, side by side")
        progress(f"  wrote {args.docs}")
    return 0


def _peak_child(argv) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--peak-child")
    for a in ("--model", "--device", "--amp", "--compile-backend"):
        p.add_argument(a)
    for a in ("--batch-size", "--image-size", "--seq-len"):
        p.add_argument(a, type=int)
    p.add_argument("--labels", action="store_true")
    args = p.parse_args(argv)
    global COMPILE_BACKEND
    COMPILE_BACKEND = args.compile_backend or COMPILE_BACKEND
    spec = _spec(args)
    model = build(spec, args.peak_child, args.device)
    batch = spec.batch(args.batch_size, args.device)
    train_step(model, spec, batch, args.device, args.amp)  # warm-up: compiles
    gc.collect()
    rest = memory_in_use(args.device)
    # the step as train_step runs it, its forward's and backward's peaks apart
    inputs, kwargs, target = batch
    reset_peak(args.device)
    with _autocast(args.device, args.amp):
        loss = spec.loss(model(*inputs, **kwargs), target)
    forward, held = peak_since_reset(args.device), memory_in_use(args.device)
    reset_peak(args.device)
    loss.backward()
    backward = peak_since_reset(args.device)
    model.zero_grad(set_to_none=True)
    print(json.dumps({"peak": max(forward, backward), "rest": rest, "forward_peak": forward, "held": held,
                      "backward_peak": backward}))


if __name__ == "__main__":
    _peak_child(sys.argv[1:])
