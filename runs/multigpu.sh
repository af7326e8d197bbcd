#!/usr/bin/env bash
# cDPO and Step-DPO at full scale with the published settings: the stages of the toy demo under
# torchrun on one node of 8 GPUs. Beside each setting, its section of PAPERS.md (A1: section A1).
#   bash runs/multigpu.sh llama3-8b          Meta-Llama-3-8B        } the three models of cDPO's
#   bash runs/multigpu.sh deepseek-math-7b   deepseek-math-7b-base  } release: cDPO's settings
#   bash runs/multigpu.sh llama3-70b         Meta-Llama-3-70B       } (A1, A4), Step-DPO's (B2, B3)
#   bash runs/multigpu.sh llama3-8b-full     OURS, not published: llama3-8b with full fine-tuning
#                                            instead of LoRA in 03 and 05
# PAPERS.md E lists every setting with its source, and what is ours: the micro-batches and process
# counts, and where the method differs from the releases (both methods start from the base model,
# 02 localizes by rollouts instead of GPT-4o, our few-shot prompt, 05's sequence-level loss).
# Several nodes: replace `--standalone` by `--nnodes=N --node-rank=R --rdzv-endpoint=HOST:PORT`.
# Nothing here ran in this repository's CI: the machine that wrote it has no GPU (BENCHMARKS.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
NPROC=${NPROC:-8}
# 03's global batch is 6 (A4) and must divide by the ranks: 6 processes of 1 example each, 2 GPUs
# idle (SFT_NPROC=3 or 2 also work: gradients then accumulate). Every other batch divides by 8.
SFT_NPROC=${SFT_NPROC:-6}
RECIPE=${1:?usage: bash runs/multigpu.sh llama3-8b|deepseek-math-7b|llama3-70b|llama3-8b-full}
export TOKENIZERS_PARALLELISM=false

TP=""                          # ours: one model copy per GPU, the problems split over them
SFT="--lora-r 8 --lr 3e-4"      # A4, SFT (alpha 16, dropout 0.1, gate/up/down_proj: fixed in 03)
CDPO="--lora-r 16 --lr 4e-5"    # A4, cDPO (alpha 32, dropout 0, q,k,v,o,gate,up,down: fixed in 05)
STEP="--epochs 8 --beta 0.5 --micro-batch-size 4"  # B3, 7B: 4 a GPU x accumulation 4
case $RECIPE in                 # TEMP: A1, GSM8K row
  llama3-8b)        MODEL=meta-llama/Meta-Llama-3-8B;        TEMP=0.5 ;;
  deepseek-math-7b) MODEL=deepseek-ai/deepseek-math-7b-base; TEMP=1.0 ;;
  llama3-70b)       MODEL=meta-llama/Meta-Llama-3-70B;       TEMP=0.85; TP=--tp  # ours: TP sampling
                    STEP="--epochs 4 --beta 0.4 --micro-batch-size 2 --cpu-offload" ;;  # B3, 72B
  llama3-8b-full)   MODEL=meta-llama/Meta-Llama-3-8B;        TEMP=0.5
                    SFT="--lr 5e-6" CDPO="--lr 5e-7" ;;  # ours: full tuning, B3's full-tuning lrs
  *) echo "unknown recipe $RECIPE" >&2; exit 2 ;;
esac
RUN=${RUN:-runs/$RECIPE}
TRAIN="--bf16 --activation-checkpointing"  # bf16: A4 (SFT), B3; checkpointing: B3 (ours in 03, 05)
# Ours throughout: the micro-batch sizes, --batch-size of 01/02/04/07 (auto: what fits in GPU
# memory), --save-every of 05/06, and bf16 sampling. `--` ends torchrun's own options: it would
# otherwise read a stage's --n as its own.
TORCHRUN="$PY -m torch.distributed.run --standalone --nproc_per_node=$NPROC --"
# Before hours of sampling: does every training stage fit this node's GPUs and host memory?
# (the arithmetic of README's memory table; llama3-70b's Step-DPO offloads 1.1 TB to the host)
$PY runs/memory_plan.py --check "$RECIPE"
# Rank 0 alone reads the checkpoint and writes the trained model while the others wait in a
# collective: give them an hour (NCCL's default is 10 minutes).
export DIST_TIMEOUT_MINUTES=${DIST_TIMEOUT_MINUTES:-60}

