"""The ground-truth evaluation: ``lrpfx eval`` / ``python -m lrpfx.eval.evaluate``.

Every method explains the same generated test images of the synthetic shapes benchmark for
the same class (the model's prediction by default, as the ECCV code does; ``--target
ground_truth`` for the label), and every map is scored the same way against the objects' masks
(METHOD_SPEC §5): insertion/deletion and the ID score twice, tie-robust (the headline: tied
pixels enter in a random order, averaged over ``--tie-seeds`` seeds) and as the ECCV code does
it (ties enter together); the pointing game at tolerance 0 (any tied maximum, as Quantus) and
at 15 px scaled to the image; relevance mass and rank accuracy on R+ and signed (Quantus'
convention); the IoU of R+ > mean(R+) and the IA/OA/WA labels of that same set for every map,
at a threshold calibrated on the validation split (``calibrate_thresholds``) and at a sweep of
fixed ones; and, for the LRP methods, conservation. Images are the model's own size (64 px, or
224 px for the 224-px model); ``--combine`` merges runs of several training seeds. The C3 stage is applied like
for like ("+ C3" rows for LRP, Grad-CAM and Input x Gradient; both rankings for C3-LRP), beside
content-free controls (a random map, a centred Gaussian blob), the binary C3 mask alone and
the ground-truth mask. ABN's attention is scored with the ABN model, in its own block.

The rows depend on the model (``methods``): the ResNets get the list above; the ViT
(``bundled:vit_w64``) gets CP-LRP (``lrp0``, ``epsilon_plus_flat``: softmax held constant)
against AttnLRP (``attnlrp``, ``attnlrp_gamma``), Grad-CAM on the last block's ``ln_1`` token
grid (pytorch-grad-cam's ViT recipe), Score-CAM likewise, Input x Gradient, Integrated
Gradients, RISE and the same controls; the rows that do not apply to it are listed, with the
reason, under ``skipped`` in results.json and below the table.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import math
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

import lrpfx
from lrpfx.eval import metrics


@dataclass
class MethodOutput:
    """A method's maps (N, H, W) at image resolution, its conservation (LRP rows), the raw
    relevance (N, C, H, W) where the C3 stage should pool it itself, and the C3 mask of a
    "+ C3" row (kept for the "C3 mask alone" control; no metric reads it)."""

    maps: torch.Tensor
    conservation: torch.Tensor | None = None
    raw: torch.Tensor | None = None
    c3_mask: torch.Tensor | None = None


Method = Callable[["Models", torch.Tensor, torch.Tensor], MethodOutput]


@dataclass
class Models:
    """The model explained, and ``fast``: the same weights frozen for the many forward-only
    passes (insertion/deletion, RISE, Score-CAM's masked inputs); see ``inference_model``."""

    model: nn.Module
    fast: nn.Module


def inference_model(model: nn.Module, example: torch.Tensor, tol: float = 1e-4) -> nn.Module:
    """A frozen TorchScript copy of ``model`` for forward-only passes (BatchNorm folded into the
    convolutions, oneDNN layouts; about 3x the eager throughput of the bundled model on CPU).

    The copy is checked against ``model`` on ``example`` (logits within ``tol``); a model that
    cannot be scripted, or a copy that disagrees, gives ``model`` itself back with a warning.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fast = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.script(copy.deepcopy(model).eval())))
            with torch.no_grad():
                ok = torch.allclose(fast(example), model(example), rtol=tol, atol=tol)
    except Exception as e:  # noqa: BLE001 - any scripting failure means "use the model as it is"
        warnings.warn(f"lrpfx.eval.evaluate: scripting the model failed ({type(e).__name__}: {str(e)[:120]}); "
                      "forward passes run eagerly (slower, same results).", stacklevel=2)
        return model
    if not ok:
        warnings.warn("lrpfx.eval.evaluate: the frozen copy of the model disagrees with it; forward passes run "
                      "eagerly.", stacklevel=2)
        return model
    return fast


def c3_options(rank: str = "mass") -> dict[str, Any]:
    """The C3 options of every "+ C3" row: the ``c3_lrp`` rule set's ``[c3]`` section (mean
    threshold, 28 x 28 selection, ...) with the ranking preset ``rank`` ("mass" or
    "opencv_order", see :class:`lrpfx.postprocess.C3Config`)."""
    options = {k: (tuple(v) if isinstance(v, list) else v) for k, v in lrpfx.RuleSet.ensure("c3_lrp").c3.items()}
    options.pop("contour_rank", None)
    options.pop("component_rank", None)
    return {**options, "rank": rank}


def apply_c3(relevance: torch.Tensor, rank: str = "mass") -> tuple[torch.Tensor, torch.Tensor]:
    """The C3 stage (tensor backend, the same one ``lrpfx.compile(..., c3=True)`` appends) on
    any map (N, H, W) or relevance (N, C, H, W): ``(c3_map, mask)`` at the input resolution."""
    from lrpfx.postprocess.tensor_backend import c3_tensor
    return c3_tensor(relevance.double(), **c3_options(rank))


def _lrp(rules: str, heat: int | None = None) -> Method:
    def run(models: Models, x: torch.Tensor, target: torch.Tensor) -> MethodOutput:
        explainer = lrpfx.compile(models.model, rules)
        with torch.inference_mode():
            out = explainer(x, target)
        relevance, logits = out[0], out[1]
        top = logits.softmax(1) if explainer_top(rules) == "softmax" else logits
        conservation = relevance.flatten(1).sum(1) / top.gather(1, target[:, None]).squeeze(1)
        maps = relevance.sum(1)
        if heat:
            from lrpfx.postprocess import heat_quantize
            maps = heat_quantize(maps, heat)
        return MethodOutput(maps, conservation, raw=relevance)
    return run


def _plus_c3(base: Method, rank: str = "mass") -> Method:
    """``base`` followed by the C3 stage: the same stage for LRP, Grad-CAM, Input x Gradient."""
    def run(models: Models, x: torch.Tensor, target: torch.Tensor) -> MethodOutput:
        out = base(models, x, target)
        c3_map, mask = apply_c3(out.raw if out.raw is not None else out.maps, rank)
        return MethodOutput(c3_map.float(), out.conservation, c3_mask=mask)
    return run


def _mask_only(base: Method) -> Method:
    """The binary C3 mask of a "+ C3" row as the map (a control: the region without its relevance)."""
    def run(models: Models, x: torch.Tensor, target: torch.Tensor) -> MethodOutput:
        return MethodOutput(base(models, x, target).c3_mask.float())
    return run


def explainer_top(rules: str) -> str:
    return lrpfx.RuleSet.ensure(rules).top


def _resnet_cam_layer(model: nn.Module) -> tuple[nn.Module, Callable | None]:
    return model.layer4[-1], None


def _vit_cam_layer(model: nn.Module) -> tuple[nn.Module, Callable | None]:
    """pytorch-grad-cam's ViT recipe: the last block's first LayerNorm, its patch tokens (class
    token dropped) reshaped to the (N, D, H/p, W/p) grid, for torchvision's ``VisionTransformer``."""
    side = model.image_size // model.patch_size

    def reshape(t: torch.Tensor) -> torch.Tensor:
        return t[:, 1:, :].reshape(t.size(0), side, side, t.size(2)).permute(0, 3, 1, 2)
    return model.encoder.layers[-1].ln_1, reshape


