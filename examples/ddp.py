"""Data-parallel training of a converted model with PyTorch's own engine.

    torchrun --nproc-per-node 2 examples/ddp.py            # CPU (gloo) or one GPU per rank (nccl)

Convert first, then wrap: ``compress_`` changes no parameter, buffer or
state_dict key, so DDP (and FSDP2's ``fully_shard``, before or after
conversion) see the same model. Each rank keeps its own quantization ranges
(and, with ``range_estimate="running"``, its own running estimates): they
only shape what a rank keeps for its own backward, so nothing needs
synchronising; gradients are all-reduced as usual.
"""

import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

import torch_mesa
from torch_mesa.tools.models import VisionTransformer


def main():
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    torch.manual_seed(0)  # same initial weights on every rank
    model = VisionTransformer(image_size=32, patch_size=4, num_classes=10, dim=192, depth=6, heads=3).to(device)
    report = torch_mesa.compress_(model)
    if rank == 0:
        print(report)
    model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1000 + rank)  # each rank its own data
    for step in range(20):
        x = torch.randn(16, 3, 32, 32, generator=g).to(device)
        y = torch.randint(0, 10, (16,), generator=g).to(device)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if rank == 0 and step % 5 == 0:
            print(f"step {step}: loss {loss.item():.4f} (rank 0 of {world})")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
