"""Stage 00: the embedded toy world, so the whole pipeline runs on a laptop with no downloads.

Draws the toy problems of machinery/toyworld.py (multi-step arithmetic word problems), builds a
sentencepiece BPE tokenizer on them, and trains a 0.86M-parameter Llama from scratch until its
greedy dev accuracy reaches --target-acc. Its errors are mostly one-digit slips in one step's
result: each wrong answer has a clear first wrong step (Step-DPO) and a clear critical token (cDPO).

  prompt   = "Question: " + question + "\\nAnswer:"       (mathtext's plain template, as in 01/07)
  response = " Step 1: 12 + 7 = 19\\nStep 2: 19 - 4 = 15\\nThe answer is 15."
  sequence = [BOS] + ids(prompt) + ids(response) + [EOS]    (loss on response + EOS only)
  loss     = mean cross-entropy over the response + EOS tokens; AdamW, warmup then cosine decay

Writes <run-dir>/00_toy/: model/ (HF Llama + tokenizer, model.safetensors), train/dev/test.jsonl
({id, question, answer: "Step k: a op b = c" lines then "#### N", step_values}, GSM8K format) and
summary.json (steps, seconds, dev and greedy test accuracy, first wrong step of wrong answers).
Same --seed, same files and weights (also across thread counts, checked for 1 and 2). CPU only
(no torchrun: one process trains the toy model in minutes):
  python 00_toy.py --run-dir runs/toy        # CPU, no downloads
On a busy machine OMP_NUM_THREADS=1 runs several times faster than torch's default threads.
"""
import argparse
import json
import os
import random
import re
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

import sentencepiece as spm
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, LlamaTokenizer
from transformers.utils import logging as hf_logging

from common import write_json, write_jsonl
from machinery.generation import generate
from machinery.mathtext import split_steps
from machinery.optimization import adamw, lr_at
from machinery.toyworld import first_wrong_step, make_split, NAMES, OBJECTS, prompt_of, response_of

parser = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
g = parser.add_argument_group("run")
g.add_argument("--run-dir", default="runs/toy", help="run dir; writes <run-dir>/00_toy/")
g.add_argument("--seed", type=int, default=0, help="seed for problems, init and batch order")
g = parser.add_argument_group("data")
g.add_argument("--n-train", type=int, default=20000, help="training problems")
g.add_argument("--n-dev", type=int, default=150, help="dev problems for the stopping rule")
g.add_argument("--n-test", type=int, default=500, help="held-out test problems")
g = parser.add_argument_group("model")
g.add_argument("--hidden", type=int, default=128, help="hidden size (MLP is 2.75x)")
g.add_argument("--layers", type=int, default=4, help="decoder layers")
g.add_argument("--heads", type=int, default=4, help="attention heads")
g = parser.add_argument_group("training")
g.add_argument("--batch-size", type=int, default=32, help="problems per optimizer step")
g.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate")
g.add_argument("--max-steps", type=int, default=2500, help="cap on optimizer steps; the cosine "
               "schedule spans it")
g.add_argument("--min-steps", type=int, default=700, help="first step the stop rule checks")
g.add_argument("--eval-every", type=int, default=100, help="steps between dev checks")
g.add_argument("--target-acc", type=float, default=0.45, help="stop at the first dev check with "
               "greedy accuracy >= this (counted in steps: the build is deterministic)")

ANSWER_RE = re.compile(r"The answer is (-?\d+)\.")  # the toy response's last line


def build_tokenizer(texts: list[str], out_dir: Path):
    """Sentencepiece BPE -> transformers LlamaTokenizer, saved to out_dir and reloaded from there.
    Ids: <pad>=0 <s>=1 </s>=2 <unk>=3, then "\\n" and "▁0".."▁9". split_digits keeps numbers as
    one piece per digit (the first one carries the space), which is what lets the model learn
    column arithmetic; identity normalization and no dummy prefix keep the text byte-exact."""
    with tempfile.TemporaryDirectory() as sp_dir:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_prefix=f"{sp_dir}/tokenizer", model_type="bpe",
            vocab_size=400, hard_vocab_limit=False,  # the toy text supports ~330 pieces
            split_digits=True, normalization_rule_name="identity", add_dummy_prefix=False,
            remove_extra_whitespaces=False, character_coverage=1.0, byte_fallback=False,
            user_defined_symbols=["\n"] + [f"▁{d}" for d in range(10)],
            pad_id=0, bos_id=1, eos_id=2, unk_id=3, num_threads=1, minloglevel=2)
        # add_prefix_space=False: otherwise the converted tokenizer prepends "▁" to every text
        # and its decoder strips the response's leading space. extra_special_tokens=[]: otherwise
        # "\n" and "▁0".."▁9" are listed among all_special_ids.
        tok = LlamaTokenizer.from_pretrained(sp_dir, pad_token="<pad>", add_bos_token=True,
                                             add_prefix_space=False, extra_special_tokens=[],
                                             model_max_length=256)
    tok.save_pretrained(out_dir)
    return AutoTokenizer.from_pretrained(out_dir)