def _cam(kind: str, layer: Callable[[nn.Module], tuple[nn.Module, Callable | None]] = _resnet_cam_layer) -> Method:
    def run(models: Models, x: torch.Tensor, target: torch.Tensor) -> MethodOutput:
        from types import SimpleNamespace
        from unittest import mock

        import pytorch_grad_cam as pgc
        import pytorch_grad_cam.score_cam as score_cam
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
        cls = {"gradcam": pgc.GradCAM, "scorecam": pgc.ScoreCAM}[kind]
        model = models.model
        target_layer, reshape = layer(model)
        with cls(model=model, target_layers=[target_layer], reshape_transform=reshape) as cam, \
                mock.patch.object(score_cam, "tqdm", SimpleNamespace(tqdm=lambda it, *a, **k: it)):
            if kind == "scorecam":
                # the activations come from the hooked model; the C masked inputs per image
                # (Score-CAM's bulk) only need forwards of the same weights
                cam.model, cam.batch_size = models.fast, 64
            maps = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(t)) for t in target])
        return MethodOutput(torch.from_numpy(maps).float())
    return run


def _captum(kind: str) -> Method:
    def run(models: Models, x: torch.Tensor, target: torch.Tensor) -> MethodOutput:
        import captum.attr as ca
        method = {"ixg": ca.InputXGradient, "ig": ca.IntegratedGradients, "gbp": ca.GuidedBackprop}[kind](models.model)
        kwargs = {"n_steps": 32, "internal_batch_size": 64} if kind == "ig" else {}
        attr = method.attribute(x.clone().requires_grad_(True), target=target, **kwargs)
        return MethodOutput(attr.detach().sum(1).float())
    return run


