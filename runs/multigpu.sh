#!/usr/bin/env bash
# cDPO and Step-DPO at full scale: the same stages as the toy demo, under torchrun on one 8-GPU node.
#   bash runs/multigpu.sh llama3-8b          Meta-Llama-3-8B, full fine-tuning (FSDP2, bf16)
#   bash runs/multigpu.sh llama3-70b-lora    Meta-Llama-3-70B, LoRA (the cDPO authors' setting)
#   bash runs/multigpu.sh llama3-70b-full    Meta-Llama-3-70B, full fine-tuning with CPU offload
#   bash runs/multigpu.sh deepseek-math-7b   deepseek-math-7b-base, full fine-tuning
# Per-GPU memory of each recipe: README "Multi-GPU". Several nodes: replace `--standalone` by
# `--nnodes=N --node-rank=R --rdzv-endpoint=HOST:PORT` (same commands on every node).
# Sampling temperatures per model are the cDPO release's for GSM8K (PAPERS.md A1). Nothing here ran
# in this repository's CI: the machine that wrote it has no GPU (BENCHMARKS.md says what was measured).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
NPROC=${NPROC:-8}
RECIPE=${1:?usage: bash runs/multigpu.sh llama3-8b|llama3-70b-lora|llama3-70b-full|deepseek-math-7b}
export TOKENIZERS_PARALLELISM=false

TP=""            # sampling: a full model copy per GPU, problems split across GPUs
TRAIN="--bf16 --activation-checkpointing"
SFT_LR=1e-5 DPO_LR=5e-7 STEP_LR=5e-7   # full fine-tuning learning rates
case $RECIPE in
  llama3-8b)        MODEL=meta-llama/Meta-Llama-3-8B;  TEMP=0.5 ;;
  deepseek-math-7b) MODEL=deepseek-ai/deepseek-math-7b-base; TEMP=1.0 ;;
  llama3-70b-lora)  MODEL=meta-llama/Meta-Llama-3-70B; TEMP=0.85; TP=--tp
                    TRAIN="$TRAIN --lora-r 16"; SFT_LR=3e-4 DPO_LR=4e-5 STEP_LR=1e-5 ;;
  llama3-70b-full)  MODEL=meta-llama/Meta-Llama-3-70B; TEMP=0.85; TP=--tp
                    TRAIN="$TRAIN --cpu-offload" ;;
  *) echo "unknown recipe $RECIPE" >&2; exit 2 ;;
esac
RUN=${RUN:-runs/$RECIPE}
# `--` ends torchrun's own options: it would otherwise read a stage's --n as one of its own.
TORCHRUN="$PY -m torch.distributed.run --standalone --nproc_per_node=$NPROC --"

# 01: 64 samples per GSM8K training problem (few-shot prompt, top-p 0.95), graded.
$TORCHRUN 01_sample.py \
  --run-dir "$RUN" --model "$MODEL" --data gsm8k --split train --template fewshot \
  --n 64 --temperature "$TEMP" --top-p 0.95 --max-new-tokens 512 --batch-size 256 --bf16 $TP

# 02 (Step-DPO): first wrong step by rollouts from the same model, self-rectified.
$TORCHRUN 02_localize.py \
  --run-dir "$RUN" --model "$MODEL" --per-problem 2 --rollouts 8 --temperature 0.8 \
  --top-p 0.95 --max-new-tokens 512 --batch-size 256 --bf16 $TP

# 03 (cDPO): positive and negative models from the base model.
$TORCHRUN 03_contrastive_sft.py \
  --run-dir "$RUN" --model "$MODEL" --epochs 1 --lr "$SFT_LR" --batch-size 64 \
  --micro-batch-size 4 --max-length 1024 --save-every 200 $TRAIN

# 04 (cDPO): contrastive-estimation weight of every rejected token.
$TORCHRUN 04_score_tokens.py \
  --run-dir "$RUN" --batch-size 8 --bf16 $TP

# 05: cDPO and the plain-DPO baseline (LoRA recipe: the released lr 4e-5, beta 0.1, 3 epochs).
for variant in "" "--uniform"; do
  $TORCHRUN 05_train_cdpo.py \
    --run-dir "$RUN" --model "$MODEL" $variant --epochs 3 --lr "$DPO_LR" --beta 0.1 \
    --batch-size 64 --micro-batch-size 2 --max-length 1024 --save-every 100 $TRAIN
done

# 06: Step-DPO (the released 7B setting: beta 0.5, global batch 128, cosine).
$TORCHRUN 06_train_stepdpo.py \
  --run-dir "$RUN" --model "$MODEL" --epochs 4 --lr "$STEP_LR" --beta 0.5 --batch-size 128 \
  --micro-batch-size 4 --schedule cosine --max-length 1024 --save-every 100 $TRAIN

# 07: greedy on GSM8K test and MATH500, every model side by side.
for data in gsm8k math500; do
  $TORCHRUN 07_eval.py \
    --run-dir "$RUN" --data "$data" --template fewshot --max-new-tokens 1024 --bf16 $TP \
    --out "$RUN/07_eval_$data" \
    --model "$MODEL" --label base \
    --model "$RUN/05_train_dpo/model" --label dpo \
    --model "$RUN/05_train_cdpo/model" --label cdpo \
    --model "$RUN/06_train_stepdpo/model" --label stepdpo
done
