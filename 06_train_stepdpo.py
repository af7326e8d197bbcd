"""Stage 06 (Step-DPO): DPO on one reasoning step after the correct earlier ones (PAPERS.md B1, B3).

The loss (`step_dpo_loss`), with x the question and s_1..s_{k-1} the correct steps before the
first wrong one:

    L = -log sigmoid( beta * log[pi_theta(s_win | x, s_<k) / pi_ref(s_win | x, s_<k)]
                    - beta * log[pi_theta(s_lose | x, s_<k) / pi_ref(s_lose | x, s_<k)] )

log pi(s | context) = sum of the log-probs of the step's tokens. Context ids = encode_prompt(prompt)
+ the prefix's ids; prefix and step are cut from the tokenization of prefix + step
(common.encode_steps), so the step's tokens are the ones the model wrote after that context
(tokenized apart, a byte-level BPE would write a seam such as "\n\n" differently). A step is not an
ending, so no EOS. The reference is the initial policy, scored once before the first update.
main() holds the optimizer step in view, the same step as 05's with this loss: one model in
memory, ln 2 at step 0, gradient accumulation = big batch, the NaN guard, torchrun/FSDP2,
--resume.

Reads   <run-dir>/02_localize/pairs.jsonl  (id, prompt, prefix, chosen, rejected, step_idx, ...)
Writes  <run-dir>/06_train_stepdpo/model/ (HF safetensors), metrics.jsonl (as 05), checkpoints/

Toy world (CPU):
    python 06_train_stepdpo.py --run-dir runs/toy
Many GPUs (the published 7B recipe):
    torchrun --nproc_per_node 8 06_train_stepdpo.py --run-dir runs/qwen2-7b \\
        --model path/to/qwen2-7b-sft --beta 0.5 --lr 5e-7 --epochs 8 --batch-size 128 \\
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
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from common import (all_reduce_sum, autocast_for, dist_init, dist_teardown, encode_prompt,
                    encode_steps, fail, load_for_training, lora_config, print0, read_jsonl,
                    token_logps)
from machinery.checkpoints import load_checkpoint, save_checkpoint, save_model
from machinery.flags import add_run_args, add_training_args
from machinery.models import load_tokenizer
from machinery.optimization import (adamw, batch_layout, check_batch, clip_grad_norm, fit_batch,
                                    global_batch, lr_at, MetricsLog, peak_memory_all_ranks,
                                    peak_memory_gb, stop_if_not_finite, sync_gradients,
                                    warmup_steps)
from machinery.packing import collate_pairs
from machinery.pairs import keep_short, reference_logps

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
    # Init
    rank, world, device = dist_init()
    check_batch(args)
    run = Path(args.run_dir)
    out = Path(args.out or run / "06_train_stepdpo")
    model_path = args.model or str(run / "00_toy" / "model")
    data = Path(args.data or run / "02_localize" / "pairs.jsonl")
    config = {**vars(args), "model": model_path, "data": str(data), "out": str(out),
              "world": world, "method": "stepdpo"}

    # Load: the step pairs, then the policy (FSDP2 over the ranks, optional LoRA), its AdamW
    tok = load_tokenizer(model_path, args.trust_remote_code)
    pairs = load_step_pairs(data, tok, args)
    config["batch_size"] = B = fit_batch(args, len(pairs), "pairs")
    print0("config " + json.dumps(config))
    model = load_for_training(model_path, device, args.bf16, args.cpu_offload,
                              args.activation_checkpointing,
                              lora_config(args.lora_r, LORA_TARGETS, lora_dropout=0.0),
                              args.trust_remote_code)
    opt, amp = adamw(model, args.lr, args.weight_decay), autocast_for(device, args.bf16)
    layout = batch_layout(args, model)  # packed rows, or padded where the model cannot take them

    # the reference: the policy before its first update, scored once without gradients
    t0 = time.time()
    ref = reference_logps(model, pairs, tok.pad_token_id, args.micro_batch_size, device, amp,
                          layout)  # [(winning step's log-probs, losing step's)] per pair
    for p, (ref_chosen, ref_rejected) in zip(pairs, ref):  # collate_pairs lays them out
        p["ref_chosen_logps"], p["ref_rejected_logps"] = ref_chosen, ref_rejected
    print0(f"reference log-probs of {len(pairs)} pairs in {time.time() - t0:.1f}s")

    # Loop: one optimizer step per global batch of B pairs, each rank a share of it
    total = args.max_steps or args.epochs * (len(pairs) // B)
    warmup, mbs = warmup_steps(args, total), args.micro_batch_size
    step = load_checkpoint(out / "checkpoints", model, opt, args.resume)  # 0: a fresh run
    log = MetricsLog(out / "metrics.jsonl", resume_step=step)
    model.train()
    while step < total:
        t0 = time.time()
        peak_memory_gb(device)  # reset: each step logs its own peak
        lr = lr_at(step, total, args.lr, warmup, args.schedule)
        for group in opt.param_groups:
            group["lr"] = lr
        mine = global_batch(len(pairs), B, args.seed, step)[rank::world]  # this rank's share
        sums = torch.zeros(5, dtype=torch.float64, device=device)  # summed over this share:
        for s in range(0, len(mine), mbs):  # loss, reward acc, win, lose reward, tokens
            sync_gradients(model, last_micro_batch=s + mbs >= len(mine))
            b = {k: v.to(device) for k, v in collate_pairs(
                [pairs[i] for i in mine[s:s + mbs]], tok.pad_token_id, **layout).items()}
            with amp:
                logps = token_logps(model, b)  # (2m, T-1), rows: m winning, then m losing
            losses, r_w, r_l = step_dpo_loss(logps.float(), b["ref_logps"], b["loss_mask"],
                                             args.beta)  # (m,) each
            # The step's loss is the mean over the B pairs of the global batch: each micro-batch
            # adds its sum / B, times world as FSDP averages gradients over ranks (as in 05).
            (losses.sum() * world / B).backward()
            sums += torch.stack([losses.sum().detach(), (r_w > r_l).sum(), r_w.sum(), r_l.sum(),
                                 b["attention_mask"].sum()]).double()
        grad_norm = clip_grad_norm(model, args.max_grad_norm)
        loss, acc, chosen, rejected, tokens = all_reduce_sum(sums).cpu().tolist()  # all ranks
        loss, acc, chosen, rejected = loss / B, acc / B, chosen / B, rejected / B
        stop_if_not_finite(loss, grad_norm, step, out / "checkpoints", out / "model")
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.time() - t0
        log.log({"step": step, "loss": loss, "reward_acc": acc, "chosen_reward": chosen,
                 "rejected_reward": rejected, "margin": chosen - rejected, "grad_norm": grad_norm,
                 "lr": lr, "tokens_per_s": tokens / dt, "dt": dt,
                 "peak_mem_gb": peak_memory_all_ranks(device)})
        step += 1
        if step < total and (args.save_every and step % args.save_every == 0
                             or step == args.stop_after):
            save_checkpoint(out / "checkpoints", model, opt, step, args.keep_checkpoints)
        if step == args.stop_after and step < total:
            print0(f"stopped after step {step} (--stop-after); --resume finishes {out / 'model'}")
            break

    # Write: an ordinary HF model (LoRA merged), the resolved config beside it
    if step >= total:  # else --stop-after: the rest waits for --resume
        save_model(model, tok, out / "model", extra=config,
                   dtype=torch.bfloat16 if args.bf16 else torch.float32)
        print0(f"saved {out / 'model'} after {total} steps")

    # Cleanup
    dist_teardown()


if __name__ == "__main__":
    main(parser.parse_args())
