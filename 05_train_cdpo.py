"""Stage 05 (cDPO): token-weighted DPO on scored pairs (PAPERS.md A3); --uniform: plain DPO.

The loss (`cdpo_loss`; sequence level, the paper-style form, not verified first-hand: PAPERS.md A3):

    L = -log sigmoid( beta * [ sum_t w^c_t D^c_t  -  sum_t w^r_t D^r_t ] ),
    D_t = log pi_theta(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t)    (response tokens, EOS included)

with w^r = rejected_weights = 1 - p_CE from 04 (the critical tokens of a wrong answer carry the
penalty) and w^c = 1 (the released default; --weight-chosen uses chosen_weights = p_CE).
--uniform sets every weight to 1, which is DPO. --form position reproduces the released code's
per-position loss (`cdpo_position_loss`, PAPERS.md A3 and D1) for fidelity studies.

The reference is the initial policy, scored once in a no-grad pass before the first update, so one
model is in memory. Each pair is one sequence, prompt then chosen then rejected, the prompt computed
once, each response masked from the other, pairs packed into rows without padding between them
(--layout packed, machinery/packing.py); --layout padded is the classic (2B, T) batch of
right-padded prompt + response rows. Both give the loss the same (2B, T-1) log-probs. main() holds
the optimizer step in view: batch -> log-probs -> loss -> backward -> clip -> step -> log.

Reads   <run-dir>/04_score_tokens/pairs.jsonl  (id, prompt_ids, chosen_ids, rejected_ids,
                                                chosen_weights, rejected_weights)
Writes  <run-dir>/05_train_cdpo/  (05_train_dpo/ with --uniform)
          model/               HF safetensors + tokenizer + training_config.json
          metrics.jsonl        per optimizer step: step, loss, reward_acc, chosen_reward,
                               rejected_reward, margin, grad_norm, lr, tokens_per_s, dt, peak_mem_gb
          checkpoints/         with --save-every (sharded torch.distributed.checkpoint)

Toy world (CPU):
    python 05_train_cdpo.py --run-dir runs/toy
    python 05_train_cdpo.py --run-dir runs/toy --uniform          # the DPO baseline
Many GPUs (FSDP2; the batch is global, each rank takes its share):
    torchrun --nproc_per_node 8 05_train_cdpo.py --run-dir runs/llama3-8b-gsm8k \\
        --model meta-llama/Meta-Llama-3-8B --lora-r 16 --lr 4e-5 --schedule linear \\
        --warmup-ratio 0.1 --epochs 3 --batch-size 8 --micro-batch-size 1 --weight-decay 0.01 \\
        --max-length 1024 --bf16 --activation-checkpointing --seed 33

Released settings (PAPERS.md A4; Llama-3-8B, Llama-3-70B and deepseek-math-7b alike): LoRA r 16,
alpha 32, dropout 0 on q,k,v,o,gate,up,down_proj; AdamW lr 4e-5, linear decay, warmup ratio 0.1,
weight decay 0.01; 3 epochs; global batch 8 (2 x accumulation 4); beta 0.1; pairs kept only when
the prompt is < 512 and prompt + response < 1024 tokens; shuffle seed 33; no bf16 flag (D8); the
per-position loss (--form position; the default here is the sequence form: PAPERS.md E). 70B on
8 x 80 GB: LoRA as above, or full tuning with --cpu-offload (README's memory table).
Defaults (the toy run): full tuning; lr 3e-5 with linear decay and warmup ratio 0.1, beta 0.1: the
released schedule and beta with an lr near the released 4e-5 (A4); 3 epochs (A4); batch 16.
DPO and cDPO share them, as the notes record no settings for the paper's DPO baseline (PAPERS.md
E). README, Results ("Learning rate and beta", runs/toy_sweep.sh) shows both at lr 1e-5 to 1e-4
and beta 0.02 to 0.5 on the toy dev and test splits.
"""
import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from common import (all_reduce_sum, autocast_for, dist_init, dist_teardown, fail,
                    load_for_training, lora_config, print0, read_jsonl, token_logps)
