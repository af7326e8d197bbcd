"""One DPO-family optimizer step, batch layouts side by side: seconds per step and peak memory.

    python bench/bench_dpo_step.py                          # random pairs shaped like the toy's
    python bench/bench_dpo_step.py --model runs/toy/00_toy/model \\
        --pairs runs/toy/04_score_tokens/pairs.jsonl        # the demo's cDPO pairs (weighted)
    python bench/bench_dpo_step.py --model runs/toy/00_toy/model \\
        --pairs runs/toy/02_localize/pairs.jsonl            # the demo's Step-DPO pairs
    python bench/bench_dpo_step.py --model runs/smollm2/model --lora-r 16 \\
        --pairs runs/smollm2/04_score_tokens/pairs.jsonl --prompt-tokens 800 \\
        --batch-size 2 --micro-batch-size 1 --steps 2 --warmup 1   # real model, 8-shot length

Layouts (--layouts, any of):
  padded        one right-padded row per response, the context repeated in both (--layout padded)
  packed        each pair's context once, then chosen and rejected; pairs packed into rows of up
                to --row-tokens tokens (0: the longest pair), padding only at row ends (the default)
  packed:N      the same with rows of up to N tokens
  trl           TRL's DPOTrainer in its fairest setting: reference log-probs precomputed, the
                same optimizer and clipping (bench/trl_dpo.py; `pip install trl==1.16.0`)
A step is what 05/06 do per global batch: collate each micro-batch (ours: inside the timed step),
token_logps, the stage's loss against the stored reference log-probs (cdpo_loss with the pairs'
weights for 04's pairs, step_dpo_loss for 02's step pairs, DPO for random pairs; TRL: sigmoid DPO),
backward, clipping, AdamW. The reference log-probs are computed once before the first step, in
the same layout (TRL: its precompute). Pairs: the first --batch-size of --pairs, the same ones
every step; 02's step pairs are tokenized as 06 does (encode_step_pair). --prompt-tokens N puts
a few-shot block (mathtext.FEWSHOT_BLOCK, repeated) before each prompt, up to N prompt tokens:
the length of the recipes' 8-shot prompts (~800 tokens), for a model that has no such run.
Each layout runs in a fresh subprocess: --warmup steps, then the median of --steps. Peak memory
comes from a second subprocess (1 warmup step and 1 step, glibc returning every large block at
once): ru_maxrss after the steps minus before the reference pass (on GPU: max_memory_allocated
minus the allocation before). Prints the machine and a markdown table; the ratios in it
("vs padded", "vs TRL": that layout's s/step over this one's; "peak vs padded": this one's peak
extra memory as a share of padded's) are computed here, never by hand.
"""
import argparse
import importlib.util
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
parser.add_argument("--model", default="", help="HF model dir (default: a random model shaped "
                    "like the toy one: hidden 128, 4 layers, vocab 400)")
parser.add_argument("--pairs", default="", help="04's pairs.jsonl (ids, weights) or 02's "
                    "(text); default: random ids shaped like the toy's (prompt ~49, responses ~47)")
parser.add_argument("--layouts", default="padded,packed,trl", help="(%(default)s)")
parser.add_argument("--row-tokens", type=int, default=0, help="rows of `packed` (%(default)s)")
parser.add_argument("--prompt-tokens", type=int, default=0,
                    help="lengthen each prompt to this many tokens with a few-shot block")
parser.add_argument("--batch-size", type=int, default=16, help="pairs per optimizer step")
parser.add_argument("--micro-batch-size", type=int, default=0,
                    help="pairs per forward (0 = the whole batch; else accumulate)")
parser.add_argument("--lora-r", type=int, default=0, help="LoRA rank (0 = full fine-tuning)")
parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
parser.add_argument("--device", default="cpu", help="cpu or cuda (trl: cpu only)")
parser.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
parser.add_argument("--one", default="", help=argparse.SUPPRESS)  # internal: run one layout


