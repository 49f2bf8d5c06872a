"""The architecture sweep: which classifiers compile, under which rule sets, and how exact LRP-0 is.

    python -m lrpfx.eval.zoo                       # torchvision (<= 100M parameters) and the timm families
    python -m lrpfx.eval.zoo --models resnet18,timm:convnext_atto --onnx

For every model (random weights, seeded, BatchNorm statistics and zero-initialized weights
randomized so that nothing is trivially zero): the compile time under ``lrp0``, the built-in rule
sets that compile and give finite relevance, the relative error of LRP-0 against Input x Gradient
of the model's linearized twin (float64; :mod:`lrpfx.eval.twin`), and with ``--onnx`` whether
the ``lrp0`` explainer exports to ONNX and runs in onnxruntime with the eager result. The table
is written as Markdown (``docs/coverage.md`` by default) and JSON.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

import lrpfx
from lrpfx.eval.twin import input_x_gradient, linearized_twin

#: one model per timm residual family (issue #15's list), and the everyday non-residual families
TIMM_FAMILIES: dict[str, str] = {
    "resnet": "resnet18", "resnet-d": "resnet18d", "resnet-t": "resnet10t", "resnet_gn": "resnet50_gn",
    "resnetv2": "resnetv2_50", "bit": "resnetv2_50x1_bit", "seresnet": "seresnet18", "ecaresnet": "ecaresnet26t",
    "skresnet": "skresnet18", "resnest": "resnest14d", "res2net": "res2net50_14w_8s", "res2next": "res2next50",
    "resnetrs": "resnetrs50", "nf_resnet": "nf_resnet50", "dm_nfnet": "dm_nfnet_f0", "regnetx": "regnetx_002",
    "regnety": "regnety_002", "cspresnet": "cspresnet50", "dla": "dla34", "dpn": "dpn68",
    "resnetblur": "resnetblur18", "gcresnet": "gcresnet33ts", "lambda_resnet": "lambda_resnet26t",
    "botnet": "botnet26t_256", "halonet": "halonet26t", "tresnet": "tresnet_m", "wide_resnet": "wide_resnet50_2",
    "resnext-ts": "resnext26ts", "hrnet": "hrnet_w18_small", "repvgg": "repvgg_a0", "selecsls": "selecsls42b",
    "vovnet": "ese_vovnet19b_dw", "rexnet": "rexnet_100", "ghostnet": "ghostnet_100", "convnext": "convnext_atto",
    "efficientnet": "efficientnet_b0", "mobilenetv3": "mobilenetv3_small_100",
}
#: the input size of the sweep (small: the sweep covers ~100 models on a 2-core machine)
SIZE = 32
#: models that need a given input size (fixed position embeddings, window partitions)
SIZES: dict[str, int] = {"squeezenet1_0": 96, "squeezenet1_1": 96, "botnet26t_256": 256, "halonet26t": 256, "maxvit_t": 224, "swin_t": 224, "swin_s": 224,
                         "swin_b": 224, "swin_v2_t": 256, "swin_v2_s": 256, "swin_v2_b": 256, "tresnet_m": 224}
#: why an architecture cannot be explained exactly (shown in its row)
KNOWN_LIMITS: dict[str, str] = {
    "product": "a product of two input-dependent values (lambda layers: q @ (softmax(k) @ v)): only the "
               "uniform product rule of attnlrp/attnlrp_gamma covers it",
}


@dataclass
class Row:
    """One model of the sweep."""

    name: str
    source: str
    params_m: float
    size: int = 0
    compile_s: float | None = None
    rulesets: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    twin_error: float | None = None
    onnx: str = "-"
    note: str = ""


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Seeded random BatchNorm statistics, and random values for all-zero weights (zero-initialized
    heads, residual gains), so that no map is trivially zero. Returns ``model``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
        for p in model.parameters():
            if p.numel() > 1 and not p.detach().any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def build(spec: str) -> tuple[nn.Module, str, str]:
    """(model, name, source) for ``name`` (torchvision) or ``timm:name``, random weights, eval mode."""
    if spec.startswith("timm:"):
        import timm
        name = spec[5:]
        return timm.create_model(name, pretrained=False, num_classes=10).eval(), name, "timm"
    import torchvision
    kwargs: dict[str, Any] = {"image_size": SIZE} if spec.startswith("vit_") else {}
    return torchvision.models.get_model(spec, weights=None, num_classes=10, **kwargs).eval(), spec, "torchvision"


def torchvision_specs(max_params: float = 100e6) -> list[str]:
    """Every torchvision classifier with at most ``max_params`` parameters."""
    import torchvision
    out = []
    for name in torchvision.models.list_models(module=torchvision.models):
        try:
            with torch.device("meta"):  # no memory, no init time
                m = torchvision.models.get_model(name, weights=None, num_classes=10)
        except NotImplementedError:  # an initializer that copies data
            m = torchvision.models.get_model(name, weights=None, num_classes=10)
        if sum(p.numel() for p in m.parameters()) <= max_params:
            out.append(name)
    return out


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:200]}" if str(e) else type(e).__name__


def _reason(e: BaseException) -> str:
    text = str(e)
    for key, why in KNOWN_LIMITS.items():
        if key in text:
            return why
    return _first_line(e)


def sweep_one(spec: str, onnx: bool = False, rulesets: list[str] | None = None) -> Row:
    """Compile and check one model."""
    model, name, source = build(spec)
    randomize(model)
    row = Row(name, source, round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
              SIZES.get(name) or _smallest_size(model))
    x = torch.randn(1, 3, row.size, row.size, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([3])
    for rs in rulesets or lrpfx.builtin_rulesets():
        try:
            t0 = time.perf_counter()
            explainer = lrpfx.compile(model, rs)
            if rs == "lrp0":
                row.compile_s = round(time.perf_counter() - t0, 2)
            with torch.no_grad():
                relevance = explainer(x, target)[0]
            if not torch.isfinite(relevance).all():
                raise FloatingPointError("non-finite relevance")
            row.rulesets.append(rs)
        except Exception as e:  # noqa: BLE001 - the sweep reports every failure in its row
            row.failed[rs] = _reason(e)
    if "lrp0" in row.rulesets:
        row.twin_error = _twin_error(model, x.double(), target)
        if onnx:
            row.onnx = _onnx(model, x)
    row.note = next(iter(row.failed.values()), "")
    return row


def _smallest_size(model: nn.Module) -> int:
    """The sweep's size, or the first larger one the model's own forward accepts."""
    for size in (SIZE, 64, 96, 224):
        try:
            with torch.no_grad():
                model(torch.zeros(1, 3, size, size))
            return size
        except Exception:  # noqa: BLE001 - too small for the network: try the next size
            continue
    return 224


def _twin_error(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> float:
    """Relative error of LRP-0 against Input x Gradient of the linearized twin, in float64."""
    m64 = model.double()
    try:
        relevance = lrpfx.compile(m64, "lrp0")(x, target)[0]
        reference = input_x_gradient(linearized_twin(m64), x, target)
        if not reference.any():  # a dead network at this size: the check would be trivially exact
            return math.nan
        return float((relevance - reference).norm() / reference.norm())
    finally:
        model.float()


def _onnx(model: nn.Module, x: torch.Tensor) -> str:
    """``ok`` when the lrp0 explainer exports and onnxruntime matches eager (rel. error < 1e-3), else why."""
    try:
        import onnxruntime as ort
        explainer = lrpfx.compile(model, "lrp0")
        with tempfile.TemporaryDirectory() as tmp:
            x = x.expand(2, *x.shape[1:]).contiguous()  # batch 2: a batch of 1 would be specialized
            path = lrpfx.export_onnx(explainer, Path(tmp) / "m.onnx", x, target_input=False, dynamic_size=False)
            got = torch.from_numpy(ort.InferenceSession(str(path)).run(None, {"x": x.numpy()})[0])
        want = explainer(x)[0]
        err = float((got - want).norm() / want.norm().clamp_min(1e-30))
        return "ok" if err < 1e-3 else f"differs ({err:.1e})"
    except Exception as e:  # noqa: BLE001
        return f"fails ({_first_line(e)[:80]})"


def markdown(rows: list[Row], command: str) -> str:
    """The coverage table as Markdown."""
    n_rs = len(lrpfx.builtin_rulesets())
    ok = [r for r in rows if len(r.rulesets) == n_rs]
    lines = [
        "# Architecture coverage", "",
        f"Generated by `{command}` (random weights, seeded; {len(ok)} of {len(rows)} models compile under all "
        f"{n_rs} built-in rule sets). Twin error: relative error of LRP-0 against Input x Gradient of the "
        "model's linearized twin, float64 (exact when below 1e-6). ONNX: the lrp0 explainer exported and run "
        "in onnxruntime against eager ('-': not run).", "",
        "| source | model | params (M) | input | compile lrp0 (s) | rule sets | twin error | ONNX | note |",
        "|---|---|---:|---:|---:|---|---:|---|---|",
    ]
    for r in rows:
        sets = "all" if len(r.rulesets) == n_rs else (", ".join(r.rulesets) or "none")
        twin = "-" if r.twin_error is None else ("zero map" if math.isnan(r.twin_error) else f"{r.twin_error:.1e}")
        comp = "-" if r.compile_s is None else f"{r.compile_s:.2f}"
        lines.append(f"| {r.source} | {r.name} | {r.params_m} | {r.size} | {comp} | {sets} | {twin} | {r.onnx} | "
                     f"{r.note.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lrpfx.eval.zoo", description=__doc__.splitlines()[0])
    ap.add_argument("--models", help="comma-separated: torchvision names or timm:NAME (default: the full sweep)")
    ap.add_argument("--source", default="torchvision,timm", help="for the full sweep: torchvision, timm or both")
    ap.add_argument("--onnx", nargs="?", const="all", default="",
                    help="also export the lrp0 explainer to ONNX and run it: for every model, or for a "
                         "comma-separated list of model names")
    ap.add_argument("--out", default="docs/coverage.md", help="Markdown table path")
    ap.add_argument("--json", default="benchmarks/coverage.json", help="JSON rows path")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--merge", help="comma-separated JSON files of earlier runs (e.g. one per source, run in "
                                    "parallel): write one table from their rows instead of sweeping; a later "
                                    "file's row replaces an earlier row of the same model")
    args = ap.parse_args(argv)
    if args.merge:
        merged: dict[tuple[str, str], Row] = {}  # a later file's row replaces an earlier row of the same model
        for path in args.merge.split(","):
            for r in json.loads(Path(path).read_text()):
                merged[(r["source"], r["name"])] = Row(**r)
        rows = list(merged.values())
        _write(rows, args, argv)
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.models:
        specs = args.models.split(",")
    else:
        specs = (torchvision_specs() if "torchvision" in args.source else []) + \
                ([f"timm:{m}" for m in TIMM_FAMILIES.values()] if "timm" in args.source else [])
    rows = []
    for spec in specs:
        t0 = time.perf_counter()
        try:
            name = spec.split(":")[-1]
            row = sweep_one(spec, onnx=args.onnx == "all" or name in args.onnx.split(","))
        except Exception as e:  # noqa: BLE001 - a model that does not even build is a row too
            row = Row(spec, "?", math.nan, note=_first_line(e))
            traceback.print_exc()
        rows.append(row)
        _write(rows, args, argv)  # after every model: a partial sweep is a partial table
        print(f"{row.source:11s} {row.name:24s} {len(row.rulesets)} rule sets  twin "
              f"{'-' if row.twin_error is None else f'{row.twin_error:.1e}'}  onnx {row.onnx}  "
              f"({time.perf_counter() - t0:.0f} s) {row.note[:100]}", flush=True)
    print(f"wrote {args.out} and {args.json}")
    return 0


def _write(rows: list[Row], args: argparse.Namespace, argv: list[str] | None) -> None:
    command = "python -m lrpfx.eval.zoo " + " ".join(argv if argv is not None else sys.argv[1:])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(markdown(rows, command.strip()))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=1))


if __name__ == "__main__":
    sys.exit(main())
