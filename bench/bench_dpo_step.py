"""One cDPO/DPO optimizer step on the toy model: time, peak memory, tokens/s.

    python bench/bench_dpo_step.py                                   # toy-shaped model, B 8/16/32
    python bench/bench_dpo_step.py --model runs/toy/00_toy/model     # the trained toy model
    python bench/bench_dpo_step.py --device cuda --batch-sizes 16,64

A step is what 05_train_cdpo.py does per global batch: chosen and rejected in one concatenated
(2B, T) forward through common.token_logps, the sequence-level cdpo_loss against stored reference
log-probs, backward, gradient clipping and an AdamW update (micro-batches accumulate when
--micro-batch-size < B). Pairs are random token ids shaped like the toy world's (prompt ~49,
responses ~47 tokens, lengths jittered by up to 25%). Each configuration runs in a fresh
subprocess: --warmup steps, then the median of --steps timed steps. Peak memory = ru_maxrss after
the steps minus ru_maxrss before the first one (activations, gradients, Adam moments; on GPU
torch.cuda.max_memory_allocated minus the allocation before). Prints a markdown table.
"""
import argparse
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

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
parser.add_argument("--model", default="", help="HF model dir (default: a random model shaped "
                    "like the toy one: hidden 128, 4 layers, vocab 400)")
parser.add_argument("--device", default="cpu", help="cpu or cuda")
parser.add_argument("--batch-sizes", default="8,16,32", help="pairs per optimizer step")
parser.add_argument("--micro-batch-size", type=int, default=0,
                    help="pairs per forward (0 = the whole batch; else accumulate)")
parser.add_argument("--lora-r", type=int, default=0, help="LoRA rank (0 = full fine-tuning)")
parser.add_argument("--prompt-len", type=int, default=49, help="mean prompt tokens")
parser.add_argument("--response-len", type=int, default=47, help="mean response tokens")
parser.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
parser.add_argument("--one", default="", help=argparse.SUPPRESS)  # internal: run one configuration


def run_one(spec):
    import importlib.util
    import resource

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from common import collate_pairs, load_model, token_logps
    from training import adamw, clip_grad_norm
    stage = importlib.util.spec_from_file_location("cdpo", ROOT / "05_train_cdpo.py")
    cdpo = importlib.util.module_from_spec(stage)
    stage.loader.exec_module(cdpo)

    dev = torch.device(spec["device"])
    torch.manual_seed(0)
    if spec["model"]:
        model = load_model(spec["model"], dev)
    else:
        cfg = LlamaConfig(vocab_size=400, hidden_size=128, intermediate_size=352,
                          num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                          tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
        model = LlamaForCausalLM(cfg).to(dev)
    if spec["lora_r"]:
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=spec["lora_r"], lora_alpha=2 * spec["lora_r"],
                                                 target_modules=cdpo.LORA_TARGETS))
    model.train()
    V, B = model.config.vocab_size, spec["B"]
    mbs = spec["mbs"] or B
    rng = random.Random(0)
    jitter = lambda n: max(2, round(n * rng.uniform(0.75, 1.25)))  # noqa: E731
    ids = lambda n: [rng.randrange(3, V) for _ in range(n)]  # noqa: E731
    pairs = []
    for _ in range(B):
        c, r = ids(jitter(spec["R"])) + [2], ids(jitter(spec["R"])) + [2]
        pairs.append({"prompt_ids": [1] + ids(jitter(spec["P"])), "chosen_ids": c,
                      "rejected_ids": r, "rejected_weights": [rng.random() for _ in r],
                      "ref_chosen_logps": [-3.0] * len(c), "ref_rejected_logps": [-3.0] * len(r)})
    batches = [{k: v.to(dev) for k, v in collate_pairs(pairs[s:s + mbs], 0).items()}
               for s in range(0, B, mbs)]
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    opt = adamw(model, 1e-5, 0.0)

    def step():
        for b in batches:
            logps = token_logps(model, b["input_ids"], b["attention_mask"])  # (2m, T-1)
            losses, _, _ = cdpo.cdpo_loss(logps, b["ref_logps"], b["weights"], 0.1)
            (losses.sum() / B).backward()
        clip_grad_norm(model, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def peak():
        if dev.type == "cuda":
            return torch.cuda.max_memory_allocated()
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    # load the kernels and libraries a step touches with a 1-pair forward and backward, so the
    # memory delta below is the step's own: activations, gradients, Adam moments
    b = {k: v.to(dev) for k, v in collate_pairs(pairs[:1], 0).items()}
    token_logps(model, b["input_ids"], b["attention_mask"]).sum().backward()
    model.zero_grad(set_to_none=True)
    w = torch.nn.Parameter(torch.zeros(8, 8, device=dev))  # optimizer code paths, tiny state
    w.grad = torch.ones_like(w)
    torch.nn.utils.clip_grad_norm_([w], 1.0)
    torch.optim.AdamW([w]).step()
    before = torch.cuda.memory_allocated() if dev.type == "cuda" else peak()
    for _ in range(spec["warmup"]):
        step()
    times = []
    for _ in range(spec["steps"]):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(json.dumps({"time": statistics.median(times), "tokens": tokens,
                      "peak": peak() - before, "params": params}))


def main(args):
    rows = []
    for B in [int(b) for b in args.batch_sizes.split(",")]:
        spec = dict(model=args.model, device=args.device, B=B, mbs=args.micro_batch_size,
                    lora_r=args.lora_r, P=args.prompt_len, R=args.response_len,
                    steps=args.steps, warmup=args.warmup)
        # glibc hands large blocks back to the OS at once, so ru_maxrss is the true high-water mark
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
        out = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)],
                             capture_output=True, text=True, check=True, env=env)
        rows.append((B, json.loads(out.stdout.strip().splitlines()[-1])))
    import torch
    model = args.model or "toy-shaped random Llama (h128, L4, vocab 400)"
    print(f"model {model} | device {args.device} | threads {torch.get_num_threads()} | "
          f"{'LoRA r ' + str(args.lora_r) if args.lora_r else 'full fine-tuning'} | "
          f"micro-batch {args.micro_batch_size or 'B'} | median of {args.steps} steps")
    print("| pairs B | tokens/step | trainable params | step ms | tokens/s | peak extra MiB |")
    print("|---|---|---|---|---|---|")
    for B, r in rows:
        print(f"| {B} | {r['tokens']} | {r['params']:,} | {r['time'] * 1e3:.0f} | "
              f"{r['tokens'] / r['time']:,.0f} | {r['peak'] / 2**20:.0f} |")


if __name__ == "__main__":
    a = parser.parse_args()
    run_one(json.loads(a.one)) if a.one else main(a)