def check_tokenizer(tok, prompts: list[str], responses: list[str]) -> bool:
    """Asserts the contract every later stage relies on; returns whether ids(prompt) +
    ids(response) == ids(prompt + response) held too (nice, but no stage depends on it)."""
    assert set(tok.all_special_ids) == {0, 1, 2, 3}, tok.all_special_tokens
    joint = True
    for p, r in zip(prompts, responses):
        ip = tok(p, add_special_tokens=False).input_ids
        ir = tok(r, add_special_tokens=False).input_ids
        assert tok.decode(ip + ir, skip_special_tokens=True) == p + r, (p, r)
        assert tok.decode(ir, skip_special_tokens=True) == r, r
        assert tok(p).input_ids == [tok.bos_token_id] + ip and tok.bos_token_id not in ip, p
        assert tok.unk_token_id not in ip + ir, (p, r)
        joint &= ip + ir == tok(p + r, add_special_tokens=False).input_ids
    return joint


def length_grouped_batches(lengths: list[int], batch_size: int, rng: random.Random):
    """One epoch of index batches. Sorting windows of 64 batches by length cuts padding
    (a batch-64 step went from 480 to 315 ms); shuffling the batches keeps the order random."""
    idx = list(range(len(lengths)))
    rng.shuffle(idx)
    window, batches = 64 * batch_size, []
    for i in range(0, len(idx), window):
        w = sorted(idx[i:i + window], key=lengths.__getitem__)
        batches += [w[j:j + batch_size] for j in range(0, len(w), batch_size)]
    rng.shuffle(batches)
    return batches


def evaluate(model, tok, recs: list[dict]) -> tuple[float, list[str], list[bool]]:
    """Greedy accuracy: "The answer is N." must match the gold "#### N"."""
    model.eval()
    prompts = [tok(prompt_of(r)).input_ids for r in recs]  # BOS + prompt
    outs = [o["text"] for s in range(0, len(prompts), 256)  # greedy, batched, KV cache
            for o in generate(model, tok, prompts[s:s + 256], max_new_tokens=100)]
    model.train()
    ok = [(m := ANSWER_RE.search(o)) is not None and m.group(1) == r["answer"].split("#### ")[1]
          for o, r in zip(outs, recs)]
    return sum(ok) / len(recs), outs, ok


