"""Stage 04 (cDPO): weigh every response token of a pair by contrastive estimation (PAPERS.md A2).

With z_pos, z_neg the logits the positive and negative models give for the position that predicts
response token y_t, and b = --ce-beta (1 in the released code):

    p_t = softmax((1 + b) * z_pos - b * z_neg)[y_t]   ∝  p_pos(y_t)^(1+b) / p_neg(y_t)^b

(log_softmax only shifts each position by a constant, so raw logits give the same softmax.) A token
the positive model prefers far more than the negative one gets p_t near 1, a token only the
negative model would write gets p_t near 0. cDPO penalises rejected tokens with weight 1 - p_t (the
critical tokens) and may weight chosen tokens by p_t.

Prompt and responses are tokenized apart (encode_prompt, encode_response with the end id each
answer was written with: the pair's chosen_eos_id / rejected_eos_id from 03, the tokenizer's eos
where a hand-made file has none) and the ids are stored with the weights, one weight per id, so
stage 05 trains on exactly the ids that were scored.

Reads  <run-dir>/03_contrastive_sft/pairs.jsonl    {id, prompt, chosen, rejected (, chosen_eos_id,
                                                   rejected_eos_id, answer)}
       <run-dir>/03_contrastive_sft/{pos,neg}/      the two fine-tuned models (same tokenizer)
Writes <run-dir>/04_score_tokens/pairs.jsonl       {id, prompt_ids, chosen_ids, rejected_ids,
                                                   chosen_weights, rejected_weights, texts, answer}
       <run-dir>/04_score_tokens/critical_tokens.html  rejected answers shaded by weight
       <run-dir>/04_score_tokens/summary.json

  python 04_score_tokens.py --run-dir runs/toy                                 # CPU, toy world
  torchrun --nproc_per_node=8 04_score_tokens.py --run-dir runs/l3-8b --bf16 --batch-size 4
"""
import argparse
import json
import time
from pathlib import Path

import torch

from common import (barrier, dist_init, dist_teardown, encode_prompt, encode_response, fail,
                    position_ids, print0, read_jsonl, write_json, write_text)
from machinery.checks import token_id
from machinery.flags import add_model_args, add_run_args
from machinery.heatmap import render_html
from machinery.models import load_model, load_tokenizer
from machinery.packing import collate_pairs
from machinery.resume import file_stamp, Progress, resume_share

parser = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
g = add_run_args(parser, out="04_score_tokens", limit="pairs",
                 data="pairs to score (default: <run-dir>/03_contrastive_sft/pairs.jsonl)")
g.add_argument("--pos-model", default=None,
               help="positive model (default: <run-dir>/03_contrastive_sft/pos)")
g.add_argument("--neg-model", default=None,
               help="negative model (default: <run-dir>/03_contrastive_sft/neg)")
g = parser.add_argument_group("scoring")
g.add_argument("--ce-beta", type=float, default=1.0,
               help="b in softmax((1+b) z_pos - b z_neg) (%(default)s, the released value)")
g.add_argument("--batch-size", type=int, default=16,
               help="pairs per forward, 2x rows (%(default)s)")
g.add_argument("--html-limit", type=int, default=40,
               help="pairs shown in the HTML view (%(default)s)")
add_model_args(parser)