def _rise(n_masks: int) -> Method:
    def run(models: Models, x: torch.Tensor, target: torch.Tensor) -> MethodOutput:
        from lrpfx.eval.rise import rise
        # an 8 x 8 grid at any size (8 px cells at 64 px, 28 px at 224 px; RISE used 7 x 7 at 224)
        cell = max(1, x.shape[-1] // 8)
        return MethodOutput(rise(models.fast, x, target, n_masks=n_masks, cell_size=cell, batch_size=100).float())
    return run


def _abn(models: Models, x: torch.Tensor, target: torch.Tensor) -> MethodOutput:
    """ABN's attention map; ``models`` is the ABN model itself (its own block of the table)."""
    with torch.no_grad():
        return MethodOutput(models.model.attention(x).reshape(x.shape[0], *x.shape[-2:]).float())


def gaussian_blob(n: int, size: tuple[int, int], sigma: float = 0.25) -> torch.Tensor:
    """The content-free control: a centred isotropic Gaussian, std ``sigma`` x the image width."""
    h, w = size
    yy = torch.arange(h, dtype=torch.float64)[:, None] - (h - 1) / 2
    xx = torch.arange(w, dtype=torch.float64)[None] - (w - 1) / 2
    g = torch.exp(-(yy ** 2 + xx ** 2) / (2 * (sigma * w) ** 2))
    return g.float().expand(n, h, w).clone()


C3_DEFAULT = "C3-LRP (c3_lrp + C3, rank=mass)"
C3_LITERAL = "C3-LRP (c3_lrp + C3, rank=opencv_order)"
BLOB = "Centred Gaussian blob (content-free)"
CONTROLS = ("C3 mask alone (binary, rank=mass)", "Ground-truth mask", "Random map", BLOB)


def model_family(model: nn.Module) -> str:
    """``"vit"`` for torchvision's ``VisionTransformer`` (the bundled ``vit_w64``), else ``"resnet"``."""
    from torchvision.models.vision_transformer import VisionTransformer
    return "vit" if isinstance(model, VisionTransformer) else "resnet"


ATTNLRP = "AttnLRP (attnlrp)"
VIT_SKIPPED = {
    "C3-LRP, ECCV 2024 and every + C3 row": "the ECCV 2024 / C3 rows are the ResNet study; the ViT block compares "
                                             "the attention rules (CP-LRP vs AttnLRP)",
    "Guided Backprop": "a ViT has no ReLU (GELU), so Guided Backprop is the plain gradient",
    "ABN block": "ABN is a ResNet with an attention branch; it has no ViT counterpart",
}
"""The ResNet rows that the ViT block leaves out, with the reason (written to the output)."""


def vit_methods(n_masks: int) -> dict[str, Method]:
    """The rows of the ViT block: CP-LRP (every rule set but attnlrp holds the softmax constant)
    against AttnLRP, beside the gradient, CAM and perturbation baselines."""
    return {
        "CP-LRP-0 (lrp0)": _lrp("lrp0"),
        "CP-LRP eps+flat (epsilon_plus_flat)": _lrp("epsilon_plus_flat"),
        ATTNLRP: _lrp("attnlrp"),
        "AttnLRP gamma (attnlrp_gamma)": _lrp("attnlrp_gamma"),
        "Grad-CAM": _cam("gradcam", _vit_cam_layer),
        "Score-CAM": _cam("scorecam", _vit_cam_layer),
        "Input x Gradient": _captum("ixg"),
        "Integrated Gradients": _captum("ig"),
        f"RISE ({n_masks} masks)": _rise(n_masks),
    }


def methods(n_masks: int, family: str = "resnet") -> dict[str, Method]:
    """The compared methods of the main block, in table order, for the model ``family``
    (``model_family``: the ResNets' list, or ``vit_methods``); the controls that need the
    images' masks are added by ``evaluate``."""
    if family == "vit":
        return vit_methods(n_masks)
    lrp = _lrp("epsilon_plus_flat")
    return {
        C3_DEFAULT: _plus_c3(_lrp("c3_lrp"), "mass"),
        C3_LITERAL: _plus_c3(_lrp("c3_lrp"), "opencv_order"),
        "ECCV 2024 + HQ (eccv2024)": _lrp("eccv2024", heat=8),
        "ECCV 2024 (eccv2024, no HQ)": _lrp("eccv2024"),
        "LRP (epsilon_plus_flat)": lrp,
        "LRP (epsilon_plus_flat) + C3": _plus_c3(lrp, "mass"),
        "Grad-CAM": _cam("gradcam"),
        "Grad-CAM + C3": _plus_c3(_cam("gradcam"), "mass"),
        "Score-CAM": _cam("scorecam"),
        "Input x Gradient": _captum("ixg"),
        "Input x Gradient + C3": _plus_c3(_captum("ixg"), "mass"),
        "Integrated Gradients": _captum("ig"),
        "Guided Backprop": _captum("gbp"),
        f"RISE ({n_masks} masks)": _rise(n_masks),
        CONTROLS[0]: _mask_only(_plus_c3(_lrp("c3_lrp"), "mass")),
    }


ABN_ROWS = ("ABN attention [ABN model]", "Centred Gaussian blob [ABN model]", "Ground-truth mask [ABN model]")
THRESHOLDS = (0.3, 0.5, 0.7)
"""p0 = c0 of the IA/OA/WA labels, swept beside the calibrated pair (METHOD_SPEC §5.4 uses 0.5)."""

CALIBRATION_IMAGES = 500
CALIBRATION_RATE = 0.05


def calibrate_thresholds(size: int = 64, seed: int = 0, n: int = CALIBRATION_IMAGES,
                         rate: float = CALIBRATION_RATE) -> dict[str, Any]:
    """p0 = c0 = t of the IA/OA/WA labels, calibrated on the *validation* split (never the test images).

    Nobody here labels maps by hand (METHOD_SPEC §5.4 step 6 asks for a human-labelled subset),
    so the threshold is set against content-free controls instead: t is the smallest value at
    which the centred Gaussian blob (a map that looks at no image content) is labelled OK on at
    most ``rate`` of ``n`` validation images, i.e. "OK" has a false-positive rate of at most 5%
    for a content-free map. The same t then holds for every method; a uniformly random map is
    OK even more rarely (reported as ``random_ok``). The labels use the attended set R+ >
    mean(R+) as everywhere. Depends on the objects of the split, not on any model.
    """
    from lrpfx.eval.datasets import ShapesDataset
    data = ShapesDataset("val", n=n, size=size, seed=seed, normalize=True, return_mask=True)
    masks = torch.stack([torch.as_tensor(data[i][2]) for i in range(n)]).bool()
    blob = metrics.attention_stats(gaussian_blob(n, tuple(masks.shape[1:])), masks)
    # the blob is OK at threshold t iff min(P, C) >= t: t is just above the (1 - rate) quantile
    # of min(P, C) over the images
    both = torch.minimum(blob.precision.nan_to_num(0.0), blob.coverage)
    ranked = torch.sort(both, descending=True).values
    allowed = int(math.floor(rate * n))  # images the blob may pass
    # the smallest t on a 0.001 grid above the (allowed + 1)-th largest min(P, C)
    t = math.floor(float(ranked[allowed]) * 1000) / 1000 + 0.001 if allowed < n else 0.0
    rand = metrics.attention_stats(torch.rand(masks.shape, generator=torch.Generator().manual_seed(10_000 + seed)),
                                   masks)
    blob_ok = float(((blob.precision >= t) & (blob.coverage >= t)).double().mean())
    random_ok = float(((rand.precision >= t) & (rand.coverage >= t)).double().mean())
    return {"p0": t, "c0": t, "split": "val", "images": n, "size": size, "seed": seed,
            "blob_ok": blob_ok, "random_ok": random_ok,
            "rule": f"p0 = c0 = the smallest t at which the content-free centred blob is OK on at most "
                    f"{rate:.0%} of {n} validation images"}


def score(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor, masks: torch.Tensor, out: MethodOutput,
          mean: tuple[float, ...], std: tuple[float, ...], points: int = 100, tie_seeds: tuple[int, ...] = (0, 1, 2, 3, 4),
          index_offset: int = 0, calibrated: tuple[float, float] | None = None) -> dict[str, Any]:
    """Per-image metrics of one method's maps, the same for every method.

    ``points`` sets the insertion/deletion step to N / points. Insertion/deletion twice: the
    ECCV protocol as published (ties enter together) and the tie-robust headline (ties in a
    random order, averaged over ``tie_seeds``; a map without ties scores the same in both, so
    those images run once). ``model`` only runs forward passes here (pass ``Models.fast``).
    """
    maps = out.maps
    step = max(1, round(maps.shape[-1] * maps.shape[-2] / points))
    kw = dict(protocol="eccv_patch", step=step, mean=mean, std=std)
    eccv = metrics.insertion_deletion(model, x, maps, target, **kw)
    flat = maps.flatten(1).double()
    tied = torch.tensor([len(torch.unique(r)) < len(r) for r in flat])
    s = len(tie_seeds)
    ins_s = eccv.insertion.expand(s, -1).clone()
    del_s = eccv.deletion.expand(s, -1).clone()
    if tied.any():
        idx = tied.nonzero()[:, 0]
        part = []
        for i in idx.tolist():  # one image at a time keeps each image's tie generator index
            part.append(metrics.insertion_deletion(model, x[i:i + 1], maps[i:i + 1], target[i:i + 1], ties="random",
                                                   seeds=tie_seeds, index_offset=index_offset + i, **kw))
        ins_s[:, idx] = torch.cat([p.insertion_per_seed for p in part], 1)
        del_s[:, idx] = torch.cat([p.deletion_per_seed for p in part], 1)
    tol = max(1.0, 15 * x.shape[-1] / 224)
    per: dict[str, Any] = {
        "ID": (ins_s - del_s).mean(0), "Ins": ins_s.mean(0), "Del": del_s.mean(0),
        "ID (ECCV)": eccv.id_score, "Ins (ECCV)": eccv.insertion, "Del (ECCV)": eccv.deletion,
        "Pointing": metrics.pointing_game(maps, masks, tolerance=0, ties="any").float(),
        "Pointing (tol)": metrics.pointing_game(maps, masks, tolerance=tol).float(),
        "RMA": metrics.relevance_mass_accuracy(maps, masks), "RRA": metrics.relevance_rank_accuracy(maps, masks),
        "RMA (signed)": metrics.relevance_mass_accuracy(maps, masks, "sum"),
        "RRA (signed)": metrics.relevance_rank_accuracy(maps, masks, "sum"),
        "IoU": metrics.attended_iou(maps, masks),
        "tied": tied.double(),
    }
    if out.conservation is not None:
        per["sum R / top"] = out.conservation.double()
    per["ID per seed"] = ins_s - del_s  # (S, n)
    for t in THRESHOLDS:
        per[f"error@{t}"] = metrics.error_type(maps, masks, p0=t, c0=t)
    if calibrated is not None:
        per["error@calibrated"] = metrics.error_type(maps, masks, p0=calibrated[0], c0=calibrated[1])
    stats = metrics.attention_stats(maps, masks)  # kept per image: labels at any other threshold
    per["precision"], per["coverage"] = stats.precision, stats.coverage
    return per


def _mean_se(v: torch.Tensor) -> tuple[float, float]:
    v = v.double()[~torch.isnan(v.double())]
    if v.numel() == 0:
        return float("nan"), float("nan")
    se = float(v.std() / math.sqrt(v.numel())) if v.numel() > 1 else 0.0
    return float(v.mean()), se


def _progress(total: int, disable: bool) -> Any:
    try:
        from tqdm import tqdm
        return tqdm(total=total, disable=disable, unit="img", file=sys.stderr)
    except ImportError:  # tqdm is optional: a silent stand-in
        from types import SimpleNamespace
        return SimpleNamespace(update=lambda n: None, set_description=lambda d: None, close=lambda: None,
                               write=lambda m, file=None: None)


@dataclass
class Evaluation:
    """What ``evaluate`` computed: the results dict (JSON-ready), and for figures the images,
    their masks and every method's maps (N, H, W)."""

    result: dict[str, Any]
    images: torch.Tensor
    masks: torch.Tensor
    maps: dict[str, torch.Tensor]


def _run_rows(rows: dict[str, Method | MethodOutput], models: Models, x: torch.Tensor, target: torch.Tensor,
              masks: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...], batch_size: int, points: int,
              tie_seeds: tuple[int, ...], bar: Any, progress: bool,
              on_row: Any = None, calibrated: tuple[float, float] | None = None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    table: dict[str, Any] = {}
    all_maps: dict[str, torch.Tensor] = {}
    n_images = len(x)
    for name, method in rows.items():
        bar.set_description(name[:28])
        t0 = time.perf_counter()
        maps: list[torch.Tensor] = []
        try:
            per: dict[str, Any] = {}
            for start in range(0, n_images, batch_size):
                sl = slice(start, start + batch_size)
                out = MethodOutput(method.maps[sl]) if isinstance(method, MethodOutput) else method(models, x[sl], target[sl])
                maps.append(out.maps)
                part = score(models.fast, x[sl], target[sl], masks[sl], out, mean, std, points, tie_seeds, start,
                             calibrated)
                for k, v in part.items():
                    per[k] = per.get(k, []) + (list(v) if isinstance(v, list) else [v])
                bar.update(len(out.maps))
            errors = {k: per.pop(k) for k in list(per) if k.startswith("error@")}
            seeds = torch.cat(per.pop("ID per seed"), 1)
            precision, coverage = torch.cat(per.pop("precision")), torch.cat(per.pop("coverage"))
            row = {k: _mean_se(torch.cat(v)) for k, v in per.items()}
            row["ID per tie seed"] = seeds.mean(1).tolist()
            headline = "error@calibrated" if "error@calibrated" in errors else "error@0.5"
            row["errors"] = dict(Counter(errors[headline]))
            row["error sweep"] = {t: dict(Counter(errors[f"error@{t}"])) for t in THRESHOLDS}
            row["per_image_ID"] = seeds.mean(0).tolist()
            row["per_image_error"] = errors[headline]
            row["per_image_precision"] = [round(float(v), 6) for v in precision]
            row["per_image_coverage"] = [round(float(v), 6) for v in coverage]
            row["seconds"] = time.perf_counter() - t0
            table[name] = row
            all_maps[name] = torch.cat(maps)
        except Exception as e:  # a method that cannot run here is reported, not hidden
            table[name] = {"failed": f"{type(e).__name__}: {str(e)[:200]}"}
            bar.update(n_images - sum(len(m) for m in maps))
        if progress:
            bar.write(f"  {name}: {table[name].get('failed', 'done')} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
        if on_row is not None:
            on_row(table)
    return table, all_maps


def evaluate(n_images: int = 200, seed: int = 0, batch_size: int = 50, rise_masks: int = 1000,
             only: list[str] | None = None, progress: bool = True, points: int = 100,
             model: str = "bundled", target: str = "predicted", tie_seeds: int = 5,
             on_partial: Any = None, abn: bool = True) -> Evaluation:
    """Run every method on ``n_images`` generated test images and score their maps.

    ``on_partial(result)``, if given, is called after every method with the result so far
    (``result["partial"]`` is True until the last one), e.g. to write it to disk as it grows.

    ``model`` is a shipped model trained on the shapes benchmark: ``"bundled"`` (the
    ResNet-50 layout), ``"bundled:resnet50_w8_seed<k>"`` (the same layout at width 8 from
    training seed k = 0, 1, 2), ``"bundled:resnet50_224_w8_seed<k>"`` (at 224 px),
    ``"bundled:resnet18_w16"`` (the ResNet-18 layout) or
    ``"bundled:vit_w64"`` (the ViT layout: its own rows, ``vit_methods``, no ABN block). ``target``:
    ``"predicted"`` (default; every method explains the model's predicted class, as the ECCV
    code does) or ``"ground_truth"``. ``tie_seeds``: seeds of the tie-robust insertion/deletion.
    The ABN attention runs in its own block, scored with the ABN model (its own prediction),
    when ``abn`` is True and the images are 64 px (the ABN model's size).

    The images are the model's size (its metadata's ``image_size``: 64, or 224 for
    ``bundled:resnet50_224_w8_seed<k>``). The IA/OA/WA labels of the table use thresholds
    calibrated on the validation split (``calibrate_thresholds``); the sweep keeps fixed ones.
    """
    from lrpfx.eval.datasets import ShapesDataset
    from lrpfx.cli.loading import load_model
    from lrpfx.eval.models import load_bundled
    if not (model == "bundled" or model.startswith("bundled:")) or "abn" in model:
        raise ValueError(f"model={model!r}: the evaluation needs a classifier trained on the shapes benchmark. "
                         "Hint: use 'bundled', 'bundled:resnet18_w16' or 'bundled:vit_w64'.")
    if target not in ("predicted", "ground_truth"):
        raise ValueError(f"target={target!r}. Hint: use 'predicted' or 'ground_truth'.")
    loaded = load_model(model)
    net = loaded.model
    size = loaded.size
    data = ShapesDataset("test", n=n_images, seed=seed, size=size, normalize=True, return_mask=True)
    calibration = calibrate_thresholds(size, seed)
    calibrated = (calibration["p0"], calibration["c0"])
    samples = [data[i] for i in range(n_images)]
    x = torch.stack([s[0] for s in samples])
    truth = torch.tensor([int(s[1]) for s in samples])
    masks = torch.stack([torch.as_tensor(s[2]) for s in samples]).bool()
    models = Models(net, inference_model(net, x[:8]))
    with torch.no_grad():
        predicted = torch.cat([net(x[i:i + 100]).argmax(1) for i in range(0, n_images, 100)])
    explained = predicted if target == "predicted" else truth
    seeds = tuple(range(tie_seeds))
    wanted = lambda k: not only or any(o.lower() in k.lower() for o in only)  # noqa: E731
    shape = tuple(masks.shape)
    controls: dict[str, Method | MethodOutput] = {
        "Ground-truth mask": MethodOutput(masks.float()),
        "Random map": MethodOutput(torch.rand(shape, generator=torch.Generator().manual_seed(seed))),
        BLOB: MethodOutput(gaussian_blob(shape[0], shape[1:])),
    }
    family = model_family(net)
    main_rows = {k: v for k, v in {**methods(rise_masks, family), **controls}.items() if wanted(k)}
    abn_rows = {k: v for k, v in {ABN_ROWS[0]: _abn, ABN_ROWS[1]: controls[BLOB],
                                  ABN_ROWS[2]: controls["Ground-truth mask"]}.items()
                if wanted(k) and family == "resnet" and abn and size == 64}
    bar = _progress((len(main_rows) + len(abn_rows)) * n_images, not progress)
    header = {"n_images": n_images, "seed": seed, "model": loaded.name,
              "model_accuracy_on_these": float((predicted == truth).float().mean()),
              "target": target, "insertion_deletion_points": points, "tie_seeds": list(seeds),
              "pointing_tolerance_px": max(1.0, 15 * x.shape[-1] / 224), "rise_masks": rise_masks,
              "c3_options": {r: c3_options(r) for r in ("mass", "opencv_order")},
              "error_thresholds": list(THRESHOLDS), "error_thresholds_calibrated": calibration,
              "image_size": size}
    if family == "vit":
        header["skipped"] = dict(VIT_SKIPPED)
    elif not abn_rows and (not abn or size != 64):
        header["skipped"] = {"ABN block": "the ABN model is trained at 64 px only" if size != 64 else
                             "left out by the caller (--no-abn)"}
    report = None if on_partial is None else (
        lambda t: on_partial({**header, "partial": True, "methods": t, "abn": None}))
    table, all_maps = _run_rows(main_rows, models, x, explained, masks, loaded.mean, loaded.std, batch_size,
                                points, seeds, bar, progress, report, calibrated)
    abn_info = None
    if abn_rows:
        abn_net = load_bundled("abn_resnet50_w16")
        with torch.no_grad():
            abn_pred = torch.cat([abn_net(x[i:i + 100]).argmax(1) for i in range(0, n_images, 100)])
        abn_models = Models(abn_net, inference_model(abn_net, x[:8]))
        abn_accuracy = float((abn_pred == truth).float().mean())
        abn_report = None if on_partial is None else (lambda t: on_partial(
            {**header, "partial": True, "methods": table, "abn": {"accuracy_on_these": abn_accuracy, "methods": t}}))
        abn_table, abn_maps = _run_rows(abn_rows, abn_models, x, abn_pred if target == "predicted" else truth,
                                        masks, loaded.mean, loaded.std, batch_size, points, seeds, bar, progress,
                                        abn_report, calibrated)
        all_maps.update(abn_maps)
        abn_info = {"accuracy_on_these": abn_accuracy, "methods": abn_table}
    bar.close()
    result = {**header, "methods": table, "abn": abn_info}
    return Evaluation(result, x, masks, all_maps)


FIGURE_METHOD = C3_DEFAULT


def best_worst_figure(ev: Evaluation, path: str | Path, k: int = 3, key: str | None = None) -> Path | None:
    """The poster-style figure: the ``k`` images where ``key`` (default: C3-LRP, or AttnLRP for
    the ViT) has its best and its worst ID score, each row beside every other method's map and
    the ground-truth mask.

    Row titles give ``key``'s ID score and its IA/OA/WA label. Returns None when ``key`` did
    not run (``--only`` without it) or matplotlib is missing.
    """
    if key is None:
        key = ATTNLRP if FIGURE_METHOD not in ev.result["methods"] and ATTNLRP in ev.result["methods"] else FIGURE_METHOD
    label = "C3-LRP" if key == FIGURE_METHOD else key.split(" (")[0]
    row = ev.result["methods"].get(key, {})
    if "per_image_ID" not in row:
        return None
    try:
        from lrpfx.eval.datasets import MEAN, STD
        from lrpfx.postprocess.render import comparison_grid
        ids = torch.tensor(row["per_image_ID"])
        order = torch.argsort(ids, descending=True, stable=True).tolist()
        k = min(k, len(order) // 2) or 1
        picks = order[:k] + order[-k:]
        labels = row["per_image_error"]
        titles = [f"{'best' if j < k else 'worst'}: ID {100 * ids[i]:.0f}, {labels[i]}" for j, i in enumerate(picks)]
        columns = {"object mask": ev.masks[picks].float()}
        columns.update({name.split(" (")[0] if name != key else label: m[picks] for name, m in ev.maps.items()
                        if name not in CONTROLS and name not in ABN_ROWS[1:]})
        return comparison_grid(ev.images[picks], columns, path, mean=MEAN, std=STD, row_titles=titles,
                               title=f"{label}'s best and worst ID scores beside the other methods", cell_inches=1.4)
    except ImportError:
        return None


COLUMNS = ("ID", "Ins", "Del", "ID (ECCV)", "Ins (ECCV)", "Del (ECCV)", "Pointing", "Pointing (tol)", "RMA", "RRA",
           "RMA (signed)", "RRA (signed)", "IoU", "sum R / top")
LOWER_IS_BETTER = ("Del", "Del (ECCV)")
NO_MARK = ("sum R / top",)
COMPACT_COLUMNS = ("ID", "Ins", "Del", "ID (ECCV)", "Ins (ECCV)", "Del (ECCV)", "Pointing", "RMA", "RRA", "IoU")
"""The columns of ``results_compact.md`` (the README's tables): the headline metrics only."""


def _header(result: dict[str, Any], columns: tuple[str, ...] = COLUMNS) -> list[str]:
    tol = result.get("pointing_tolerance_px") or 15 * (result.get("image_size") or 64) / 224
    names = {"Pointing": "Point (tol 0)", "Pointing (tol)": f"Point ({tol:.1f} px)", "ID": "**ID**",
             "RMA (signed)": "RMA±", "RRA (signed)": "RRA±"}
    cols = [names.get(c, c) for c in columns]
    return [f"| method | {' | '.join(cols)} | ID over tie seeds | OK / IA / OA / WA |",
            "|---" * (len(columns) + 3) + "|"]


def _cell(c: str, row: dict[str, Any]) -> str:
    """One cell: mean ± standard error over images, or for a combined run mean ± std over the
    training seeds with the mean standard error over images in parentheses."""
    m, spread = row[c]
    scale, fmt = (1, "{:.3f}") if c == "sum R / top" else (100, "{:.1f}")
    cell = f"{fmt.format(scale * m)} ± {fmt.format(scale * spread)}"
    if "se_images" in row and c in row["se_images"]:
        cell += f" ({fmt.format(scale * row['se_images'][c])})"
    return cell


def _rows(rows: dict[str, Any], blob: dict[str, Any] | None, columns: tuple[str, ...] = COLUMNS) -> list[str]:
    lines = []
    for name, row in rows.items():
        if "failed" in row:
            lines.append(f"| {name} | " + " | ".join("-" for _ in columns) + f" | - | failed: {row['failed'][:60]} |")
            continue
        cells = []
        for c in columns:
            if c not in row:
                cells.append("-")
                continue
            m = row[c][0]
            cell = _cell(c, row)
            if blob is not None and row is not blob and c not in NO_MARK and c in blob and not math.isnan(m):
                b = blob[c][0]
                if (m >= b) if c in LOWER_IS_BETTER else (m <= b):
                    cell += " †"
            cells.append(cell)
        per_seed = row.get("ID per tie seed", [])
        spread = f"{100 * min(per_seed):.1f} – {100 * max(per_seed):.1f}" if per_seed else "-"
        e = row["errors"]
        lines.append(f"| {name} | {' | '.join(cells)} | {spread} | {e.get('OK', 0)} / {e.get('IA', 0)} / "
                     f"{e.get('OA', 0)} / {e.get('WA', 0)} |")
    return lines


def _legend(result: dict[str, Any]) -> list[str]:
    cal = result.get("error_thresholds_calibrated")
    labels = (f"OK / IA / OA / WA: counts at the calibrated p0 = {cal['p0']}, c0 = {cal['c0']} ({cal['rule']})"
              if cal else "OK / IA / OA / WA: counts at p0 = c0 = 0.5")
    if result.get("combined"):
        spread = (f"mean ± std over {len(result['runs'])} training seeds (mean standard error over the "
                  f"{result['n_images']} images of a seed in parentheses); counts summed over the seeds")
    else:
        spread = f"mean ± standard error over {result.get('n_images', 'the')} images"
    return [f"*{spread}; in %, except sum R / top. † marks a value no better than the content-free centred "
            f"blob's. {labels}.*", ""]


def markdown(result: dict[str, Any], columns: tuple[str, ...] = COLUMNS) -> str:
    """The results tables: mean ± standard error over images in % (for a combined run: mean ±
    std over training seeds, the standard error over images in parentheses), † where a method
    does not beat the centred Gaussian blob of its block; the ABN block (scored with the ABN
    model); and the IA/OA/WA counts at every threshold of the sweep. ``columns``: the metric
    columns (``COMPACT_COLUMNS`` for the headline ones)."""
    lines = _legend(result) + _header(result, columns) + _rows(result["methods"], result["methods"].get(BLOB), columns)
    if result.get("partial"):  # written while the run goes on: the rows so far
        lines = ["*Partial: the run is still going (or was interrupted); these are the methods done so far.*",
                 ""] + lines
    abn = result.get("abn")
    if abn and abn.get("methods"):
        lines += ["", f"ABN block (maps scored with the ABN model, {100 * abn['accuracy_on_these']:.1f}% correct "
                      "on these images" + ("; one ABN model, so mean ± standard error over images" if result.get("combined")
                                           else "") + "):", ""]
        lines += _header(result, columns) + _rows(abn["methods"], abn["methods"].get(ABN_ROWS[1]), columns)
    sweep = [(n, r) for n, r in {**result["methods"], **((abn or {}).get("methods") or {})}.items() if "failed" not in r]
    if sweep:
        ts = result.get("error_thresholds", THRESHOLDS)
        lines += ["", "IA/OA/WA labels (OK / IA / OA / WA) at p0 = c0 = t, attended set R+ > mean(R+) for every map:", "",
                  "| method | " + " | ".join(f"t = {t}" for t in ts) + " |", "|---" * (len(ts) + 1) + "|"]
        for name, row in sweep:
            cells = []
            for t in ts:
                e = row["error sweep"].get(t, row["error sweep"].get(str(t), {}))
                cells.append(f"{e.get('OK', 0)} / {e.get('IA', 0)} / {e.get('OA', 0)} / {e.get('WA', 0)}")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if result.get("skipped"):
        lines += ["", "Rows not run for this model:", ""] + [f"- {k}: {v}." for k, v in result["skipped"].items()]
    return "\n".join(lines)


def _sum_counts(counts: list[dict[str, int]]) -> dict[str, int]:
    total: Counter = Counter()
    for c in counts:
        total.update(c)
    return dict(total)


def combine(results: list[dict[str, Any]], names: list[str] | None = None) -> dict[str, Any]:
    """One result from runs of the same protocol on models trained from different seeds.

    Every metric cell becomes (mean over runs of the per-run means, std over runs), with the
    runs' mean standard error over images under ``se_images``; label counts are summed; the
    ABN block is taken from the run that has one (there is one ABN model). The runs must share
    the images, points, tie seeds and target, which is checked.
    """
    if len(results) < 2:
        raise ValueError(f"combine needs at least 2 runs, got {len(results)}. Hint: pass one results.json per seed.")
    same = ("n_images", "seed", "target", "insertion_deletion_points", "tie_seeds", "image_size", "rise_masks")
    for key in same:
        values = {json.dumps(r.get(key)) for r in results}
        if len(values) > 1:
            raise ValueError(f"the runs differ in {key!r} ({', '.join(sorted(values))}); they cannot be combined. "
                             "Hint: run every seed with the same lrpfx eval options.")
    methods: dict[str, Any] = {}
    for name in results[0]["methods"]:
        rows = [r["methods"].get(name, {"failed": "missing"}) for r in results]
        failed = [row["failed"] for row in rows if "failed" in row]
        if failed:
            methods[name] = {"failed": failed[0]}
            continue
        row: dict[str, Any] = {"se_images": {}}
        for c in COLUMNS:
            if c not in rows[0]:
                continue
            means = torch.tensor([float(r[c][0]) for r in rows], dtype=torch.float64)
            row[c] = (float(means.mean()), float(means.std()) if len(means) > 1 else 0.0)
            row["se_images"][c] = float(torch.tensor([float(r[c][1]) for r in rows]).mean())
        row["ID per run"] = [float(r["ID"][0]) for r in rows]
        row["ID per tie seed"] = [v for r in rows for v in r["ID per tie seed"]]
        row["errors"] = _sum_counts([r["errors"] for r in rows])
        row["error sweep"] = {str(t): _sum_counts([r["error sweep"].get(str(t), r["error sweep"].get(t, {}))
                                                   for r in rows]) for t in results[0].get("error_thresholds", THRESHOLDS)}
        methods[name] = row
    abn = next((r["abn"] for r in results if r.get("abn")), None)
    first = results[0]
    return {**{k: first.get(k) for k in same}, "combined": True,
            "runs": names or [r.get("model") for r in results], "model": ", ".join(r.get("model", "?") for r in results),
            "model_accuracy_on_these": [r.get("model_accuracy_on_these") for r in results],
            "pointing_tolerance_px": first.get("pointing_tolerance_px"), "c3_options": first.get("c3_options"),
            "error_thresholds": first.get("error_thresholds", list(THRESHOLDS)),
            "error_thresholds_calibrated": first.get("error_thresholds_calibrated"),
            "skipped": first.get("skipped"), "methods": methods, "abn": abn,
            "seconds": sum(r.get("seconds", 0.0) for r in results)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lrpfx eval", description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=200, help="test images (default: %(default)s)")
    p.add_argument("--quick", action="store_true",
                   help="a first look: 8 images, 100 RISE masks, 10 points, 2 tie seeds, the same columns and "
                        "rows (measured: 21 s on 2 idle cores, 4 min with two other jobs on them; the standard errors are wide)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default="bundled",
                   help="bundled (ResNet-50 layout, default), bundled:resnet50_w8_seed{0,1,2} (the same layout at "
                        "width 8, three training seeds), bundled:resnet50_224_w8_seed{0,1,2} (224 px), "
                        "bundled:resnet18_w16 (ResNet-18 layout) or bundled:vit_w64 (ViT layout: CP-LRP vs AttnLRP rows)")
    p.add_argument("--rise-masks", type=int, default=1000, help="RISE masks per image (default: %(default)s)")
    p.add_argument("--points", type=int, default=100, help="insertion/deletion points: step = N / points")
    p.add_argument("--only", nargs="*", help="run methods whose name contains one of these words")
    p.add_argument("--target", choices=("predicted", "ground_truth"), default="predicted",
                   help="the class every method explains (default: %(default)s, as the ECCV code)")
    p.add_argument("--tie-seeds", type=int, default=5,
                   help="seeds of the tie-robust insertion/deletion (default: %(default)s)")
    p.add_argument("--out", default="lrpfx-eval", help="directory for results.json, results.md and best_worst.png")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-abn", action="store_true", help="leave out the ABN block (one ABN model serves every seed)")
    p.add_argument("--combine", nargs="+", metavar="DIR",
                   help="combine finished runs (one folder with results.json per training seed) into one table "
                        "of mean ± std over seeds in --out; runs nothing else")
    args = p.parse_args(argv)
    if args.combine:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        try:
            runs = [json.loads((Path(d) / "results.json").read_text()) for d in args.combine]
            result = combine(runs, [str(d) for d in args.combine])
        except (OSError, ValueError) as e:
            p.error(str(e))
        result["command"] = "lrpfx eval " + " ".join(argv if argv is not None else sys.argv[1:])
        (out / "results.json").write_text(json.dumps(result, indent=1))
        (out / "results.md").write_text(markdown(result) + "\n")
        (out / "results_compact.md").write_text(markdown(result, COMPACT_COLUMNS) + "\n")
        print(markdown(result, COMPACT_COLUMNS))
        print(f"wrote {out / 'results.json'}, {out / 'results.md'} (every column), {out / 'results_compact.md'}")
        return 0
    for flag, value, low in (("--images", args.images, 1), ("--rise-masks", args.rise_masks, 1),
                             ("--points", args.points, 1), ("--tie-seeds", args.tie_seeds, 1)):
        if value < low:
            p.error(f"{flag} {value}: must be >= {low}")
    torch.manual_seed(args.seed)
    n, masks, points, tie_seeds = ((8, 100, 10, 2) if args.quick else
                                   (args.images, args.rise_masks, args.points, args.tie_seeds))
    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "lrpfx eval " + " ".join(argv if argv is not None else sys.argv[1:])

    def write(result: dict[str, Any]) -> None:
        """results.json and results.md, rewritten after every method: an interrupted run keeps its rows."""
        result.update(seconds=time.perf_counter() - t0, threads=torch.get_num_threads(), command=command)
        for name, text in (("results.json", json.dumps(result, indent=1)), ("results.md", markdown(result) + "\n"),
                           ("results_compact.md", markdown(result, COMPACT_COLUMNS) + "\n")):
            tmp = out / f".{name}.tmp"
            tmp.write_text(text)
            os.replace(tmp, out / name)

    try:
        ev = evaluate(n, args.seed, rise_masks=masks, only=args.only, points=points,
                      progress=not args.no_progress, model=args.model, target=args.target, tie_seeds=tie_seeds,
                      on_partial=write, abn=not args.no_abn)
    except ValueError as e:
        p.error(str(e))
    result = ev.result
    write(result)
    table = markdown(result)
    figure = best_worst_figure(ev, out / "best_worst.png")
    abn = (result.get("abn") or {}).get("accuracy_on_these")
    print(f"{result['model']} ({100 * result['model_accuracy_on_these']:.1f}% correct on these {n} images"
          + (f", ABN {100 * abn:.1f}%" if abn is not None else "")
          + f"; explains the {result['target'].replace('_', ' ')} class; {points} insertion/deletion points, "
          f"{tie_seeds} tie seeds, {masks} RISE masks; {result['seconds']:.0f} s on {result['threads']} threads)")
    print(table)
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}" + (f", {figure}" if figure else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