# 01: 64 samples per GSM8K training problem, few-shot prompt, graded (A0, A1).
$TORCHRUN 01_sample.py \
  --run-dir "$RUN" --model "$MODEL" --data gsm8k --split train --template fewshot \
  --n 64 --temperature "$TEMP" --top-p 0.95 --max-new-tokens 1024 --batch-size auto --bf16 $TP

# 02 (Step-DPO): first wrong step by rollouts, self-rectified; B2's sampling (temperature 0.8,
# top-p 0.95, at most 2 wrong answers a problem); rollouts, threshold and token cap are ours.
$TORCHRUN 02_localize.py \
  --run-dir "$RUN" --model "$MODEL" --per-problem 2 --temperature 0.8 --top-p 0.95 \
  --rollouts 8 --threshold 0.125 --max-new-tokens 1024 --batch-size auto --bf16 $TP

# 03 (cDPO): positive and negative models (A4: cosine, 100 warmup steps, 1 epoch, global batch 6,
# max length 1024, bf16, saved every 200 steps).
$PY -m torch.distributed.run --standalone --nproc_per_node="$SFT_NPROC" -- 03_contrastive_sft.py \
  --run-dir "$RUN" --model "$MODEL" $SFT --schedule cosine --warmup-steps 100 --epochs 1 \
  --batch-size 6 --micro-batch-size 1 --max-length 1024 --save-every 200 $TRAIN

# 04 (cDPO): contrastive-estimation weight of every rejected token (A2: CE beta 1, bf16).
$TORCHRUN 04_score_tokens.py \
  --run-dir "$RUN" --ce-beta 1 --batch-size 8 --bf16 $TP

# 05: cDPO and the plain-DPO baseline (A4: linear, warmup ratio 0.1, 3 epochs, global batch 8,
# weight decay 0.01, beta 0.1, max length 1024, shuffle seed 33).
for variant in "" "--uniform"; do
  $TORCHRUN 05_train_cdpo.py \
    --run-dir "$RUN" --model "$MODEL" $variant $CDPO --schedule linear --warmup-ratio 0.1 \
    --epochs 3 --batch-size 8 --micro-batch-size 1 --weight-decay 0.01 --beta 0.1 \
    --max-length 1024 --seed 33 --save-every 100 $TRAIN
done

# 06: Step-DPO, full fine-tuning (B3: lr 5e-7, cosine, warmup ratio 0.1, global batch 128,
# max length 1024, seed 42).
$TORCHRUN 06_train_stepdpo.py \
  --run-dir "$RUN" --model "$MODEL" $STEP --lr 5e-7 --schedule cosine --warmup-ratio 0.1 \
  --batch-size 128 --max-length 1024 --seed 42 --save-every 100 $TRAIN

# 07: greedy, few-shot, on GSM8K test and MATH500, every model side by side (A0, A6).
for data in gsm8k math500; do
  $TORCHRUN 07_eval.py \
    --run-dir "$RUN" --data "$data" --template fewshot --temperature 0 --max-new-tokens 1024 \
    --batch-size auto --bf16 $TP --out "$RUN/07_eval_$data" \
    --model "$MODEL" --label base \
    --model "$RUN/03_contrastive_sft/pos" --label sft \
    --model "$RUN/05_train_dpo/model" --label dpo \
    --model "$RUN/05_train_cdpo/model" --label cdpo \
    --model "$RUN/06_train_stepdpo/model" --label stepdpo
done
