#!/usr/bin/env bash
# The GPU benchmark of issue #5 as one prepared run (resnet50, 224 x 224, batch 64): correctness
# checks, then `python -m lrpfx.eval.bench` in float32 and bfloat16, eager, then torch.compile.
# Each stage has its own timeout and writes its JSON at once, so a cut-off run keeps what it did.
#
#   bash benchmarks/gpu.sh [stages]     # stages: any of check fp32 bf16 cl32 clbf16 cfp32 cbf16 profile
#                                        (default: all; cl* = channels-last)
#
# Needs torch with CUDA, zennit and captum importable (or as wheels in .whl/, installed to
# /tmp/site); lrpfx is copied to /tmp/site with its rule sets, so no build step is needed.
set -u
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
repo=$PWD
stages=${*:-check fp32 bf16 cl32 clbf16 cfp32 cbf16 profile}
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
site=/tmp/site
mkdir -p "$site"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl || exit 1
fi
rm -rf "$site/lrpfx" && cp -r lrpfx "$site/" && mkdir -p "$site/lrpfx/rulesets" && cp rules/*.py rules/*.toml "$site/lrpfx/rulesets/"
export PYTHONPATH=$site PYTHONUNBUFFERED=1
cd /tmp || exit 1
python3 -c "import torch, lrpfx, zennit; print('torch', torch.__version__, 'lrpfx from', lrpfx.__file__)" || exit 1
bench="python3 -m lrpfx.eval.bench --device cuda --batch 64 --threads 8"
compiled=(--compile --rounds 10 --warmup 2 --only forward floor "floor (torch.compile)" lrpfx:c3_lrp+C3
          "lrpfx:c3_lrp+C3 (torch.compile)" lrpfx:epsilon_plus_flat "lrpfx:epsilon_plus_flat (torch.compile)")
nhwc=(--rounds 20 --warmup 3 --only forward floor lrpfx:lrp0 lrpfx:epsilon_plus_flat lrpfx:c3_lrp lrpfx:c3_lrp+C3
      zennit:EpsilonPlusFlat)
for s in $stages; do
  echo "=== stage $s ($(date +%T))"
  case $s in
    check) timeout 120 python3 "$repo/benchmarks/gpu_check.py" --json "$OUT/gpu_check.json" ;;
    fp32) timeout 150 $bench --dtype float32 --rounds 20 --warmup 3 --json "$OUT/results_gpu_fp32.json" ;;
    bf16) timeout 150 $bench --dtype bfloat16 --rounds 20 --warmup 3 --json "$OUT/results_gpu_bf16.json" ;;
    cl32) timeout 100 $bench --dtype float32 --channels-last "${nhwc[@]}" --json "$OUT/results_gpu_fp32_channels_last.json" ;;
    clbf16) timeout 100 $bench --dtype bfloat16 --channels-last "${nhwc[@]}" --json "$OUT/results_gpu_bf16_channels_last.json" ;;
    cfp32) timeout 300 $bench --dtype float32 "${compiled[@]}" --json "$OUT/results_gpu_compile_fp32.json" ;;
    cbf16) timeout 300 $bench --dtype bfloat16 "${compiled[@]}" --json "$OUT/results_gpu_compile_bf16.json" ;;
    profile) timeout 150 python3 "$repo/benchmarks/gpu_profile.py" --rules lrp0 c3_lrp epsilon_plus_flat > "$OUT/profile_fp32.txt" 2>&1
             grep -E "^###|^C3 stage" "$OUT/profile_fp32.txt" ;;
  esac
  echo "=== stage $s ended with $? ($(date +%T))"
done
