"""Pictures of relevance maps: overlays on the input image, PNG files, comparison grids.

:func:`overlay` and :func:`save_png` need OpenCV only. :func:`comparison_grid` draws with
matplotlib's object API on an Agg canvas (no pyplot, no global backend switch); matplotlib is
the optional extra ``render`` and is imported only when a grid is drawn.

Colour conventions: a signed map uses a diverging blue-white-red scale symmetric around 0
(blue negative, red positive, |R| normalised by the map's max |R|); a non-negative map uses a
sequential scale (default ``"inferno"``) from 0 to its max. In an overlay the colour is blended
in proportion to |R|, so irrelevant pixels show the image and strong relevance shows colour.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import cv2
import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor

_CV2_MAPS = {"jet": cv2.COLORMAP_JET, "inferno": cv2.COLORMAP_INFERNO, "hot": cv2.COLORMAP_HOT,
             "viridis": cv2.COLORMAP_VIRIDIS, "turbo": cv2.COLORMAP_TURBO}
COLORMAPS = ("bwr",) + tuple(_CV2_MAPS)


def _numpy(x: ArrayLike | Sequence[Any]) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().to(torch.float64).numpy()
    return np.asarray(x)


def to_rgb(image: ArrayLike, *, mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> np.ndarray:
    """An image as float RGB (H, W, 3) in [0, 1], undoing the model's normalisation.

    Args:
        image: (3, H, W), (1, 3, H, W), (H, W, 3), (1, H, W) or (H, W); uint8 means 0..255.
        mean, std: the per-channel normalisation the model's input went through
            (x_norm = (x - mean) / std); ``None`` means none.
    """
    x = _numpy(image)
    if x.ndim == 4 and x.shape[0] == 1:
        x = x[0]
    if x.ndim == 3 and x.shape[0] in (1, 3) and x.shape[-1] not in (1, 3):
        x = np.moveaxis(x, 0, -1)  # CHW, the torch layout
    if x.ndim == 2:
        x = x[..., None]
    if x.ndim != 3 or x.shape[-1] not in (1, 3):
        raise ValueError(f"image has shape {_numpy(image).shape}; expected (3, H, W), (H, W, 3) or (H, W). "
                         "Hint: pass one image, not a batch.")
    x = x / 255.0 if x.dtype == np.uint8 else x.astype(np.float64)
    if std is not None:
        x = x * np.asarray(std, dtype=np.float64)
    if mean is not None:
        x = x + np.asarray(mean, dtype=np.float64)
    return np.clip(np.broadcast_to(x, x.shape[:2] + (3,)), 0.0, 1.0)


def to_map(relevance: ArrayLike, size: tuple[int, int] | None = None) -> np.ndarray:
    """A relevance as one float64 (H, W) map: channels summed, resized to ``size`` if given.

    Enlarging uses nearest neighbours, so a low-resolution C3 map shows its true blocks.
    """
    r = _numpy(relevance).astype(np.float64)
    while r.ndim > 2:
        if r.shape[0] != 1 and r.ndim == 4:
            raise ValueError(f"relevance has shape {r.shape}; pass one sample. Hint: index the batch.")
        r = r.sum(0)
    if r.ndim != 2:
        raise ValueError(f"relevance has shape {_numpy(relevance).shape}; expected (C, H, W) or (H, W).")
    if size is None or r.shape == tuple(size):
        return r
    enlarge = size[0] >= r.shape[0] and size[1] >= r.shape[1]
    return cv2.resize(r, (size[1], size[0]), interpolation=cv2.INTER_NEAREST if enlarge else cv2.INTER_AREA)


def colorize(relevance: ArrayLike, *, signed: bool | None = None, cmap: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Colours (H, W, 3) float RGB in [0, 1] and the normalised magnitude (H, W) in [0, 1].

    Args:
        relevance: a map, pooled with :func:`to_map`.
        signed: diverging scale around 0; ``None`` decides from the data (any value < 0).
        cmap: ``"bwr"`` or one of ``"inferno"``, ``"jet"``, ``"hot"``, ``"viridis"``,
            ``"turbo"``; ``None`` picks ``"bwr"`` for signed and ``"inferno"`` otherwise.
    """
    r = to_map(relevance)
    signed = bool((r < 0).any()) if signed is None else signed
    cmap = cmap or ("bwr" if signed else "inferno")
    if cmap not in COLORMAPS:
        raise ValueError(f"cmap={cmap!r} is not one of {COLORMAPS}; use e.g. cmap='bwr'.")
    top = np.abs(r).max() if signed else max(r.max(), 0.0)
    v = r / top if top > 0 else np.zeros_like(r)
    v = np.clip(v, -1.0, 1.0) if signed else np.clip(v, 0.0, 1.0)
    if cmap == "bwr":
        return _bwr(v), np.abs(v)
    scaled = np.round((v + 1) * 127.5 if signed else v * 255).astype(np.uint8)
    bgr = cv2.applyColorMap(scaled, _CV2_MAPS[cmap])
    return bgr[..., ::-1] / 255.0, np.abs(v)


