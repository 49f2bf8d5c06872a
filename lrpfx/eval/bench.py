"""Speed and memory of lrpfx against its peers, measured side by side: ``python -m lrpfx.eval.bench``.

Every method explains the same batch for the same targets, in one process, interleaved
(round r runs every method once), after warm-up; the table reports medians over rounds and
the ratio to the *floor*: one forward plus the Input x Gradient backward with frozen
parameters, the least an LRP implementation built on the gradient can cost. Peak memory is
measured per method in a fresh subprocess: the peak resident set (VmHWM, reset after
loading) minus the resident set after loading.

Machines here are shared and noisy: compare ratios from one run, not times across runs.

``--models resnet50,convnext_tiny,...`` runs the lrpfx rule sets on several architectures in one
process, each against its own floor (its own forward plus Input x Gradient backward), and reports
time and peak memory as ratios to that floor (``--memory``); a model or rule set that does not
compile is reported with its error. ViT runs at its fixed input size.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torchvision

import lrpfx

LRPFX_RULES = ("lrp0", "epsilon_plus_flat", "epsilon_gamma_box", "c3_lrp")
PEERS = ("zennit:EpsilonPlusFlat", "zennit:EpsilonGammaBox", "captum:LRP")


def build_model(arch: str, device: str, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torchvision.models.get_model(arch, weights=None).eval().to(device, dtype)
    for p in model.parameters():
        p.requires_grad_(False)  # frozen parameters: every method's fast path
    return model


def _floor(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor) -> Callable[[], Any]:
    def run() -> torch.Tensor:
        xg = x.detach().requires_grad_(True)
        out = model(xg)
        grad, = torch.autograd.grad(out.gather(1, target[:, None]).sum(), xg)
        return xg * grad
    return run


def _floor_compiled(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor) -> Callable[[], Any]:
    """The floor with the model under torch.compile (forward and backward compiled by AOTAutograd)."""
    return _floor(torch.compile(model), x, target)


def _forward(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor) -> Callable[[], Any]:
    def run() -> torch.Tensor:
        with torch.inference_mode():
            return model(x)
    return run


def _lrpfx(rules: str, compiled: bool = False, c3: bool = False) -> Callable[..., Callable[[], Any]]:
    def make(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor) -> Callable[[], Any]:
        kwargs = {"c3": True} if c3 else {}
        explainer = lrpfx.compile(model, rules, **kwargs)
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            explainer = explainer.to(memory_format=torch.channels_last)  # its 4-D weights, as the model's
        fn = torch.compile(explainer, fullgraph=True) if compiled else explainer

        def run() -> Any:
            with torch.inference_mode():
                return fn(x, target)
        return run
    return make


def _zennit(name: str) -> Callable[..., Callable[[], Any]]:
    def make(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor) -> Callable[[], Any]:
        from zennit.attribution import Gradient
        from zennit.composites import EpsilonGammaBox, EpsilonPlusFlat
        from zennit.torchvision import ResNetCanonizer
        m = copy.deepcopy(model)
        canon = [ResNetCanonizer()]
        composite = (EpsilonPlusFlat(canonizers=canon) if name == "EpsilonPlusFlat" else
                     EpsilonGammaBox(low=-3.0, high=3.0, canonizers=canon))
        attributor = Gradient(model=m, composite=composite)
        attributor.__enter__()
        with torch.no_grad():  # the same output relevance as lrpfx: the target logit
            onehot = torch.nn.functional.one_hot(target, 1000).to(x.dtype) * model(x)

        def run() -> torch.Tensor:
            return attributor(x, onehot)[1]
        return run
    return make


def _captum(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor) -> Callable[[], Any]:
    from captum.attr import LRP
    lrp = LRP(copy.deepcopy(model))

    def run() -> torch.Tensor:
        return lrp.attribute(x, target=target)
    return run


def methods(compiled: bool, c3: bool, peers: bool = True) -> dict[str, Callable[..., Callable[[], Any]]]:
    out: dict[str, Callable[..., Callable[[], Any]]] = {"forward": _forward, "floor": _floor}
    out.update({f"lrpfx:{r}": _lrpfx(r) for r in LRPFX_RULES})
    if c3:
        out["lrpfx:c3_lrp+C3"] = _lrpfx("c3_lrp", c3=True)
    if compiled:
        out["floor (torch.compile)"] = _floor_compiled
        out.update({f"lrpfx:{r} (torch.compile)": _lrpfx(r, compiled=True) for r in LRPFX_RULES})
        if c3:
            out["lrpfx:c3_lrp+C3 (torch.compile)"] = _lrpfx("c3_lrp", compiled=True, c3=True)
    if peers:
        out["zennit:EpsilonPlusFlat"] = _zennit("EpsilonPlusFlat")
        out["zennit:EpsilonGammaBox"] = _zennit("EpsilonGammaBox")
        out["captum:LRP"] = _captum
    return out


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _cuda_peak_mb(run: Callable[[], Any], device: str) -> float:
    """Peak CUDA memory one call allocates beyond what was allocated before it (MB)."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = run()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del out
    return (peak - base) / 2**20


