#!/usr/bin/env bash
# The real-model study (`make study`): cDPO and Step-DPO on SmolLM2-135M-Instruct, sized to tell
# methods apart rather than to prove the stages run (that is `make real`): one- and two-step word
# problems (runs/real_problems.py) in disjoint train / dev / test splits, every stage at the
# papers' shape on a small scale, a learning-rate sweep on dev, seeds of the training stages, and
# paired statistics by 09 into the README's study section.
#   bash runs/study.sh                  (what `make study` runs; SEEDS=1 for one seed)
# Killed at any moment and run again, it continues: the sampling stages resume record by record,
# the training stages from their last checkpoint (--resume), a finished stage is skipped.
# Every setting is chosen on the dev split (the sweep below); the test split sees each final model
# once.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
RUN=${RUN:-runs/study}
MODEL=$RUN/model
SEEDS=${SEEDS:-3}
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 TOKENIZERS_PARALLELISM=false
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # one thread per process is fastest on a small CPU
NPROC=${NPROC:-2}
SPLIT="$PY -m torch.distributed.run --standalone --nproc_per_node=$NPROC --"
[ "$NPROC" = 1 ] && SPLIT=$PY
ALONE="env OMP_NUM_THREADS=${ALONE_THREADS:-2} $PY"  # a stage that has the machine to itself
KINDS=${KINDS:-add,sub,mul,add_sub,sub_sub,mul_add}  # one- and two-step, in turn
TRAIN_N=${TRAIN_N:-160}  # training problems; 01 samples N answers each
N=${N:-8}                # the cDPO recipe samples 64; 8 gives most problems right and wrong ones
DEV_N=${DEV_N:-200}      # dev problems: every choice of setting is made on these
TEST_N=${TEST_N:-500}    # test problems: +-4.4 points at 50% (95% Wilson)
REAL_N=${REAL_N:-32}     # problems of each real subset (GSM8K, MATH500): a look at transfer
ROLLOUTS=${ROLLOUTS:-8}  # 02's rollouts per prefix (its threshold: 1 in 8)
CRITICAL_N=${CRITICAL_N:-24}  # wrong answers 08 rolls out from every position of (8 rollouts)
EPOCHS=${EPOCHS:-2}      # every training stage: whole passes over its data (3 in the recipes)
LR_SFT=${LR_SFT:-2e-4}                                   # 03's default
LR_DPO=${LR_DPO:-3e-5} LR_DPO_HI=${LR_DPO_HI:-1e-4}      # 05: its default and ~3x (dev sweep)
LR_STEP=${LR_STEP:-1e-5} LR_STEP_HI=${LR_STEP_HI:-3e-5}  # 06: the same
BETA_DPO=0.1 BETA_STEP=0.5                               # the papers' betas
MAXTOK=160
# the sampling stages decode up to 128 rows side by side a process: wider is faster at one thread
EVAL="--template chat --max-new-tokens $MAXTOK --batch-size 128"
TRAIN="--lora-r 8 --epochs $EPOCHS --batch-size 8 --micro-batch-size 8 --save-every 5 --resume"
GSM8K=data/gsm8k_test_64.jsonl MATH500=data/math500_test_32.jsonl
mkdir -p "$RUN"
t0=$SECONDS
stamp() { echo "== $1: $((SECONDS - t0)) s since start" | tee -a "$RUN/times.log" >&2; }
done_model() { [ -f "$1/model.safetensors" ]; }  # a training stage that finished

# The model dir and the problems (train, dev and test disjoint; the same bytes on every run).
$PY runs/build_smollm2.py --out "$MODEL"
P=$RUN/problems
$PY runs/real_problems.py --out $P/train.jsonl --n "$TRAIN_N" --seed 10 --kinds "$KINDS"
$PY runs/real_problems.py --out $P/dev.jsonl --n "$DEV_N" --seed 11 --kinds "$KINDS" \
  --exclude $P/train.jsonl
$PY runs/real_problems.py --out $P/test.jsonl --n "$TEST_N" --seed 12 --kinds "$KINDS" \
  --exclude $P/train.jsonl --exclude $P/dev.jsonl
stamp build

# 01: N answers at temperature 0.7 for each training problem, graded.
$SPLIT 01_sample.py --run-dir "$RUN" --model "$MODEL" --data $P/train.jsonl \
  --template chat --n "$N" --temperature 0.7 --top-p 0.95 --max-new-tokens $MAXTOK --batch-size 128