def _bwr(v: np.ndarray) -> np.ndarray:
    """Blue (−1) → white (0) → red (+1), linear in each channel (matplotlib's "bwr")."""
    neg, pos = np.clip(-v, 0, 1)[..., None], np.clip(v, 0, 1)[..., None]
    white = np.ones(v.shape + (3,))
    return white - neg * np.array([1.0, 1.0, 0.0]) - pos * np.array([0.0, 1.0, 1.0])


def overlay(image: ArrayLike, relevance: ArrayLike, *, mean: Sequence[float] | None = None,
            std: Sequence[float] | None = None, signed: bool | None = None, alpha: float = 0.8,
            cmap: str | None = None, desaturate: bool = True) -> np.ndarray:
    """The relevance drawn over the image, as an RGB uint8 array (H, W, 3).

    Args:
        image: the model's input image (see :func:`to_rgb`), normalised or not.
        relevance: (C, H, W), (1, C, H, W) or (H, W); channels are summed, a smaller map is
            enlarged with nearest neighbours.
        mean, std: the model's input normalisation, undone before drawing.
        signed: diverging colours around 0; ``None`` decides from the data.
        alpha: opacity of the colour where |R| is largest; it falls linearly to 0 with |R|.
        cmap: see :func:`colorize`.
        desaturate: draw over a grey version of the image, so that every colour in the
            result comes from the relevance (red relevance on a red object stays visible).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha!r} must lie in [0, 1]; use e.g. alpha=0.8.")
    rgb = to_rgb(image, mean=mean, std=std)
    if desaturate:
        rgb = np.repeat(rgb @ np.array([[0.299], [0.587], [0.114]]), 3, axis=-1)
    colours, weight = colorize(to_map(relevance, rgb.shape[:2]), signed=signed, cmap=cmap)
    a = alpha * weight[..., None]
    return np.round((rgb * (1 - a) + colours * a) * 255).astype(np.uint8)


def heatmap(relevance: ArrayLike, *, signed: bool | None = None, cmap: str | None = None) -> np.ndarray:
    """The relevance alone in colour, RGB uint8 (H, W, 3)."""
    colours, _ = colorize(relevance, signed=signed, cmap=cmap)
    return np.round(colours * 255).astype(np.uint8)


def save_png(path: str | Path, array: ArrayLike) -> Path:
    """Write an RGB (H, W, 3) or grey (H, W) image as PNG; floats are taken in [0, 1].

    Returns the path; parent folders are created.
    """
    a = _numpy(array)
    if a.dtype != np.uint8:
        a = np.round(np.clip(a.astype(np.float64), 0, 1) * 255).astype(np.uint8)
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] != 3):
        raise ValueError(f"save_png takes (H, W, 3) RGB or (H, W) grey, got shape {a.shape}. "
                         "Hint: use overlay() to make an RGB image.")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), a[..., ::-1] if a.ndim == 3 else a):
        raise OSError(f"could not write {path}. Hint: check that the folder is writable and the name ends in .png.")
    return path


def comparison_grid(images: ArrayLike | Sequence[ArrayLike], columns: Mapping[str, ArrayLike | Sequence[ArrayLike]],
                    path: str | Path, *, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                    row_titles: Sequence[str] | None = None, title: str | None = None, overlay_maps: bool = True,
                    signed: bool | None = None, alpha: float = 0.8, cell_inches: float = 2.0, dpi: int = 100) -> Path:
    """A grid of explanations: one row per image, columns "original" then each named map.

    Args:
        images: (N, 3, H, W) batch (or a list of images), normalised as the model saw them.
        columns: column title → maps for the N images, e.g. ``{"C3-LRP": c3, "LRP": lrp,
            "Grad-CAM": cam}``; each entry is (N, ...) or a list of N maps of any resolution.
        path: the PNG to write.
        mean, std: the model's input normalisation, undone for display.
        row_titles: one label per row (e.g. the class), written left of the row.
        title: a title above the grid.
        overlay_maps: draw the maps over the image (else the maps alone).
        signed, alpha: as in :func:`overlay`; ``signed=None`` decides per map.
        cell_inches, dpi: each cell is ``cell_inches * dpi`` pixels square.

    Returns:
        ``path``. The PNG is exactly ``(rows * cell + header) × (cols * cell)`` pixels, header
        being 0.25 cell for the column titles (plus 0.25 cell for ``title``).

    Raises:
        ImportError: matplotlib is missing (``pip install lrpfx[render]``).
    """
    figure_cls, canvas_cls = _matplotlib()
    originals = [to_rgb(im, mean=mean, std=std) for im in images]
    names = ["original", *columns]
    if row_titles is not None and len(row_titles) != len(originals):
        raise ValueError(f"row_titles has {len(row_titles)} entries for {len(originals)} images.")
    header = 0.25 * (1 + (title is not None))
    fig = figure_cls(figsize=(len(names) * cell_inches, (len(originals) + header) * cell_inches), dpi=dpi)
    canvas_cls(fig)
    axes = fig.subplots(len(originals), len(names), squeeze=False,
                        gridspec_kw={"left": 0.0, "right": 1.0, "bottom": 0.0, "wspace": 0.03, "hspace": 0.03,
                                     "top": len(originals) / (len(originals) + header)})
    for i, rgb in enumerate(originals):
        cells = [rgb] + [_cell(rgb, columns[name][i], overlay_maps, signed, alpha) for name in columns]
        for j, cell in enumerate(cells):
            _show(axes[i][j], cell, names[j] if i == 0 else None, row_titles[i] if row_titles and j == 0 else None)
    if title is not None:
        fig.suptitle(title, y=1 - 0.1 / (len(originals) + header))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png")
    return path


def _matplotlib() -> tuple[Any, Any]:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("comparison_grid needs matplotlib, which is not installed. "
                          "Hint: pip install lrpfx[render]") from e
    return Figure, FigureCanvasAgg


def _cell(rgb: np.ndarray, relevance: ArrayLike, overlay_maps: bool, signed: bool | None, alpha: float) -> np.ndarray:
    r = to_map(relevance, rgb.shape[:2])
    return overlay(rgb, r, signed=signed, alpha=alpha) if overlay_maps else heatmap(r, signed=signed)


def _show(ax: Any, cell: np.ndarray, column: str | None, row: str | None) -> None:
    ax.imshow(cell, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    if column is not None:
        ax.set_title(column, fontsize=10)
    if row is not None:
        ax.text(0.02, 0.98, row, transform=ax.transAxes, va="top", ha="left", fontsize=8,
                color="white", bbox={"facecolor": "black", "alpha": 0.5, "pad": 1, "linewidth": 0})
