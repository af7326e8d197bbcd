"""The DPO family's training run, shared by 05 (cDPO, and DPO with --uniform) and 06 (Step-DPO).
The losses are not here: each stage passes its own in.

  reference_logps   the reference model's log-probs: the initial policy in one no-grad pass, so
                    training keeps one model in memory
  keep_short        the --max-length filter over tokenized pairs
  train_preference  reference pass, then training.optimize over pairs with the stage's loss

A pair is {id, prompt_ids, chosen_ids, rejected_ids} plus optional chosen_weights /
rejected_weights parallel to the response ids (batches.collate_pairs lays them out: packed, the
prompt once per pair, or padded, --layout). The reference pass and the training forwards use the
same layout, so at step 0 policy and reference differ by float rounding only (loss ln 2).
"""
import contextlib
import math
import time

import torch
import torch.distributed as dist

from batches import collate_pairs
from common import dist_init, fail, get_rank, get_world, print0, token_logps
from training import batch_layout, optimize


@torch.no_grad()
def reference_logps(model, pairs: list[dict], pad_id: int, batch_size: int, device,
                    autocast=None, layout: dict | None = None) -> list[tuple[list, list]]:
    """Per pair, the float32 log-probs of its chosen and rejected response tokens under `model`.

    Called with the initial policy before the first update, this is DPO's reference model in a
    single no-grad pass, so training keeps one model in memory. Under torchrun rank r scores
    pairs r, r+W, ... and the results are shared; every rank runs the same number of forwards
    (FSDP gathers each layer collectively), a rank with nothing left scoring a dummy batch.
    `autocast`: the context manager the training forward runs under (bf16 in one process), so
    that policy and reference agree at step 0; `layout`: collate_pairs' layout keywords, the
    training forward's. Returns [(chosen logps, rejected logps)] in order.
    """
    rank, world = get_rank(), get_world()
    was_training = model.training
    model.eval()
    mine = list(range(rank, len(pairs), world))
    n_batches = math.ceil(math.ceil(len(pairs) / world) / batch_size)
    out = {}
    for k in range(n_batches):
        idx = mine[k * batch_size:(k + 1) * batch_size]
        batch = [pairs[i] for i in idx] or pairs[:1]  # dummy keeps collective forwards in step
        b = collate_pairs([{f: p[f] for f in ("prompt_ids", "chosen_ids", "rejected_ids")}
                           for p in batch], pad_id, **(layout or {}))
        with autocast or contextlib.nullcontext():
            lp = token_logps(model, {k: v.to(device) for k, v in b.items()}).float().cpu()
        for j, i in enumerate(idx):
            p, P = pairs[i], len(pairs[i]["prompt_ids"]) - 1  # column of response token 0
            out[i] = (lp[j, P:P + len(p["chosen_ids"])].tolist(),
                      lp[len(batch) + j, P:P + len(p["rejected_ids"])].tolist())
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, out)
        out = {i: v for part in parts for i, v in part.items()}
    model.train(was_training)
    return [out[i] for i in range(len(pairs))]


def keep_short(pairs: list[dict], max_length: int, path) -> list[dict]:
    """The pairs whose prompt + longer response fit in max_length tokens (--max-length; longer
    ones are dropped and counted, not truncated). Stops when none is left."""
    kept = [p for p in pairs
            if len(p["prompt_ids"]) + max(len(p["chosen_ids"]), len(p["rejected_ids"]))
            <= max_length]
    if len(kept) < len(pairs):
        print0(f"dropped {len(pairs) - len(kept)} pairs longer than --max-length {max_length}")
    if not kept:
        fail(f"{path}: no pairs left to train on")
    return kept


def train_preference(args, model, opt, autocast, tok, pairs: list[dict], B: int, out,
                     loss_fn) -> dict | None:
    """DPO-family training of `model` (the policy, as training.training_policy built it, with its
    optimizer and autocast) on `pairs`, B per optimizer step. The stage's loss:

        loss_fn(policy_logps, ref_logps, batch) -> (losses, chosen_rewards, rejected_rewards)

    logps (2m, T-1) float32 for a micro-batch of m pairs in collate_pairs' layout (rows 0..m-1
    chosen, m..2m-1 rejected), `batch` the collated micro-batch (its weights and loss_mask);
    the three results (m,). The step's loss is the mean over the B pairs of the global batch.
    Writes out/metrics.jsonl and out/checkpoints/; returns training.optimize's result (None:
    stopped by --stop-after), and the caller saves the model.
    """
    _, _, device = dist_init()  # already joined by main(): this only returns them

    # the reference: the policy before its first update, scored once (no-grad)
    t0 = time.time()
    layout = batch_layout(args, model)
    ref = reference_logps(model, pairs, tok.pad_token_id, args.micro_batch_size, device, autocast,
                          layout)
    for p, (ref_c, ref_r) in zip(pairs, ref):
        p["ref_chosen_logps"], p["ref_rejected_logps"] = ref_c, ref_r
    print0(f"reference log-probs of {len(pairs)} pairs in {time.time() - t0:.1f}s")

    def pair_loss(idx: list[int]):
        """Summed loss of pairs[idx], and the sums that metrics.jsonl reports as means."""
        b = {k: v.to(device) for k, v in
             collate_pairs([pairs[i] for i in idx], tok.pad_token_id, **layout).items()}
        with autocast:
            logps = token_logps(model, b)  # (2m, T-1), the padded layout's columns
        losses, r_c, r_r = loss_fn(logps.float(), b["ref_logps"], b)  # (m,) each
        return losses.sum(), {"reward_acc": (r_c > r_r).sum(), "chosen_reward": r_c.sum(),
                              "rejected_reward": r_r.sum(), "tokens": b["attention_mask"].sum()}

    return optimize(args, model, opt, len(pairs), B, pair_loss, normaliser=lambda batch: B,
                    ckpt=out / "checkpoints", metrics=out / "metrics.jsonl",
                    model_dir=out / "model",
                    derived=lambda m: {"margin": m["chosen_reward"] - m["rejected_reward"]})
