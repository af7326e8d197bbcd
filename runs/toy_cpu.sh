#!/usr/bin/env bash
# The toy demo: every stage, 00 -> 09, on the embedded toy world, on a CPU (~9 min on 2 cores;
# measured from scratch on an Intel Xeon: 541 s, or 874 s with SEEDS=3).
#   bash runs/toy_cpu.sh            (what `make demo` runs)
#   SEEDS=3 bash runs/toy_cpu.sh    the training stages again with seeds 1 and 2 (runs/toy-s1, -s2)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
RUN=${RUN:-runs/toy}
SEEDS=${SEEDS:-1}
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 TOKENIZERS_PARALLELISM=false
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # one thread per process is fastest on a small CPU
# Sampling stages split their records over NPROC processes under torchrun (the records are the
# ones a single process writes: every sample has its own seed); training runs in one process.
NPROC=${NPROC:-2}
SPLIT="$PY -m torch.distributed.run --standalone --nproc_per_node=$NPROC --"
[ "$NPROC" = 1 ] && SPLIT=$PY
# A stage that has the machine to itself trains in 2 threads (00: 190 instead of 330 ms a step).
ALONE="env OMP_NUM_THREADS=${ALONE_THREADS:-2} $PY"

# 00: problems, tokenizer and a 0.86M-parameter Llama trained until dev accuracy >= 45% (~3.5 min).
if [ ! -f "$RUN/00_toy/model/model.safetensors" ]; then
  $ALONE 00_toy.py \
    --run-dir "$RUN"
fi

# 01: 8 samples at temperature 1 for each of 800 training problems, graded (~1 min).
$SPLIT 01_sample.py \
  --run-dir "$RUN" \
  --limit 800 \
  --n 8

# 02: Step-DPO pairs: first wrong step by binary-search rollouts, self-rectified (~3 min).
$SPLIT 02_localize.py \
  --run-dir "$RUN"

# 07: the base model on the toy test split (~10 s).
$PY 07_eval.py \
  --run-dir "$RUN" \
  --model "$RUN/00_toy/model" \
  --label base

for seed in $(seq 0 $((SEEDS - 1))); do
  dir=$RUN
  if [ "$seed" != 0 ]; then  # a sibling run dir that shares the seed-independent stages
    dir=$RUN-s$seed
    mkdir -p "$dir"
    for stage in 00_toy 01_sample 02_localize; do
      ln -sfn "$(realpath -m "$RUN/$stage")" "$dir/$stage"
    done
    mkdir -p "$dir/07_eval" && ln -sfn "$(realpath -m "$RUN/07_eval/base")" "$dir/07_eval/base"
  fi

  # trained afresh below: what was scored or evaluated with earlier models no longer applies
  rm -rf "$dir"/04_score_tokens "$dir"/07_eval/{sft,dpo,cdpo,stepdpo}

  # 03: cDPO data selection, then the positive and negative SFT models (~2 min).
  $ALONE 03_contrastive_sft.py \
    --run-dir "$dir" \
    --seed "$seed"

  # 04: contrastive-estimation weight of every rejected token + critical_tokens.html (~20 s).
  $PY 04_score_tokens.py \
    --run-dir "$dir"

  # 05: plain DPO (the baseline, on the second core; its log in 05_train_dpo.log) and cDPO,
  # both from the base model (~1 min each).
  $PY 05_train_cdpo.py \
    --run-dir "$dir" \
    --uniform \
    --seed "$seed" > "$dir/05_train_dpo.log" 2>&1 &
  dpo=$!
  $PY 05_train_cdpo.py \
    --run-dir "$dir" \
    --seed "$seed"

  # 06: Step-DPO from the base model on the pairs of 02 (~1 min).
  $PY 06_train_stepdpo.py \
    --run-dir "$dir" \
    --seed "$seed"
  wait "$dpo" || { tail -5 "$dir/05_train_dpo.log"; exit 1; }
  tail -1 "$dir/05_train_dpo.log"

  # 07: every trained model on the same held-out toy test split (~10 s each).
  $PY 07_eval.py \
    --run-dir "$dir" \
    --model "$dir/03_contrastive_sft/pos" --label sft \
    --model "$dir/05_train_dpo/model" --label dpo \
    --model "$dir/05_train_cdpo/model" --label cdpo \
    --model "$dir/06_train_stepdpo/model" --label stepdpo
done

# 08: the critical-token study on the base model, for the rejected answers scored by 04 (~2 min).
rm -rf "$RUN/08_critical_tokens"
$SPLIT 08_critical_tokens.py \
  --run-dir "$RUN"

# 09: results.md and the training curves, from the files above.
$PY 09_report.py \
  --run-dir "$RUN" \
  --seeds "$SEEDS"
