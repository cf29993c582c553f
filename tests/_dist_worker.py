"""Worker for the distributed tests (spawned processes import this module)."""

import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

import torch_mesa
from torch_mesa.tools.models import VisionTransformer


def tiny():
    torch.manual_seed(0)
    return VisionTransformer(image_size=16, patch_size=4, num_classes=10, dim=32, depth=2, heads=2)


def global_batch(n=8):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, 10, (n,), generator=g)


def run(rank, world, init_file, mode, out_dir):
    os.environ["TORCH_MESA_KERNEL"] = "reference"
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = tiny()
        if mode == "ddp":
            torch_mesa.compress_(model)
            model = torch.nn.parallel.DistributedDataParallel(model)
        elif mode == "fsdp_convert_first":
            from torch.distributed.fsdp import fully_shard

            torch_mesa.compress_(model)
            for block in model.blocks:
                fully_shard(block)
            fully_shard(model)
        elif mode == "fsdp_shard_first":
            from torch.distributed.fsdp import fully_shard

            for block in model.blocks:
                fully_shard(block)
            fully_shard(model)
            torch_mesa.compress_(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        x, y = global_batch()
        per = x.shape[0] // world
        xs, ys = x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]
        for _ in range(2):
            opt.zero_grad()
            F.cross_entropy(model(xs), ys).backward()
            opt.step()
        params = {}
        for n, p in model.named_parameters():
            t = p.full_tensor() if hasattr(p, "full_tensor") else p.detach()
            params[n.replace("module.", "")] = t.detach().clone()
        torch.save(params, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
