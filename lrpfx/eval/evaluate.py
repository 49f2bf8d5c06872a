"""The ground-truth evaluation: ``lrpfx eval`` / ``python -m lrpfx.eval.evaluate``.

Every method explains the same generated test images of the synthetic shapes benchmark for
the same classes (the ground truth, as the ECCV metric does), and every map is scored with the
metrics of METHOD_SPEC §5 against the objects' masks: patch insertion/deletion and the ID score
(ECCV protocol, step scaled to the image), the pointing game, relevance mass and rank accuracy,
the IoU of the attended region, the IA/OA/WA class of every failure, and, for the LRP methods,
conservation (sum of the map over the output relevance).
"""
from __future__ import annotations

import argparse
import copy
import json
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
    """A method's maps (N, H, W) at image resolution, its attended region, and its conservation."""

    maps: torch.Tensor
    attended: torch.Tensor | None = None
    conservation: torch.Tensor | None = None


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


def _lrp(rules: str, c3: bool = False, heat: int | None = None) -> Method:
    def run(models: Models, x: torch.Tensor, target: torch.Tensor) -> MethodOutput:
        explainer = lrpfx.compile(models.model, rules, c3=c3)  # the rule set's [c3] options, any image size
        with torch.inference_mode():
            out = explainer(x, target)
        relevance, logits = out[0], out[1]
        top = logits.softmax(1) if explainer_top(rules) == "softmax" else logits
        conservation = relevance.flatten(1).sum(1) / top.gather(1, target[:, None]).squeeze(1)
        if c3:
            return MethodOutput(out[2].float(), out[3], conservation)
        maps = relevance.sum(1)
        if heat:
            from lrpfx.postprocess import heat_quantize
            maps = heat_quantize(maps, heat)
        return MethodOutput(maps, None, conservation)
    return run


def explainer_top(rules: str) -> str:
    return lrpfx.RuleSet.ensure(rules).top


def _cam(kind: str) -> Method:
    def run(models: Models, x: torch.Tensor, target: torch.Tensor) -> MethodOutput:
        from types import SimpleNamespace
        from unittest import mock

        import pytorch_grad_cam as pgc
        import pytorch_grad_cam.score_cam as score_cam
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
        cls = {"gradcam": pgc.GradCAM, "scorecam": pgc.ScoreCAM}[kind]
        model = models.model
        with cls(model=model, target_layers=[model.layer4[-1]]) as cam, \
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
        return MethodOutput(rise(models.fast, x, target, n_masks=n_masks, batch_size=100).float())
    return run


def _abn(models: Models, x: torch.Tensor, target: torch.Tensor) -> MethodOutput:
    from lrpfx.eval.models import load_bundled
    abn = load_bundled("abn_resnet50_w16")
    with torch.no_grad():
        return MethodOutput(abn.attention(x).reshape(x.shape[0], *x.shape[-2:]).float())


def methods(n_masks: int) -> dict[str, Method]:
    """The compared methods, in table order."""
    return {
        "C3-LRP (c3_lrp + C3)": _lrp("c3_lrp", c3=True),
        "ECCV 2024 + HQ (eccv2024)": _lrp("eccv2024", heat=8),
        "ECCV 2024 (eccv2024, no HQ)": _lrp("eccv2024"),
        "LRP (epsilon_plus_flat)": _lrp("epsilon_plus_flat"),
        "Grad-CAM": _cam("gradcam"),
        "Score-CAM": _cam("scorecam"),
        "Input x Gradient": _captum("ixg"),
        "Integrated Gradients": _captum("ig"),
        "Guided Backprop": _captum("gbp"),
        f"RISE ({n_masks} masks)": _rise(n_masks),
        "ABN (attention map)": _abn,
    }


