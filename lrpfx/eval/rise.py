"""RISE: Randomized Input Sampling for Explanation (Petsiuk, Das & Saenko, BMVC 2018).

The saliency of class c is the expectation of the model's probability under random masks,
weighted by the masks: S_c = sum_i f_c(I * M_i) M_i / (N p). The masks follow the paper's
construction (and its reference code): a random binary s x s grid with keep probability p,
bilinearly upsampled to (s + 1) cells, shifted by a random offset below one cell and cropped
to the image, so that the masks are smooth and not aligned to a fixed lattice.

As in the reference code the masks multiply the *normalised* image, so a masked pixel
becomes 0, the dataset's mean colour.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def generate_masks(n_masks: int, size: tuple[int, int], cell_size: int = 8, p: float = 0.5,
                   seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """RISE masks (n_masks, H, W) in [0, 1].

    Args:
        n_masks: number of masks N.
        size: image size (H, W).
        cell_size: side of one grid cell in pixels (the reference code's ``cell_size``); the
            grid has s = ceil(side / cell_size) cells per side.
        p: probability that a cell is kept.
        seed: seed of a private ``torch.Generator`` (the global RNG is not touched).
    """
    if not 0 < p <= 1 or cell_size < 1 or n_masks < 1:
        raise ValueError(f"generate_masks(n_masks={n_masks}, cell_size={cell_size}, p={p}) is invalid. "
                         "Hint: use n_masks >= 1, cell_size >= 1 and 0 < p <= 1.")
    h, w = size
    gh, gw = math.ceil(h / cell_size), math.ceil(w / cell_size)
    g = torch.Generator().manual_seed(seed)
    grid = (torch.rand(n_masks, 1, gh, gw, generator=g) < p).to(dtype)
    up = F.interpolate(grid, size=((gh + 1) * cell_size, (gw + 1) * cell_size), mode="bilinear", align_corners=False)
    up = up.clamp_(0, 1)  # bilinear weights can overshoot 1 by a rounding error
    dy = torch.randint(0, cell_size, (n_masks,), generator=g).tolist()
    dx = torch.randint(0, cell_size, (n_masks,), generator=g).tolist()
    return torch.stack([up[i, 0, y:y + h, x:x + w] for i, (y, x) in enumerate(zip(dy, dx))])


def saliency_all_classes(model: torch.nn.Module, image: torch.Tensor, masks: torch.Tensor, p: float,
                         batch_size: int = 100) -> torch.Tensor:
    """S (K, H, W) for every class of one normalised image (3, H, W): sum_i softmax(f(I*M_i)) M_i / (N p)."""
    n, h, w = masks.shape
    sal = None
    with torch.no_grad():
        for i in range(0, n, batch_size):
            m = masks[i:i + batch_size]
            probs = model(image[None] * m[:, None]).softmax(1).to(masks.dtype)  # (b, K)
            part = probs.T @ m.flatten(1)
            sal = part if sal is None else sal + part
    return (sal / (n * p)).view(-1, h, w)


def rise(model: torch.nn.Module, images: torch.Tensor, targets: torch.Tensor | list[int] | None = None, *,
         n_masks: int = 2000, cell_size: int = 8, p: float = 0.5, batch_size: int = 100, seed: int = 0) -> torch.Tensor:
    """RISE saliency maps (N, H, W) of the target classes.

    Args:
        model: classifier on normalised images returning logits (RISE uses its softmax).
        images: normalised images (N, 3, H, W).
        targets: class per image; None explains the model's prediction.
        n_masks: masks per image (the same masks for every image).
        cell_size: grid-cell side in pixels (8 px gives an 8 x 8 grid at 64 x 64).
        p: probability that a cell is kept.
        batch_size: masked images per forward pass.
        seed: the masks' seed; equal seeds give equal maps.
    """
    masks = generate_masks(n_masks, tuple(images.shape[-2:]), cell_size, p, seed, images.dtype)
    maps = []
    for i, x in enumerate(images):
        sal = saliency_all_classes(model, x, masks, p, batch_size)
        if targets is None:
            with torch.no_grad():
                t = int(model(x[None]).argmax(1))
        else:
            t = int(targets[i])
        maps.append(sal[t])
    return torch.stack(maps)
