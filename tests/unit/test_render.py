"""Rendering: overlays, PNG files and comparison grids (sizes, colours, the matplotlib hint)."""
from __future__ import annotations

import builtins
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from lrpfx.postprocess import c3_tensor
from lrpfx.postprocess.render import colorize, comparison_grid, heatmap, overlay, save_png, to_rgb

torch.set_num_threads(1)

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _image(size: int = 32) -> torch.Tensor:
    """A normalised (1, 3, H, W) batch: grey background, a red disc."""
    yy, xx = np.mgrid[:size, :size]
    img = np.full((3, size, size), 0.5)
    img[:, (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 4) ** 2] = np.array([0.9, 0.1, 0.1])[:, None]
    return torch.from_numpy((img - np.array(MEAN)[:, None, None]) / np.array(STD)[:, None, None])[None].float()


def _relevance(size: int = 32) -> torch.Tensor:
    yy, xx = np.mgrid[:size, :size] / size
    bump = np.exp(-((yy - 0.5) ** 2 + (xx - 0.5) ** 2) / 0.02) - 0.5 * np.exp(-((yy - 0.1) ** 2 + (xx - 0.1) ** 2) / 0.005)
    return torch.from_numpy(np.stack([bump, 0.5 * bump, 0.2 * bump]))[None].float()


def test_to_rgb_undoes_the_normalisation_in_any_layout() -> None:
    rgb = to_rgb(_image(), mean=MEAN, std=STD)
    assert rgb.shape == (32, 32, 3)
    np.testing.assert_allclose(rgb[0, 0], [0.5, 0.5, 0.5], atol=1e-6)
    np.testing.assert_allclose(rgb[16, 16], [0.9, 0.1, 0.1], atol=1e-6)
    hwc = (rgb * 255).round().astype(np.uint8)
    np.testing.assert_allclose(to_rgb(hwc), rgb, atol=1 / 255)
    assert to_rgb(rgb[..., 0]).shape == (32, 32, 3)
    with pytest.raises(ValueError, match=r"image has shape \(2, 3, 32, 32\).*Hint: pass one image"):
        to_rgb(np.zeros((2, 3, 32, 32)))


def test_colour_scales() -> None:
    r = np.array([[-2.0, 0.0, 2.0]])
    colours, weight = colorize(r)  # signed: blue, white, red
    np.testing.assert_allclose(colours[0], [[0, 0, 1], [1, 1, 1], [1, 0, 0]])
    np.testing.assert_allclose(weight[0], [1, 0, 1])
    colours, weight = colorize(np.array([[0.0, 1.0, 2.0]]))  # sequential: inferno, dark to bright
    assert colours[0, 0].sum() < colours[0, 1].sum() < colours[0, 2].sum()
    assert colorize(np.zeros((2, 2)))[1].max() == 0  # an empty map draws nothing
    with pytest.raises(ValueError, match=r"cmap='rainbow' is not one of"):
        colorize(r, cmap="rainbow")


def test_overlay_shows_the_image_where_relevance_is_zero() -> None:
    out = overlay(_image(), _relevance(), mean=MEAN, std=STD)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert out[16, 16, 0] > 200 and out[16, 16, 2] < 80  # strong positive relevance: red
    assert out[3, 3, 2] > out[3, 3, 0]  # the negative bump: blue
    grey = overlay(_image(), torch.zeros(1, 3, 32, 32), mean=MEAN, std=STD)
    assert (grey[..., 0] == grey[..., 1]).all()  # no relevance: the desaturated image
    colour = overlay(_image(), torch.zeros(1, 3, 32, 32), mean=MEAN, std=STD, desaturate=False)
    assert colour[16, 16, 0] > 200 and colour[16, 16, 1] < 50
    low = overlay(_image(), np.ones((8, 8)), mean=MEAN, std=STD)  # a low-resolution map is enlarged
    assert low.shape == (32, 32, 3)
    with pytest.raises(ValueError, match=r"alpha=1.5 must lie in \[0, 1\]"):
        overlay(_image(), _relevance(), alpha=1.5)


def test_save_png_writes_the_pixels(tmp_path: Path) -> None:
    rgb = overlay(_image(), _relevance(), mean=MEAN, std=STD)
    path = save_png(tmp_path / "sub" / "overlay.png", rgb)
    back = cv2.imread(str(path))[..., ::-1]
    assert np.array_equal(back, rgb)
    grey = save_png(tmp_path / "grey.png", np.linspace(0, 1, 12).reshape(3, 4))
    assert cv2.imread(str(grey), cv2.IMREAD_UNCHANGED).shape == (3, 4)
    assert heatmap(_relevance()).shape == (32, 32, 3)
    with pytest.raises(ValueError, match=r"save_png takes \(H, W, 3\) RGB or \(H, W\) grey, got shape \(3, 32, 32\)"):
        save_png(tmp_path / "bad.png", np.zeros((3, 32, 32)))


def test_comparison_grid_size_and_content(tmp_path: Path) -> None:
    images = torch.cat([_image(), _image()])
    lrp = torch.cat([_relevance(), -_relevance()])
    c3, _ = c3_tensor(lrp, resize_to=(8, 8))
    path = comparison_grid(images, {"C3-LRP": c3, "LRP": lrp, "Grad-CAM": [np.ones((7, 7)), np.eye(7)]},
                           tmp_path / "grid.png", mean=MEAN, std=STD, row_titles=["bird", "cat"],
                           title="comparison", cell_inches=1.0, dpi=64)
    png = cv2.imread(str(path))
    rows, cols, header = 2, 4, 0.25 * 2
    assert png.shape == (round((rows + header) * 64), cols * 64, 3)
    assert (png.reshape(-1, 3).std(0) > 10).all()  # something was drawn
    plain = comparison_grid(images, {"LRP": lrp}, tmp_path / "plain.png", overlay_maps=False, dpi=50)
    assert cv2.imread(str(plain)).shape == (round(2.25 * 100), 2 * 100, 3)
    with pytest.raises(ValueError, match=r"row_titles has 1 entries for 2 images"):
        comparison_grid(images, {"LRP": lrp}, tmp_path / "x.png", row_titles=["one"])


def test_comparison_grid_without_matplotlib(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real_import = builtins.__import__

    def no_matplotlib(name: str, *args: object, **kwargs: object) -> object:
        if name.startswith("matplotlib"):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(ImportError, match=r"comparison_grid needs matplotlib.*Hint: pip install lrpfx\[render\]"):
        comparison_grid(_image(), {"LRP": _relevance()}, tmp_path / "grid.png")
    assert overlay(_image(), _relevance()).shape == (32, 32, 3)  # overlays need OpenCV only


def test_example_image_is_small() -> None:
    example = Path(__file__).parents[2] / "docs" / "img" / "c3_example.png"
    assert example.is_file() and example.stat().st_size < 200_000
