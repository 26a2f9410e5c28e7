#!/usr/bin/env bash
# The quality benchmark and both ablation studies (fixes, masking) of the tiny CIFAR-10 recipe at a longer budget
# than a CPU allows, on one GPU. A tiny run leaves the GPU mostly idle and the CPU workers decide its speed, so the
# runs train side by side: 4, then 5 processes, each with its own DataLoader workers (16 CPU cores in all). Its speed
# on one H200: docs/masking-study.md.
#
#   DATA=path/to/cifar10 EPOCHS=8 OUT=bench/gpu bash benchmarks/gpu_quality.sh
#   DATA=path/to/cifar10 EPOCHS=0.02 TIME_LIMIT=1200 bash benchmarks/gpu_quality.sh   # a dry run of the script, on a CPU
#
# Wave 1: the benchmark's three ExtreMA methods (variants of `ablate.py --study fixes`) and the masking study's
# "0.75 x 4"; wave 2: `benchmark_quality.py` (ViTMAE and the scoring of every method, reusing wave 1's runs) and the
# rest of the masking study ("0.75 x 2" is the recipe again: its distance to wave 1's recipe run is the run-to-run
# noise). The two waves get TIME_LIMIT seconds together (wave 1 at most 45% of it); a run still going then is stopped.
# A variant that finished is in its study's results.json either way, and every run's log (with its kNN after each
# epoch) is in $OUT/logs; the script ends by printing every run's kNN curve.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the project's modules, installed or not (a bare GPU machine)
DATA=${DATA:?set DATA to CIFAR-10 as Parquet shards}
EPOCHS=${EPOCHS:-8}
WARMUP=${WARMUP:-1}
OUT=${OUT:-bench/gpu}
TIME_LIMIT=${TIME_LIMIT:-1200}
SEED=${SEED:-1}
PYTHON=${PYTHON:-$(command -v python || command -v python3)}  # some GPU images have only python3
export TQDM_DISABLE=1  # logs without progress bars
mkdir -p "$OUT/logs"
budget=(--train_dir "$DATA" --num_train_epochs "$EPOCHS" --warmup_epochs "$WARMUP" --seed "$SEED")
if "$PYTHON" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  budget+=(--color_on_device)  # the colour jitter of a batch on the GPU, not in the CPU workers
fi

start() {  # start LOG COMMAND...: in the background, stopped at $deadline
  local log=$1
  shift
  timeout $((deadline > SECONDS ? deadline - SECONDS : 1)) "$@" >"$log" 2>&1 &
}

variant() {  # variant STUDY NAME WORKERS: one run of an ablation study
  start "$OUT/logs/$1-${2// /_}.log" "$PYTHON" benchmarks/ablate.py --study "$1" --variants "$2" \
    --output_dir "$OUT/$1" --num_workers "$3" "${budget[@]}"
}

begin=$SECONDS
deadline=$((begin + TIME_LIMIT * 45 / 100))
variant fixes "recipe (BYOL + all fixes)" 3
variant fixes "official BYOL (no fix)" 3
variant fixes "InfoNCE (official heads)" 3
variant masking "0.75 x 4" 3
wait
echo "wave 1: $((SECONDS - begin)) s"

deadline=$((begin + TIME_LIMIT))
start "$OUT/logs/quality.log" "$PYTHON" benchmarks/benchmark_quality.py --extrema_study_dir "$OUT/fixes" \
  --output_dir "$OUT/quality" --num_workers 2 --train_dir "$DATA" --num_train_epochs "$EPOCHS" \
  --warmup_epochs "$WARMUP" --seed "$SEED"
for name in "0.5 x 1" "0.75 x 1" "0.9 x 1" "0.75 x 2"; do variant masking "$name" 2; done
wait
echo "waves 1 and 2: $((SECONDS - begin)) s"

for log in "$OUT"/logs/*.log; do  # every run's kNN curve: "step S: kNN top-1 X%" lines
  echo "$(basename "$log" .log): $(grep -o -E "(step [0-9]+|after [0-9.]+ epochs): kNN top-1 [0-9.]+%" "$log" \
    | sed "s/: kNN top-1 /=/" | tr "\n" " ")"
done