def time_methods(args: argparse.Namespace, peers: bool = True) -> dict[str, dict[str, Any]]:
    if args.device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True  # every method gets cuDNN's fastest algorithms
    model = build_model(args.arch, args.device, getattr(torch, args.dtype))
    x = torch.randn(args.batch, 3, args.size, args.size, device=args.device, dtype=getattr(torch, args.dtype))
    if args.channels_last:  # every method, the floor included, on NHWC weights and input
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    target = model(x).argmax(1)
    runs: dict[str, Callable[[], Any]] = {}
    notes: dict[str, str] = {}
    for name, make in methods(args.compile, _has_c3(), peers).items():
        if args.only and name not in args.only:
            continue
        try:
            runs[name] = make(model, x, target)
            result = runs[name]()
            notes[name] = _check(name, result, model, x, target)
            for _ in range(args.warmup):
                runs[name]()
        except Exception as e:  # a peer that fails is reported, not hidden
            runs.pop(name, None)
            notes[name] = f"failed: {type(e).__name__}: {str(e)[:120]}"
    cuda_mb = {name: _cuda_peak_mb(run, args.device) for name, run in runs.items()} \
        if args.device.startswith("cuda") else {}
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.rounds):
        for name, run in runs.items():
            _sync(args.device)
            t0 = time.perf_counter()
            run()
            _sync(args.device)
            times[name].append(time.perf_counter() - t0)
    floor = statistics.median(times["floor"]) if "floor" in times else float("nan")
    table = {}
    for name in notes:
        med = statistics.median(times[name]) if name in times else float("nan")
        table[name] = {"ms": med * 1e3, "images_per_s": args.batch / med if name in times else float("nan"),
                       "ratio_to_floor": med / floor, "note": notes[name]}
        if name in cuda_mb:
            table[name]["extra_mb"] = cuda_mb[name]
            table[name]["memory_ratio_to_floor"] = cuda_mb[name] / cuda_mb.get("floor", float("nan"))
    return table


def input_size(arch: str, size: int) -> int:
    """The input size to run ``arch`` at: ``size``, or the model's own fixed size (ViT's 224)."""
    return int(getattr(torchvision.models.get_model(arch, weights=None), "image_size", size))


def sweep(args: argparse.Namespace) -> dict[str, Any]:
    """Every lrpfx rule set on every model of ``--models``, each model against its own floor."""
    out: dict[str, Any] = {}
    for arch in args.models.split(","):
        margs = copy.copy(args)
        margs.arch, margs.size = arch, input_size(arch, args.size)
        try:
            table = time_methods(margs, peers=False)
        except Exception as e:  # a model that does not even build or run its floor
            out[arch] = {"size": margs.size, "error": f"{type(e).__name__}: {str(e)[:200]}"}
            continue
        if args.memory and not args.device.startswith("cuda"):
            mem = measure_memory(margs, [k for k in table if k != "forward" and table[k]["ms"] == table[k]["ms"]])
            for k, v in mem.items():
                table[k]["extra_mb"] = v
                table[k]["memory_ratio_to_floor"] = v / mem.get("floor", float("nan"))
        out[arch] = {"size": margs.size, "methods": table}
        print(f"{arch} ({margs.size} px) done", flush=True)
    return out


def print_sweep(result: dict[str, Any]) -> None:
    names = [f"lrpfx:{r}" for r in LRPFX_RULES] + (["lrpfx:c3_lrp+C3"] if _has_c3() else [])
    print("time / memory, each as a ratio to the model's own floor (forward + Input x Gradient backward)")
    print(f"{'model':18s} {'px':>4s} {'floor ms':>9s}" + "".join(f" {n[6:]:>21s}" for n in names))
    for arch, row in result.items():
        if "error" in row:
            print(f"{arch:18s} {row['size']:4d} failed: {row['error']}")
            continue
        m = row["methods"]
        cells = []
        for n in names:
            v = m.get(n)
            if v is None or v["ms"] != v["ms"]:
                cells.append(f" {'not compiled':>21s}")
            else:
                cells.append(f" {v['ratio_to_floor']:9.2f}x / {v.get('memory_ratio_to_floor', float('nan')):7.2f}x")
        print(f"{arch:18s} {row['size']:4d} {m['floor']['ms']:9.0f}" + "".join(cells))


def _has_c3() -> bool:
    try:
        import inspect as _inspect
        return "c3" in _inspect.signature(lrpfx.compile).parameters
    except Exception:
        return False


def _check(name: str, result: Any, model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor) -> str:
    """A one-line sanity note: does the relevance sum to something near the target logit?"""
    if name.startswith(("forward", "floor")):
        return ""
    rel = result[0] if isinstance(result, tuple) else result
    with torch.no_grad():
        logit = model(x).gather(1, target[:, None]).squeeze(1).double()
    ratio = (rel.detach().double().flatten(1).sum(1) / logit).abs().max().item()
    note = f"max |sum R / logit| = {ratio:.3g}"
    if name.startswith("captum") and (ratio > 10 or ratio != ratio):
        note += " (WRONG: captum's LRP has no rule for the residual sum)"
    return note


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def memory_child(args: argparse.Namespace) -> None:
    """Run one method once in this (fresh) process and print its peak extra memory in MB."""
    model = build_model(args.arch, "cpu", getattr(torch, args.dtype))
    x = torch.randn(args.batch, 3, args.size, args.size, dtype=getattr(torch, args.dtype))
    target = model(x).argmax(1)
    run = methods(args.compile, _has_c3())[args.memory_of](model, x, target)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    base = _rss_kb("VmRSS")
    run()
    print(json.dumps({"extra_mb": (_rss_kb("VmHWM") - base) / 1024}))


