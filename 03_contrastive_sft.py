"""Stage 03 (cDPO): select the SFT sets and DPO pairs, fine-tune a positive and a negative model.

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
global batch (train_sft holds the optimizer step in view, as 05 and 06 do). Full fine-tuning
by default; --lora-r r adds LoRA (alpha 2r, dropout 0.1, on gate/up/down_proj as released),
merged on save so 04 loads ordinary HF models.

Reads   <run-dir>/01_sample/samples.jsonl  (id, question, answer, prompt,
                                            samples: [{text, pred, correct, truncated, eos_id}])
Writes  <run-dir>/03_contrastive_sft/
          pos/, neg/             HF models (safetensors + tokenizer + training_config.json)
          pairs.jsonl            id, prompt, chosen, rejected, chosen_eos_id, rejected_eos_id,
                                 answer (gold)  -> 04
          metrics_{pos,neg}.jsonl  per optimizer step: step, loss, grad_norm, lr, tokens_per_s,
                                 dt, peak_mem_gb
          checkpoints_{pos,neg}/  with --save-every or --stop-after (torch.distributed.checkpoint)
          summary.json           selection counts, training figures, config

Toy world (CPU):
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
sampled with, PAPERS.md E).
Defaults (the toy run): full tuning; lr 2e-4 with A4's cosine decay, warmup ratio 0.1 (the toy run
has ~120 steps, too few for A4's 100 warmup steps); 3 epochs, batch 16. The positive model they
give is the SFT row of README, Results.
"""
import argparse
import json
import math
import random
import time
from collections import Counter
from pathlib import Path

import torch

from common import (all_reduce_sum, autocast_for, dist_init, dist_teardown, encode_prompt,
                    encode_response, fail, load_for_training, lora_config, print0, read_json,
                    read_jsonl, seed_for, token_logps, write_json, write_jsonl)
from machinery.checkpoints import load_checkpoint, save_checkpoint, save_model
from machinery.checks import each, token_id
from machinery.flags import add_run_args, add_training_args
from machinery.models import load_tokenizer
from machinery.optimization import (adamw, batch_layout, check_batch, clip_grad_norm, fit_batch,
                                    global_batch, lr_at, MetricsLog, peak_memory_all_ranks,
                                    peak_memory_gb, stop_if_not_finite, sync_gradients,
                                    warmup_steps)
from machinery.packing import collate_sft

parser = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
g = add_run_args(parser, model="initial model of both (default: <run-dir>/00_toy/model)",
                 data="graded samples (default: <run-dir>/01_sample/samples.jsonl)",
                 out="03_contrastive_sft", limit="problems",
                 seed="representatives, tie order, data order")
g = parser.add_argument_group("selection")
g.add_argument("--pos-top-k", type=int, default=1, help="correct groups per problem (released: 1)")
g.add_argument("--neg-top-p", type=float, default=0.5,
               help="share of the wrong samples the negative set covers (released: 0.5)")
g.add_argument("--which", default="pos,neg", help="models to train: pos, neg or pos,neg")
add_training_args(parser, lr=2e-4, epochs=3, batch_size=16, micro_batch_size=16,
                  warmup_ratio=0.1, schedule="cosine", weight_decay=0.0, max_length=1024)

LORA_TARGETS = ["gate_proj", "up_proj", "down_proj"]  # released SFT targets


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