stamp 01

# 02: the first wrong step of one wrong answer per problem (ROLLOUTS rollouts a prefix) and
# self-generated replacement steps; then how they read against the problems' known values.
$SPLIT 02_localize.py --run-dir "$RUN" --model "$MODEL" --limit 0 --per-problem 1 \
  --rollouts "$ROLLOUTS" --temperature 0.7 --max-new-tokens 128 --batch-size 128
$PY runs/check_steps.py --run-dir "$RUN"
stamp 02

eval_real() {  # eval_real DIR <--model M --label L ...>: models on the GSM8K and MATH500 subsets
  local dir=$1; shift  # (both sets in one run: their rows decode side by side)
  $SPLIT 07_eval.py --run-dir "$dir" --template chat --max-new-tokens 256 --batch-size 128 "$@" \
    --data $GSM8K --out "$RUN/07_eval_gsm8k" --data $MATH500 --out "$RUN/07_eval_math500" \
    --limit "$REAL_N"
}

# 07: the base model on test and on dev (the split settings are chosen on), in one run, and on
# the real subsets.
$SPLIT 07_eval.py --run-dir "$RUN" --model "$MODEL" --label base $EVAL \
  --data $P/test.jsonl --out "$RUN/07_eval" --data $P/dev.jsonl --out "$RUN/07_eval_dev"
eval_real "$RUN" --model "$MODEL" --label base
stamp "07 base"

train() {  # train METHOD LR BETA OUT DIR SEED [START]: 05 or 06 into OUT, unless it finished
  local method=$1 lr=$2 beta=$3 out=$4 dir=$5 seed=$6 start=${7:-$MODEL}
  done_model "$out/model" && return 0
  mkdir -p "$out"
  local stage=05_train_cdpo.py flags=()
  [ "$method" = dpo ] && flags=(--uniform)
  [ "$method" = stepdpo ] && stage=06_train_stepdpo.py
  $PY $stage "${flags[@]}" --run-dir "$dir" --out "$out" --model "$start" --seed "$seed" \
    --lr "$lr" --beta "$beta" $TRAIN > "$out.log" 2>&1 || { tail -5 "$out.log"; return 1; }
}
pair() {  # pair <7 args of train> <7 args of train>: two trainings side by side, a core each
  train "${@:1:7}" & local first=$!
  train "${@:8:7}" || return 1
  wait $first
}
lr_of() { sed -E 's/.*-lr(.+)-b[^-]*$/\1/' "$SW/best-$1.txt"; }  # the dev sweep's choice
SW=$RUN/sweep
# the label of a method's best dev accuracy among the sweep's results: BEST <07_eval_dev> <method>
BEST='import json, sys, pathlib; d = {p.parent.name: json.loads(p.read_text())["accuracy"] for p in
  sorted(pathlib.Path(sys.argv[1]).glob(f"sweep-{sys.argv[2]}-lr*/results.json"))}; print(max(d, key=d.get))'
