"""
Stage 07: accuracy on GSM8K, MATH500 or a local JSONL (the toy test split by default).

Greedy by default (temperature 0, one answer per problem, the protocol of PAPERS.md B4); graded
with mathtext's extract_answer / is_equiv (this project's grader, not the released ones of PAPERS.md
C1, C2); an answer cut by --max-new-tokens counts as wrong and
is reported (n_truncated: raise the limit if it is not small). Accuracy p = c / n comes with its 95% Wilson
interval: (p + z^2/2n +- z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n), z = 1.96. With --n k and a
temperature each problem gets k samples: the record's output is sample 0 (accuracy stays the
accuracy of one sample), and results add, for k' = 1, 2, 4, ... <= k,
  pass@k' = mean over problems of 1 - C(k-c, k') / C(k, k')   (unbiased; c = right samples)
  maj@k'  = share of problems whose most frequent answer among the first k' samples is right
            (truncated samples do not vote)
            (answers grouped by a normalized string: spacing, \\dfrac, 1,000 vs 1000, 0.5 vs 1/2)
MATH500 (problems with `level` / `subject`) adds accuracy by level and by subject.

Reads  --data (default <run-dir>/00_toy/test.jsonl), --model (repeatable; default the toy model)
Writes <run-dir>/07_eval/<label>/generations.jsonl  {id, prompt, output, pred, gold, correct,
                                                     truncated} (+ samples: [{text, pred,
                                                     correct, truncated}] if --n > 1)
       <run-dir>/07_eval/<label>/results.json       accuracy, ci95, n, n_unparsed, n_truncated,
                                                     pass@k, maj@k,
                                                     by_level, by_subject, throughput, config
       <run-dir>/07_eval/summary.md                 one table over every label evaluated so far
<label> defaults to the model's stage: `base` for 00_toy/model, `05_train_cdpo` for
05_train_cdpo/model, else the model dir's name. Resumable and torchrun-ready like 01_sample.py.

  python 07_eval.py --run-dir runs/toy                                        # CPU, toy base
  python 07_eval.py --run-dir runs/toy --model runs/toy/05_train_cdpo/model \\
      --model runs/toy/06_train_stepdpo/model                                 # side by side
  python 07_eval.py --run-dir runs/toy --summary                              # table only
  torchrun --nproc_per_node=8 -- 07_eval.py --run-dir runs/l3-8b \\
      --model runs/l3-8b/05_train_cdpo/model --data ../shared/data/gsm8k/test.jsonl \\
      --max-new-tokens 512 --batch-size auto --bf16
(with --n, the `--` keeps torchrun from reading it as an abbreviation of its own options)
"""
import argparse
import json
import math
import re
import time
from collections import Counter, defaultdict
from fractions import Fraction
from pathlib import Path

import torch

from common import (Progress, ResumableJsonl, all_reduce_sum, auto_batch_size, barrier,
                    batch_size_arg, dist_init, dist_teardown, encode_prompt, fail, file_stamp,
                    get_world, load_model, load_tokenizer, print0, sample_problems, work_share,
                    write_json)
from mathtext import STOP_STRINGS, TEMPLATES, format_prompt, grade, is_equiv, load_problems

# -------------------------------------------------------------------------------------------------
# CLI arguments
parser = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--run-dir", default="runs/toy", help="run directory")
parser.add_argument("--model", action="append", default=None, help="HF id or local dir; repeat "
                    "to compare several (default: <run-dir>/00_toy/model)")
parser.add_argument("--label", action="append", default=None, help="name of each --model's "
                    "results (default: its stage, e.g. base, 05_train_cdpo)")
parser.add_argument("--out", default=None, help="output dir (default: <run-dir>/07_eval)")
parser.add_argument("--summary", "--compare", action="store_true", help="only write and print "
                    "the table over every label in the output dir")
parser.add_argument("--trust-remote-code", action="store_true", help="allow model code from hub")
parser.add_argument("--tp", action="store_true", help="under torchrun: shard the model over "
                    "all ranks (tensor parallel) instead of a full copy per rank; for models "
                    "larger than one GPU")
