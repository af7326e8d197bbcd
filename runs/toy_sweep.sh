#!/usr/bin/env bash
# Is plain DPO below the base model only because its learning rate or beta is wrong for it?
# DPO and cDPO on the same grid, same pairs (04), same seed; one 07_eval table at the end (~12 min).
#   bash runs/toy_sweep.sh            (after runs/toy_cpu.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
RUN=${RUN:-runs/toy}
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 TOKENIZERS_PARALLELISM=false
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

for cfg in "1e-5 0.1" "3e-5 0.1" "1e-4 0.1" "3e-5 0.5" "3e-5 0.02"; do
  set -- $cfg
  for method in dpo cdpo; do
    name=sweep-$method-lr$1-b$2
    if [ ! -f "$RUN/sweep/$name/model/model.safetensors" ]; then
      $PY 05_train_cdpo.py \
        --run-dir "$RUN" \
        --out "$RUN/sweep/$name" \
        --lr "$1" \
        --beta "$2" \
        $([ $method = dpo ] && echo --uniform)
    fi
    if [ ! -f "$RUN/07_eval/$name/results.json" ]; then
      $PY 07_eval.py \
        --run-dir "$RUN" \
        --model "$RUN/sweep/$name/model" \
        --label "$name"
    fi
  done
done

$PY 07_eval.py \
  --run-dir "$RUN" \
  --summary
