"""Preference pairs before training (05 and 06): the --max-length filter and the reference pass.

  keep_short        the pairs whose prompt + longer response fit in --max-length tokens
  reference_logps   DPO's reference model: the initial policy's log-probs of every pair, in one
                    no-grad pass before the first update, so training keeps one model in memory

A pair is {id, prompt_ids, chosen_ids, rejected_ids} plus optional chosen_weights /
rejected_weights parallel to the response ids (machinery.packing.collate_pairs lays them out:
packed, the prompt once per pair, or padded, --layout). The reference pass and the training
forwards use the same layout, so at step 0 policy and reference differ by float rounding only
(loss ln 2).
"""
import contextlib
import math

import torch
import torch.distributed as dist

from common import fail, get_rank, get_world, print0, token_logps
from machinery.packing import collate_pairs


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
