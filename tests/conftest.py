"""Shared helpers: reference comparisons and test data.

Lossy numerics are judged by signal-to-noise ratio (dB) against the exact
PyTorch result, or, in bf16/fp16, against a multiple of PyTorch's own
low-precision error (see ``assert_close_to_exact``).
"""

import math
import os

import pytest
import torch


def sqnr_db(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """10 log10(|exact|^2 / |approx - exact|^2); inf when equal."""
    exact = exact.double()
    noise = (approx.double() - exact).pow(2).sum().item()
    signal = exact.pow(2).sum().item()
    if noise == 0:
        return math.inf
    return 10 * math.log10(signal / noise)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), 0).item()


def with_outliers(*shape, dtype=torch.float32, seed=0, requires_grad=True) -> torch.Tensor:
    """Gaussian data with what real activations have: a few channels 10x
    larger than the rest (2% of channels) and sparse spikes of +-8 sigma
    (0.1% of elements)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    channels = shape[-1]
    n_out = max(1, channels // 50)
    idx = torch.randperm(channels, generator=g)[:n_out]
    x[..., idx] *= 10.0
    spikes = torch.rand(*shape, generator=g) < 1e-3
    x = torch.where(spikes, 8.0 * torch.sign(x), x)
    return x.to(dtype).requires_grad_(requires_grad)


def assert_grads_close(approx, exact, *, min_db=30.0, low_precision=None, what=""):
    """Each gradient's SQNR against the exact one must be >= ``min_db``.

    ``low_precision``: gradients PyTorch itself computes in the low-precision
    dtype; then the bar is relaxed to within 6 dB (2x the error amplitude) of
    PyTorch's own SQNR where that is below ``min_db``.
    """
    for i, (a, e) in enumerate(zip(approx, exact)):
        if e is None:
            assert a is None
            continue
        bar = min_db
        if low_precision is not None:
            bar = min(min_db, sqnr_db(low_precision[i], e) - 6.0)
        got = sqnr_db(a, e)
        assert got >= bar, f"{what} grad[{i}]: SQNR {got:.1f} dB < {bar:.1f} dB"


def draws_in(fn) -> int:
    """How many random draws (dropout's bernoulli) ``fn()`` makes, by the
    profiler's operator counts (a dispatch mode would keep the compiled
    quantizer's Dynamo path from running)."""
    with torch.profiler.profile() as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if "bernoulli" in e.key or "dropout" in e.key)


if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two workers share the machine's cores (pyproject's addopts): one
    # intra-op thread each, and the same for the processes the tests start
    # (examples, the CLI, distributed ranks), unless the caller chose.
    # Tiny models run no faster on two threads, and two workers of two
    # threads each on two cores contend.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture
def reference_kernel(monkeypatch):
    """Run the eager reference quantizer (no compilation) in this test."""
    monkeypatch.setenv("TORCH_MESA_KERNEL", "reference")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_report_header(config):
    return f"torch {torch.__version__}, threads {torch.get_num_threads()}, " + (
        "TORCH_MESA_KERNEL=" + os.environ.get("TORCH_MESA_KERNEL", "(default)")
    )