def score(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor, masks: torch.Tensor, out: MethodOutput,
          mean: tuple[float, ...], std: tuple[float, ...], points: int = 100) -> dict[str, torch.Tensor | list[str]]:
    """Per-image metrics of one method's maps; ``points`` sets the insertion/deletion step to N / points.

    ``model`` only runs forward passes here (pass ``Models.fast``).
    """
    maps = out.maps
    step = max(1, round(maps.shape[-1] * maps.shape[-2] / points))
    insdel = metrics.insertion_deletion(model, x, maps, target, protocol="eccv_patch", step=step, mean=mean, std=std)
    per = {"Ins": insdel.insertion, "Del": insdel.deletion, "ID": insdel.id_score,
           "Pointing": metrics.pointing_game(maps, masks, tolerance=max(1.0, 15 * x.shape[-1] / 224)).float(),
           "RMA": metrics.relevance_mass_accuracy(maps, masks), "RRA": metrics.relevance_rank_accuracy(maps, masks),
           "IoU": metrics.attended_iou(maps, masks, out.attended)}
    if out.conservation is not None:
        per["sum R / top"] = out.conservation.double()
    per["error"] = metrics.error_type(maps, masks, out.attended)
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


def evaluate(n_images: int = 200, seed: int = 0, batch_size: int = 50, rise_masks: int = 1000,
             only: list[str] | None = None, progress: bool = True, points: int = 100,
             model: str = "bundled") -> Evaluation:
    """Run every method on ``n_images`` generated test images and score their maps.

    ``model`` is a shipped model trained on the shapes benchmark: ``"bundled"`` (the
    ResNet-50 layout) or ``"bundled:resnet18_w16"`` (the ResNet-18 layout).
    """
    from lrpfx.eval.datasets import ShapesDataset
    from lrpfx.cli.loading import load_model
    if not (model == "bundled" or model.startswith("bundled:")) or "abn" in model:
        raise ValueError(f"model={model!r}: the evaluation needs a classifier trained on the shapes benchmark. "
                         "Hint: use 'bundled' or 'bundled:resnet18_w16'.")
    loaded = load_model(model)
    model = loaded.model
    data = ShapesDataset("test", n=n_images, seed=seed, normalize=True, return_mask=True)
    samples = [data[i] for i in range(n_images)]
    x = torch.stack([s[0] for s in samples])
    target = torch.tensor([int(s[1]) for s in samples])
    masks = torch.stack([torch.as_tensor(s[2]) for s in samples]).bool()
    models = Models(model, inference_model(model, x[:8]))
    with torch.no_grad():
        accuracy = float((model(x).argmax(1) == target).float().mean())
    table: dict[str, Any] = {}
    all_maps: dict[str, torch.Tensor] = {}
    sanity = {"Ground-truth mask (upper bound)": MethodOutput(masks.float()),
              "Random map (chance)": MethodOutput(torch.rand(masks.shape, generator=torch.Generator().manual_seed(seed)))}
    todo = [(k, v) for k, v in {**methods(rise_masks), **sanity}.items()
            if not only or any(o.lower() in k.lower() for o in only)]
    bar = _progress(len(todo) * n_images, not progress)
    for name, method in todo:
        bar.set_description(name[:28])
        t0 = time.perf_counter()
        try:
            per: dict[str, Any] = {}
            maps = []
            for start in range(0, n_images, batch_size):
                sl = slice(start, start + batch_size)
                if isinstance(method, MethodOutput):
                    out = MethodOutput(method.maps[sl])
                else:
                    out = method(models, x[sl], target[sl])
                maps.append(out.maps)
                part = score(models.fast, x[sl], target[sl], masks[sl], out, loaded.mean, loaded.std, points)
                for k, v in part.items():
                    per[k] = per.get(k, []) + (list(v) if isinstance(v, list) else [v])
                bar.update(len(out.maps))
            row = {k: _mean_se(torch.cat(v)) for k, v in per.items() if k != "error"}
            row["errors"] = dict(Counter(per["error"]))
            row["per_image_ID"] = torch.cat(per["ID"]).tolist()
            row["per_image_error"] = per["error"]
            row["seconds"] = time.perf_counter() - t0
            table[name] = row
            all_maps[name] = torch.cat(maps)
        except Exception as e:  # a method that cannot run here is reported, not hidden
            table[name] = {"failed": f"{type(e).__name__}: {str(e)[:200]}"}
            bar.update(n_images - sum(len(m) for m in maps))
        if progress:
            bar.write(f"  {name}: {table[name].get('failed', 'done')} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    bar.close()
    result = {"n_images": n_images, "seed": seed, "model": loaded.name, "model_accuracy_on_these": accuracy,
              "insertion_deletion_points": points, "rise_masks": rise_masks, "methods": table,
              "abn_accuracy_on_these": _abn_accuracy(x, target) if any(k.startswith("ABN") for k in table) else None}
    return Evaluation(result, x, masks, all_maps)


def _abn_accuracy(x: torch.Tensor, target: torch.Tensor) -> float:
    from lrpfx.eval.models import load_bundled
    abn = load_bundled("abn_resnet50_w16")
    with torch.no_grad():
        return float((abn(x).argmax(1) == target).float().mean())


FIGURE_METHOD = "C3-LRP (c3_lrp + C3)"


def best_worst_figure(ev: Evaluation, path: str | Path, k: int = 3, key: str = FIGURE_METHOD) -> Path | None:
    """The poster-style figure: the ``k`` images where ``key`` (C3-LRP) has its best and its
    worst ID score, each row beside every other method's map and the ground-truth mask.

    Row titles give C3-LRP's ID score and its IA/OA/WA label. Returns None when ``key`` did
    not run (``--only`` without it) or matplotlib is missing.
    """
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
        columns.update({name.split(" (")[0] if name != key else "C3-LRP": m[picks] for name, m in ev.maps.items()
                        if not name.startswith(("Ground-truth", "Random"))})
        return comparison_grid(ev.images[picks], columns, path, mean=MEAN, std=STD, row_titles=titles,
                               title="C3-LRP's best and worst ID scores beside the other methods", cell_inches=1.4)
    except ImportError:
        return None


COLUMNS = ("Ins", "Del", "ID", "Pointing", "RMA", "RRA", "IoU", "sum R / top")


def markdown(result: dict[str, Any]) -> str:
    """The results table (mean ± standard error over images, in %) and the IA/OA/WA counts."""
    lines = [f"| method | {' | '.join(COLUMNS)} | OK / IA / OA / WA |", "|---" * (len(COLUMNS) + 2) + "|"]
    for name, row in result["methods"].items():
        if "failed" in row:
            lines.append(f"| {name} | " + " | ".join("-" for _ in COLUMNS) + f" | failed: {row['failed'][:60]} |")
            continue
        cells = []
        for c in COLUMNS:
            if c not in row:
                cells.append("-")
                continue
            m, se = row[c]
            cells.append(f"{m:.3f} ± {se:.3f}" if c == "sum R / top" else f"{100 * m:.1f} ± {100 * se:.1f}")
        e = row["errors"]
        lines.append(f"| {name} | {' | '.join(cells)} | {e.get('OK', 0)} / {e.get('IA', 0)} / {e.get('OA', 0)} / "
                     f"{e.get('WA', 0)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lrpfx eval", description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=200, help="test images (default: %(default)s)")
    p.add_argument("--quick", action="store_true",
                   help="the CI smoke run: 8 images, 100 RISE masks, 20 points (under a minute)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default="bundled",
                   help="bundled (ResNet-50 layout, default) or bundled:resnet18_w16 (ResNet-18 layout)")
    p.add_argument("--rise-masks", type=int, default=1000, help="RISE masks per image (default: %(default)s)")
    p.add_argument("--points", type=int, default=100, help="insertion/deletion points: step = N / points")
    p.add_argument("--only", nargs="*", help="run methods whose name contains one of these words")
    p.add_argument("--out", default="lrpfx-eval", help="directory for results.json, results.md and best_worst.png")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    n, masks, points = (8, 100, 20) if args.quick else (args.images, args.rise_masks, args.points)
    t0 = time.perf_counter()
    try:
        ev = evaluate(n, args.seed, rise_masks=masks, only=args.only, points=points,
                      progress=not args.no_progress, model=args.model)
    except ValueError as e:
        p.error(str(e))
    result = ev.result
    result["seconds"] = time.perf_counter() - t0
    result["threads"] = torch.get_num_threads()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1))
    table = markdown(result)
    (out / "results.md").write_text(table + "\n")
    figure = best_worst_figure(ev, out / "best_worst.png")
    abn = result.get("abn_accuracy_on_these")
    print(f"{result['model']} ({100 * result['model_accuracy_on_these']:.1f}% correct on these {n} images"
          + (f", ABN {100 * abn:.1f}%" if abn is not None else "")
          + f"; {points} insertion/deletion points, {masks} RISE masks; {result['seconds']:.0f} s on "
          f"{result['threads']} threads)")
    print(table)
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}" + (f", {figure}" if figure else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
