#!/usr/bin/env bash
# The README's evaluation tables (issue #18): the ResNet-50 layout at width 8, trained from
# three seeds at 64 px and three at 224 px, every method scored on the same test images, then
# combined into mean ± std over the seeds. One thread per run; runs of one size are independent,
# so JOBS=2 runs two at a time on a 2-core machine.
#
#   bash benchmarks/eval_seeds.sh            # IMAGES64=100 IMAGES224=60 POINTS=20 RISE=300 JOBS=2
#
# Training the six models (already shipped in lrpfx/eval/weights/; their JSON has each command):
#   python -m lrpfx.eval.train --model resnet50_w8_seed$S --seed $S --epochs 9 --threads 1
#   python -m lrpfx.eval.train --model resnet50_224_w8_seed$S --seed $S --size 224 --epochs 6 --threads 1
set -euo pipefail
PY=${PY:-python}
IMAGES64=${IMAGES64:-100}
IMAGES224=${IMAGES224:-60}
POINTS=${POINTS:-20}
RISE=${RISE:-300}
JOBS=${JOBS:-2}
OUT=${OUT:-benchmarks}

run() {  # run SIZE_TAG MODEL IMAGES EXTRA...
  local tag=$1 model=$2 images=$3; shift 3
  OMP_NUM_THREADS=1 $PY -m lrpfx.eval.evaluate --model "bundled:$model" --images "$images" --points "$POINTS" \
    --rise-masks "$RISE" --tie-seeds 5 --no-progress --out "$OUT/$tag/${model##*_}" "$@" > "$OUT/$tag/${model##*_}.log" 2>&1
}

mkdir -p "$OUT/eval_64" "$OUT/eval_224"
jobs_list=("eval_64 resnet50_w8_seed0 $IMAGES64" "eval_64 resnet50_w8_seed1 $IMAGES64 --no-abn"
           "eval_64 resnet50_w8_seed2 $IMAGES64 --no-abn" "eval_224 resnet50_224_w8_seed0 $IMAGES224"
           "eval_224 resnet50_224_w8_seed1 $IMAGES224" "eval_224 resnet50_224_w8_seed2 $IMAGES224")
for j in "${jobs_list[@]}"; do
  # shellcheck disable=SC2086
  run $j &
  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do sleep 5; done
done
wait
for tag in eval_64 eval_224; do
  $PY -m lrpfx.eval.evaluate --combine "$OUT/$tag/seed0" "$OUT/$tag/seed1" "$OUT/$tag/seed2" --out "$OUT/$tag"
done
