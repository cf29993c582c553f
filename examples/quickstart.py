"""Quick start: convert a model in one line and see where its memory goes.

    python examples/quickstart.py

Builds the reference ViT-S/16 layout from torch_mesa.tools.models (random weights),
prints the bytes one batch keeps for backward before and after
``torch_mesa.compress_``, then trains a few steps to show nothing else changes.
"""

import torch
import torch.nn.functional as F

import torch_mesa
from torch_mesa.tools.models import vit_small


def main():
    torch.manual_seed(0)
    model = vit_small(image_size=224, num_classes=10)
    images, labels = torch.randn(8, 3, 224, 224), torch.randint(0, 10, (8,))

    before = torch_mesa.measure(model, images)
    report = torch_mesa.compress_(model)  # <- the one line
    after = torch_mesa.measure(model, images)
    print(report)
    print()
    print(after.table(depth=1))
    print(f"\nkept for backward: {before.total_bytes / 2**20:.1f} MiB -> "
          f"{after.total_bytes / 2**20:.1f} MiB ({after.total_bytes / before.total_bytes:.2f}x)")

    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(3):
        loss = F.cross_entropy(model(images), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        print(f"step {step}: loss {loss.item():.4f}")

    torch_mesa.restore_(model)  # back to plain nn modules, same weights


if __name__ == "__main__":
    main()