def train_sft(args, model_path, tok, examples: list[dict], B: int, out: Path, name: str,
              config: dict, rank: int, world: int, device) -> dict | None:
    """Fine-tune one model on `examples` ({prompt_ids, response_ids}), B per optimizer step, into
    out/<name>; returns its figures, or None when --stop-after ended the run early.

        loss = - sum of log p(response tokens) / response tokens in the global batch"""
    start = time.time()
    model = load_for_training(model_path, device, args.bf16, args.cpu_offload,
                              args.activation_checkpointing,
                              lora_config(args.lora_r, LORA_TARGETS, lora_dropout=0.1),
                              args.trust_remote_code)
    opt, amp = adamw(model, args.lr, args.weight_decay), autocast_for(device, args.bf16)
    layout = batch_layout(args, model)  # packed rows, or padded where the model cannot take them
    total = args.max_steps or args.epochs * (len(examples) // B)
    warmup, mbs = warmup_steps(args, total), args.micro_batch_size
    ckpt = out / f"checkpoints_{name}"
    step = load_checkpoint(ckpt, model, opt, args.resume)  # 0: a fresh run
    log = MetricsLog(out / f"metrics_{name}.jsonl", resume_step=step)
    model.train()
    loss = float("nan")
    while step < total:
        t0 = time.time()
        peak_memory_gb(device)  # reset: each step logs its own peak
        lr = lr_at(step, total, args.lr, warmup, args.schedule)
        for group in opt.param_groups:
            group["lr"] = lr
        batch = global_batch(len(examples), B, args.seed, step)  # the same on every rank
        mine = batch[rank::world]  # this rank's share
        n_tokens = sum(len(examples[i]["response_ids"]) for i in batch)  # the loss: mean over these
        sums = torch.zeros(2, dtype=torch.float64, device=device)  # NLL, input tokens of the share
        for s in range(0, len(mine), mbs):
            sync_gradients(model, last_micro_batch=s + mbs >= len(mine))
            b = {k: v.to(device) for k, v in collate_sft(
                [examples[i] for i in mine[s:s + mbs]], tok.pad_token_id, **layout).items()}
            with amp:
                logps = token_logps(model, b)  # (m, T-1), the padded layout's columns
            nll = -(logps.float() * b["loss_mask"]).sum()  # summed over the response tokens
            # times world as FSDP averages gradients over ranks: the 1-process update (05)
            (nll * world / n_tokens).backward()
            sums += torch.stack([nll.detach(), b["attention_mask"].sum()]).double()
        grad_norm = clip_grad_norm(model, args.max_grad_norm)
        loss, tokens = all_reduce_sum(sums).cpu().tolist()  # all ranks
        loss = loss / n_tokens
        stop_if_not_finite(loss, grad_norm, step, ckpt, out / name)
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
            print0(f"stopped after step {step} (--stop-after); --resume finishes {out / name}")
            return None
    save_model(model, tok, out / name, extra={**config, "trained": name},
               dtype=torch.bfloat16 if args.bf16 else torch.float32)
    return {"examples": len(examples), "steps": total, "final_loss": loss,
            "seconds": round(time.time() - start, 1)}  # the model leaves memory with this frame


def main(args):
    # Init
    rank, world, device = dist_init()
    run = Path(args.run_dir)
    out = Path(args.out or run / "03_contrastive_sft")
    model_path = args.model or str(run / "00_toy" / "model")
    data = Path(args.data or run / "01_sample" / "samples.jsonl")
    which = [w for w in args.which.split(",") if w]
    if not which or set(which) - {"pos", "neg"}:
        fail(f"--which {args.which!r}: use pos, neg or pos,neg")
    check_batch(args)
    config = {**vars(args), "model": model_path, "data": str(data), "out": str(out),
              "world": world}

    # Load: the graded samples, then the selection of each problem (select_examples)
    tok = load_tokenizer(model_path, args.trust_remote_code)
    # the end id a sample was written with; sample files that predate eos_id: the tokenizer's
    eos_of = lambda s: s.get("eos_id", tok.eos_token_id)  # noqa: E731
    sample = each({"text": str, "pred": (str, type(None)), "correct": bool},
                  {"truncated": bool, "eos_id": token_id(len(tok), null=True)})
    records = read_jsonl(data, required={"id": str, "prompt": str, "answer": str,
                                         "samples": sample})[:args.limit or None]
    # --resume: the models an earlier run finished (train.json is written with the model)
    trained = {name: read_json(out / name / "train.json", hint="delete it to train that model "
                               "again") for name in which
               if args.resume and (out / name / "train.json").exists()}
    sets, pairs, counts = {"pos": [], "neg": []}, [], Counter(problems=len(records))
    for rec in records:
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

    # Loop: the same initial model twice, one set each (train_sft: the optimizer steps)
    for name in which:
        examples = [{"prompt_ids": encode_prompt(tok, e["prompt"]),
                     "response_ids": encode_response(tok, e["text"], eos=e["eos_id"])}
                    for e in sets[name]]
        examples = [e for e in examples if len(e["prompt_ids"]) + len(e["response_ids"])
                    <= args.max_length]
        counts[f"{name}_dropped_too_long"] = len(sets[name]) - len(examples)
        B = fit_batch(args, len(examples), f"{name} examples")
        done = out / name / "train.json"  # written with the model: the model is whole
        if name in trained:
            print0(f"{out / name} is already trained (--resume): kept")
            continue
        print0(f"training the {name} model on {len(examples)} examples, {B} per step")
        trained[name] = train_sft(args, model_path, tok, examples, B, out, name, config, rank,
                                  world, device)
        if trained[name] is None:  # --stop-after: the rest waits for --resume
            dist_teardown()
            return
        if rank == 0:
            write_json(done, trained[name])

    # Write
    if rank == 0:
        write_json(out / "summary.json", {"counts": dict(counts), "train": trained,
                                          "config": config})

    # Cleanup
    dist_teardown()


if __name__ == "__main__":
    main(parser.parse_args())
