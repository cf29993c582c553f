"""Where a converted training step spends its time beyond the unconverted one, by kind of work.

A model (ViT-S/16, batch 16, on the CPU by default), the unconverted model and the converted one side by
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

On CUDA (``--device cuda``) the kinds are those of the GPU kernels' own time (matrix products,
attention, Inductor's Triton kernels: in an eager converted model the quantizer, other kernels),
with the time the GPU waited for the host (the step's wall time less its kernels' time) as a row
of its own, and the busiest kernels of each model listed below the table.

For deciding what to make cheaper, not a target. With ``--docs``, the table replaces the block
between ``<!-- step-profile:start -->`` and ``<!-- step-profile:end -->``.

    python benchmarks/step_profile.py --mode eager,compiled --amp none,bf16
    python benchmarks/step_profile.py --device cuda --model timm:deit_base_patch16_224 --batch-size 128 --amp bf16
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
GPU_KINDS = ("matrix products", "attention forward", "attention backward", "Inductor kernels", "other kernels",
             "GPU waiting for the host")

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


def kernel_kind(name: str) -> str:
    """The kind of a CUDA kernel, by its name (flash, memory-efficient and
    cuDNN attention; cuBLAS and CUTLASS products; Inductor's Triton)."""
    low = name.lower()
    if any(k in low for k in ("flash", "fmha", "attention", "sdpa")):
        backward = any(k in low for k in ("bwd", "backward", "cutlassb", "bprop"))
        return "attention backward" if backward else "attention forward"
    if any(k in low for k in ("gemm", "xmma", "cutlass", "cublas", "_mma", "splitk", "nvjet")):
        return "matrix products"
    if low.startswith("triton_"):
        return "Inductor kernels"
    return "other kernels"


def profile(model, spec, batch, amp: str, steps: int, device: str, wall_ms: float) -> tuple:
    """``(ms per step by kind, ms per step by CUDA kernel)``: operators' self
    times on the CPU, kernels' own times on CUDA."""
    cuda = torch.device(device).type == "cuda"
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(steps):
            bench.train_step(model, spec, batch, device, amp)
        if cuda:
            torch.cuda.synchronize()
    per_kind, kernels = collections.Counter(), collections.Counter()  # ms per step
    if not cuda:
        for event in prof.key_averages():
            per_kind[kind_of(event.key)] += event.self_cpu_time_total / 1e3 / steps
        return per_kind, kernels
    # each kernel, copy or fill on the GPU's timeline; not the annotated
    # ranges drawn there too (a compiled region's), which span kernels
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA and not getattr(event, "is_user_annotation", False):
            kernels[event.name] += event.self_device_time_total / 1e3 / steps
    for name, ms in kernels.items():
        per_kind[kernel_kind(name)] += ms
    per_kind["GPU waiting for the host"] = max(0.0, wall_ms - sum(kernels.values()))
    return per_kind, kernels


def run(mode: str, amp: str, args) -> tuple:
    spec = resolve(args.model, image_size=224, seq_len=args.seq_len)
    batch = spec.batch(args.batch_size, args.device)
    configs = {"eager": ("baseline", "mesa8"), "compiled": ("baseline+compile", "native8+blocks")}[mode]
    models = {config: bench.build(spec, config, args.device) for config in configs}
    walls = {c: t * 1e3 for c, t in
             bench.timed(models, spec, batch, args.device, amp, args.repeats, None).items()}
    found = {c: profile(m, spec, batch, amp, args.profile_steps, args.device, walls[c]) for c, m in models.items()}
    kinds = {c: f[0] for c, f in found.items()}
    kernels = {c: f[1] for c, f in found.items()}
    return configs, walls, kinds, kernels


def table(mode: str, amp: str, configs, walls, kinds, kernels, top: int = 12) -> str:
    base, conv = configs
    gpu = bool(kernels[base])
    lines = [f"**{mode}, autocast {amp}**: step {walls[base]:.1f} ms unconverted, {walls[conv]:.1f} ms converted "
             f"({walls[conv] / walls[base]:.3f}x; median of interleaved steps without the profiler)\n",
             "| kind of work | unconverted (ms/step) | converted (ms/step) | difference (ms/step) | "
             "difference / unconverted step |",
             "|---|---:|---:|---:|---:|"]
    for kind in (GPU_KINDS if gpu else KINDS):
        a, b = kinds[base][kind], kinds[conv][kind]
        lines.append(f"| {kind} | {a:.1f} | {b:.1f} | {b - a:+.1f} | {(b - a) / walls[base]:+.1%} |")
    a, b = sum(kinds[base].values()), sum(kinds[conv].values())
    lines.append(f"| all (profiled) | {a:.1f} | {b:.1f} | {b - a:+.1f} | {(b - a) / walls[base]:+.1%} |")
    for c in (configs if gpu else ()):
        lines += [f"\nBusiest kernels, {c} (ms/step):\n", "| kernel | ms/step |", "|---|---:|"]
        lines += [f"| `{name[:110]}` | {ms:.2f} |" for name, ms in kernels[c].most_common(top)]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", default="eager,compiled", help="comma-separated: eager, compiled")
    p.add_argument("--amp", default="none,bf16", help="comma-separated: none, bf16")
    p.add_argument("--model", default="vit:small", help="a `torch-mesa bench` model (e.g. timm:deit_base_patch16_224)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--device", default="cpu")
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
    head = (f"{args.model}, batch {args.batch_size}, {bench.device_name(args.device)}, torch {torch.__version__}, "
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
