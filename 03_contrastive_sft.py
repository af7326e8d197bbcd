"""cDPO step 1: select the SFT sets and the DPO pairs, fine-tune a positive and a negative model.

Selection per problem (PAPERS.md A1; `select_examples`): shuffle the samples (seeded by --seed and
the problem id), drop empty answers and answers cut by the token limit (a cut answer has no final
answer to group by, and an EOS after it would teach the model to stop mid-sentence; counted as
truncated_samples), group by extracted answer, order the groups by size (ties
keep the shuffled first-seen order, so they are broken at random but reproducibly); each group's
representative is its first member.
  positive set  representatives of the --pos-top-k largest correct groups (released: 1)
  negative set  with E wrong samples, budget = ceil(--neg-top-p * E) (released: 0.5); walk the
                wrong groups largest first, add a representative if budget > 0 and (it is the
                first one added or its group has >= 2 members), then subtract the group's size
  DPO pair      (largest correct group, largest wrong group); problems lacking a side are
                skipped and counted
The released code strips the representative's text; here it is kept as sampled, so that 04 and 05
score the tokens the model produced.

Fine-tuning (PAPERS.md A0 step 3): two models from the same initial model, positive on the correct
answers, negative on the wrong ones; loss = mean NLL of the response tokens (prompt via
encode_prompt, response via encode_response with the sample's own eos_id: the end id the model
wrote, e.g. <|eot_id|> under a Llama-3 chat template), averaged over the response tokens of the
global batch. Full fine-tuning by default; --lora-r r adds LoRA (alpha 2r, dropout 0.1, on
gate/up/down_proj as released), merged on save so 04 loads ordinary HF models.

Reads   <run-dir>/01_sample/samples.jsonl  (id, question, answer, prompt,
                                            samples: [{text, pred, correct, truncated, eos_id}])
Writes  <run-dir>/03_contrastive_sft/
          pos/, neg/             HF models (safetensors + tokenizer + training_config.json)
          pairs.jsonl            id, prompt, chosen, rejected, chosen_eos_id, rejected_eos_id,
                                 answer (gold)  -> 04
          metrics_{pos,neg}.jsonl  per optimizer step: step, loss, grad_norm, lr, tokens_per_s, dt
          summary.json           selection counts, training figures, config

Toy world (2 CPU cores, ~40 s for both models on 800 problems x 8 samples):
    python 03_contrastive_sft.py --run-dir runs/toy
Many GPUs (the released recipe, runs/multigpu.sh; 6 processes, as the global batch 6 must divide
by the ranks):
    torchrun --nproc_per_node 6 03_contrastive_sft.py --run-dir runs/llama3-8b \\
        --model meta-llama/Meta-Llama-3-8B --lora-r 8 --lr 3e-4 --schedule cosine \\
        --warmup-steps 100 --epochs 1 --batch-size 6 --micro-batch-size 1 --max-length 1024 \\
        --save-every 200 --bf16 --activation-checkpointing
Released settings (PAPERS.md A4): LoRA r 8 / alpha 16 / dropout 0.1 on gate, up, down_proj; lr 3e-4,
cosine, 100 warmup steps; 1 epoch; global batch 6 (70B: 2 x accumulation 3); max length 1024; bf16;
saved every 200 steps, the best checkpoint by the loss on the last 300 examples, held out (not
done here: the last model is kept); no few-shot block in the SFT text (A1; here the prompt 01
sampled with, PAPERS.md E). Toy defaults below: full tuning, lr 2e-4, 3 epochs, batch 16,
cosine, warmup 0.1 (the positive model's accuracy is the SFT row of README, Results).
"""
import argparse
import json
import math
import random
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from common import (add_training_args, all_reduce_sum, clip_grad_norm, dist_init, dist_teardown,
                    encode_prompt, encode_response, fail, global_batch, load_checkpoint,
                    load_tokenizer, lr_at, MetricsLog, pad_right, peak_memory_all_ranks,
                    peak_memory_gb, print0, read_jsonl, save_checkpoint, save_model, seed_for,
                    sync_gradients, token_logps, training_policy, warmup_steps, write_json,
                    write_jsonl)

