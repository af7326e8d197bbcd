"""cDPO: token-weighted DPO on scored pairs (PAPERS.md A3), and plain DPO, the baseline (--uniform).

The loss (`cdpo_loss`; sequence level, the paper-style form, not verified first-hand: PAPERS.md A3):

    L = -log sigmoid( beta * [ sum_t w^c_t D^c_t  -  sum_t w^r_t D^r_t ] ),
    D_t = log pi_theta(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t)    (response tokens, EOS included)

with w^r = rejected_weights = 1 - p_CE from 04 (the critical tokens of a wrong answer carry the
penalty) and w^c = 1 (the released default; --weight-chosen uses chosen_weights = p_CE).
--uniform sets every weight to 1, which is DPO. --form position reproduces the released code's
per-position loss (`cdpo_position_loss`, PAPERS.md A3 and D1) for fidelity studies.

The reference is the initial policy, scored once in a no-grad pass before the first update, so one
model is in memory. Chosen and rejected go through one concatenated (2B, T) forward.

Reads   <run-dir>/04_score_tokens/pairs.jsonl  (id, prompt_ids, chosen_ids, rejected_ids,
                                                chosen_weights, rejected_weights)
Writes  <run-dir>/05_train_cdpo/  (05_train_dpo/ with --uniform)
          model/               HF safetensors + tokenizer + training_config.json
          metrics.jsonl        per optimizer step: step, loss, reward_acc, chosen_reward,
                               rejected_reward, margin, grad_norm, lr, tokens_per_s, dt
          checkpoints/         with --save-every (sharded torch.distributed.checkpoint)

Toy world (2 CPU cores, ~35 s each on the demo's ~600 pairs: ~110 steps of ~0.3 s):
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
8 x 80 GB: LoRA as above, or full tuning with --cpu-offload (README's memory table). Toy defaults
below: full tuning, lr 3e-5 (near the released 4e-5), 3 epochs, batch 16, warmup 0.1, linear
decay, beta 0.1; DPO and cDPO share them (the notes do not record the settings of the paper's DPO
baseline). How both fare at other lr and beta: runs/toy_sweep.sh and README, Results.
"""
import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from common import (add_training_args, all_reduce_sum, clip_grad_norm, collate_pairs, dist_init,
                    dist_teardown, fail, get_world, global_batch, load_checkpoint, load_tokenizer,
                    lr_at, MetricsLog, peak_memory_all_ranks, peak_memory_gb, print0, read_jsonl,
                    reference_logps, save_checkpoint, save_model, sync_gradients, token_logps,
                    training_policy, warmup_steps)

parser = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
g = parser.add_argument_group("run")
g.add_argument("--run-dir", default="runs/toy",
               help="run directory shared by all stages (%(default)s)")
g.add_argument("--model", default="",
               help="initial policy = reference (default <run-dir>/00_toy/model)")
g.add_argument("--data", default="", help="pairs (default <run-dir>/04_score_tokens/pairs.jsonl)")
g.add_argument("--out", default="", help="output dir (default <run-dir>/05_train_cdpo, or "
                                         "05_train_dpo with --uniform)")
g.add_argument("--limit", type=int, default=0, help="use the first K pairs (0 = all)")
g.add_argument("--seed", type=int, default=0, help="data order (%(default)s)")
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


# --------------------------------------------------------------------------------------------------
# The losses


