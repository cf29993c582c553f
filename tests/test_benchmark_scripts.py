"""The convergence benchmark's machinery, on a few steps: a run of each kind
gives a record, the same seed gives the same start in every setting, and the
summary's gaps and targets are what their definitions say."""

import importlib.util
import math
import statistics
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _benchmark(name: str):
    """The script benchmarks/NAME.py, imported as a module."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def convergence():
    return _benchmark("convergence")


def test_runs_give_records_and_share_their_start(convergence):
    exact = convergence.train("vit", "exact", 0, steps=3)
    mesa = convergence.train("vit", "8", 0, steps=3)
    for r in (exact, mesa):
        assert r["steps"] == 3 and len(r["curve"]) == 3 and math.isfinite(r["val_loss"])
    # same weights and batch at step 0, and the forward is exact: same first loss
    assert exact["curve"][0] == mesa["curve"][0]
    assert 0.99 < exact["trained_worst_cosine"] <= 1.0 and "trained_worst_cosine" not in mesa


def test_summary_gaps_and_targets(convergence):
    def rec(setting, seed, loss):
        return {"task": "t", "setting": setting, "seed": seed, "steps": 1, "val_loss": loss, "curve": [loss]}

    exact = [2.0, 2.1, 1.9]
    results = [rec("exact", i, v) for i, v in enumerate(exact)]
    results += [rec("8", i, v) for i, v in enumerate([2.05, 2.1, 2.05])]   # +1.7%: inside the spread 0.2
    results += [rec("4", i, v) for i, v in enumerate([2.5, 2.5, 2.5])]     # +25%: outside 2% and the spread
    results += [rec("2", i, v) for i, v in enumerate([1.5, 1.6, 1.7])]     # better: no target at 2 bits
    rows = {r["setting"]: r for r in convergence.summarize(results)}
    e_mean = statistics.fmean(exact)
    assert rows["8"]["gap"] == pytest.approx((statistics.fmean([2.05, 2.1, 2.05]) - e_mean) / e_mean)
    assert rows["8"]["met"] is True and rows["4"]["met"] is False and rows["2"]["met"] is None
    assert rows["8"]["spread_only"] is True  # +1.7% > 1%: met through the exact spread alone
    assert rows["exact"]["exact_spread"] == pytest.approx(0.2)
    # paired by seed: 2.05 > 2.0, 2.1 = 2.1, 2.05 > 1.9
    assert (rows["8"]["worse_seeds"], rows["8"]["paired_seeds"]) == (2, 3)
    assert rows["2"]["worse_seeds"] == 0
    text = convergence.markdown(list(rows.values()), "cmd")
    assert "**no**" in text and text.count("| t |") == 4


def test_replace_section_keeps_the_rest_of_the_file(tmp_path):
    from torch_mesa.tools.bench import replace_section

    doc = tmp_path / "b.md"
    doc.write_text("# B\n\nintro\n\n<!-- t:start -->\nold\n<!-- t:end -->\n\n## After\n\ntail\n")
    replace_section(doc, "t", "new table")
    assert doc.read_text() == "# B\n\nintro\n\n<!-- t:start -->\nnew table\n<!-- t:end -->\n\n## After\n\ntail\n"
    replace_section(doc, "u", "other", heading="U")  # missing markers: appended under a heading
    assert doc.read_text().endswith("tail\n\n## U\n\n<!-- u:start -->\nother\n<!-- u:end -->\n")
    assert doc.read_text().count("new table") == 1


@pytest.fixture(scope="module")
def step_profile():
    return _benchmark("step_profile")


def test_step_profile_sorts_a_converted_steps_operators(step_profile):
    """The step profile's kinds, on the operators a real converted step runs
    (a depth-1 ViT, eager, 8 bits): the attention forward is counted twice
    (the forward and its rerun in backward), the backward once, torch-mesa's
    autograd Functions as its Python, and the model's products as products;
    unconverted, nothing lands in torch-mesa's kinds."""
    import torch

    from torch_mesa import compress_
    from torch_mesa.tools.models import VisionTransformer

    counts = {}
    for converted in (False, True):
        torch.manual_seed(0)
        m = VisionTransformer(image_size=16, patch_size=4, in_chans=3, num_classes=4, dim=64, depth=1, heads=2)
        if converted:
            compress_(m)
        x = torch.randn(2, 3, 16, 16)
        m(x).sum().backward()  # (compiles the quantizer outside the profile)
        with torch.profiler.profile() as prof:
            m(x).sum().backward()
        kinds = {}
        for event in prof.key_averages():
            kind = step_profile.kind_of(event.key)
            assert kind in step_profile.KINDS
            kinds[kind] = kinds.get(kind, 0) + event.count
        counts[converted] = kinds
    plain, mesa = counts[False], counts[True]
    assert plain["attention forward"] == 1 and plain["attention backward"] == 1
    assert mesa["attention forward"] == 2 and mesa["attention backward"] == 1
    assert mesa["torch-mesa ops (Python)"] > 0 and "torch-mesa ops (Python)" not in plain
    assert mesa["compiled-call overhead"] > 0 and plain["matrix products"] > 0
    assert step_profile.kind_of("graph_3_cpp_fused_gelu_view_4") == "Inductor kernels"


