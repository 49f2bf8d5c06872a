"""The offline demo: ``lrpfx demo``. The bundled model, generated images, and the poster's figure.

Columns: the image, C3-LRP (the seed's method: ``c3_lrp`` + the C3 stage), LRP
(``epsilon_plus_flat``), Grad-CAM (pytorch-grad-cam, last stage), RISE (lrpfx.eval.rise) and
Input x Gradient (captum), all explaining the ground-truth class of generated test images.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

import lrpfx
from lrpfx.cli.progress import Stages


def explanations(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor, *,
                 rise_masks: int = 500, stages: Stages | None = None) -> dict[str, Any]:
    """Every method's map for the batch ``x`` and classes ``target`` (column title -> maps).

    ``stages`` names each step as it runs (compiling, explaining, RISE image by image).
    """
    stages = stages or Stages(quiet=True)
    n = len(x)
    columns: dict[str, Any] = {}
    with torch.inference_mode():
        with stages.stage("compiling the C3-LRP explainer (c3_lrp + C3 stage)"):
            c3 = lrpfx.compile(model, "c3_lrp", c3=True)
        with stages.stage(f"explaining {n} images with C3-LRP"):
            columns["C3-LRP"] = c3(x, target)[2]  # the rule set's [c3] options
        with stages.stage("compiling the LRP explainer (epsilon_plus_flat)"):
            lrp = lrpfx.compile(model, "epsilon_plus_flat")
        with stages.stage(f"explaining {n} images with LRP"):
            columns["LRP"] = lrp(x, target)[0]
    with stages.stage(f"Grad-CAM on {n} images (pytorch-grad-cam)"):
        columns["Grad-CAM"] = _gradcam(model, x, target)
    from lrpfx.eval.rise import rise
    maps = []
    with stages.bar(f"RISE, {rise_masks} masks per image", n) as bar:
        for i in range(n):  # the same masks for every image (one seed): as one call on the batch
            maps.append(rise(model, x[i:i + 1], target[i:i + 1], n_masks=rise_masks))
            bar.step()
    columns["RISE"] = torch.cat(maps)
    with stages.stage(f"Input x Gradient on {n} images (captum)"):
        columns["Input x Gradient"] = _input_x_gradient(model, x, target)
    return columns


def _gradcam(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    with GradCAM(model=model, target_layers=[model.layer4[-1]]) as cam:
        maps = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(t)) for t in target])
    return torch.from_numpy(maps)


def _input_x_gradient(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    from captum.attr import InputXGradient
    return InputXGradient(model).attribute(x.clone().requires_grad_(True), target=target).detach()


def run(out: Path, n_images: int = 4, seed: int = 0, stages: Stages | None = None) -> Path:
    """Write ``out/comparison.png`` for ``n_images`` generated test images; returns its path."""
    stages = stages or Stages(quiet=True)
    from lrpfx.cli.loading import load_model
    from lrpfx.eval.datasets import ShapesDataset
    from lrpfx.postprocess.render import comparison_grid
    with stages.stage("loading the bundled ResNet-50-layout model (64 x 64, 8 shape classes)"):
        loaded = load_model("bundled")
    model = loaded.model
    with stages.stage(f"generating {n_images} test images (seed {seed})"):
        data = ShapesDataset("test", n=n_images, seed=seed, normalize=True)
        x = torch.stack([data[i][0] for i in range(n_images)])
        target = torch.tensor([int(data[i][1]) for i in range(n_images)])
        with torch.no_grad():
            predicted = model(x).argmax(1)
    classes = loaded.classes or [str(i) for i in range(int(target.max()) + 1)]
    rows = [f"{classes[t]}" + ("" if p == t else f" (pred. {classes[p]})") for t, p in zip(target, predicted)]
    columns = explanations(model, x, target, stages=stages)
    out.mkdir(parents=True, exist_ok=True)
    with stages.stage("drawing the figure"):
        return comparison_grid(x, columns, out / "comparison.png", mean=loaded.mean, std=loaded.std,
                               row_titles=rows, title="lrpfx demo: bundled ResNet-50-layout model, generated shapes")
