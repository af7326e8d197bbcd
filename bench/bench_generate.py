"""Sampling at the shapes real runs have, side by side in one run: our generate before and now,
transformers' generate and vLLM's CPU backend, on the real SmolLM2-135M-Instruct.

    python bench/bench_generate.py --threads 2                         # all shapes, ~25 min
    python bench/bench_generate.py --threads 2 --shapes chat-n8,fewshot-n64 --variants now,vLLM
    python bench/bench_generate.py --threads 2 --shapes chat-n8,fewshot-n64 --variants prev,now,prepacked
    python bench/bench_generate.py --device cuda --variants before,now,bf16,HF --batch-size 256

Shapes (--shapes; rows = prompts x n, --max-new-tokens each):
  chat-greedy   make real's 07: 32 GSM8K test questions, chat template (~60-140 tokens), greedy
  chat-n8       the real-model study's 01: 8 questions x n 8, T 0.7 / top-p 0.95
  fewshot-greedy  few-shot GSM8K prompts of ~800 tokens (the recipes' 8-shot prompt length under
                  Llama-3's tokenizer), 8 questions, greedy
  fewshot-n8      4 questions x n 8, T 0.7 / top-p 0.95
  fewshot-n64     the cDPO recipe's 01: 1 question x n 64, T 0.7 / top-p 0.95
The exemplars are the first --shots problems of data/gsm8k_test_64.jsonl with their gold
solutions (calculator annotations removed, "The answer is N." last; the questions asked are the
next ones) in mathtext's plain Question/Answer format: 5 make ~800 tokens under SmolLM2's
tokenizer, which writes every digit as a token of its own (8 would make ~1,300).
Variants (--variants):
  before  sampling.generate as git revision --before has it (default: the last commit before
          generation.py), run as the stages ran it: the rows in static batches of --batch-size
  now     generation.generate(batch_size=--batch-size): continuous batching, each prompt computed
          once and its keys and values held once for its rows, the top-k nucleus
  prev    generation.generate as git revision --prev has it (default: before one copy of a
          shared prompt: each row held its own copy of its prompt's keys and values)
  prepacked  now, on a copy of the model whose linear layers hold oneDNN-prepacked float32
          weights (torch.utils.mkldnn.MkldnnLinear): tried, not used by the stages
  bf16    now, on a bfloat16 copy of the model (--bf16 of the sampling stages)
  HF      model.generate(num_return_sequences=n, top_k=None), --batch-size // n prompts a call
  vLLM    bench/vllm_generate.py under --vllm-python (a venv of its own: its docstring has the
          recipe); "not installed" when that python is absent. Its start (~1-2 min) is not timed.
Each variant runs once per shape (--repeats for more; the median is reported), the variants of a
shape one after another. Generated tokens = per row, its ids up to and including its first end
id. Peak memory: on CPU the peak resident set during the run above what was held before it
(VmHWM reset through /proc/self/clear_refs after malloc_trim; vLLM: its process's ru_maxrss,
weights and its 2 GiB KV cache included); on CUDA max_memory_allocated above the allocated.
MFU share: generated tokens/s x 2 x parameters (the FLOPs of a token's forward, attention left
out) over a large float32 matmul's FLOP/s on the same threads (measured first): the share of the
machine's dense throughput that ends up in generated tokens (prompt work is not credited).
Checks: greedy ids of now = before = HF (rows equal, counted), sampled ids of now = before, prev
and prepacked (the same per-row seeds), bf16's greedy agreement with float32 (rows identical /
all); the tokens/s of prev and prepacked against now's.
Targets (issue 20): now >= 2x before at chat-n8 and >= 4x at fewshot-n64; now >= 1.2x vLLM there.
"""
import argparse
import atexit
import ctypes
import importlib
import json
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

