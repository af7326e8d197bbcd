"""Step-DPO: DPO on a single reasoning step after the correct earlier ones (PAPERS.md B1, B3).

The loss (`step_dpo_loss`), with x the question and s_1..s_{k-1} the correct steps before the
first wrong one:

    L = -log sigmoid( beta * log[pi_theta(s_win | x, s_<k) / pi_ref(s_win | x, s_<k)]
                    - beta * log[pi_theta(s_lose | x, s_<k) / pi_ref(s_lose | x, s_<k)] )

log pi(s | context) = sum of the log-probs of the step's tokens. Context ids = encode_prompt(prompt)
+ the prefix's ids; prefix and step are cut from the tokenization of prefix + step
(common.encode_steps), so the step's tokens are the ones the model wrote after that context
(tokenized apart, a byte-level BPE would write a seam such as "\n\n" differently). A step is not an
ending, so no EOS. The reference is the initial policy, scored once before the first update. The
training run around the loss is preference.train_preference, the one 05 uses, so everything it
guarantees holds here too: one model in memory, ln 2 at step 0, gradient accumulation = big
batch, the NaN guard, torchrun/FSDP2, --resume.

Reads   <run-dir>/02_localize/pairs.jsonl  (id, prompt, prefix, chosen, rejected, step_idx, ...)
Writes  <run-dir>/06_train_stepdpo/model/ (HF safetensors), metrics.jsonl (as 05), checkpoints/

Toy world (2 CPU cores, under a minute for the demo's ~850 step pairs):
    python 06_train_stepdpo.py --run-dir runs/toy
Many GPUs (the published 7B recipe):
    torchrun --nproc_per_node 8 06_train_stepdpo.py --run-dir runs/qwen2-7b \\
        --model <your Qwen2-7B-SFT> --beta 0.5 --lr 5e-7 --epochs 8 --batch-size 128 \\
        --micro-batch-size 4 --schedule cosine --warmup-ratio 0.1 --max-length 1024 --bf16 \\
        --activation-checkpointing --seed 42

Published settings (PAPERS.md B3): full fine-tuning; AdamW lr 5e-7, cosine, warmup ratio 0.1;
global batch 128 (7B: 8 GPUs x 4 x accumulation 4; 72B: 8 x 2 x 8); 7B 8 epochs, beta 0.5 (the
released script; the paper's text says 0.4); 72B 4 epochs, beta 0.4 (paper: 0.5), with ZeRO-3
CPU offload (here: --cpu-offload); bf16, gradient checkpointing, max length 1024, seed 42; the
initial model is an SFT model (runs/multigpu.sh starts from the base model, as 05 does: PAPERS.md
E). The released code keeps the last 512 prompt tokens of over-long pairs; here they are dropped
and counted. With --lora-r, LoRA goes on every projection, as in 05.
Defaults (the toy run): full tuning; beta 0.5 (the released 7B value, B3); cosine with warmup
ratio 0.1 (B3); 3 epochs, batch 16; lr 1e-5, the middle of the range where the toy dev accuracy
is flat (README, Results, "Learning rate and beta": 3e-6 to 3e-5 within 3.5 points of each other,
1e-4 over 20 points lower).
"""
import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from common import (add_run_args, dist_init, dist_teardown, encode_prompt, encode_steps, fail,
                    load_tokenizer, print0, read_jsonl)
from preference import keep_short, train_preference
from training import add_training_args, check_batch, fit_batch, save_model, training_policy

parser = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
add_run_args(parser, model="initial policy = reference (default: <run-dir>/00_toy/model)",
             data="step pairs (default: <run-dir>/02_localize/pairs.jsonl)",
             out="06_train_stepdpo", limit="pairs", seed="data order")
g = parser.add_argument_group("loss")
g.add_argument("--beta", type=float, default=0.5,
               help="DPO temperature (%(default)s; released 7B 0.5, 72B 0.4)")