@pytest.mark.parametrize("name,kind", [
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_cublas", "matrix products"),
    ("nvjet_hsh_128x256_64x4_2x1_v_bz_coopA_TNN", "matrix products"),
    ("void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_64x4_tn_align8>(Params)",
     "matrix products"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128>, true>(Flash_fwd_params)",
     "attention forward"),
    ("void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits<64>>(Params)",
     "attention backward"),
    ("fmha_cutlassF_bf16_aligned_64x64_rf_sm80(PyTorchMemEffAttention::AttentionKernel<...>::Params)",
     "attention forward"),
    ("fmha_cutlassB_bf16_aligned_64x64_k64_sm80(PyTorchMemEffAttention::AttentionBackwardKernel<...>::Params)",
     "attention backward"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_3_64x64x128", "attention backward"),
    ("triton_red_fused__to_copy_amax_amin_0", "Inductor kernels"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>(int, ...)",
     "other kernels"),
])
def test_step_profile_sorts_cuda_kernels_by_name(step_profile, name, kind):
    """On CUDA the profile sorts kernels, not operators: attention before
    products (memory-efficient attention's kernels are CUTLASS ones)."""
    assert step_profile.kernel_kind(name) == kind
    assert kind in step_profile.GPU_KINDS


def test_demo_ablation_switches_off_what_it_names():
    """benchmarks/compile.py --demo-ablation times the demo model with each
    cut of its overhead switched off; each switch must switch off that cut
    and nothing stays switched after it: quantizer calls go through Dynamo
    (no graph compiled for a direct call), and attention dropout draws its
    mask again in backward."""
    import torch

    from torch_mesa import ops
    from torch_mesa.quant import fused
    from torch_mesa.quant import reference as ref

    ablations = _benchmark("compile")._ablations()
    assert len(ablations) == 2
    dynamo, redraw = ablations.values()

    def keep(x):
        return ref.quantize_core(x, None, None, None, None, bits=8, axes=(1,), group_size=1, rows=None,
                                 running=None)

    compiled = fused._Compiled(keep, "test_ablation")
    x = torch.randn(9, 40)
    with dynamo():
        compiled(x)
    assert compiled.direct == {} and compiled.impl is not None
    compiled(x)
    assert len(compiled.direct) == 1

    def draws_in_backward():
        from conftest import draws_in

        q, k, v = (torch.randn(2, 2, 9, 16, requires_grad=True) for _ in range(3))
        out = ops.scaled_dot_product_attention(q, k, v, dropout_p=0.2)
        return draws_in(lambda: out.sum().backward())

    with redraw():
        assert draws_in_backward() > 0
    assert draws_in_backward() == 0


def test_gpu_run_stops_a_stage_at_its_share_and_goes_on(tmp_path, monkeypatch):
    """benchmarks/gpu.py's stages (the script itself needs a GPU): a stage
    that outlives its share of the budget is stopped with its children, its
    output up to then logged, and the next stage still runs; a stage's
    leftover children never hold the run."""
    gpu = _benchmark("gpu")
    monkeypatch.setattr(gpu.Run, "MIN_STAGE", 0.5)
    run = gpu.Run(tmp_path, budget=4.0)
    child = "import subprocess, sys, time; print('started', flush=True); " \
            "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)"
    t = time.monotonic()
    assert run.stage("slow", [sys.executable, "-c", child], share=0.5) != 0
    assert time.monotonic() - t < 10
    # a stage that ends but leaves a child holding its output (as compile workers can) ends with it
    leaves = "import subprocess, sys; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); " \
             "print('done')"
    t = time.monotonic()
    assert run.stage("quick", [sys.executable, "-c", leaves], share=1.0) == 0
    assert time.monotonic() - t < 10
    log = (tmp_path / "log.txt").read_text()
    assert "started" in log and "stopped at its limit" in log and "done" in log
    assert [s["stage"] for s in run.stages] == ["slow", "quick"]
    run.budget = 0.0
    assert run.stage("late", [sys.executable, "-c", "pass"], share=1.0) == -1  # no time left: skipped
    assert run.stages[-1]["skipped"]