parser.add_argument("--bf16", action="store_true", help="generate in bfloat16 (GPU)")
# problems
parser.add_argument("--data", default=None, help="gsm8k, math500 or a JSONL path "
                    "(default: <run-dir>/00_toy/test.jsonl)")
parser.add_argument("--split", default="test", help="hub split (a JSONL file is its own split)")
parser.add_argument("--limit", type=int, default=0, help="first K problems only (0: all)")
parser.add_argument("--template", default="plain", choices=TEMPLATES,
                    help="plain 'Question: ...\\nAnswer:' (toy, SFT'd models), fewshot (4 worked "
                         "examples first: base models), chat (the question as the user message "
                         "of the tokenizer's chat template) or chat-boxed (+ 'Please reason step "
                         "by step, and put your final answer within \\boxed{}.')")
# decoding
parser.add_argument("--n", type=int, default=1, help="samples per problem (> 1: pass@k, maj@k)")
parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
parser.add_argument("--top-p", type=float, default=1.0, help="nucleus mass")
parser.add_argument("--max-new-tokens", type=int, default=128, help="tokens per answer, at most")
parser.add_argument("--batch-size", type=batch_size_arg, default=64, help="sequences per "
                    "forward, or auto: as many as the free device memory holds, sized per model "
                    "(the KV cache of the longest prompt + --max-new-tokens, "
                    "common.auto_batch_size)")
parser.add_argument("--seed", type=int, default=0, help="sample k of problem q uses "
                    "seed_for(seed, q, k)")

SHAPES_RESULTS = ("model", "data", "split", "template", "n", "temperature", "top_p",
                  "max_new_tokens", "seed")  # config a resumed run must share with the first
Z95 = 1.959963984540054


# -------------------------------------------------------------------------------------------------
# Metrics