@torch.no_grad()
def ce_token_probs(z_pos, z_neg, input_ids, beta: float, chunk_bytes: int = 1 << 30):
    """p[b, t] = softmax((1+beta) z_pos[b, t] - beta z_neg[b, t])[input_ids[b, t+1]], float32.

    z_pos, z_neg: (B, T, V) logits of the two models on the same input_ids (B, T); returns
    (B, T-1): column t scores token t+1, the same shift as common.token_logps. A few positions
    at a time, so the only float32 (B, c, V) buffers are per chunk (at most chunk_bytes), never a
    third (B, T, V)."""
    B, T, V = z_pos.shape
    out = torch.empty(B, T - 1, dtype=torch.float32, device=z_pos.device)
    chunk = max(1, chunk_bytes // (4 * B * V))  # positions per chunk
    for s in range(0, T - 1, chunk):
        e = min(s + chunk, T - 1)
        # (B, c, V) float32; the product is a new tensor (.float() of float32 logits is no copy)
        z = (z_pos[:, s:e].float() * (1 + beta)).sub_(z_neg[:, s:e].float(), alpha=beta)
        target = input_ids[:, s + 1:e + 1, None]  # (B, c, 1)
        out[:, s:e] = (z.gather(-1, target).squeeze(-1) - torch.logsumexp(z, -1)).exp()
        del z
    return out


@torch.no_grad()
def logits_of(model, input_ids, attention_mask):
    """(B, T, V) logits of a right-padded batch; positions follow the mask as in token_logps."""
    return model(input_ids=input_ids, attention_mask=attention_mask,
                 position_ids=position_ids(attention_mask), use_cache=False).logits


def score_batch(pos, neg, items: list[dict], beta: float, pad_id: int, device) -> list[tuple]:
    """(chosen p_t, rejected p_t) per item, one float per response id. collate_pairs lays the
    rows out (chosen rows, then rejected rows) and its loss_mask marks the columns that score the
    response ids, exactly the columns the trainer reads."""
    b = collate_pairs(items, pad_id)
    ids, mask = b["input_ids"].to(device), b["attention_mask"].to(device)  # (2B, T)
    probs = ce_token_probs(logits_of(pos, ids, mask), logits_of(neg, ids, mask), ids, beta)
    probs, resp = probs.cpu(), b["loss_mask"].bool()  # (2B, T-1)
    n = len(items)
    return [(probs[i][resp[i]].tolist(), probs[n + i][resp[n + i]].tolist()) for i in range(n)]


def main(args):
    # Init
    rank, world, device = dist_init()
    run = Path(args.run_dir)
    out = Path(args.out or run / "04_score_tokens")
    pos_path = str(args.pos_model or run / "03_contrastive_sft" / "pos")
    neg_path = str(args.neg_model or run / "03_contrastive_sft" / "neg")
    print0(f"config: {json.dumps(vars(args))}")
    data = Path(args.data or run / "03_contrastive_sft" / "pairs.jsonl")
    tok = load_tokenizer(pos_path, args.trust_remote_code)
    if load_tokenizer(neg_path, args.trust_remote_code).get_vocab() != tok.get_vocab():
        fail(f"{pos_path} and {neg_path} have different tokenizers; CE needs one vocabulary")
    # the end ids are 03's (an answer cut by the token limit has none: it is no full solution)
    pairs = read_jsonl(data, {"id": str, "prompt": str, "chosen": str, "rejected": str},
                       optional={"chosen_eos_id": token_id(len(tok)),
                                 "rejected_eos_id": token_id(len(tok))})[:args.limit or None]
    if len({p["id"] for p in pairs}) != len(pairs):
        fail(f"{data}: duplicate ids")

    # Tokenize once: prompt and responses apart, EOS after each full solution
    items = []
    for p in pairs:
        if not p["chosen"].strip() or not p["rejected"].strip():
            fail(f"{data}: pair '{p['id']}': empty chosen or rejected response")
        eos = {side: p.get(f"{side}_eos_id", tok.eos_token_id) for side in ("chosen", "rejected")}
        items.append({**p, "prompt_ids": encode_prompt(tok, p["prompt"]),
                      "chosen_ids": encode_response(tok, p["chosen"], eos=eos["chosen"]),
                      "rejected_ids": encode_response(tok, p["rejected"], eos=eos["rejected"])})
    # resume only what these very models, these pairs and this --ce-beta produced
    store, mine = resume_share(out / "pairs.jsonl", items, args.tp,
                               fingerprint={"pos": file_stamp(pos_path),
                                            "neg": file_stamp(neg_path),
                                            "data": file_stamp(data), "ce_beta": args.ce_beta})
    # longest first, so batches hold similar lengths (little padding) and memory peaks early
    mine.sort(key=lambda it: -len(it["prompt_ids"]) - max(len(it["chosen_ids"]),
                                                          len(it["rejected_ids"])))
    print0(f"{len(pairs)} pairs | {len(items) - len(store.done)} to score on {world} rank(s)")

    # Load
    dtype = torch.bfloat16 if args.bf16 else torch.float32  # ce_token_probs combines in float32
    pos = load_model(pos_path, device, dtype, args.trust_remote_code, tp=args.tp).eval()
    neg = load_model(neg_path, device, dtype, args.trust_remote_code, tp=args.tp).eval()
    if pos.config.vocab_size != neg.config.vocab_size:
        fail(f"vocab sizes differ: pos {pos.config.vocab_size}, neg {neg.config.vocab_size}")

    # Loop
    progress, t0, n_tok = Progress(len(mine), unit="pairs"), time.time(), 0
    for s in range(0, len(mine), args.batch_size):
        batch = mine[s:s + args.batch_size]
        for it, (p_cho, p_rej) in zip(batch, score_batch(pos, neg, batch, args.ce_beta,
                                                         tok.pad_token_id, device)):
            assert len(p_cho) == len(it["chosen_ids"]) and len(p_rej) == len(it["rejected_ids"])
            store.append({"id": it["id"], "prompt_ids": it["prompt_ids"],
                          "chosen_ids": it["chosen_ids"], "rejected_ids": it["rejected_ids"],
                          "chosen_weights": [round(p, 6) for p in p_cho],
                          "rejected_weights": [round(1 - p, 6) for p in p_rej],
                          **{k: it[k] for k in ("prompt", "chosen", "rejected", "answer",
                                                "question") if k in it}})
            n_tok += len(p_cho) + len(p_rej)
        progress.update(len(batch), tokens_per_s=n_tok / (time.time() - t0))
    progress.close()

    # Write: merge the ranks, then the summary and the HTML view
    barrier()
    if rank == 0:
        records = store.merge([p["id"] for p in items])
        rej = [w for r in records for w in r["rejected_weights"]]
        cho = [w for r in records for w in r["chosen_weights"]]
        summary = {"pairs": len(records), "rejected_tokens": len(rej),
                   "mean_rejected_weight": sum(rej) / len(rej),
                   "share_rejected_weight_over_0.5": sum(w > 0.5 for w in rej) / len(rej),
                   "mean_chosen_weight": sum(cho) / len(cho), "config": vars(args)}
        write_json(out / "summary.json", summary)
        shown = records[:args.html_limit]
        write_text(out / "critical_tokens.html", render_html(
            shown, tok, f"{len(shown)} of {len(records)} cDPO pairs · CE beta {args.ce_beta} · "
                        f"pos {pos_path} · neg {neg_path}"))
        print0(f"pairs {len(records)} | mean rejected weight {summary['mean_rejected_weight']:.3f}"
               f" | weight>0.5 {summary['share_rejected_weight_over_0.5']:.3f} -> {out}")
    else:
        store.close()

    # Cleanup
    dist_teardown()


if __name__ == "__main__":
    main(parser.parse_args())
