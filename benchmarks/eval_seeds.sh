#!/usr/bin/env bash
# The README's evaluation tables (issue #18): the ResNet-50 layout at width 8, trained from
# three seeds at 64 px, every method scored on the same test images, then combined into
# mean ± std over the seeds; and the 224-px model, likewise from three seeds (SEEDS224="0 1 2").
# One thread per run; the runs are independent, so JOBS=2 runs two at a time on a 2-core machine;
# the 224-px runs go one at a time (each peaks near 12 GB of memory).
#
#   bash benchmarks/eval_seeds.sh            # IMAGES64=100 IMAGES224=50 POINTS=20 RISE=300 JOBS=2
#
# Training the six models (already shipped in lrpfx/eval/weights/; their JSON has each command):
#   python -m lrpfx.eval.train --model resnet50_w8_seed$S --seed $S --epochs 9 --threads 1
#   python -m lrpfx.eval.train --model resnet50_224_w8_seed$S --seed $S --size 224 --epochs 6 --threads 1   (S = 0, 1, 2)
set -euo pipefail
PY=${PY:-python}
IMAGES64=${IMAGES64:-100}
IMAGES224=${IMAGES224:-50}
POINTS=${POINTS:-20}
RISE=${RISE:-300}
JOBS=${JOBS:-2}
SEEDS224=${SEEDS224:-0 1 2}
OUT=${OUT:-benchmarks}

run() {  # run SIZE_TAG MODEL IMAGES EXTRA...
  local tag=$1 model=$2 images=$3; shift 3
  OMP_NUM_THREADS=1 $PY -m lrpfx.eval.evaluate --model "bundled:$model" --images "$images" --points "$POINTS" \
    --rise-masks "$RISE" --tie-seeds 5 --no-progress --out "$OUT/$tag/${model##*_}" "$@" > "$OUT/$tag/${model##*_}.log" 2>&1
}

mkdir -p "$OUT/eval_64" "$OUT/eval_224"
jobs_list=("eval_64 resnet50_w8_seed0 $IMAGES64" "eval_64 resnet50_w8_seed1 $IMAGES64 --no-abn"
           "eval_64 resnet50_w8_seed2 $IMAGES64 --no-abn")
for s in $SEEDS224; do jobs_list+=("eval_224 resnet50_224_w8_seed$s $IMAGES224"); done
last224=""
for j in "${jobs_list[@]}"; do
  if [[ $j == eval_224* && -n $last224 ]]; then  # one 224-px run at a time (each peaks near 12 GB)
    while kill -0 "$last224" 2>/dev/null; do sleep 5; done
  fi
  # shellcheck disable=SC2086
  run $j &
  [[ $j == eval_224* ]] && last224=$!
  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do sleep 5; done
done
wait
$PY -m lrpfx.eval.evaluate --combine "$OUT/eval_64/seed0" "$OUT/eval_64/seed1" "$OUT/eval_64/seed2" --out "$OUT/eval_64"
read -ra s224 <<< "$SEEDS224"
if [ "${#s224[@]}" -ge 2 ]; then
  $PY -m lrpfx.eval.evaluate --combine "${s224[@]/#/$OUT/eval_224/seed}" --out "$OUT/eval_224"
fi
