#!/usr/bin/env bash
# How much do the toy results depend on the learning rate and beta? DPO, cDPO and Step-DPO on one
# grid, the same pairs (02, 04) and seed, two trainings at a time; each model is scored on the dev
# split (to choose by) and on the test split (to report). 09_report.py turns it into a table.
# ~8 min on 2 cores (measured: 490 s), after runs/toy_cpu.sh:
#   bash runs/toy_sweep.sh && .venv/bin/python 09_report.py --run-dir runs/toy
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
RUN=${RUN:-runs/toy}
JOBS=${JOBS:-2}
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 TOKENIZERS_PARALLELISM=false
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

one() {  # method lr beta: train (unless done), then score on dev and test
  local method=$1 lr=$2 beta=$3 name=sweep-$1-lr$2-b$3
  local dir=$RUN/sweep/$name
  if [ ! -f "$dir/model/model.safetensors" ]; then
    case $method in
      dpo)     $PY 05_train_cdpo.py --run-dir "$RUN" --out "$dir" --lr "$lr" --beta "$beta" --uniform ;;
      cdpo)    $PY 05_train_cdpo.py --run-dir "$RUN" --out "$dir" --lr "$lr" --beta "$beta" ;;
      stepdpo) $PY 06_train_stepdpo.py --run-dir "$RUN" --out "$dir" --lr "$lr" --beta "$beta" ;;
    esac > "$dir.log" 2>&1 || { tail -5 "$dir.log"; return 1; }
  fi
  for split in dev test; do
    $PY 07_eval.py --run-dir "$RUN" --model "$dir/model" --label "$name" \
      --data "$RUN/00_toy/$split.jsonl" --out "$RUN/sweep/07_eval_$split" | tail -1
  done
}

mkdir -p "$RUN/sweep"
grid=(
  "dpo 1e-5 0.1" "dpo 3e-5 0.1" "dpo 1e-4 0.1" "dpo 3e-5 0.02" "dpo 3e-5 0.5"
  "cdpo 1e-5 0.1" "cdpo 3e-5 0.1" "cdpo 1e-4 0.1" "cdpo 3e-5 0.02" "cdpo 3e-5 0.5"
  "stepdpo 3e-6 0.5" "stepdpo 1e-5 0.5" "stepdpo 3e-5 0.5" "stepdpo 1e-4 0.5"
  "stepdpo 1e-5 0.1" "stepdpo 1e-5 2.0"
)
for cfg in "${grid[@]}"; do
  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n; done
  one $cfg &
done
wait