def measure_memory(args: argparse.Namespace, names: list[str]) -> dict[str, float]:
    out = {}
    for name in names:
        cmd = [sys.executable, "-m", "lrpfx.eval.bench", "--memory-of", name, "--arch", args.arch, "--batch",
               str(args.batch), "--size", str(args.size), "--threads", str(args.threads), "--dtype", args.dtype]
        cmd += ["--keep-freed-memory"] if args.keep_freed_memory else []
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        try:
            out[name] = json.loads(proc.stdout.strip().splitlines()[-1])["extra_mb"]
        except Exception:
            out[name] = float("nan")
    return out


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return (f"{torch.cuda.get_device_name(device)}; TF32 convolutions "
                f"{'on' if torch.backends.cudnn.allow_tf32 else 'off'} (torch's default), cudnn.benchmark on")
    return f"CPU, {os.cpu_count()} cores"


def compile_time(arch: str = "resnet152", rules: str = "c3_lrp") -> float:
    model = torchvision.models.get_model(arch, weights=None).eval()
    t0 = time.perf_counter()
    lrpfx.compile(model, rules)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lrpfx.eval.bench", description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--models", help="comma-separated torchvision architectures: every lrpfx rule set on each, "
                                    "against that model's own floor (no peers); ViT at its fixed size")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--compile", action="store_true", help="also time lrpfx under torch.compile")
    p.add_argument("--channels-last", action="store_true",
                   help="run every method on a channels-last model and input (NHWC; the explainer's weights too)")
    p.add_argument("--memory", action="store_true",
                   help="measure peak memory per method (CPU: fresh subprocesses; CUDA: always measured, "
                        "in process, from the caching allocator's peak)")
    p.add_argument("--keep-freed-memory", action="store_true",
                   help="let glibc's malloc keep freed memory for reuse (lrpfx.keep_freed_memory) in this process and "
                        "the memory subprocesses, for every method alike")
    p.add_argument("--only", nargs="*", help="method names to run (default: all)")
    p.add_argument("--json", help="write the results to this file")
    p.add_argument("--memory-of", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.keep_freed_memory and not lrpfx.keep_freed_memory():
        p.error("--keep-freed-memory: this C library is not glibc (the setting is glibc's mallopt)")
    if args.memory_of:
        memory_child(args)
        return 0
    if args.models:
        result = {"config": {k: v for k, v in vars(args).items() if k != "memory_of"}, "torch": torch.__version__,
                  "cpu_count": os.cpu_count(), "device_name": _device_name(args.device), "models": sweep(args)}
        print(f"batch {args.batch}, {args.threads} threads, {result['device_name']}, {args.dtype}, "
              f"{'freed memory kept, ' if args.keep_freed_memory else ''}median of {args.rounds} interleaved rounds")
        print_sweep(result["models"])
        for arch, row in result["models"].items():
            for name, v in row.get("methods", {}).items():
                if v["note"].startswith("failed"):
                    print(f"  {arch} {name}: {v['note']}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)
        return 0
    table = time_methods(args)
    if args.memory and not args.device.startswith("cuda"):
        mem = measure_memory(args, [k for k in table if k != "forward" and table[k]["ms"] == table[k]["ms"]])
        floor_mb = mem.get("floor", float("nan"))
        for k, v in mem.items():
            table[k]["extra_mb"] = v
            table[k]["memory_ratio_to_floor"] = v / floor_mb
    result = {"config": {k: v for k, v in vars(args).items() if k != "memory_of"},
              "torch": torch.__version__, "cpu_count": os.cpu_count(), "device_name": _device_name(args.device),
              "compile_resnet152_s": compile_time(), "methods": table}
    print(f"{args.arch}, batch {args.batch}, {args.size}x{args.size}, {args.threads} threads, {result['device_name']}, "
          f"{args.dtype}{', channels-last' if args.channels_last else ''}"
          f"{', freed memory kept' if args.keep_freed_memory else ''}, median of {args.rounds} interleaved rounds")
    print(f"{'method':42s} {'ms/batch':>9s} {'img/s':>7s} {'x floor':>8s} {'extra MB':>9s} {'mem x floor':>11s}  note")
    for k, v in table.items():
        print(f"{k:42s} {v['ms']:9.0f} {v['images_per_s']:7.1f} {v['ratio_to_floor']:8.2f} "
              f"{v.get('extra_mb', float('nan')):9.0f} {v.get('memory_ratio_to_floor', float('nan')):11.2f}  {v['note']}")
    print(f"compile resnet152 (trace to emitted module): {result['compile_resnet152_s']:.2f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
