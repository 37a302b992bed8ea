"""Train the small CIFAR-10 ViT (latprune/models_vit.py) that bench/vit_accuracy.py prunes.

Recipe: the 50,000 training JPEGs of ../shared/data (random crop of the 4-pixel zero-padded
image, horizontal flip), AdamW (lr 1e-3, weight decay 0.05, betas 0.9/0.999), batch 128,
linear warm-up over the first epoch then cosine decay to 0, label smoothing 0.1, `--epochs`
epochs; top-1 on all 10,000 test images after every epoch. Saves
{"config", "state_dict", "top1", "epochs", "seconds"} to --out (default
bench/weights/cifar_vit.pt) and prints a line per epoch.

    python bench/train_vit.py [--epochs 15] [--threads 2] [--out FILE]
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=HERE / "weights" / "cifar_vit.pt")
    args = ap.parse_args()
    import torch

    from latprune.finetune import CifarTrain, cifar_test, evaluate, load_train_images
    from latprune.models_vit import cifar_vit

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    config = {"image": 32, "patch": 4, "dim": 128, "depth": 6, "heads": 4, "mlp_ratio": 2.0, "num_classes": 10}
    model = cifar_vit(**config)
    images = load_train_images()
    train = CifarTrain(images=images, augment=True, seed=args.seed)
    x_test, y_test = cifar_test()
    loader = torch.utils.data.DataLoader(train, batch_size=args.batch, shuffle=True, drop_last=True,
                                         generator=torch.Generator().manual_seed(args.seed))
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or name.endswith(("cls_token", "pos_embed")) else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.999))
    steps, warm = args.epochs * len(loader), len(loader)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm))))
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    t0, top1 = time.perf_counter(), 0.0
    for epoch in range(args.epochs):
        model.train()
        losses = []
        for xb, yb in loader:
            loss = loss_fn(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
        top1 = evaluate(model, x_test, y_test)
        print(f"epoch {epoch + 1}/{args.epochs}: loss {np.mean(losses):.3f}, top-1 {100 * top1:.2f}%, "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"config": config, "state_dict": model.state_dict(), "top1": top1, "epochs": epoch + 1,
                    "seconds": time.perf_counter() - t0, "recipe": vars(args) | {"out": str(args.out)}}, args.out)
    print(f"saved {args.out}: top-1 {100 * top1:.2f}% after {args.epochs} epochs, {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
