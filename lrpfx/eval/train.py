"""Train a bundled model on the synthetic shapes dataset, on CPU.

    python -m lrpfx.eval.train --model resnet50_w16 --out lrpfx/eval/weights/ --seed 0 --epochs 9 --threads 1

Every epoch draws ``--epoch-size`` *fresh* training images (indices continue from the
previous epoch), so the model never sees an image twice and needs no augmentation; pass
``--train-size N`` to cycle through a fixed set of N images instead. SGD with Nesterov
momentum or (the default) AdamW, with a one-cycle learning-rate schedule; cross-entropy (for the ABN, the sum of
both branches' cross-entropies). Writes ``<out>/<model>.safetensors`` and
``<out>/<model>.json`` (classes, mean/std, validation and test accuracy, the command, seed,
wall time). Accuracy is logged every epoch on the *validation* split (``--val-size`` images of
split "val"), which is what any model selection may look at; the test split is evaluated once,
after the last epoch.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from lrpfx.eval.datasets import CLASSES, MEAN, STD, generate_batch
from lrpfx.eval.models import ABNResNet, build, save_state


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m lrpfx.eval.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet50_w16", help="resnet50_w16, resnet18_w16, abn_resnet50_w16, vit_w64, ...")
    p.add_argument("--out", default="lrpfx/eval/weights/", help="folder for <model>.safetensors and <model>.json")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation and of the data")
    p.add_argument("--epochs", type=int, default=9)
    p.add_argument("--epoch-size", type=int, default=12_800, help="training images per epoch")
    p.add_argument("--train-size", type=int, default=0, help="cycle a fixed set of this many images (0: fresh)")
    p.add_argument("--test-size", type=int, default=2000)
    p.add_argument("--val-size", type=int, default=2000, help="validation images, logged every epoch")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--optimizer", choices=("sgd", "adamw"), default="adamw")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate of the one-cycle schedule")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--max-minutes", type=float, default=0.0, help="stop after this wall time (0: no limit)")
    return p.parse_args(argv)


def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 250) -> float:
    """Top-1 accuracy of ``model`` in eval mode (channels-last, no grad)."""
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            x = images[i:i + batch_size].contiguous(memory_format=torch.channels_last)
            correct += (model(x).argmax(1) == labels[i:i + batch_size]).sum().item()
    return correct / len(images)


def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Cross-entropy; for an ABN the sum over the perception and attention branches."""
    if isinstance(model, ABNResNet):
        logits, att_logits, _ = model.forward_all(x)
        return F.cross_entropy(logits, y, label_smoothing=smoothing) + F.cross_entropy(att_logits, y, label_smoothing=smoothing)
    return F.cross_entropy(model(x), y, label_smoothing=smoothing)


def train_index(args: argparse.Namespace, step: int) -> int:
    """The first training image of a step: fresh images, or cycling through --train-size."""
    start = step * args.batch_size
    return start % args.train_size if args.train_size else start


def train_epoch(model: nn.Module, opt: torch.optim.Optimizer, sched: Any, args: argparse.Namespace, first_step: int) -> float:
    """One epoch of SGD on generated batches; returns the mean training loss."""
    model.train()
    steps, total = args.epoch_size // args.batch_size, 0.0
    for s in range(first_step, first_step + steps):
        x, y, _ = generate_batch(train_index(args, s), args.batch_size, split="train", size=args.size, seed=args.seed)
        loss = loss_fn(model, x.contiguous(memory_format=torch.channels_last), y, args.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        total += loss.item()
    return total / steps


def make_optimizer(model: nn.Module, args: argparse.Namespace) -> tuple[torch.optim.Optimizer, Any]:
    """SGD (Nesterov, momentum 0.9) or AdamW, no weight decay on BatchNorm and biases, one-cycle LR."""
    groups = [{"params": [p for p in model.parameters() if p.ndim > 1], "weight_decay": args.weight_decay},
              {"params": [p for p in model.parameters() if p.ndim <= 1], "weight_decay": 0.0}]
    if args.optimizer == "adamw":
        opt: torch.optim.Optimizer = torch.optim.AdamW(groups, lr=args.lr)
    else:
        opt = torch.optim.SGD(groups, lr=args.lr, momentum=0.9, nesterov=True)
    total = args.epochs * (args.epoch_size // args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=total, pct_start=0.15)
    return opt, sched


def metadata(args: argparse.Namespace, accuracy: float, wall: float, log: list[dict[str, float]],
             val_accuracy: float | None = None) -> dict[str, Any]:
    """The JSON written next to the weights."""
    return {
        "name": args.model, "classes": list(CLASSES), "mean": list(MEAN), "std": list(STD),
        "image_size": args.size, "test_accuracy": accuracy, "val_accuracy": val_accuracy,
        "test_set": {"split": "test", "n": args.test_size, "seed": args.seed},
        "val_set": {"split": "val", "n": args.val_size, "seed": args.seed},
        "command": "python -m lrpfx.eval.train " + " ".join(sys.argv[1:]), "seed": args.seed,
        "threads": args.threads, "wall_time_s": round(wall, 1), "epochs_run": len(log), "log": log,
        "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = build(args.model, num_classes=len(CLASSES)).to(memory_format=torch.channels_last)
    opt, sched = make_optimizer(model, args)
    val_x, val_y, _ = generate_batch(0, args.val_size, split="val", size=args.size, seed=args.seed)
    t0, log, val = time.perf_counter(), [], 0.0
    for epoch in range(args.epochs):
        loss = train_epoch(model, opt, sched, args, epoch * (args.epoch_size // args.batch_size))
        val = evaluate(model, val_x, val_y)
        log.append({"epoch": epoch + 1, "loss": round(loss, 4), "val_accuracy": val,
                    "minutes": round((time.perf_counter() - t0) / 60, 2)})
        print(json.dumps(log[-1]), flush=True)
        if args.max_minutes and time.perf_counter() - t0 > 60 * args.max_minutes:
            break
    # the test split is touched once, after training
    test_x, test_y, _ = generate_batch(0, args.test_size, split="test", size=args.size, seed=args.seed)
    acc = evaluate(model, test_x, test_y)
    meta = metadata(args, acc, time.perf_counter() - t0, log, val)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_state(model.to(memory_format=torch.contiguous_format), out / args.model)
    (out / f"{args.model}.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"test accuracy {acc:.4f} after {meta['wall_time_s']} s; wrote {out / args.model}.safetensors", flush=True)
    return meta


if __name__ == "__main__":
    main()
