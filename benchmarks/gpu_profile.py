"""Where the GPU time goes (resnet50, batch 64, 224 x 224): a torch.profiler kernel table per method,
and the C3 stage alone.

    python benchmarks/gpu_profile.py [--dtype float32]
"""
from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

import lrpfx
from lrpfx.eval.bench import _floor, build_model
from lrpfx.postprocess.tensor_backend import c3_tensor


def wall(fn, n=20):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return ts[len(ts) // 2] * 1e3


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rules", nargs="*", default=["lrp0", "c3_lrp"])
    args = p.parse_args()
    torch.backends.cudnn.benchmark = True
    dtype = getattr(torch, args.dtype)
    model = build_model("resnet50", "cuda", dtype)
    x = torch.randn(args.batch, 3, 224, 224, device="cuda", dtype=dtype)
    target = model(x).argmax(1)
    runs = {"floor": _floor(model, x, target)}
    for rules in args.rules:
        e = lrpfx.compile(model, rules)
        runs[rules] = (lambda e=e: e(x, target))
    for name, fn in runs.items():
        with torch.inference_mode(name != "floor"):
            ms = wall(fn)
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                fn()
                torch.cuda.synchronize()
        events = prof.key_averages()
        total = sum(e.self_device_time_total for e in events) / 1e3
        print(f"\n### {name}: wall {ms:.2f} ms, GPU kernel time {total:.2f} ms")
        print(events.table(sort_by="device_time_total", row_limit=30, max_name_column_width=50))
    with torch.inference_mode():
        rel = lrpfx.compile(model, "c3_lrp")(x, target)[0]
        ms = wall(lambda: c3_tensor(rel))
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            c3_tensor(rel)
            torch.cuda.synchronize()
        kernels = sum(e.count for e in prof.key_averages())
        gpu = sum(e.self_device_time_total for e in prof.key_averages()) / 1e3
    print(f"\nC3 stage alone, batch {args.batch}: eager {ms:.2f} ms ({kernels} kernels, {gpu:.2f} ms of GPU "
          f"kernel time)")


if __name__ == "__main__":
    main()
