#!/usr/bin/env bash
# One short GPU session (minutes; docs/performance.md): the environment, the GPU
# tests, and the training throughput of ExtreMA ViT-B/16 (224 px, ratio 0.8 x 5 and x 1 masks, bf16 autocast)
# against ViTMAEForPreTraining, with MFU; then the data pipeline if the JPEGs are there, with the
# colour augmentation on the GPU as `train_extrema.py --color_on_device` (the ImageNet recipes) does it.
#
#   bash benchmarks/gpu_check.sh            # from anywhere, with the project's dependencies installed
#   MODEL=tiny BATCH=8 bash benchmarks/gpu_check.sh   # a quick dry run of the script itself, e.g. on a CPU
#
# Every step has its own time limit, so that one hang cannot eat the session; the exit status is 1 if any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the project's modules, installed or not (a bare GPU machine)
MODEL=${MODEL:-vit-base-patch16}
BATCH=${BATCH:-256}  # per GPU: the paper's 2048 over 8 V100s
PYTHON=${PYTHON:-$(command -v python || command -v python3)}  # some GPU images have only python3
status=0

run() {  # run LIMIT_SECONDS command...: print it, time-limit it, remember a failure
  local limit=$1
  shift
  echo
  echo "=== $* (limit ${limit}s)"
  local start=$SECONDS
  timeout "$limit" "$@"
  local code=$?
  echo "--- exit $code after $((SECONDS - start))s"
  [ "$code" -eq 0 ] || status=1
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv
"$PYTHON" - <<'PY'
import importlib.util, torch, transformers
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}, "
      f"{torch.cuda.get_device_name()}, bf16 {torch.cuda.is_bf16_supported()}, "
      f"datasets {'present' if importlib.util.find_spec('datasets') else 'absent'}")
PY

# GPU tests: every test whose name says cuda or gpu (they skip themselves without a GPU). Modules that cannot be
# imported here are reported and skipped instead of stopping the run.
run 90 "$PYTHON" -m pytest tests -q -rs -k "cuda or gpu" --continue-on-collection-errors -p no:cacheprovider

BENCH=("$PYTHON" benchmarks/benchmark_throughput.py --model "$MODEL" --batch_size "$BATCH" --precision bfloat16)
run 120 "${BENCH[@]}" --num_masks 5 --peer_precision bfloat16 --warmup 5 --rounds 8 --steps_per_round 3
run 90 "${BENCH[@]}" --num_masks 1 --peer_precision bfloat16 --warmup 5 --rounds 8 --steps_per_round 3
# torch.compile last: the slowest step, and the numbers above do not depend on it
run 150 "${BENCH[@]}" --num_masks 5 --peer_precision none --compile --warmup 3 --rounds 5 --steps_per_round 3

# Data pipeline on real JPEGs, when they are here: per CPU worker with the colour in
# the worker and with only decode + crop + flip (+ colour parameters), the colour of a batch of 256 on the GPU, and
# DataLoader throughput with the colour on the GPU (--color_on_device)
DATA=${EXTREMA_IMAGENET_SAMPLE_DIR:-../shared/data/imagenet-sample}
if [ -d "$DATA" ]; then
  run 90 "$PYTHON" benchmarks/benchmark_throughput.py --mode data --data_dir "$DATA" --num_images 500 --workers 1 4 8 12 \
    --color_on_device
else
  echo; echo "=== data pipeline skipped: no $DATA (set EXTREMA_IMAGENET_SAMPLE_DIR)"
fi

echo
[ "$status" -eq 0 ] && echo "gpu_check: all steps passed" || echo "gpu_check: some steps FAILED (see '--- exit')"
exit "$status"
