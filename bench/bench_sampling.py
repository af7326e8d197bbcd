"""Batched sampling vs one sequence at a time: generated tokens/s of generation.generate.

    python bench/bench_sampling.py                       # the toy model of runs/toy, on CPU
    python bench/bench_sampling.py --model DIR --device cuda

The model is runs/toy/00_toy/model (or --model); when it is absent a tiny untrained toy world is
built with 00_toy.py in a temp dir (seconds), and the output says so. Both modes sample the same
prompts (the toy test questions, plain template) with the same per-row seeds, temperature and stop
strings as 01_sample.py, so they must return the same texts (checked). Each mode runs once to warm
up, then --repeats times; the table gives the median. Target: batched >= 4x one-at-a-time.
Prints a markdown table for BENCHMARKS.md with the machine and the exact command.
"""
import argparse
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
parser.add_argument("--model", default=str(ROOT / "runs/toy/00_toy/model"),
                    help="model dir; its ../test.jsonl gives the questions")
parser.add_argument("--device", default="cpu", help="cpu or cuda")
parser.add_argument("--prompts", type=int, default=64, help="prompts sampled by the batched mode")
parser.add_argument("--single-prompts", type=int, default=16,
                    help="of those, how many the one-at-a-time mode samples (it is slow)")
parser.add_argument("--batch-size", type=int, default=64, help="sequences per generate call")
parser.add_argument("--max-new-tokens", type=int, default=128, help="tokens per sample, at most")
parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
parser.add_argument("--repeats", type=int, default=3, help="timed runs per mode (median)")
parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")


def build_tiny(tmp: Path) -> Path:
    """The test suite's toy world: real tokenizer and architecture, 20 training steps."""
    subprocess.run([sys.executable, str(ROOT / "00_toy.py"), "--run-dir", str(tmp), "--n-train",
                    "300", "--n-test", "64", "--n-dev", "20", "--max-steps", "20", "--min-steps",
                    "20", "--hidden", "32", "--layers", "2", "--heads", "2"],
                   check=True, capture_output=True)
    return tmp / "00_toy" / "model"


def machine() -> str:
    import torch
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{cpu} | {os.cpu_count()} cores | load avg {load:.1f} | torch {torch.__version__} "
            f"| {torch.get_num_threads()} threads | Python {platform.python_version()}")


def main(args):
    import torch

    from common import encode_prompt, read_jsonl, seed_for
    from machinery.models import load_model, load_tokenizer
    from machinery.mathtext import format_prompt, STOP_STRINGS
    from machinery.generation import generate
    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir, note = Path(args.model), "toy model"
    if not (model_dir / "config.json").exists():
        model_dir = build_tiny(Path(tempfile.mkdtemp(prefix="bench_sampling_")))
        note = f"tiny untrained toy world built by 00_toy.py ({args.model} absent)"
    device = torch.device(args.device)
    model = load_model(model_dir, device).eval()
    tok = load_tokenizer(model_dir)
    problems = read_jsonl(model_dir.parent / "test.jsonl")[:args.prompts]
    prompts = [encode_prompt(tok, format_prompt(p["question"])) for p in problems]
    seeds = [seed_for(0, p["id"], 0) for p in problems]
    kw = dict(temperature=args.temperature, max_new_tokens=args.max_new_tokens,
              stop=tuple(STOP_STRINGS))

    def batched():
        return [o for s in range(0, len(prompts), args.batch_size)
                for o in generate(model, tok, prompts[s:s + args.batch_size],
                                  seeds[s:s + args.batch_size], **kw)]

    def single():
        return [generate(model, tok, [p], [s], **kw)[0]
                for p, s in zip(prompts[:args.single_prompts], seeds)]

    rows, texts = {}, {}
    for name, run in (("one at a time", single), ("batched", batched)):
        texts[name] = [o["text"] for o in run()]  # warm-up
        times, tokens = [], 0
        for _ in range(args.repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            outs = run()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            tokens = sum(len(o["ids"]) for o in outs)
        rows[name] = (len(outs), tokens, statistics.median(times),
                      [tokens / t for t in times])
    same = texts["batched"][:args.single_prompts] == texts["one at a time"]

    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {model_dir} ({note}, {n_params / 1e6:.2f}M parameters) | device {device}")
    print(f"machine: {machine()}")
    print(f"command: {shlex.join([Path(sys.executable).name, *sys.argv])}")
    print(f"T={args.temperature} | max_new_tokens {args.max_new_tokens} | batch {args.batch_size}"
          f" | median of {args.repeats} | same texts in both modes: {'yes' if same else 'NO'}")
    print()
    print("| mode | sequences | generated tokens | seconds | tokens/s (median) | tokens/s (runs) |")
    print("|---|---|---|---|---|---|")
    for name, (n, tokens, sec, rates) in rows.items():
        print(f"| {name} | {n} | {tokens} | {sec:.2f} | {tokens / sec:.0f} | "
              f"{', '.join(f'{r:.0f}' for r in rates)} |")
    ratio = (rows["batched"][1] / rows["batched"][2]) / (rows["one at a time"][1]
                                                         / rows["one at a time"][2])
    print(f"\nbatched / one at a time: {ratio:.1f}x (target >= 4x)")


if __name__ == "__main__":
    main(parser.parse_args())
