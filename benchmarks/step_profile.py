"""Where a converted training step spends its time beyond the unconverted one, by kind of work.

ViT-S/16 (batch 16 by default) on the CPU, the unconverted model and the converted one side by
side: eager (``compress_``) or compiled (``torch.compile`` against ``torch_mesa.compile``, by
block). Each model is warmed up, the two are timed in interleaved steps (median, without the
profiler), then each is profiled for a few steps with ``torch.profiler`` and every operator's
self time is put in one of these kinds:

* matrix products: ``mm``, ``addmm``, ``bmm``, convolutions (the q/k rotation's products land here);
* attention forward / attention backward: the scaled-dot-product kernels (a converted model
  reruns the attention forward in backward, where its kept q, k and v are expanded);
* Inductor kernels: generated C++ loops (in an eager converted model: the quantizer; in compiled
  models: every fused elementwise and norm step, with the quantizer fused into them);
* compiled-call overhead: Dynamo's guard check and the compiled wrappers' own Python;
* torch-mesa ops (Python): the autograd Functions' own time (routing, recipes, bookkeeping);
* other ATen ops (elementwise, norms, copies) and everything else (the autograd engine).

For deciding what to make cheaper, not a target. With ``--docs``, the table replaces the block
between ``<!-- step-profile:start -->`` and ``<!-- step-profile:end -->``.

    python benchmarks/step_profile.py --mode eager,compiled --amp none,bf16
"""

import argparse
import collections
import re
import sys
import time

import torch

from torch_mesa.tools import bench
from torch_mesa.tools.zoo import resolve

KINDS = ("matrix products", "attention forward", "attention backward", "Inductor kernels",
         "compiled-call overhead", "torch-mesa ops (Python)", "other ATen ops", "everything else")

_PRODUCTS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::mkldnn_convolution",
             "aten::convolution_backward", "aten::_convolution", "aten::linear"}
_OVERHEAD = re.compile(r"^(TorchDynamo Cache Lookup|Torch-Compiled Region.*|## Call CompiledFxGraph .*|"
                       r"CompiledFunction|CompiledFunctionBackward)$")


def kind_of(key: str) -> str:
    if key in _PRODUCTS:
        return "matrix products"
    if key.startswith("aten::_scaled_dot_product") or key.startswith("aten::_flash_attention"):
        return "attention backward" if key.endswith("_backward") else "attention forward"
    if key.startswith("graph_") or key.startswith("cpp_fused") or key.startswith("triton_"):
        return "Inductor kernels"
    if _OVERHEAD.match(key):
        return "compiled-call overhead"
    if re.match(r"^_\w+Fn(Backward)?$", key) or key.startswith("torch_mesa"):
        return "torch-mesa ops (Python)"
    if key.startswith("aten::"):
        return "other ATen ops"
    return "everything else"


def profile(model, spec, batch, amp: str, steps: int) -> dict:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            bench.train_step(model, spec, batch, "cpu", amp)
    per_kind = collections.Counter()
    for event in prof.key_averages():
        per_kind[kind_of(event.key)] += event.self_cpu_time_total / 1e3 / steps  # ms per step
    return per_kind


def run(mode: str, amp: str, args) -> tuple:
    spec = resolve("vit:small", image_size=224, seq_len=128)
    batch = spec.batch(args.batch_size, "cpu")
    configs = {"eager": ("baseline", "mesa8"), "compiled": ("baseline+compile", "native8+blocks")}[mode]
    models = {config: bench.build(spec, config, "cpu") for config in configs}
    walls = {c: t * 1e3 for c, t in bench.timed(models, spec, batch, "cpu", amp, args.repeats, None).items()}
    kinds = {c: profile(m, spec, batch, amp, args.profile_steps) for c, m in models.items()}
    return configs, walls, kinds


def table(mode: str, amp: str, configs, walls, kinds) -> str:
    base, conv = configs
    lines = [f"**{mode}, autocast {amp}**: step {walls[base]:.0f} ms unconverted, {walls[conv]:.0f} ms converted "
             f"({walls[conv] / walls[base]:.3f}x; median of interleaved steps without the profiler)\n",
             "| kind of work | unconverted (ms/step) | converted (ms/step) | difference (ms/step) | "
             "difference / unconverted step |",
             "|---|---:|---:|---:|---:|"]
    for kind in KINDS:
        a, b = kinds[base][kind], kinds[conv][kind]
        lines.append(f"| {kind} | {a:.1f} | {b:.1f} | {b - a:+.1f} | {(b - a) / walls[base]:+.1%} |")
    a, b = sum(kinds[base].values()), sum(kinds[conv].values())
    lines.append(f"| all (profiled) | {a:.1f} | {b:.1f} | {b - a:+.1f} | {(b - a) / walls[base]:+.1%} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", default="eager,compiled", help="comma-separated: eager, compiled")
    p.add_argument("--amp", default="none,bf16", help="comma-separated: none, bf16")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5, help="interleaved timed steps of each model")
    p.add_argument("--profile-steps", type=int, default=3)
    p.add_argument("--docs", help="a Markdown file whose step-profile block to replace")
    args = p.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    # names every generated C++ loop in the profile (else their time is the compiled wrappers')
    torch._inductor.config.cpp.enable_kernel_profile = True
    started = time.perf_counter()
    parts = []
    for mode in args.mode.split(","):
        for amp in args.amp.split(","):
            parts.append(table(mode, amp, *run(mode, amp, args)))
            print(parts[-1] + "\n", flush=True)
    head = (f"ViT-S/16, batch {args.batch_size}, {bench.device_name('cpu')}, torch {torch.__version__}, "
            f"{time.strftime('%Y-%m-%d')}; eager: unconverted against `compress_` (8 bits); compiled: "
            "`torch.compile` against `torch_mesa.compile` (by block). Operator self times from "
            f"`torch.profiler` over {args.profile_steps} steps per model; the whole command took "
            f"{(time.perf_counter() - started) / 60:.1f} min.")
    if args.docs:
        command = "python benchmarks/step_profile.py " + " ".join(argv if argv is not None else sys.argv[1:])
        bench.replace_section(args.docs, "step-profile", f"```\n{command}\n```\n\n{head}\n\n" + "\n\n".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