def wilson(correct: int, n: int, z: float = Z95) -> list[float]:
    """95% Wilson score interval [lo, hi] of a binomial proportion correct / n."""
    if n == 0:
        return [0.0, 1.0]
    p = correct / n
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [max(0.0, center - half), min(1.0, center + half)]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are right: 1 - C(n-c, k) / C(n, k)."""
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def vote_key(pred: str) -> str:
    """Answers that are the same written differently share a key: no spacing, \\left/\\right,
    $ or trailing period; \\dfrac = \\frac; plain numbers as exact fractions (1,000 = 1000.0)."""
    s = re.sub(r"\s+|\\[!,; ]|\\left|\\right|\\?\$", "", pred).rstrip(".")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    try:
        return str(Fraction(s.replace(",", "")))
    except (ValueError, ZeroDivisionError):
        return s


def majority(preds: list) -> str | None:
    """The most frequent extracted answer (ties: the one seen first); unparsed ones do not vote."""
    votes = Counter(vote_key(p) for p in preds if p is not None)
    if not votes:
        return None
    best = max(votes.values())
    return next(p for p in preds if p is not None and votes[vote_key(p)] == best)


def powers_of_two(n: int) -> list[int]:
    return [2 ** i for i in range(n.bit_length()) if 2 ** i <= n]


def results_of(records: list[dict], problems: list[dict], n: int) -> dict:
    """accuracy (of the record's output), Wilson ci95, n_unparsed; pass@k and maj@k with --n > 1;
    accuracy by level and by subject when the problems carry them (MATH)."""
    right = sum(r["correct"] for r in records)
    res = {"accuracy": right / len(records), "ci95": wilson(right, len(records)),
           "n": len(records), "n_correct": right,
           "n_unparsed": sum(r["pred"] is None for r in records),
           "n_truncated": sum(r.get("truncated", False) for r in records)}
    if n > 1:
        counts = [sum(s["correct"] for s in r["samples"]) for r in records]
        res["pass@k"] = {str(k): sum(pass_at_k(n, c, k) for c in counts) / len(records)
                         for k in powers_of_two(n)}
        res["maj@k"] = {str(k): sum(is_equiv(majority([None if s.get("truncated") else s["pred"]
                                                       for s in r["samples"][:k]]),
                                             r["gold"]) for r in records) / len(records)
                        for k in powers_of_two(n)}
    for field in ("level", "subject"):
        groups = defaultdict(list)
        for p, r in zip(problems, records):
            if p.get(field) is not None:
                groups[str(p[field])].append(r["correct"])
        if groups:
            res[f"by_{field}"] = {g: {"accuracy": sum(v) / len(v), "n": len(v)}
                                  for g, v in sorted(groups.items())}
    return res


def default_label(model: str) -> str:
    """base for <run>/00_toy/model; the stage (and sub-dir) for <run>/05_train_cdpo/model or
    <run>/03_contrastive_sft/pos; else the last part of the path or hub id."""
    parts = Path(model).parts
    stages = [i for i, x in enumerate(parts) if re.fullmatch(r"\d\d_\w+", x)]
    if not stages:
        return parts[-1] if parts else "model"
    i = stages[-1]
    rest = [x for x in parts[i + 1:] if x != "model"]
    return "base" if parts[i] == "00_toy" and not rest else "_".join([parts[i]] + rest)


def table(rows: list[dict]) -> str:
    """Markdown: one row per results.json."""
    lines = ["| label | data | accuracy | 95% CI | n | n_unparsed | n_truncated |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lo, hi = r["ci95"]
        lines.append(f"| {r['label']} | {Path(r['config']['data']).name} | {r['accuracy']:.3f} | "
                     f"[{lo:.3f}, {hi:.3f}] | {r['n']} | {r['n_unparsed']} | "
                     f"{r.get('n_truncated', 0)} |")
    return "\n".join(lines) + "\n"


def write_summary(out: Path) -> str:
    """summary.md over every <label>/results.json in out: base first, then by label."""
    rows = [json.loads(p.read_text()) for p in sorted(out.glob("*/results.json"))]
    rows.sort(key=lambda r: (r["label"] != "base", r["label"]))
    text = table(rows)
    if rows:
        (out / "summary.md").write_text(text, encoding="utf-8")
    return text


# -------------------------------------------------------------------------------------------------


def evaluate(args, model_path: str, tok, label: str, problems: list[dict], out: Path, rank: int,
             world: int, device) -> dict | None:
    """One model: generate and grade (resumable), then rank 0 merges and writes its results."""
    config = {**{k: v for k, v in vars(args).items() if k not in ("model", "label", "summary")},
              "model": model_path, "label": label, "stop": STOP_STRINGS}
    model = load_model(model_path, device, torch.bfloat16 if args.bf16 else torch.float32,
                       args.trust_remote_code, tp=args.tp).eval()
    prompts = {p["id"]: format_prompt(p["question"], args.template, tok) for p in problems}
    # resume only what this model (these very weights), data and config produced
    share, shares = work_share(args.tp)  # problems share, share + shares, ... are this rank's
    store = ResumableJsonl(out / "generations.jsonl", share, writer=rank == 0 or not args.tp,
                           fingerprint={**{k: config[k] for k in SHAPES_RESULTS},
                                        "model": file_stamp(model_path),
                                        "data": file_stamp(args.data)})
    todo = [p for p in problems[share::shares] if p["id"] not in store.done]
    print0(f"[{label}] {len(problems)} problems | {len(problems) - len(store.done)} to do on "
           f"{world} rank(s)")

    # Loop: (problem, sample) rows, --batch-size per generate call; a problem's record is
    # appended as soon as its last sample is back.
    ids = {p["id"]: encode_prompt(tok, prompts[p["id"]]) for p in todo}
    batch_size = args.batch_size if args.batch_size != "auto" else auto_batch_size(
        model, max(map(len, ids.values()), default=0), args.max_new_tokens, device,
        get_world() if args.tp else 1)
    progress = Progress(len(todo), unit="problems")
    n_rows, n_tokens, n_right, n_cut, n_done, t0 = 0, 0, 0, 0, 0, time.time()
    for p, outs, n_rows, n_tokens in sample_problems(
            model, tok, todo, ids, args.n, args.seed, batch_size,
            temperature=args.temperature, top_p=args.top_p,
            max_new_tokens=args.max_new_tokens, stop=tuple(STOP_STRINGS)):
        samples = []
        for o in outs:
            pred, correct = grade(o["text"], p["answer"], o["finish"] == "length")
            samples.append({"text": o["text"], "pred": pred, "correct": correct,
                            "truncated": o["finish"] == "length"})
        rec = {"id": p["id"], "prompt": prompts[p["id"]], "output": samples[0]["text"],
               "pred": samples[0]["pred"], "gold": p["answer"], "correct": samples[0]["correct"],
               "truncated": samples[0]["truncated"]}
        store.append({**rec, "samples": samples} if args.n > 1 else rec)
        n_right, n_done, n_cut = n_right + rec["correct"], n_done + 1, n_cut + rec["truncated"]
        dt = time.time() - t0
        progress.update(1, samples_s=n_rows / dt, tok_s=n_tokens / dt, acc=n_right / n_done,
                        truncated=n_cut / n_done)
    progress.close()
    seconds = time.time() - t0
    del model

    # Write: rank 0 merges the ranks' part files in problem order, then results.json
    # summed over ranks; under --tp every rank counted the same share, so count it once
    totals = all_reduce_sum(torch.tensor([n_tokens, n_rows], device=device)) * shares / world
    barrier()
    if rank != 0:
        store.close()
        return None
    records = store.merge([p["id"] for p in problems])
    res = {"label": label, **results_of(records, problems, args.n)}
    res["throughput"] = {  # this invocation (resumed work excluded), all ranks
        "samples": int(totals[1]), "generated_tokens": int(totals[0]),
        "seconds": round(seconds, 2), "tokens_per_s": float(totals[0]) / max(seconds, 1e-9),
        "ranks": world}
    res["config"] = config
    write_json(out / "results.json", res)
    lo, hi = res["ci95"]
    print0(f"[{label}] accuracy {res['accuracy']:.3f} [{lo:.3f}, {hi:.3f}] | n {res['n']} | "
           f"unparsed {res['n_unparsed']} | truncated {res['n_truncated']}" + "".join(
               f" | {m}{k} {v:.3f}" for m in ("pass@", "maj@") for k, v in
               res.get(m + "k", {}).items()) + f" -> {out}")
    return res


def main(args):
    out_root = Path(args.out or Path(args.run_dir) / "07_eval")
    if args.summary:
        if not list(out_root.glob("*/results.json")):
            fail(f"{out_root}: no results yet (run 07_eval.py first)")
        print(write_summary(out_root), end="")
        return

    # Init: every check before anything is written
    rank, world, device = dist_init()
    run = Path(args.run_dir)
    models = [str(m) for m in args.model or [run / "00_toy" / "model"]]
    labels = args.label or [default_label(m) for m in models]
    args.data = str(args.data or run / "00_toy" / "test.jsonl")
    if len(labels) != len(models) or len(set(labels)) != len(labels):
        fail(f"labels {labels} for models {models}: give one distinct --label per --model")
    if args.n <= 0 or args.max_new_tokens <= 0:
        fail("--n and --max-new-tokens must be positive")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        fail("--temperature must be >= 0 and --top-p in (0, 1]")
    if args.temperature == 0 and args.n > 1:
        fail("--n > 1 at --temperature 0 repeats the greedy answer n times; set a temperature")
    # a missing second model stops here, not after the first model's results are written
    toks = [load_tokenizer(m, args.trust_remote_code) for m in models]
    problems = load_problems(args.data, args.split)
    problems = problems[:args.limit] if args.limit > 0 else problems
    if not problems:
        fail(f"{args.data}: no problems")
    print0(f"config: {json.dumps({**vars(args), 'model': models, 'label': labels})}")

    # One model after the other, then the comparison table
    results = [evaluate(args, m, tok, label, problems, out_root / label, rank, world, device)
               for m, tok, label in zip(models, toks, labels)]
    if rank == 0:
        write_summary(out_root)
        if len(results) > 1:
            print(table(results), end="")
    dist_teardown()


if __name__ == "__main__":
    main(parser.parse_args())