BEST=${BEST//$'\n'/}
label() { echo "sweep-$1-lr$2-b$3"; }  # what 09's sweep table reads

for seed in $(seq 0 $((SEEDS - 1))); do
  dir=$RUN
  if [ "$seed" != 0 ]; then  # a sibling run dir sharing the seed-independent stages (09 --seeds)
    dir=$RUN-s$seed
    mkdir -p "$dir/07_eval"
    for stage in model problems 01_sample 02_localize; do
      ln -sfn "$(realpath -m "$RUN/$stage")" "$dir/$stage"
    done
    ln -sfn "$(realpath -m "$RUN/07_eval/base")" "$dir/07_eval/base"
  fi
  # 03: cDPO's data selection (seeded) and the positive and negative models (LoRA r 8)
  done_model "$dir/03_contrastive_sft/neg" || $ALONE 03_contrastive_sft.py --run-dir "$dir" \
    --model "$MODEL" --seed "$seed" --lr "$LR_SFT" $TRAIN
  # 04: the weight of every rejected token (contrastive estimation)
  [ -f "$dir/04_score_tokens/pairs.jsonl" ] || $ALONE 04_score_tokens.py --run-dir "$dir" \
    --batch-size 8
  stamp "seed $seed: 03 04"

  if [ "$seed" = 0 ]; then
    # The dev sweep: each preference method from the base model at its default learning rate
    # and at ~3x it, scored on dev only. Each method's best on dev is its setting for every seed,
    # and that seed-0 model is the one the test split sees.
    for lr in "$LR_DPO" "$LR_DPO_HI"; do
      pair dpo "$lr" $BETA_DPO "$SW/$(label dpo "$lr" $BETA_DPO)" "$dir" 0 "$MODEL" \
           cdpo "$lr" $BETA_DPO "$SW/$(label cdpo "$lr" $BETA_DPO)" "$dir" 0 "$MODEL"
    done
    pair stepdpo "$LR_STEP" $BETA_STEP "$SW/$(label stepdpo "$LR_STEP" $BETA_STEP)" "$dir" 0 \
           "$MODEL" \
         stepdpo "$LR_STEP_HI" $BETA_STEP "$SW/$(label stepdpo "$LR_STEP_HI" $BETA_STEP)" "$dir" 0 \
           "$MODEL"
    stamp "sweep: trained"
    models=()
    for m in "$SW"/sweep-*/model; do models+=(--model "$m" --label "$(basename "$(dirname "$m")")"); done
    $SPLIT 07_eval.py --run-dir "$RUN" --data $P/dev.jsonl --out "$SW/07_eval_dev" $EVAL "${models[@]}"
    for method in dpo cdpo stepdpo; do  # ties: the first by name
      $PY -c "$BEST" "$SW/07_eval_dev" $method > "$SW/best-$method.txt"
    done
    ln -sfn "sweep/$(cat "$SW/best-dpo.txt")" "$dir/05_train_dpo"
    ln -sfn "sweep/$(cat "$SW/best-cdpo.txt")" "$dir/05_train_cdpo"
    ln -sfn "sweep/$(cat "$SW/best-stepdpo.txt")" "$dir/06_train_stepdpo"
    # Step-DPO from the SFT model (03's positive model: where its release starts), 02's pairs
    OMP_NUM_THREADS=2 train stepdpo "$(lr_of stepdpo)" $BETA_STEP "$dir/06_train_stepdpo_sft" \
      "$dir" 0 "$dir/03_contrastive_sft/pos"
    stamp "sweep: dev, chosen"
  else
    pair dpo "$(lr_of dpo)" $BETA_DPO "$dir/05_train_dpo" "$dir" "$seed" "$MODEL" \
         cdpo "$(lr_of cdpo)" $BETA_DPO "$dir/05_train_cdpo" "$dir" "$seed" "$MODEL"
    pair stepdpo "$(lr_of stepdpo)" $BETA_STEP "$dir/06_train_stepdpo" "$dir" "$seed" "$MODEL" \
         stepdpo "$(lr_of stepdpo)" $BETA_STEP "$dir/06_train_stepdpo_sft" "$dir" "$seed" \
         "$dir/03_contrastive_sft/pos"
    stamp "seed $seed: 05 06"
  fi
  # 07: every trained model on the test split, once; seed 0's also on the real subsets
  trained=(--model "$dir/03_contrastive_sft/pos" --label sft
           --model "$dir/05_train_dpo/model" --label dpo
           --model "$dir/05_train_cdpo/model" --label cdpo
           --model "$dir/06_train_stepdpo/model" --label stepdpo
           --model "$dir/06_train_stepdpo_sft/model" --label stepdpo-sft)
  $SPLIT 07_eval.py --run-dir "$dir" --data $P/test.jsonl $EVAL "${trained[@]}"
  if [ "$seed" = 0 ]; then  # transfer: expected near zero at 135M, as the base model's
    eval_real "$dir" "${trained[@]}"
  fi
  stamp "seed $seed: 07"
done

# 08: the critical-token study on the base model's wrong answers (04's scored pairs of seed 0):
# rollouts from every position of every answer, the costliest stage here (CRITICAL_N=0 skips it).
if [ "$CRITICAL_N" != 0 ]; then
  $SPLIT 08_critical_tokens.py --run-dir "$RUN" --model "$MODEL" --limit "$CRITICAL_N" \
    --rollouts 8 --max-new-tokens 96 --batch-size 128
  stamp 08
fi
$PY bench/screenshot_html.py "$RUN/04_score_tokens/critical_tokens.html" \
  --out "$RUN/critical_tokens.png" || echo "no headless browser here: the heatmap stays HTML" >&2

# The grader against a second one written separately, then 09's report into the README.
$PY runs/audit_grader.py --run-dir "$RUN"
$PY 09_report.py --run-dir "$RUN" --seeds "$SEEDS" --readme README.md --readme-block study-results
stamp done
