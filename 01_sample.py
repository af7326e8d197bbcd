"""
Stage 01: --n graded completions per problem, the raw material of both methods (PAPERS.md A1, B2).

For each problem q with gold answer a, draw samples y_1..y_n ~ pi(. | prompt(q)) at --temperature
with nucleus --top-p, each stopped at EOS, at a stop string (mathtext.STOP_STRINGS: the model
starting the next question), at an end id of the model (every eos id of its generation config)
or after --max-new-tokens, and grade them: pred_k = extract_answer(y_k), correct_k =
is_equiv(pred_k, a). A sample cut by --max-new-tokens is marked truncated and never counts as right
(its "last number" may be a partial result); later stages never train on it as a whole answer. Sample k of problem q is drawn with
seed_for(--seed, q, k), so the same --seed gives the same samples whatever the batching, the number
of ranks or the point a run was resumed from. Rows of several problems share one forward
(--batch-size sequences; auto: as many as the KV cache of the longest prompt + --max-new-tokens
lets fit in the free device memory, common.auto_batch_size) for throughput.

Reads  --data: <run-dir>/00_toy/train.jsonl by default (cDPO samples *training* questions), or
       gsm8k, math500, or any GSM8K / MATH-format JSONL (mathtext.load_problems)
Writes <run-dir>/01_sample/samples.jsonl  one record per problem: {id, question, answer, prompt,
                                          samples: [{text, pred, correct, truncated, eos_id}]}
                                          (+ step_values, solution, level, subject when the
                                          problem has them); eos_id = the end id that makes the
                                          text a whole answer (common.response_eos), null if cut
       <run-dir>/01_sample/summary.json   config, problems, sample accuracy, share of problems
                                          with both right and wrong samples, truncated share,
                                          throughput

Resumable: records are appended (one write + fsync each) as problems finish; a run killed at any
moment and started again with the same command skips the finished problems and drops a torn last
line. Under torchrun rank r samples problems r, r+W, ... into its own part file and rank 0 merges
them in problem order: the same file as one process writes.

  python 01_sample.py --run-dir runs/toy                                      # CPU, toy world
  torchrun --nproc_per_node=8 -- 01_sample.py --run-dir runs/l3-8b \\
      --model meta-llama/Meta-Llama-3-8B --data ../shared/data/gsm8k/train.jsonl \\
      --n 64 --temperature 0.5 --top-p 0.95 --max-new-tokens 1024 --batch-size auto --bf16
(the `--` keeps torchrun from reading --n as an abbreviation of its own --nnodes / --nproc-per-node)
"""
import argparse
import json
import time
from pathlib import Path

import torch

from common import (Progress, ResumableJsonl, all_reduce_sum, auto_batch_size, barrier,
                    batch_size_arg, dist_init, dist_teardown, encode_prompt, fail, file_stamp,
                    get_world, load_model, load_tokenizer, print0, response_eos, sample_problems,
                    work_share, write_json)
from mathtext import STOP_STRINGS, TEMPLATES, format_prompt, grade, load_problems

# -------------------------------------------------------------------------------------------------
# CLI arguments
parser = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--run-dir", default="runs/toy", help="run directory")
parser.add_argument("--model", default=None,
                    help="HF id or local dir (default: <run-dir>/00_toy/model)")
parser.add_argument("--out", default=None, help="output dir (default: <run-dir>/01_sample)")
parser.add_argument("--trust-remote-code", action="store_true", help="allow model code from hub")
parser.add_argument("--tp", action="store_true", help="under torchrun: shard the model over "
                    "all ranks (tensor parallel) instead of a full copy per rank; for models "
                    "larger than one GPU")
parser.add_argument("--bf16", action="store_true", help="sample in bfloat16 (GPU)")
# problems
parser.add_argument("--data", default=None, help="gsm8k, math500 or a JSONL path "
                    "(default: <run-dir>/00_toy/train.jsonl)")
parser.add_argument("--split", default="train", help="hub split for gsm8k (a JSONL file is "
                    "its own split)")
parser.add_argument("--limit", type=int, default=0, help="first K problems only (0: all)")
parser.add_argument("--template", default="plain", choices=TEMPLATES,
                    help="plain 'Question: ...\\nAnswer:' (toy, SFT'd models), fewshot (4 worked "
                         "examples first: base models), chat (the question as the user message "
                         "of the tokenizer's chat template) or chat-boxed (+ 'Please reason step "
                         "by step, and put your final answer within \\boxed{}.')")
# sampling
parser.add_argument("--n", type=int, default=8, help="samples per problem (cDPO: 64)")
parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature "
                    "(cDPO: 0.5 Llama-3-8B GSM8K, 0.1 MATH; PAPERS.md A1)")
parser.add_argument("--top-p", type=float, default=1.0, help="nucleus mass (cDPO: 0.95)")
parser.add_argument("--max-new-tokens", type=int, default=128, help="tokens per sample, at most")
parser.add_argument("--batch-size", type=batch_size_arg, default=64, help="sequences per "
                    "forward, or auto: as many as the free device memory holds (the KV cache of "
                    "the longest prompt + --max-new-tokens, common.auto_batch_size)")
parser.add_argument("--seed", type=int, default=0, help="sample k of problem q uses "
                    "seed_for(seed, q, k)")

KEEP = ("step_values", "solution", "level", "subject")  # problem fields later stages read
SHAPES_SAMPLES = ("model", "data", "split", "template", "n", "temperature", "top_p",
                  "max_new_tokens", "seed")  # config a resumed run must share with the first


# -------------------------------------------------------------------------------------------------
# Grading and the summary