def main(args):
    # Init
    t0 = time.time()
    hf_logging.disable_progress_bar()  # no "Writing model shards" bar in the log
    out, model_tmp = Path(args.run_dir) / "00_toy", Path(args.run_dir) / "00_toy" / "model.tmp"
    shutil.rmtree(model_tmp, ignore_errors=True)  # the model is built here, renamed at the end
    model_tmp.mkdir(parents=True)
    print(f"config: {json.dumps(vars(args))}")

    # Load: the problems, and a tokenizer built on their training split
    splits = {s: make_split(s, n, args.seed)
              for s, n in [("train", args.n_train), ("dev", args.n_dev), ("test", args.n_test)]}
    lexicon = " ".join([n for n, _ in NAMES] + OBJECTS)  # every letter, however small n-train
    texts = [f(r) for r in splits["train"] for f in (prompt_of, response_of)]
    tok = build_tokenizer(texts + [lexicon], model_tmp)
    held_out = (splits["dev"] + splits["test"])[:200]
    joint = check_tokenizer(tok, [prompt_of(r) for r in held_out],
                            [response_of(r) for r in held_out])
    # One example = ([BOS] + prompt + response + [EOS], n_prompt): the first n_prompt ids carry
    # no loss.
    data = [(tok(prompt_of(r)).input_ids, tok(response_of(r), add_special_tokens=False).input_ids)
            for r in splits["train"]]
    data = [(p + r + [tok.eos_token_id], len(p)) for p, r in data]
    lengths = [len(x) for x, _ in data]
    print(f"vocab {len(tok)} | ids(p)+ids(r)==ids(p+r): {joint} | "
          f"tokens/example {sum(lengths) / len(data):.1f} mean, {max(lengths)} max")

    # Load: a fresh model and its optimizer
    torch.manual_seed(args.seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=args.hidden,
                      intermediate_size=int(2.75 * args.hidden), num_hidden_layers=args.layers,
                      num_attention_heads=args.heads, num_key_value_heads=args.heads,
                      max_position_embeddings=256, tie_word_embeddings=True,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)
    model = LlamaForCausalLM(cfg)  # its generation_config takes bos/eos/pad from cfg
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters")
    # Weight decay 0.1 on matrices, none on norms; not the fused kernel, which rounds differently
    # (1e-7 apart after 100 steps): the same seed keeps giving the same weights.
    opt = adamw(model, args.lr, 0.1, betas=(0.9, 0.98), fused=False)

    # Loop: stop at the first dev check >= target-acc, or at max-steps
    rng, batches, step, dev_acc = random.Random(args.seed), [], 0, None
    t_train = t_log = time.time()
    tokens = 0
    while step < args.max_steps:
        batches = batches or length_grouped_batches(lengths, args.batch_size, rng)
        batch = [data[i] for i in batches.pop()]
        T = max(len(x) for x, _ in batch)
        # Right padding needs no attention mask: causal attention never lets a real token see
        # the pads after it, and the pads carry no loss.
        ids = torch.tensor([x + [tok.pad_token_id] * (T - len(x)) for x, _ in batch])  # (B, T)
        loss_mask = torch.tensor([[0] * n + [1] * (len(x) - n) + [0] * (T - len(x))
                                  for x, n in batch])[:, 1:].bool()  # (B, T-1): response + EOS
        logits = model(input_ids=ids).logits[:, :-1]  # (B, T-1, V) predicts ids[:, 1:]
        loss = F.cross_entropy(logits[loss_mask], ids[:, 1:][loss_mask])  # mean over tokens
        lr = lr_at(step, args.max_steps, args.lr, warmup=max(1, args.max_steps // 20))  # cosine
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step, tokens = step + 1, tokens + sum(len(x) for x, _ in batch)
        if step % 100 == 0:
            dt = time.time() - t_log  # seconds for the last 100 steps
            print(f"step {step:5d} | loss {loss.item():.4f} | lr {lr:.2e} | dt {dt * 10:.0f}ms"
                  f" | tok/s {tokens / dt:.0f}")
            t_log, tokens = time.time(), 0
        if step >= args.min_steps and step % args.eval_every == 0:
            dev_acc = evaluate(model, tok, splits["dev"])[0]
            print(f"step {step:5d} | dev acc {dev_acc:.3f}")
            if dev_acc >= args.target_acc:
                break
    train_s = time.time() - t_train  # dev checks included
    if dev_acc is None or step % args.eval_every:  # stopped at the cap between two checks
        dev_acc = evaluate(model, tok, splits["dev"])[0]

    # then greedy test accuracy, and where the wrong answers first go wrong
    test_acc, outs, ok = evaluate(model, tok, splits["test"])
    wrong = Counter(first_wrong_step(split_steps(o), r["step_values"])
                    for o, r, good in zip(outs, splits["test"], ok) if not good)
    hist = {str(k): wrong[k] for k in sorted(wrong)}

    # Write: the model dir by rename (tokenizer already in it), then data files and summary
    model.save_pretrained(model_tmp)  # model.safetensors; the tied lm_head is stored once
    shutil.rmtree(out / "model", ignore_errors=True)
    os.replace(model_tmp, out / "model")
    summary = {"steps": step, "train_seconds": round(train_s, 1), "dev_acc": dev_acc,
               "test_acc": test_acc, "n_test": len(outs), "first_wrong_step": hist,
               "n_params": n_params, "vocab_size": len(tok), "ids_concat_equals_joint": joint,
               "special_ids": {"pad": tok.pad_token_id, "bos": tok.bos_token_id,
                               "eos": tok.eos_token_id, "unk": tok.unk_token_id},
               "total_seconds": round(time.time() - t0, 1), "config": vars(args)}
    for s, recs in splits.items():  # temp file + rename: a kill never leaves half a file
        write_jsonl(out / f"{s}.jsonl", recs)
    write_json(out / "summary.json", summary)
    print(f"steps {step} | train {train_s:.0f}s | dev acc {dev_acc:.3f} | test acc {test_acc:.3f}"
          f" | first wrong step {hist} | total {summary['total_seconds']:.0f}s -> {out}")


if __name__ == "__main__":
    main(parser.parse_args())