def build_model(spec, dev):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from machinery.models import load_model
    torch.manual_seed(0)
    if spec["model"]:
        return load_model(spec["model"], dev)
    cfg = LlamaConfig(vocab_size=400, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(cfg).to(dev)


def load_pairs(spec, tok, stepdpo) -> tuple[list[dict], str]:
    """The first B pairs as token ids, and which loss they train with."""
    from common import encode_prompt, read_jsonl
    B = spec["B"]
    if not spec["pairs"]:  # random, toy-shaped
        rng = random.Random(0)
        jitter = lambda n: max(2, round(n * rng.uniform(0.75, 1.25)))  # noqa: E731
        ids = lambda n: [rng.randrange(3, 400) for _ in range(n)]  # noqa: E731
        return [{"prompt_ids": [1] + ids(jitter(49)), "chosen_ids": ids(jitter(47)) + [2],
                 "rejected_ids": ids(jitter(47)) + [2]} for _ in range(B)], "dpo"
    records = read_jsonl(spec["pairs"])[:B]
    if "prompt_ids" in records[0]:  # 04's scored pairs
        pairs, loss = records, "cdpo"
    else:  # 02's step pairs, tokenized as 06 tokenizes them
        pairs = [stepdpo.encode_step_pair(tok, r) for r in records]
        pairs, loss = [p for p in pairs if p], "stepdpo"
    if spec["prompt_tokens"]:
        from machinery.mathtext import FEWSHOT_BLOCK
        block = tok(FEWSHOT_BLOCK * 8, add_special_tokens=False).input_ids
        for p in pairs:
            body = p["prompt_ids"]
            lead = encode_prompt(tok, "")  # the BOS where the tokenizer adds one
            need = max(0, spec["prompt_tokens"] - len(body))
            p["prompt_ids"] = lead + block[:need] + body[len(lead):]
    if len(pairs) < B:
        raise SystemExit(f"{spec['pairs']}: only {len(pairs)} usable pairs for a batch of {B}")
    return pairs, loss


def load_stage(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run_one(spec):
    import resource

    import torch

    from machinery.packing import collate_pairs
    from common import token_logps
    from machinery.models import load_tokenizer
    from machinery.optimization import adamw, clip_grad_norm
    CDPO, STEPDPO = load_stage("05_train_cdpo"), load_stage("06_train_stepdpo")
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    dev = torch.device(spec["device"])
    model = build_model(spec, dev)
    tok = load_tokenizer(spec["model"]) if spec["model"] else None
    pairs, loss_name = load_pairs(spec, tok, STEPDPO)
    B, mbs, layout = spec["B"], spec["mbs"] or spec["B"], spec["layout"]
    pad_id = tok.pad_token_id if tok else 0
    keywords = {} if layout == "padded" else {
        "packed": True, "row_tokens": int(layout.split(":")[1]) if ":" in layout else spec["rt"]}

    def peak():
        if dev.type == "cuda":
            return torch.cuda.max_memory_allocated()
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    # load the kernels and libraries a step touches (a no-grad forward of a 12-token pair in both
    # layouts, a tiny AdamW), so that the memory delta below is the step's own: activations,
    # logits, gradients, Adam moments (a backward here would leave a full gradient's worth of
    # pages in ru_maxrss, hiding a LoRA step's whole peak)
    model.train()
    tiny = [{"prompt_ids": pairs[0]["prompt_ids"][:8], "chosen_ids": pairs[0]["chosen_ids"][:2],
             "rejected_ids": pairs[0]["rejected_ids"][:2]}]
    with torch.no_grad():
        for packed in (False, True):
            token_logps(model, collate_pairs(tiny, pad_id, packed=packed))
    w = torch.nn.Parameter(torch.zeros(8, 8, device=dev))
    w.grad = torch.ones_like(w)
    torch.optim.AdamW([w]).step()
    before = torch.cuda.memory_allocated() if dev.type == "cuda" else peak()

    if layout == "trl":
        from trl_dpo import trl_dpo_step
        r = trl_dpo_step(model, tok, pairs, B, mbs, spec["steps"], spec["warmup"],
                         lora_r=spec["lora_r"], lora_targets=CDPO.LORA_TARGETS)
        print(json.dumps({**r, "peak": peak() - before, "rows": None}))
        return
    if spec["lora_r"]:
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=spec["lora_r"], lora_alpha=2 * spec["lora_r"],
                                                 target_modules=CDPO.LORA_TARGETS))
    t0 = time.perf_counter()
    with torch.no_grad():  # the reference: the initial policy, once, in the same layout
        for s in range(0, B, mbs):
            b = collate_pairs(pairs[s:s + mbs], pad_id, **keywords)
            lp = token_logps(model, {k: v.to(dev) for k, v in b.items()}).cpu()
            for j, p in enumerate(pairs[s:s + mbs]):
                P, n = len(p["prompt_ids"]) - 1, len(pairs[s:s + mbs])
                p["ref_chosen_logps"] = lp[j, P:P + len(p["chosen_ids"])].tolist()
                p["ref_rejected_logps"] = lp[n + j, P:P + len(p["rejected_ids"])].tolist()
    ref_seconds = time.perf_counter() - t0
    ref_sum = sum(sum(p["ref_chosen_logps"]) + sum(p["ref_rejected_logps"]) for p in pairs)
    opt = adamw(model, 1e-5, 0.0)

    def step():
        tokens = rows = 0
        for s in range(0, B, mbs):
            b = {k: v.to(dev) for k, v in collate_pairs(pairs[s:s + mbs], pad_id,
                                                        **keywords).items()}
            logps = token_logps(model, b)  # (2m, T-1), the padded layout's columns
            if loss_name == "stepdpo":
                losses, _, _ = STEPDPO.step_dpo_loss(logps, b["ref_logps"], b["loss_mask"], 0.5)
            else:  # cDPO's weights from 04; random pairs: 1 on every response token (DPO)
                losses, _, _ = CDPO.cdpo_loss(logps, b["ref_logps"], b["weights"], 0.1)
            (losses.sum() / B).backward()
            tokens += int(b["attention_mask"].sum())
            rows += b["input_ids"].numel()
        clip_grad_norm(model, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return tokens, rows

    for _ in range(spec["warmup"]):
        step()
    times = []
    for _ in range(spec["steps"]):
        t0 = time.perf_counter()
        tokens, rows = step()
        times.append(time.perf_counter() - t0)
    print(json.dumps({"time": statistics.median(times), "tokens": tokens, "rows": rows,
                      "peak": peak() - before, "ref_seconds": ref_seconds,
                      "ref_sum": ref_sum}))


def run_layout(spec, **env) -> dict:
    """run_one in a fresh process (nothing left over from another layout)."""
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", **env)
    out = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)],
                         capture_output=True, text=True, env=env)
    if out.returncode:
        sys.exit(f"{spec['layout']} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(args):
    spec = dict(model=args.model, pairs=args.pairs, device=args.device, B=args.batch_size,
                mbs=args.micro_batch_size, lora_r=args.lora_r, rt=args.row_tokens,
                prompt_tokens=args.prompt_tokens, threads=args.threads, steps=args.steps,
                warmup=args.warmup)
    results = {}
    for layout in args.layouts.split(","):
        if layout == "trl" and importlib.util.find_spec("trl") is None:
            print("trl: not installed (pip install -r bench/requirements.txt); row left out")
            continue
        results[layout] = run_layout({**spec, "layout": layout})
        # memory in a run of its own: with glibc handing every block over 64 KiB back to the OS
        # at once, ru_maxrss is the true high-water mark, but each allocation is then a fresh
        # mmap and its page faults, which would slow the timed steps by 2x and more
        memory = run_layout({**spec, "layout": layout, "steps": 1, "warmup": 1},
                            MALLOC_MMAP_THRESHOLD_="65536")
        results[layout]["peak"] = memory["peak"]
    import torch

    from machine import describe
    prompts = f" | prompts {args.prompt_tokens} tokens" if args.prompt_tokens else ""
    print(describe(args.device, args.threads or None))
    print(f"model {args.model or 'toy-shaped random Llama (h128, L4, vocab 400)'} | pairs "
          f"{args.pairs or 'random, toy-shaped'}{prompts} | "
          f"device {args.device} | threads {args.threads or torch.get_num_threads()} | "
          f"{'LoRA r ' + str(args.lora_r) if args.lora_r else 'full fine-tuning'} | batch "
          f"{args.batch_size}, micro-batch {args.micro_batch_size or args.batch_size} | median "
          f"of {args.steps} steps after {args.warmup}")
    sums = {k: r["ref_sum"] for k, r in results.items() if "ref_sum" in r}
    if sums:  # the layouts must compute the same log-probs (TRL's are its own business)
        spread = max(sums.values()) - min(sums.values())
        print(f"reference log-probs summed over the batch: {min(sums.values()):.4f} "
              f"(layouts differ by {spread:.2g})")
    base, trl = results.get("padded"), results.get("trl")

    def speed(ref, r):  # how many times faster than ref a step is
        return f"{ref['time'] / r['time']:.2f}x" if ref else "-"

    print("| layout | real tokens/step | token slots/step | s/step | vs padded | vs TRL | peak "
          "extra MiB | peak vs padded | reference pass s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for layout, r in results.items():
        share = f"{100 * r['peak'] / base['peak']:.0f}%" if base and base["peak"] > 0 else "-"
        print(f"| {layout} | {r['tokens'] or '-'} | {r['rows'] or '-'} | {r['time']:.3f} | "
              f"{speed(base, r)} | {speed(trl, r)} | {r['peak'] / 2**20:.0f} | {share} | "
              f"{r['ref_seconds'] or 0:.1f} |")


if __name__ == "__main__":
    a = parser.parse_args()
    run_one(json.loads(a.one)) if a.one else main(a)
