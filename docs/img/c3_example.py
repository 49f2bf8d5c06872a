"""Regenerate c3_example.png: a synthetic image, its Input×Gradient relevance, C3, heat quantization.

Run from the repository root: ``python docs/img/c3_example.py``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lrpfx.postprocess import c3_tensor, heat_quantize
from lrpfx.postprocess.render import comparison_grid

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def scene(size: int = 112, seed: int = 0) -> torch.Tensor:
    """A textured background with a red disc (the object) and a blue square (a distractor)."""
    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    img = np.stack([0.35 + 0.2 * yy, 0.55 + 0.1 * xx, 0.35 + 0.1 * yy]) + 0.05 * g.standard_normal((3, size, size))
    disc = (yy - 0.55) ** 2 + (xx - 0.4) ** 2 < 0.2 ** 2
    img[:, disc] = np.array([0.85, 0.2, 0.15])[:, None] + 0.05 * g.standard_normal((3, int(disc.sum())))
    img[:, 12:26, 80:94] = np.array([0.15, 0.25, 0.85])[:, None, None]
    x = (np.clip(img, 0, 1) - np.array(MEAN)[:, None, None]) / np.array(STD)[:, None, None]
    return torch.from_numpy(x)[None].float()


def relevance(x: torch.Tensor) -> torch.Tensor:
    """Input × Gradient of a linear detector f(x) = Σ w ⊙ x: red inside a broad window, plus a
    narrow spurious response to blue at the square (the isolated spike that holds the peak)."""
    size = x.shape[-1]
    yy, xx = torch.meshgrid(torch.arange(size) / size, torch.arange(size) / size, indexing="ij")
    disc = torch.exp(-((yy - 0.55) ** 2 + (xx - 0.4) ** 2) / 0.05)
    spike = torch.exp(-((yy - 0.17) ** 2 + (xx - 0.78) ** 2) / 0.003)
    w = torch.stack([disc - 0.6 * spike, -0.5 * disc, -0.3 * disc + 1.2 * spike])
    return x * w


def main(path: Path = Path(__file__).with_name("c3_example.png")) -> Path:
    x = scene()
    r = relevance(x)
    c3_map, _ = c3_tensor(r, resize_to=(28, 28))
    low, _ = c3_tensor(r, resize_to=(28, 28), output="masked_low_res")
    return comparison_grid(x, {"LRP (signed)": r, "C3-LRP": c3_map, "C3 + heat q=8": heat_quantize(low)},
                           path, mean=MEAN, std=STD, cell_inches=1.6, dpi=90)


if __name__ == "__main__":
    print(main())