from machinery.checkpoints import load_checkpoint, save_checkpoint, save_model
from machinery.checks import numbers, token_ids
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
             data="scored pairs (default: <run-dir>/04_score_tokens/pairs.jsonl)",
             out="05_train_cdpo, or <run-dir>/05_train_dpo with --uniform", limit="pairs",
             seed="data order")
g = parser.add_argument_group("loss")
g.add_argument("--beta", type=float, default=0.1,
               help="DPO temperature (%(default)s, the released value)")
g.add_argument("--form", default="sequence", choices=["sequence", "position"],
               help="sequence: the paper-style loss (default; not verified first-hand, "
                    "PAPERS.md A3); position: the released code's")
g.add_argument("--uniform", action="store_true", help="all weights 1: plain DPO, the baseline")
g.add_argument("--weight-chosen", action="store_true",
               help="weight the chosen side by chosen_weights too (released default: off)")
add_training_args(parser, lr=3e-5, epochs=3, batch_size=16, micro_batch_size=16,
                  warmup_ratio=0.1, schedule="linear", weight_decay=0.0, max_length=1024)

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def cdpo_loss(policy_logps, ref_logps, weights, beta: float):
    """Token-weighted DPO, sequence level (paper-style; PAPERS.md A3). With all weights 1 it is DPO.

        D_bt   = log pi_theta(y_bt | x_b, y_b<t) - log pi_ref(y_bt | x_b, y_b<t)
        r_b    = beta * sum_t w_bt * D_bt                  (the implicit reward of response b)
        L_b    = -log sigmoid(r^chosen_b - r^rejected_b)

    policy_logps, ref_logps: (2B, T-1) float32 per-token log-probs in the padded layout, rows
        0..B-1 chosen, B..2B-1 rejected (packing.collate_pairs, token_logps columns; a packed
        batch's log-probs come back in these rows and columns).
    weights: (2B, T-1) token weights, zero outside the responses (so they are also the mask):
        cDPO: 1 on chosen tokens, 1 - p_CE on rejected ones; DPO: 1 on every response token.
    Returns per-pair losses (B,) (the caller averages over the global batch) and the rewards
    r^chosen, r^rejected (B,), detached.
    """
    rewards = beta * ((policy_logps - ref_logps) * weights).sum(-1)  # (2B,)
    B = rewards.shape[0] // 2
    chosen, rejected = rewards[:B], rewards[B:]  # (B,), (B,)
    losses = -F.logsigmoid(chosen - rejected)  # (B,)
    return losses, chosen.detach(), rejected.detach()


def cdpo_position_loss(policy_logps, ref_logps, weights, beta: float):
    """The released code's per-position loss (PAPERS.md A3), for fidelity studies:

        L = mean over b and ALL t < T-1 of  -log sigmoid(beta * (w^c_bt D^c_bt - w^r_bt D^r_bt))

    Chosen token t is compared with rejected token t of the same absolute position (both right
    padded to the batch's common length T); prompt and padding positions have D = 0 on both sides
    and add the constant log 2 with no gradient, diluting the mean. T depends on what else is in
    the micro-batch, so unlike the sequence form this loss changes with --micro-batch-size and the
    number of ranks, as it did in the released code (2 pairs per device). Shapes as in
    cdpo_loss. Returns per-pair losses (B,) = row means over the T-1 positions (their mean is the
    released micro-batch loss) and the sequence-level rewards beta * sum_t w_bt D_bt (B,), (B,)
    for logging.
    """
    delta = (policy_logps - ref_logps) * weights  # (2B, T-1)
    B = delta.shape[0] // 2
    per_position = -F.logsigmoid(beta * (delta[:B] - delta[B:]))  # (B, T-1)
    rewards = beta * delta.sum(-1).detach()  # (2B,)
    return per_position.mean(-1), rewards[:B], rewards[B:]