parser = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
g = parser.add_argument_group("run")
g.add_argument("--run-dir", default="runs/toy",
               help="run directory shared by all stages (%(default)s)")
g.add_argument("--model", default="", help="initial model of both (default <run-dir>/00_toy/model)")
g.add_argument("--data", default="", help="samples (default <run-dir>/01_sample/samples.jsonl)")
g.add_argument("--out", default="", help="output dir (default <run-dir>/03_contrastive_sft)")
g.add_argument("--limit", type=int, default=0, help="use the first K problems (0 = all)")
g.add_argument("--seed", type=int, default=0,
               help="representatives, tie order, data order (%(default)s)")
g.add_argument("--which", default="pos,neg", help="models to train: pos, neg or pos,neg")
g = parser.add_argument_group("selection")
g.add_argument("--pos-top-k", type=int, default=1, help="correct groups per problem (released: 1)")
g.add_argument("--neg-top-p", type=float, default=0.5,
               help="share of the wrong samples the negative set covers (released: 0.5)")
add_training_args(parser, lr=2e-4, epochs=3, batch_size=16, micro_batch_size=16,
                  warmup_ratio=0.1, schedule="cosine", weight_decay=0.0, max_length=1024)

LORA_TARGETS = ["gate_proj", "up_proj", "down_proj"]  # released SFT targets


# --------------------------------------------------------------------------------------------------
# The selection rule


def select_examples(samples: list[dict], rng: random.Random, pos_top_k: int = 1,
                    neg_top_p: float = 0.5):
    """One problem's samples [{text, pred, correct, truncated}] -> (positive samples, negative
    samples, (chosen, rejected) samples or None), by the released rule (module docstring)."""
    # no extracted answer, or cut by the token limit: counts nowhere
    samples = [s for s in samples if s["pred"] not in (None, "") and not s.get("truncated")]
    rng.shuffle(samples)
    groups: dict[tuple, list[dict]] = {}  # (answer, correct) -> members in shuffled order
    for s in samples:
        groups.setdefault((s["pred"], bool(s["correct"])), []).append(s)
    ordered = sorted(groups.values(), key=len, reverse=True)  # stable: ties keep shuffled order
    correct = [grp for grp in ordered if grp[0]["correct"]]
    wrong = [grp for grp in ordered if not grp[0]["correct"]]

    positive = [grp[0] for grp in correct[:pos_top_k]]
    negative, budget = [], math.ceil(neg_top_p * sum(len(grp) for grp in wrong))
    for grp in wrong:
        if budget > 0 and (not negative or len(grp) >= 2):  # singletons only as the first pick
            negative.append(grp[0])
        budget -= len(grp)
    pair = (correct[0][0], wrong[0][0]) if correct and wrong else None
    return positive, negative, pair


# --------------------------------------------------------------------------------------------------
# Supervised fine-tuning on response tokens


def collate_sft(examples: list[dict], pad_id: int) -> dict:
    """Right-padded input_ids, attention_mask (B, T) and loss_mask (B, T-1): 1 on the columns of
    token_logps that score a response token (response token j of prompt length P: column P+j-1)."""
    rows = [e["prompt_ids"] + e["response_ids"] for e in examples]
    masks = [[0.0] * (len(e["prompt_ids"]) - 1) + [1.0] * len(e["response_ids"]) for e in examples]
    return {"input_ids": pad_right(rows, pad_id),
            "attention_mask": pad_right([[1] * len(r) for r in rows], 0),
            "loss_mask": pad_right(masks, 0.0)}


