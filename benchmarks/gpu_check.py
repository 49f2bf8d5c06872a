"""Correctness of the explainer on a CUDA device, run before the GPU timings (benchmarks/gpu.sh).

    python benchmarks/gpu_check.py --json gpu_check.json

1. LRP-0 in float64 on the GPU equals autograd's Input x Gradient on the GPU (the oracle of
   tests/unit/test_oracle_ixg.py, here with cuDNN's kernels).
2. ``c3_lrp`` with the C3 stage in float32 (TF32 off) on the GPU against the CPU: relative L2
   error of the relevance and the share of identical C3 mask pixels.
3. ``c3_lrp`` in bfloat16 on the GPU against float32 on the GPU: finite, relative L2, cosine.
"""
from __future__ import annotations

import argparse
import copy
import json

import torch

import lrpfx
from lrpfx.eval.bench import build_model


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm()).item()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--json")
    p.add_argument("--device", default="cuda", help="cpu only to try the script itself")
    args = p.parse_args()
    dev = args.device
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    out: dict[str, object] = {"device": torch.cuda.get_device_name(0) if dev == "cuda" else dev, "torch": torch.__version__}
    torch.manual_seed(0)

    model64 = build_model("resnet50", dev, torch.float64)
    x = torch.randn(4, 3, 224, 224, device=dev, dtype=torch.float64)
    target = model64(x).argmax(1)
    xg = x.clone().requires_grad_(True)
    grad, = torch.autograd.grad(model64(xg).gather(1, target[:, None]).sum(), xg)
    rel0, _ = lrpfx.compile(model64, "lrp0")(x, target)
    out["lrp0_vs_ixg_float64_rel_l2"] = rel(rel0, x * grad)

    model = build_model("resnet50", "cpu", torch.float32)
    xc = torch.randn(8, 3, 224, 224)
    tc = model(xc).argmax(1)
    cpu = lrpfx.compile(model, "c3_lrp", c3=True)(xc, tc)
    gpu_model = copy.deepcopy(model).to(dev)
    gpu = lrpfx.compile(gpu_model, "c3_lrp", c3=True)(xc.to(dev), tc.to(dev))
    out["c3_lrp_gpu_vs_cpu_rel_l2"] = rel(gpu[0], cpu[0])
    masks_gpu, masks_cpu = gpu[-1].cpu(), cpu[-1]
    out["c3_mask_pixels_equal"] = (masks_gpu == masks_cpu).double().mean().item()
    out["c3_masks_identical_images"] = f"{int((masks_gpu == masks_cpu).flatten(1).all(1).sum())}/{len(xc)}"

    bf = lrpfx.compile(copy.deepcopy(gpu_model).bfloat16(), "c3_lrp")(xc.to(dev).bfloat16(), tc.to(dev))[0]
    out["c3_lrp_bf16_finite"] = bool(torch.isfinite(bf).all())
    out["c3_lrp_bf16_vs_fp32_rel_l2"] = rel(bf.float(), gpu[0])
    out["c3_lrp_bf16_cosine_min"] = torch.nn.functional.cosine_similarity(
        bf.float().flatten(1), gpu[0].flatten(1)).min().item()
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
