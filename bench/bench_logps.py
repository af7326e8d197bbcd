"""token_logps vs naive log_softmax + gather: time and peak memory beyond the model's forward.

    python bench/bench_logps.py                 # CPU: vocab 32k and 128k, B=2, T=512
    python bench/bench_logps.py --device cuda   # GPU: adds bf16 logits, B=4, T=2048

Each variant runs in two fresh subprocesses: one times it (median of --repeats after a warm-up),
one measures its memory. Peak memory beyond the forward = (peak of forward + log-probs +
backward) - (peak of the baseline: forward, then backward of logits.sum(), whose one
logits-sized gradient every loss needs to reach lm_head), read from ru_maxrss on CPU (with
glibc's mmap threshold lowered, so that every large block goes back to the OS when freed and
ru_maxrss is the true high-water mark) and torch.cuda.max_memory_allocated on GPU. The timing
process keeps glibc's default threshold: the lowered one makes every large allocation a fresh
mmap and its page faults, ~2x slower steps (BENCHMARKS.md). Target: under 25% of the logits
tensor for token_logps (naive costs 100-200%). token_logps_4M: its chunks before they were
sized by bytes (4M elements: 128-512 chunks of tiny kernels at vocabulary 128,256 on a GPU).
Prints a markdown table for BENCHMARKS.md.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from machine import describe  # noqa: E402  (bench/, the script's own folder)

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
parser.add_argument("--device", default="cpu", help="cpu or cuda")
parser.add_argument("--vocabs", default="32000,128256", help="comma-separated vocabulary sizes")
parser.add_argument("--batch-size", type=int, default=0, help="B (0: 2 on CPU, 4 on GPU)")
parser.add_argument("--seq-len", type=int, default=0, help="T (0: 512 on CPU, 2048 on GPU)")
parser.add_argument("--repeats", type=int, default=3, help="timed runs per variant (median)")
parser.add_argument("--one", default="", help=argparse.SUPPRESS)  # internal: run one variant


def run_one(spec):
    import resource

    import torch
    import torch.nn.functional as F
    from transformers import LlamaConfig, LlamaForCausalLM

    from common import token_logps
    dev = torch.device(spec["device"])
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    cfg = LlamaConfig(vocab_size=spec["vocab"], hidden_size=256, intermediate_size=512,
                      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4)
    model = LlamaForCausalLM(cfg).to(dev, dtype)
    B, T = spec["B"], spec["T"]
    ids = torch.randint(0, spec["vocab"], (B, T), device=dev)
    mask = torch.ones_like(ids)

    def variant():
        train = spec["mode"] == "train"
        with torch.set_grad_enabled(train):
            if spec["variant"] == "baseline":
                logits = model(input_ids=ids, attention_mask=mask).logits
                if train:  # any loss needs one logits-sized gradient to reach lm_head
                    logits.backward(torch.ones_like(logits))
            elif spec["variant"] == "naive":
                logits = model(input_ids=ids, attention_mask=mask).logits
                lp = F.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])
                if train:
                    lp.sum().backward()
            else:  # token_logps: chunks by its default byte budget, or the old 4M-element ones
                old = spec["variant"] == "token_logps_4M"
                lp = token_logps(model, {"input_ids": ids, "attention_mask": mask}, **({"chunk_bytes": 4 << 22} if old else {}))
                if train:
                    lp.sum().backward()
        model.zero_grad(set_to_none=True)

    def peak():
        if dev.type == "cuda":
            return torch.cuda.max_memory_allocated()
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    variant()  # warm-up; on CPU its own peak is the high-water mark we compare against
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(spec["repeats"] if spec["measure"] == "time" else 1):
        t0 = time.perf_counter()
        variant()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    logits_bytes = B * T * spec["vocab"] * torch.finfo(dtype).bits // 8
    print(json.dumps({"peak": peak(), "time": statistics.median(times), "logits": logits_bytes}))


def run_variant(spec, **env) -> dict:
    """run_one in a fresh process. Memory runs pass MALLOC_MMAP_THRESHOLD_: glibc then hands every
    block over 64 KiB back to the OS at once, so ru_maxrss is the true high-water mark, not an
    allocator artefact; timed runs keep the default (a fresh mmap per large block is slow)."""
    out = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)],
                         capture_output=True, text=True, check=True, env=dict(os.environ, **env))
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(args):
    on_gpu = args.device == "cuda"
    B = args.batch_size or (4 if on_gpu else 2)
    T = args.seq_len or (2048 if on_gpu else 512)
    rows = []
    for V in [int(v) for v in args.vocabs.split(",")]:
        for mode in ("forward", "train"):
            res = {}
            for variant in ("baseline", "naive", "token_logps_4M", "token_logps"):
                spec = dict(device=args.device, vocab=V, B=B, T=T, variant=variant, mode=mode,
                            repeats=args.repeats)
                res[variant] = {"time": run_variant({**spec, "measure": "time"})["time"],
                                **{k: v for k, v in run_variant(
                                    {**spec, "measure": "memory"}, MALLOC_MMAP_THRESHOLD_="65536"
                                ).items() if k != "time"}}
            base = res["baseline"]
            for variant in ("naive", "token_logps_4M", "token_logps"):
                extra = res[variant]["peak"] - base["peak"]
                rows.append((V, mode, variant, res[variant]["time"] * 1e3, extra / 2**20,
                             100 * extra / base["logits"], base["logits"] / 2**20))
    print(f"{describe(args.device, int(os.environ.get('OMP_NUM_THREADS', 0)) or None)} | "
          f"B {B} | T {T} | median of {args.repeats} (timed apart from the memory runs) | extra "
          "peak = beyond the model's own forward (and, in train, its one logits-sized gradient)")
    print("| vocab | pass | method | ms | extra peak MiB | % of logits | logits MiB |")
    print("|---|---|---|---|---|---|---|")
    for V, mode, name, ms, mib, pct, lmib in rows:
        print(f"| {V} | {mode} | {name} | {ms:.0f} | {mib:.0f} | {pct:.0f}% | {lmib:.0f} |")

if __name__ == "__main__":
    a = parser.parse_args()
    run_one(json.loads(a.one)) if a.one else main(a)
