"""Measure the generation rate of the shapes dataset on one core (images per second).

Run: ``python benchmarks/shapes_speed.py [--n 3000] [--size 64]``. Also writes a contact sheet
of the first images with their masks when ``--sheet PATH`` is given.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from lrpfx.eval.datasets import CLASSES, make_sample


def rate(n: int, size: int, seed: int = 0) -> float:
    """Images per second of ``make_sample`` over ``n`` consecutive training indices."""
    make_sample(seed, "train", 0, size)  # warm caches (coordinate grids)
    t0 = time.perf_counter()
    for i in range(n):
        make_sample(seed, "train", i, size)
    return n / (time.perf_counter() - t0)


def contact_sheet(path: str, count: int = 32, size: int = 64) -> None:
    """Save images (top) and masks (bottom) of ``count`` samples in a grid, with labels."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 8
    rows = 2 * ((count + cols - 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.6, rows * 1.6))
    for i in range(count):
        s = make_sample(0, "train", i, size)
        r, c = 2 * (i // cols), i % cols
        axes[r, c].imshow(s.image.permute(1, 2, 0).numpy())
        axes[r, c].set_title(CLASSES[s.label], fontsize=8)
        axes[r + 1, c].imshow(s.mask.numpy().astype(int) + s.visible_mask.numpy(), cmap="gray", vmin=0, vmax=2)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--sheet", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    import cv2
    cv2.setNumThreads(1)
    r = [rate(args.n, args.size) for _ in range(3)]
    print(f"size {args.size}: {np.median(r):.0f} images/s on one core (median of 3 runs of {args.n})")
    if args.sheet:
        contact_sheet(args.sheet, size=args.size)


if __name__ == "__main__":
    main()
