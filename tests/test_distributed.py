"""Two ranks on CPU (gloo): DDP and FSDP2 with a converted model.

With nearest rounding and the same data, both ranks end each step with
identical parameters, equal within quantization tolerance to one process on
the combined batch (the ranges are each rank's own: they need no
synchronisation for correctness).
"""


import warnings

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

import torch_mesa

from conftest import cosine
import _dist_worker as worker

pytestmark = pytest.mark.usefixtures("reference_kernel")


def _spawn(mode, tmp_path):
    for attempt in range(2):
        init = tmp_path / f"init{attempt}"
        try:
            mp.start_processes(worker.run, args=(2, str(init), mode, str(tmp_path)), nprocs=2, join=True,
                               start_method="spawn")
            break
        except mp.ProcessExitedException as err:
            # A rank killed by a signal (seen once in ~10 runs of the whole
            # suite on a loaded 2-core machine, never in isolation): retry
            # once. A Python error in a rank (ProcessRaisedException, e.g. a
            # failed conversion) is not retried.
            if attempt:
                raise
            warnings.warn(f"distributed test: retrying after {err}")
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]


def _single_process_reference():
    model = worker.tiny()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch_mesa.compress_(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x, y = worker.global_batch()
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return start, {n: p.detach() for n, p in model.named_parameters()}


def _check(ranks):
    a, b = ranks
    for n in a:
        assert torch.equal(a[n], b[n]), n
    start, single = _single_process_reference()
    for n in a:
        # compare the updates: same direction within quantization tolerance
        assert cosine(a[n] - start[n], single[n] - start[n]) >= 0.999, n


def test_ddp_two_ranks(tmp_path):
    _check(_spawn("ddp", tmp_path))


@pytest.mark.parametrize("mode", ["fsdp_convert_first", "fsdp_shard_first"])
def test_fsdp2_two_ranks(mode, tmp_path):
    pytest.importorskip("torch.distributed.fsdp")
    from torch.distributed import fsdp

    if not hasattr(fsdp, "fully_shard"):
        pytest.skip("this torch has no FSDP2 (fully_shard)")
    _check(_spawn(mode, tmp_path))