SHAPES = {  # name: (template, questions, n, temperature, top_p)
    "chat-greedy": ("chat", 32, 1, 0.0, 1.0), "chat-n8": ("chat", 8, 8, 0.7, 0.95),
    "fewshot-greedy": ("fewshot", 8, 1, 0.0, 1.0), "fewshot-n8": ("fewshot", 4, 8, 0.7, 0.95),
    "fewshot-n64": ("fewshot", 1, 64, 0.7, 0.95)}

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
parser.add_argument("--model", default=str(ROOT / "runs/smollm2/model"), help="model dir")
parser.add_argument("--data", default=str(ROOT / "data/gsm8k_test_64.jsonl"), help="questions")
parser.add_argument("--device", default="cpu", help="cpu or cuda")
parser.add_argument("--shapes", default=",".join(SHAPES), help="which shapes (see above)")
parser.add_argument("--variants", default="before,now,bf16,HF,vLLM", help="which variants")
parser.add_argument("--shots", type=int, default=5, help="exemplars of the few-shot prompts")
parser.add_argument("--batch-size", type=int, default=64, help="rows decoded side by side")
parser.add_argument("--max-new-tokens", type=int, default=128, help="tokens per row, at most")
parser.add_argument("--repeats", type=int, default=1, help="timed runs per variant (median)")
parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
parser.add_argument("--before", default="f7d2717", help="git revision of the previous generate")
parser.add_argument("--prev", default="6174d0e",
                    help="git revision of machinery/generation.py for the prev variant")
parser.add_argument("--vllm-python", default="/work/vllm-venv/bin/python",
                    help="python of vLLM's venv (bench/vllm_generate.py)")


def generate_at(rev: str):
    """generate as it is in git revision `rev`'s sampling.py, imported from that revision's own
    tree (its sampling.py imports its own common.py and mathtext.py, since moved or changed)."""
    tree = tempfile.mkdtemp(prefix=f"generate-{rev}-")
    atexit.register(shutil.rmtree, tree, True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], capture_output=True)
    if archive.returncode != 0:
        raise SystemExit(f"no revision {rev}: {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", tree], input=archive.stdout, check=True)
    if "def generate(" not in (Path(tree) / "sampling.py").read_text():
        raise SystemExit(f"no generate in {rev}:sampling.py")
    names = ("common", "mathtext", "batches", "sampling")  # that tree's top-level modules
    ours = {n: sys.modules.pop(n) for n in names if n in sys.modules}
    sys.path.insert(0, tree)
    try:
        return importlib.import_module("sampling").generate
    finally:  # that revision's modules stay bound inside its generate, not in sys.modules
        sys.path.remove(tree)
        for n in names:
            sys.modules.pop(n, None)
        sys.modules.update(ours)


def generation_at(rev: str):
    """generate as it is in git revision `rev`'s machinery/generation.py (it imports only
    torch, transformers and common.position_ids, which are unchanged)."""
    r = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:machinery/generation.py"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"no machinery/generation.py in {rev}: {r.stderr.strip()}")
    mod = types.ModuleType(f"generation_{rev}")
    exec(compile(r.stdout, f"generation.py@{rev}", "exec"), mod.__dict__)
    return mod.generate


def prepacked_copy(model):
    """A copy of `model` whose nn.Linear layers are oneDNN MkldnnLinear (float32 weights
    reordered once into oneDNN's blocked layout; inputs and outputs stay dense tensors)."""
    import copy
    import torch
    from torch.utils.mkldnn import MkldnnLinear
    packed = copy.deepcopy(model)
    for module in list(packed.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear):
                setattr(module, name, MkldnnLinear(child, torch.float32))
    return packed