def cdpo_loss(policy_logps, ref_logps, weights, beta: float):
    """Token-weighted DPO, sequence level (paper-style; PAPERS.md A3). With all weights 1 it is DPO.

        D_bt   = log pi_theta(y_bt | x_b, y_b<t) - log pi_ref(y_bt | x_b, y_b<t)
        r_b    = beta * sum_t w_bt * D_bt                  (the implicit reward of response b)
        L_b    = -log sigmoid(r^chosen_b - r^rejected_b)

    policy_logps, ref_logps: (2B, T-1) float32 per-token log-probs of one concatenated batch,
        rows 0..B-1 chosen, B..2B-1 rejected (common.collate_pairs layout, token_logps columns).
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


# --------------------------------------------------------------------------------------------------
# The training loop, shared with 06_train_stepdpo.py (which brings its own loss)


def train_preference(args, model_path, pairs: list[dict], tok, out: Path, config: dict, loss_fn,
                     lora_targets=LORA_TARGETS):
    """DPO-family training. `pairs` hold prompt_ids, chosen_ids, rejected_ids (+ weights);
    loss_fn(policy_logps, ref_logps, batch) -> (per-pair losses, chosen rewards, rejected
    rewards), all (m,) for a micro-batch of m pairs. Writes out/metrics.jsonl, out/model/."""
    rank, world, device = dist_init()  # already joined by main(): this only returns them
    B, mbs = args.batch_size, args.micro_batch_size

    # init: the policy (FSDP2 over ranks, optional LoRA); the reference is this same model, now
    model, opt, amp = training_policy(args, model_path, device, lora_targets, lora_dropout=0.0)
    t0 = time.time()
    ref = reference_logps(model, pairs, tok.pad_token_id, mbs, device, amp)
    for p, (ref_c, ref_r) in zip(pairs, ref):
        p["ref_chosen_logps"], p["ref_rejected_logps"] = ref_c, ref_r
    print0(f"reference log-probs of {len(pairs)} pairs in {time.time() - t0:.1f}s")

    total = args.max_steps or args.epochs * (len(pairs) // B)
    warmup = warmup_steps(args, total)
    ckpt = out / "checkpoints"
    step = load_checkpoint(ckpt, model, opt, args.resume)  # fresh run: starts clean
    if step:
        print0(f"resumed at step {step} from {ckpt}")
    log = MetricsLog(out / "metrics.jsonl", resume_step=step)

    # loop: one optimizer step per global batch of B pairs
    model.train()
    while step < total:
        t0 = time.time()
        peak_memory_gb(device)  # reset: each step logs its own peak
        lr = lr_at(step, total, args.lr, warmup, args.schedule)
        for group in opt.param_groups:
            group["lr"] = lr
        mine = global_batch(len(pairs), B, args.seed, step)[rank::world]  # this rank's share
        stats = torch.zeros(5, dtype=torch.float64, device=device)  # summed over pairs:
        # loss, correct (r_chosen > r_rejected), r_chosen, r_rejected; and tokens
        for s in range(0, len(mine), mbs):
            sync_gradients(model, last_micro_batch=s + mbs >= len(mine))
            b = {k: v.to(device) for k, v in
                 collate_pairs([pairs[i] for i in mine[s:s + mbs]], tok.pad_token_id).items()}
            with amp:
                logps = token_logps(model, b["input_ids"], b["attention_mask"])  # (2m, T-1)
            losses, r_c, r_r = loss_fn(logps.float(), b["ref_logps"], b)  # (m,) each
            # Sum over this rank's pairs / B, times world because FSDP averages gradients over
            # ranks: the update is the 1-process update on the whole global batch, for any
            # split into ranks and micro-batches.
            (losses.sum() * world / B).backward()
            stats += torch.stack([losses.detach().sum(), (r_c > r_r).sum(), r_c.sum(), r_r.sum(),
                                  b["attention_mask"].sum()]).double()
        grad_norm = clip_grad_norm(model, args.max_grad_norm)
        loss, acc, r_c, r_r, tokens = (all_reduce_sum(stats).cpu() / torch.tensor(
            [B, B, B, B, 1], dtype=torch.float64)).tolist()
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            last = json.loads((ckpt / "latest.json").read_text())["step"] if (
                ckpt / "latest.json").exists() else None
            if rank == 0:
                print(f"error: non-finite loss {loss} (grad norm {grad_norm}) at step {step}; "
                      f"stopped before applying it. {out / 'model'} was not written; last good "
                      f"checkpoint: {f'step {last} in {ckpt}' if last else 'none'}"
                      "; try a lower --lr or check the pairs", file=sys.stderr, flush=True)
            raise SystemExit(1)
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.time() - t0
        log.log({"step": step, "loss": loss, "reward_acc": acc, "chosen_reward": r_c,
                 "rejected_reward": r_r, "margin": r_c - r_r, "grad_norm": grad_norm, "lr": lr,
                 "tokens_per_s": tokens / dt, "dt": dt,
                 "peak_mem_gb": peak_memory_all_ranks(device)})
        step += 1
        if step < total and (args.save_every and step % args.save_every == 0
                             or step == args.stop_after):
            save_checkpoint(ckpt, model, opt, step, args.keep_checkpoints)
        if step == args.stop_after and step < total:
            print0(f"stopped after step {step} (--stop-after); continue with --resume")
            return

    # write: an ordinary HF model (LoRA merged), the resolved config beside it
    save_model(model, tok, out / "model", extra=config,
               dtype=torch.bfloat16 if args.bf16 else torch.float32)
    print0(f"saved {out / 'model'} after {total} steps")


def prepare_run(args, default_out: str, default_data: str):
    """Resolve the paths and check the batch against the ranks; returns out, model path, data
    path and the config (shared with 06)."""
    run = Path(args.run_dir)
    out = Path(args.out or run / default_out)
    model_path = args.model or str(run / "00_toy" / "model")
    data = Path(args.data or run / default_data)
    if args.batch_size < 1 or args.micro_batch_size < 1:
        fail("--batch-size and --micro-batch-size must be >= 1")
    if args.batch_size % get_world():
        fail(f"--batch-size {args.batch_size} is not divisible by {get_world()} ranks")
    config = {**vars(args), "model": model_path, "data": str(data), "out": str(out),
              "world": get_world()}
    return out, model_path, data, config


def fit_batch(args, n_pairs: int, config: dict):
    """Fewer pairs than --batch-size (tiny runs): shrink the global batch to what there is."""
    if n_pairs < get_world():
        fail(f"{n_pairs} pairs for {get_world()} ranks; need at least one pair per rank")
    if n_pairs < args.batch_size:
        args.batch_size = config["batch_size"] = n_pairs - n_pairs % get_world()
        print0(f"only {n_pairs} pairs: --batch-size lowered to {args.batch_size}")
    print0("config " + json.dumps(config))


# --------------------------------------------------------------------------------------------------


def load_pairs(path: Path, args) -> list[dict]:
    """04's scored pairs, checked: weights parallel to ids, no empty response, length cap."""
    need = {"id": str, "prompt_ids": list, "chosen_ids": list, "rejected_ids": list}
    if not args.uniform:
        need["rejected_weights"] = list
    if args.weight_chosen:
        need["chosen_weights"] = list
    pairs, too_long = [], 0
    for rec in read_jsonl(path, required=need)[:args.limit or None]:
        for side in ("chosen", "rejected"):
            if not rec[f"{side}_ids"]:
                fail(f"{path}: pair '{rec['id']}': empty {side}_ids")
            w = rec.get(f"{side}_weights")
            if w is not None and len(w) != len(rec[f"{side}_ids"]):
                fail(f"{path}: pair '{rec['id']}': {side}_weights has {len(w)} entries for "
                     f"{len(rec[f'{side}_ids'])} {side}_ids (weights must be parallel to ids)")
        if len(rec["prompt_ids"]) + max(len(rec["chosen_ids"]), len(rec["rejected_ids"])) > \
                args.max_length:
            too_long += 1
            continue
        pairs.append({"id": rec["id"], "prompt_ids": rec["prompt_ids"],
                      "chosen_ids": rec["chosen_ids"], "rejected_ids": rec["rejected_ids"],
                      # None -> collate_pairs uses 1 on every response token
                      "chosen_weights": rec["chosen_weights"] if args.weight_chosen else None,
                      "rejected_weights": None if args.uniform else rec["rejected_weights"]})
    if too_long:
        print0(f"dropped {too_long} pairs longer than --max-length {args.max_length}")
    if not pairs:
        fail(f"{path}: no pairs left to train on")
    return pairs


def main(args):
    dist_init()
    if args.uniform and args.weight_chosen:
        fail("--uniform and --weight-chosen contradict each other")
    out, model_path, data, config = prepare_run(
        args, "05_train_dpo" if args.uniform else "05_train_cdpo", "04_score_tokens/pairs.jsonl")
    config["method"] = "dpo" if args.uniform else "cdpo"
    tok = load_tokenizer(model_path, args.trust_remote_code)
    pairs = load_pairs(data, args)
    fit_batch(args, len(pairs), config)
    loss = cdpo_position_loss if args.form == "position" else cdpo_loss
    train_preference(args, model_path, pairs, tok, out, config,
                     loss_fn=lambda pol, ref, b: loss(pol, ref, b["weights"], args.beta))
    dist_teardown()


if __name__ == "__main__":
    main(parser.parse_args())