def train_sft(args, model_path, tok, examples: list[dict], B: int, out: Path, name: str,
              config: dict):
    """Fine-tune one model on `examples` ({prompt_ids, response_ids}), B per optimizer step;
    returns its figures."""
    rank, world, device = dist_init()  # already joined by main(): this only returns them
    mbs = args.micro_batch_size
    model, opt, amp = training_policy(args, model_path, device, LORA_TARGETS, lora_dropout=0.1)
    total = args.max_steps or args.epochs * (len(examples) // B)
    warmup = warmup_steps(args, total)
    ckpt = out / f"checkpoints_{name}"
    step = load_checkpoint(ckpt, model, opt, args.resume)  # fresh run: starts clean
    log = MetricsLog(out / f"metrics_{name}.jsonl", resume_step=step)

    model.train()
    start, loss = time.time(), float("nan")
    while step < total:
        t0 = time.time()
        peak_memory_gb(device)  # reset: each step logs its own peak
        lr = lr_at(step, total, args.lr, warmup, args.schedule)
        for group in opt.param_groups:
            group["lr"] = lr
        batch = global_batch(len(examples), B, args.seed, step)
        mine = batch[rank::world]  # this rank's share
        n_tok = sum(len(examples[i]["response_ids"]) for i in batch)  # whole global batch
        stats = torch.zeros(2, dtype=torch.float64, device=device)  # summed NLL, tokens seen
        for s in range(0, len(mine), mbs):
            sync_gradients(model, last_micro_batch=s + mbs >= len(mine))
            b = {k: v.to(device) for k, v in
                 collate_sft([examples[i] for i in mine[s:s + mbs]], tok.pad_token_id).items()}
            with amp:
                logps = token_logps(model, b["input_ids"], b["attention_mask"])  # (m, T-1)
            nll = -(logps.float() * b["loss_mask"]).sum()
            # mean over the global batch's response tokens; x world: FSDP averages over ranks
            (nll * world / n_tok).backward()
            stats += torch.stack([nll.detach(), b["attention_mask"].sum()]).double()
        grad_norm = clip_grad_norm(model, args.max_grad_norm)
        nll_sum, tokens = all_reduce_sum(stats).cpu().tolist()
        loss = nll_sum / n_tok
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            if rank == 0:
                print(f"error: non-finite SFT loss {loss} at step {step} of the {name} model; "
                      f"{out / name} was not written; try a lower --lr", file=sys.stderr)
            raise SystemExit(1)
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.time() - t0
        log.log({"step": step, "loss": loss, "grad_norm": grad_norm, "lr": lr,
                 "tokens_per_s": tokens / dt, "dt": dt,
                 "peak_mem_gb": peak_memory_all_ranks(device)})
        step += 1
        if step < total and (args.save_every and step % args.save_every == 0
                             or step == args.stop_after):
            save_checkpoint(ckpt, model, opt, step, args.keep_checkpoints)
        if step == args.stop_after and step < total:
            print0(f"stopped the {name} model after step {step} (--stop-after); "
                   "continue with --resume")
            return None

    save_model(model, tok, out / name, extra={**config, "trained": name},
               dtype=torch.bfloat16 if args.bf16 else torch.float32)
    del model, opt
    return {"examples": len(examples), "steps": total, "final_loss": loss,
            "seconds": round(time.time() - start, 1)}


# --------------------------------------------------------------------------------------------------


def main(args):
    rank, world, _ = dist_init()
    run = Path(args.run_dir)
    out = Path(args.out or run / "03_contrastive_sft")
    model_path = args.model or str(run / "00_toy" / "model")
    data = Path(args.data or run / "01_sample" / "samples.jsonl")
    which = [w for w in args.which.split(",") if w]
    if not which or set(which) - {"pos", "neg"}:
        fail(f"--which {args.which!r}: use pos, neg or pos,neg")
    if args.batch_size % world:
        fail(f"--batch-size {args.batch_size} is not divisible by {world} ranks")
    config = {**vars(args), "model": model_path, "data": str(data), "out": str(out),
              "world": world}

    # select
    tok = load_tokenizer(model_path, args.trust_remote_code)
    # the end id a sample was written with; sample files that predate eos_id: the tokenizer's
    eos_of = lambda s: s.get("eos_id", tok.eos_token_id)  # noqa: E731
    records = read_jsonl(data, required={"id": str, "prompt": str, "answer": str,
                                         "samples": list})[:args.limit or None]
    sets, pairs, counts = {"pos": [], "neg": []}, [], Counter(problems=len(records))
    for rec in records:
        for j, s in enumerate(rec["samples"]):
            if not isinstance(s, dict) or not {"text", "pred", "correct"} <= s.keys():
                fail(f"{data}: problem '{rec['id']}': sample {j} needs text, pred and correct")
        rng = random.Random(seed_for(args.seed, rec["id"]))
        pos, neg, pair = select_examples(rec["samples"], rng, args.pos_top_k, args.neg_top_p)
        sets["pos"] += [{"id": rec["id"], "prompt": rec["prompt"], "text": s["text"],
                         "eos_id": eos_of(s)} for s in pos]
        sets["neg"] += [{"id": rec["id"], "prompt": rec["prompt"], "text": s["text"],
                         "eos_id": eos_of(s)} for s in neg]
        counts["empty_pred_samples"] += sum(s["pred"] in (None, "") for s in rec["samples"])
        counts["truncated_samples"] += sum(bool(s.get("truncated")) for s in rec["samples"])
        if pair:
            pairs.append({"id": rec["id"], "prompt": rec["prompt"], "chosen": pair[0]["text"],
                          "rejected": pair[1]["text"], "chosen_eos_id": eos_of(pair[0]),
                          "rejected_eos_id": eos_of(pair[1]), "answer": rec["answer"]})
        elif not pos and not neg:
            counts["skipped_no_answer"] += 1  # no sample has a whole answer that parses
        else:
            counts["skipped_no_correct" if not pos else "skipped_no_wrong"] += 1
    counts.update(pairs=len(pairs), pos_examples=len(sets["pos"]), neg_examples=len(sets["neg"]))
    print0("selection " + " | ".join(f"{k} {v}" for k, v in counts.items()))
    if not pairs:
        fail(f"{data}: no problem has both a correct and a wrong answer; no pairs to write")
    if rank == 0:
        write_jsonl(out / "pairs.jsonl", pairs)
    print0("config " + json.dumps(config))

    # train: the same initial model twice, one set each
    trained = {}
    for name in which:
        examples = [{"prompt_ids": encode_prompt(tok, e["prompt"]),
                     "response_ids": encode_response(tok, e["text"], eos=e["eos_id"])}
                    for e in sets[name]]
        examples = [e for e in examples if len(e["prompt_ids"]) + len(e["response_ids"])
                    <= args.max_length]
        counts[f"{name}_dropped_too_long"] = len(sets[name]) - len(examples)
        if len(examples) < world:
            fail(f"{len(examples)} {name} examples for {world} ranks: need one per rank")
        B = min(args.batch_size, len(examples) - len(examples) % world)  # tiny runs: all there is
        done = out / name / "train.json"  # written with the model: the model is whole
        if args.resume and done.exists():
            print0(f"{out / name} is already trained (--resume): kept")
            trained[name] = json.loads(done.read_text())
            continue
        print0(f"training the {name} model on {len(examples)} examples, {B} per step")
        trained[name] = train_sft(args, model_path, tok, examples, B, out, name, config)
        if trained[name] is None:  # --stop-after: the rest waits for --resume
            dist_teardown()
            return
        if rank == 0:
            write_json(done, trained[name])

    # write
    if rank == 0:
        write_json(out / "summary.json", {"counts": dict(counts), "train": trained,
                                          "config": config})
    dist_teardown()


if __name__ == "__main__":
    main(parser.parse_args())