def summarize(records: list[dict]) -> dict:
    """Sample accuracy, and the share of problems with both a right and a wrong sample (only
    those yield a DPO pair)."""
    right = [sum(s["correct"] for s in r["samples"]) for r in records]
    n = [len(r["samples"]) for r in records]
    return {"problems": len(records), "samples": sum(n),
            "sample_accuracy": sum(right) / max(1, sum(n)),
            "mixed_share": sum(0 < c < k for c, k in zip(right, n)) / max(1, len(records)),
            "all_right_share": sum(c == k for c, k in zip(right, n)) / max(1, len(records)),
            "unparsed_share": sum(s["pred"] is None for r in records for s in r["samples"])
            / max(1, sum(n)),
            "truncated_share": sum(s.get("truncated", False) for r in records
                                   for s in r["samples"]) / max(1, sum(n))}


def main(args):
    # Init: every check before anything is written
    rank, world, device = dist_init()
    run = Path(args.run_dir)
    out = Path(args.out or run / "01_sample")
    args.model = str(args.model or run / "00_toy" / "model")
    args.data = str(args.data or run / "00_toy" / "train.jsonl")
    if args.n <= 0 or args.max_new_tokens <= 0:
        fail("--n and --max-new-tokens must be positive")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        fail("--temperature must be >= 0 and --top-p in (0, 1]")
    if args.temperature == 0 and args.n > 1:
        fail("--n > 1 at --temperature 0 draws the same greedy answer n times; set a temperature")
    config = {**vars(args), "stop": STOP_STRINGS}
    problems = load_problems(args.data, args.split)
    problems = problems[:args.limit] if args.limit > 0 else problems
    if not problems:
        fail(f"{args.data}: no problems")
    print0(f"config: {json.dumps(config)}")

    # Load
    model = load_model(args.model, device, torch.bfloat16 if args.bf16 else torch.float32,
                       args.trust_remote_code, tp=args.tp).eval()
    tok = load_tokenizer(args.model, args.trust_remote_code)
    for p in problems:
        p["prompt"] = format_prompt(p["question"], args.template, tok)
    # resume only what this model (these very weights), data and config produced
    share, shares = work_share(args.tp)  # problems share, share + shares, ... are this rank's
    store = ResumableJsonl(out / "samples.jsonl", share, writer=rank == 0 or not args.tp,
                           fingerprint={**{k: config[k] for k in SHAPES_SAMPLES},
                                        "model": file_stamp(args.model),
                                        "data": file_stamp(args.data)})
    todo = [p for p in problems[share::shares] if p["id"] not in store.done]
    print0(f"{len(problems)} problems x {args.n} samples | {len(problems) - len(store.done)} "
           f"problems to do on {world} rank(s)")

    # Loop: (problem, sample) rows, --batch-size per generate call; a problem's record is
    # appended as soon as its last sample is back.
    ids = {p["id"]: encode_prompt(tok, p["prompt"]) for p in todo}
    if args.batch_size == "auto":
        args.batch_size = auto_batch_size(model, max(map(len, ids.values()), default=0),
                                          args.max_new_tokens, device,
                                          get_world() if args.tp else 1)
    progress = Progress(len(todo), unit="problems")
    n_rows, n_tokens, n_right, n_cut, n_done, t0 = 0, 0, 0, 0, 0, time.time()
    for p, outs, n_rows, n_tokens in sample_problems(
            model, tok, todo, ids, args.n, args.seed, args.batch_size,
            temperature=args.temperature, top_p=args.top_p,
            max_new_tokens=args.max_new_tokens, stop=tuple(STOP_STRINGS)):
        samples = []
        for o in outs:
            pred, correct = grade(o["text"], p["answer"], o["finish"] == "length")
            samples.append({"text": o["text"], "pred": pred, "correct": correct,
                            "truncated": o["finish"] == "length", "eos_id": response_eos(tok, o)})
        store.append({"id": p["id"], "question": p["question"], "answer": p["answer"],
                      "prompt": p["prompt"], "samples": samples,
                      **{f: p[f] for f in KEEP if f in p}})
        n_right, n_done = n_right + sum(s["correct"] for s in samples), n_done + 1
        n_cut += sum(s["truncated"] for s in samples)
        dt = time.time() - t0
        progress.update(1, samples_s=n_rows / dt, tok_s=n_tokens / dt,
                        acc=n_right / (args.n * n_done), truncated=n_cut / (args.n * n_done))
    progress.close()
    seconds = time.time() - t0

    # Write: rank 0 merges the ranks' part files in problem order, then the summary
    # summed over ranks; under --tp every rank counted the same share, so count it once
    totals = all_reduce_sum(torch.tensor([n_tokens, n_rows], device=device)) * shares / world
    barrier()
    if rank == 0:
        records = store.merge([p["id"] for p in problems])
        summary = summarize(records)
        summary["throughput"] = {  # this invocation (resumed work excluded), all ranks
            "samples": int(totals[1]), "generated_tokens": int(totals[0]),
            "seconds": round(seconds, 2), "samples_per_s": float(totals[1]) / max(seconds, 1e-9),
            "tokens_per_s": float(totals[0]) / max(seconds, 1e-9), "ranks": world}
        summary["config"] = config
        write_json(out / "summary.json", summary)
        print0(" | ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                          for k, v in summary.items() if k not in ("config", "throughput"))
               + f" | {summary['throughput']['tokens_per_s']:.0f} tok/s -> {out}")
    else:
        store.close()
    dist_teardown()


if __name__ == "__main__":
    main(parser.parse_args())
