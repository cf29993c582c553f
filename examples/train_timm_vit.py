"""Train a timm Vision Transformer with torch-mesa on scikit-learn's digits.

    pip install 'torch-mesa[timm,demo]'
    python examples/train_timm_vit.py [--epochs 10] [--bits 8] [--max-steps N]

The digits (8x8, bundled with scikit-learn) are upsampled to 32x32; the model
is timm's ``vit_tiny_patch16_224`` layout at 32 px with 4x4 patches, random
weights. One line converts it; the script prints where activation memory goes
and the test accuracy after training.
"""

import argparse

import torch
import torch.nn.functional as F

import torch_mesa


def main():
    import timm
    from sklearn.datasets import load_digits

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--bits", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-steps", type=int, default=None, help="stop each epoch after this many steps (a quick look)")
    args = p.parse_args()

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=32, mode="bilinear").expand(-1, 3, -1, -1).contiguous()
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    n_test = len(y) // 5
    (xt, yt), (xs, ys) = (x[:n_test], y[:n_test]), (x[n_test:], y[n_test:])

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, num_classes=10)
    before = torch_mesa.measure(model, xs[: args.batch_size])
    print(torch_mesa.compress_(model, torch_mesa.MesaConfig(bits=args.bits)))  # <- the one line
    after = torch_mesa.measure(model, xs[: args.batch_size])
    print(after.table(depth=1))
    print(f"kept for backward: {before.total_bytes / 2**20:.1f} MiB -> {after.total_bytes / 2**20:.1f} MiB "
          f"({after.total_bytes / before.total_bytes:.2f}x)")

    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(ys))
        for step, i in enumerate(range(0, len(ys), args.batch_size)):
            if step == args.max_steps:
                break
            idx = order[i:i + args.batch_size]
            loss = F.cross_entropy(model(xs[idx]), ys[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            acc = (model(xt).argmax(-1) == yt).float().mean().item()
        print(f"epoch {epoch + 1}: loss {loss.item():.3f}, test accuracy {acc:.1%}")


if __name__ == "__main__":
    main()