add_training_args(parser, lr=1e-5, epochs=3, batch_size=16, micro_batch_size=16,
                  warmup_ratio=0.1, schedule="cosine", weight_decay=0.0, max_length=1024)

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def step_dpo_loss(policy_logps, ref_logps, step_mask, beta: float):
    """Sigmoid DPO on summed step log-probs.

    policy_logps, ref_logps: (2B, T-1) float32 per-token log-probs in the padded layout (rows
        0..B-1 the winning steps, B..2B-1 the losing ones, each after its shared context; with
        --layout packed the context is computed once and the log-probs come back in these
        rows and columns).
    step_mask: (2B, T-1) 1 on the columns that score a step token, 0 on context and padding.
    Returns per-pair losses (B,) and the rewards beta * log(pi_theta / pi_ref) of s_win and
    s_lose (B,), detached.
    """
    rewards = beta * ((policy_logps - ref_logps) * step_mask).sum(-1)  # (2B,)
    B = rewards.shape[0] // 2
    win, lose = rewards[:B], rewards[B:]  # (B,), (B,)
    return -F.logsigmoid(win - lose), win.detach(), lose.detach()


def encode_step_pair(tok, rec: dict) -> dict | None:
    """Context = prompt ids + prefix ids; each step's ids cut from prefix + step tokenized
    together; no EOS. None when the context would tokenize differently before the two steps (a
    token straddling the seam): they would no longer share one context."""
    prefix_c, chosen = encode_steps(tok, [rec["prefix"], rec["chosen"]])
    prefix_r, rejected = encode_steps(tok, [rec["prefix"], rec["rejected"]])
    if prefix_c != prefix_r:
        return None
    return {"id": rec["id"], "prompt_ids": encode_prompt(tok, rec["prompt"]) + prefix_c,
            "chosen_ids": chosen, "rejected_ids": rejected}


def load_step_pairs(path: Path, tok, args) -> list[dict]:
    """02's step pairs, tokenized (encode_step_pair) and checked: no empty step, no special
    token in a step; the first --limit, those within --max-length."""
    need = {"id": str, "prompt": str, "prefix": str, "chosen": str, "rejected": str}
    pairs, seams = [], 0
    for rec in read_jsonl(path, required=need)[:args.limit or None]:
        pair = encode_step_pair(tok, rec)
        if pair is None:
            seams += 1
            continue
        if not pair["prompt_ids"]:
            fail(f"{path}: pair '{rec['id']}': empty prompt and prefix (a step's first token is "
                 "scored from the context's last one)")
        for side in ("chosen", "rejected"):
            if not pair[f"{side}_ids"]:
                fail(f"{path}: pair '{rec['id']}': empty {side} step")
            if set(pair[f"{side}_ids"]) & set(tok.all_special_ids):  # a literal '<|eot_id|>'
                fail(f"{path}: pair '{rec['id']}': {side} step encodes to a special token "
                     "(EOS or another end of turn); a step is not an ending")
        pairs.append(pair)
    if seams:
        print0(f"dropped {seams} pairs whose context tokenizes differently before the two steps")
    return keep_short(pairs, args.max_length, path)


def main(args):
    _, world, device = dist_init()
    check_batch(args)
    run = Path(args.run_dir)
    out = Path(args.out or run / "06_train_stepdpo")
    model_path = args.model or str(run / "00_toy" / "model")
    data = Path(args.data or run / "02_localize" / "pairs.jsonl")
    config = {**vars(args), "model": model_path, "data": str(data), "out": str(out),
              "world": world, "method": "stepdpo"}

    # load
    tok = load_tokenizer(model_path, args.trust_remote_code)
    pairs = load_step_pairs(data, tok, args)
    config["batch_size"] = B = fit_batch(args, len(pairs), "pairs")
    print0("config " + json.dumps(config))

    # train: the policy (FSDP2 over the ranks, optional LoRA) is also the reference
    model, opt, amp = training_policy(args, model_path, device, LORA_TARGETS, lora_dropout=0.0)
    done = train_preference(args, model, opt, amp, tok, pairs, B, out,
                            loss_fn=lambda pol, ref, b: step_dpo_loss(pol, ref, b["loss_mask"],
                                                                      args.beta))

    # write: an ordinary HF model (LoRA merged), the resolved config beside it
    if done:  # None: --stop-after, the rest waits for --resume
        save_model(model, tok, out / "model", extra=config,
                   dtype=torch.bfloat16 if args.bf16 else torch.float32)
        print0(f"saved {out / 'model'} after {done['steps']} steps")
    dist_teardown()


if __name__ == "__main__":
    main(parser.parse_args())