def measure(device, fn):
    """(result, seconds, peak bytes above what was held before) of fn()."""
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        held = torch.cuda.memory_allocated()
    else:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed tensors leave the resident set
        held = status_bytes("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() - held if device.type == "cuda" else \
        status_bytes("VmHWM") - held
    return out, seconds, peak


def status_bytes(field: str) -> int:
    return int(re.search(field + r":\s+(\d+)", open("/proc/self/status").read())[1]) * 1024


def matmul_flops(device, threads: int) -> float:
    """FLOP/s of a large float32 matmul (2048^3) on this device and threads: the reference."""
    import torch
    a = torch.randn(2048, 2048, device=device)
    for _ in range(2):
        a @ a
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 2.0:
        a @ a
        n += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * 2048 ** 3 * n / (time.perf_counter() - t0)


def run_vllm(python: str, model_dir: Path, prompts, n, temperature, top_p, max_new_tokens,
             ends) -> dict | None:
    """bench/vllm_generate.py in vLLM's venv on the same ids; None where it is not installed."""
    if not Path(python).exists():
        return None
    with tempfile.TemporaryDirectory() as d:
        spec, out = Path(d) / "in.json", Path(d) / "out.json"
        spec.write_text(json.dumps({"prompts": prompts, "n": n, "temperature": temperature,
                                    "top_p": top_p, "max_new_tokens": max_new_tokens,
                                    "end_ids": sorted(ends)}))
        r = subprocess.run([python, str(ROOT / "bench/vllm_generate.py"), "--model",
                            str(model_dir), "--prompts", str(spec), "--out", str(out)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            print(f"vLLM failed:\n{r.stderr[-3000:]}", file=sys.stderr)
            return None
        return json.loads(out.read_text())


def main(args):
    import torch

    from machine import describe
    from common import encode_prompt, seed_for
    from machinery.models import load_model, load_tokenizer
    from machinery.generation import end_ids, generate
    from machinery.mathtext import format_prompt, load_problems, PLAIN_TEMPLATE
    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = Path(args.model)
    if not (model_dir / "model.safetensors").exists():
        subprocess.run([sys.executable, str(ROOT / "runs/build_smollm2.py"), "--out",
                        str(model_dir)], check=True)
    device = torch.device(args.device)
    model = load_model(model_dir, device).eval()
    tok = load_tokenizer(model_dir)
    variants = args.variants.split(",")
    model16 = load_model(model_dir, device, torch.bfloat16).eval() if "bf16" in variants else None
    problems = load_problems(args.data)
    shots = "".join(PLAIN_TEMPLATE.format(question=p["question"]) + " " +
                    re.sub(r"<<[^>]*>>", "", p["solution"].split("####")[0]).strip() +
                    f" The answer is {p['answer']}.\n\n" for p in problems[:args.shots])
    ends = set(end_ids(model, tok))
    generate_before = generate_at(args.before) if "before" in variants else None
    generate_prev = generation_at(args.prev) if "prev" in variants else None
    model_packed = prepacked_copy(model) if "prepacked" in variants else None
    peak_flops = matmul_flops(device, args.threads)
    n_params = sum(p.numel() for p in model.parameters())

    def cut(ids):  # up to and including the first end id
        return ids[:next((j + 1 for j, t in enumerate(ids) if t in ends), len(ids))]

    table, checks = [], []
    for shape in args.shapes.split(","):
        template, n_q, n, temperature, top_p = SHAPES[shape]
        qs = problems[args.shots:args.shots + n_q]
        prompts = [encode_prompt(tok, shots + PLAIN_TEMPLATE.format(question=p["question"])
                                 if template == "fewshot" else
                                 format_prompt(p["question"], "chat", tok)) for p in qs]
        rows = [p for p in prompts for _ in range(n)]
        seeds = [seed_for(0, q["id"], k) for q in qs for k in range(n)]
        kw = dict(temperature=temperature, top_p=top_p, max_new_tokens=args.max_new_tokens)
        B = args.batch_size

        def before():
            return [o["ids"] for s in range(0, len(rows), B)
                    for o in generate_before(model, tok, rows[s:s + B], seeds[s:s + B], **kw)]

        def now(m=model):
            return [o["ids"] for o in generate(m, tok, rows, seeds, batch_size=B, **kw)]

        def hf():
            out, per = [], max(1, B // n)
            for s in range(0, len(prompts), per):
                chunk = prompts[s:s + per]
                P = max(map(len, chunk))
                pad = tok.pad_token_id
                ids = torch.tensor([[pad] * (P - len(p)) + p for p in chunk], device=device)
                mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in chunk],
                                    device=device)
                sample = dict(do_sample=True, temperature=temperature, top_p=top_p) if \
                    temperature else dict(do_sample=False, temperature=None, top_p=None)
                with torch.no_grad():
                    gen = model.generate(input_ids=ids, attention_mask=mask, pad_token_id=pad,
                                         max_new_tokens=args.max_new_tokens, top_k=None,
                                         num_return_sequences=n, **sample)[:, P:].tolist()
                out += [cut(g) for g in gen]
            return out

        def prev():
            return [o["ids"] for o in generate_prev(model, tok, rows, seeds, batch_size=B, **kw)]

        fns = {"before": before, "prev": prev, "now": now, "prepacked": lambda: now(model_packed),
               "bf16": lambda: now(model16), "HF": hf}
        got = {}
        for v in variants:
            if v == "vLLM":
                r = run_vllm(args.vllm_python, model_dir, prompts, n, temperature, top_p,
                             args.max_new_tokens, ends)
                got[v] = None if r is None else (
                    [ids for per in r["outputs"] for ids in per], [r["seconds"]],
                    r["peak_rss_mib"] * 2 ** 20)
                continue
            fns[v]() if args.repeats > 1 else None  # a warm-up where the median is asked for
            runs = [measure(device, fns[v]) for _ in range(args.repeats)]
            got[v] = (runs[-1][0], [r[1] for r in runs], max(r[2] for r in runs))
            print(f"{shape} {v}: {statistics.median(got[v][1]):.1f} s", file=sys.stderr)
        rate = {v: sum(map(len, g[0])) / statistics.median(g[1]) for v, g in got.items() if g}
        for v in variants:
            if got.get(v) is None:
                table.append((shape, rows, prompts, n, v, None))
                continue
            ids, times, peak = got[v]
            table.append((shape, rows, prompts, n, v, (sum(map(len, ids)), statistics.median(
                times), rate[v], peak, rate[v] * 2 * n_params / peak_flops,
                rate[v] / rate["before"] if "before" in rate else None)))
        for other in ("prev", "prepacked"):
            if "now" in got and other in got:
                same = sum(a == b for a, b in zip(got["now"][0], got[other][0]))
                checks.append(f"{shape}: now = {other} on {same}/{len(rows)} rows; "
                              f"{other} / now = {rate[other] / rate['now']:.2f}x tokens/s")
        if "now" in got and "before" in got:
            same = sum(a == b for a, b in zip(got["now"][0], got["before"][0]))
            checks.append(f"{shape}: now = before on {same}/{len(rows)} rows")
        if temperature == 0 and "now" in got and "HF" in got:
            same = sum(a == b for a, b in zip(got["now"][0], got["HF"][0]))
            checks.append(f"{shape}: now = HF on {same}/{len(rows)} rows")
        if temperature == 0 and "now" in got and got.get("bf16"):
            same = sum(a == b for a, b in zip(got["now"][0], got["bf16"][0]))
            checks.append(f"{shape}: bf16 greedy = float32 greedy on {same}/{len(rows)} rows")

    print(f"model: {model_dir} (SmolLM2-135M-Instruct from GGUF, {n_params / 1e6:.1f}M "
          f"parameters, float32) | {describe(args.device, args.threads)}")
    print(f"command: {shlex.join([Path(sys.executable).name, *sys.argv])}")
    print(f"batch {args.batch_size} rows | max_new_tokens {args.max_new_tokens} | "
          f"{'median of ' + str(args.repeats) if args.repeats > 1 else 'one run'} | large "
          f"float32 matmul: {peak_flops / 1e9:.1f} GFLOP/s | before = {args.before}")
    print()
    print("| shape | rows (prompt tokens) | generate | generated tokens | seconds | tokens/s "
          "| vs before | peak memory (MiB) | MFU share |")
    print("|---|---|---|---|---|---|---|---|---|")
    for shape, rows, prompts, n, v, r in table:
        lens = f"{min(map(len, prompts))}-{max(map(len, prompts))}"
        if r is None:
            print(f"| {shape} | {len(rows)} ({lens}) | {v} | not installed | | | | | |")
            continue
        tokens, seconds, rate, peak, mfu, vs = r
        vs_txt = "" if vs is None else f"**{vs:.2f}x**" if v == "now" else f"{vs:.2f}x"
        print(f"| {shape} | {len(rows)} = {len(prompts)} x {n} ({lens}) | {v} | {tokens} | "
              f"{seconds:.1f} | {rate:.0f} | {vs_txt} | {peak / 2**20:.0f} | {mfu:.1%} |")
    print()
    for c in checks:
        print(f"- {c}")
    for shape, rows, prompts, n, v, r in table:
        if v == "vLLM" and r is not None:
            now = next(x for x in table if x[0] == shape and x[4] == "now")[5]
            if now:
                print(f"- {shape}: now / vLLM = {now[2] / r[2]:.2f}x")


if __name__ == "__main__":
    main(parser.parse_args())