def load_pairs(path: Path, args, vocab: int | None = None) -> list[dict]:
    """04's scored pairs, checked: token ids of this tokenizer (vocab: its size), weights parallel
    to ids, no empty response; the first --limit, those within --max-length."""
    ids = token_ids(vocab)
    need = {"id": str, "prompt_ids": ids, "chosen_ids": ids, "rejected_ids": ids}
    if not args.uniform:
        need["rejected_weights"] = numbers
    if args.weight_chosen:
        need["chosen_weights"] = numbers
    pairs = []
    for where, rec in read_jsonl(path, required=need, locations=True,
                                 optional={"chosen_weights": numbers, "rejected_weights": numbers},
                                 parallel=[("chosen_weights", "chosen_ids"),
                                           ("rejected_weights", "rejected_ids")]
                                 )[:args.limit or None]:
        if not rec["prompt_ids"]:
            fail(f"{where}: pair '{rec['id']}': empty prompt_ids (a response's first token is "
                 "scored from the prompt's last one)")
        for side in ("chosen", "rejected"):
            if not rec[f"{side}_ids"]:
                fail(f"{where}: pair '{rec['id']}': empty {side}_ids")
        pairs.append({"id": rec["id"], "prompt_ids": rec["prompt_ids"],
                      "chosen_ids": rec["chosen_ids"], "rejected_ids": rec["rejected_ids"],
                      # None -> collate_pairs uses 1 on every response token
                      "chosen_weights": rec["chosen_weights"] if args.weight_chosen else None,
                      "rejected_weights": None if args.uniform else rec["rejected_weights"]})
    return keep_short(pairs, args.max_length, path)


def main(args):
    # Init
    rank, world, device = dist_init()
    if args.uniform and args.weight_chosen:
        fail("--uniform and --weight-chosen contradict each other")
    check_batch(args)
    run = Path(args.run_dir)
    out = Path(args.out or run / ("05_train_dpo" if args.uniform else "05_train_cdpo"))
    model_path = args.model or str(run / "00_toy" / "model")
    data = Path(args.data or run / "04_score_tokens" / "pairs.jsonl")
    config = {**vars(args), "model": model_path, "data": str(data), "out": str(out),
              "world": world, "method": "dpo" if args.uniform else "cdpo"}

    # Load: the pairs, then the policy (FSDP2 over the ranks, optional LoRA), its AdamW
    tok = load_tokenizer(model_path, args.trust_remote_code)
    pairs = load_pairs(data, args, len(tok))
    config["batch_size"] = B = fit_batch(args, len(pairs), "pairs")
    print0("config " + json.dumps(config))
    model = load_for_training(model_path, device, args.bf16, args.cpu_offload,
                              args.activation_checkpointing,
                              lora_config(args.lora_r, LORA_TARGETS, lora_dropout=0.0),
                              args.trust_remote_code)
    opt, amp = adamw(model, args.lr, args.weight_decay), autocast_for(device, args.bf16)
    layout = batch_layout(args, model)  # packed rows, or padded where the model cannot take them
    loss_fn = cdpo_position_loss if args.form == "position" else cdpo_loss

    # the reference: the policy before its first update, scored once without gradients
    t0 = time.time()
    ref = reference_logps(model, pairs, tok.pad_token_id, args.micro_batch_size, device, amp,
                          layout)  # [(chosen log-probs, rejected log-probs)] per pair
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
        for s in range(0, len(mine), mbs):  # loss, reward acc, chosen, rejected reward, tokens
            sync_gradients(model, last_micro_batch=s + mbs >= len(mine))
            b = {k: v.to(device) for k, v in collate_pairs(
                [pairs[i] for i in mine[s:s + mbs]], tok.pad_token_id, **layout).items()}
            with amp:
                logps = token_logps(model, b)  # (2m, T-1), rows: m chosen, then m rejected
            losses, r_c, r_r = loss_fn(logps.float(), b["ref_logps"], b["weights"], args.beta)
            # The step's loss is the mean over the B pairs of the global batch: each micro-batch
            # adds its sum / B, times world as FSDP averages gradients over ranks. The update is
            # the 1-process update on the whole batch, for any split into ranks and micro-batches.
            (losses.sum() * world / B).backward()
            sums += torch.stack([losses.sum().detach(), (r_c > r_r).sum(), r_c.sum(), r_r.sum(),
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
