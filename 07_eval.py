"""Stage 07: accuracy on GSM8K, MATH500 or a local JSONL (the toy test split by default).

Greedy by default (temperature 0, one answer per problem, the protocol of PAPERS.md B4); graded
with mathtext's extract_answer / is_equiv (this project's grader, not the released ones of
PAPERS.md C1, C2); an answer cut by --max-new-tokens counts as wrong and is reported (n_truncated:
raise the limit if it is not small). The sampling loop and its flags are sampling.GradedSampling's,
shared with 01. Accuracy p = c / n comes with its 95% Wilson interval:
  (p + z^2/2n +- z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n),  z = 1.96.
With --n k and a temperature each problem gets k samples: the record's output is sample 0
(accuracy stays the accuracy of one sample), and results add, for k' = 1, 2, 4, ... <= k,
  pass@k' = mean over problems of 1 - C(k-c, k') / C(k, k')   (unbiased; c = right samples;
            mathtext.pass_at_k)
  maj@k'  = share of problems whose most frequent answer among the first k' samples is right
            (truncated samples do not vote; answers grouped by a normalized string: spacing,
            \\dfrac, 1,000 vs 1000, 0.5 vs 1/2)
MATH500 (problems with `level` / `subject`) adds accuracy by level and by subject.

Reads  --data (default <run-dir>/00_toy/test.jsonl), --model (repeatable; default the toy model)
       Several sets: --data A --out DIR_A [--limit K_A] --data B --out DIR_B ...: each set has
       its own output dir and results, and the rows of all sets decode side by side in one
       batch (a 16-problem subset alone would decode 8 rows a step per rank, where the weights'
       reads, not the arithmetic, set the pace: `make real` evaluates its three sets so).
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
  torchrun --nproc_per_node=2 -- 07_eval.py --run-dir runs/smollm2 --template chat \\
      --model runs/smollm2/model --label base --data runs/smollm2/problems/test.jsonl \\
      --out runs/smollm2/07_eval --limit 0 --data data/gsm8k_test_64.jsonl \\
      --out runs/smollm2/07_eval_gsm8k --limit 16                             # two sets at once
  torchrun --nproc_per_node=8 -- 07_eval.py --run-dir runs/l3-8b \\
      --model runs/l3-8b/05_train_cdpo/model --data gsm8k \\
      --max-new-tokens 512 --batch-size auto --bf16
(with --n, the `--` keeps torchrun from reading it as an abbreviation of its own options)
"""
import argparse
import json
import math
import re
from collections import defaultdict
from pathlib import Path

import torch

from common import (barrier, dist_init, dist_teardown, fail, print0, read_json, read_jsonl,
                    write_json, write_jsonl, write_text)
from machinery.flags import add_model_args, add_run_args, add_sampling_args, check_sampling_args
from machinery.mathtext import (format_prompt, grade, is_equiv, load_problems, majority,
                                pass_at_k, STOP_STRINGS)
from machinery.models import load_model, load_tokenizer
from machinery.resume import file_stamp, resume_share
from machinery.sampling import GradedSampling

parser = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
g = add_run_args(parser, out="07_eval", limit="problems", sets=True,
                 data="gsm8k, math500 or a JSONL path (default: <run-dir>/00_toy/test.jsonl)",
                 seed="sample k of problem q uses seed_for(seed, q, k)")
g.add_argument("--model", action="append", default=None, help="HF id or local dir; repeat to "
               "compare several (default: <run-dir>/00_toy/model)")
g.add_argument("--label", action="append", default=None, help="name of each --model's results "
               "(default: its stage, e.g. base, 05_train_cdpo)")
g.add_argument("--split", default="test",
               help="hub split (%(default)s; a JSONL file is its own split)")
add_sampling_args(parser, n=1, temperature=0.0)
add_model_args(parser)
g = parser.add_argument_group("table")
g.add_argument("--summary", "--compare", action="store_true", help="only write and print the "
               "table over every label in the output dir")
g.add_argument("--regrade", action="store_true", help="grade every stored answer in the output "
               "dir again with the current grader and rewrite its results (no model is run)")

SHAPES_RESULTS = ("model", "data", "split", "template", "n", "temperature", "top_p",
                  "max_new_tokens", "seed")  # config a resumed run must share with the first
Z95 = 1.959963984540054


def wilson(correct: int, n: int, z: float = Z95) -> list[float]:
    """95% Wilson score interval [lo, hi] of a binomial proportion correct / n."""
    if n == 0:
        return [0.0, 1.0]
    p = correct / n
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [max(0.0, center - half), min(1.0, center + half)]


def powers_of_two(n: int) -> list[int]:
    """The k of pass@k and maj@k: 1, 2, 4, ... up to n samples."""
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
        write_text(out / "summary.md", text)
    return text


def evaluate(args, model_path: str, tok, label: str, sets: list[dict], rank: int, world: int,
             device) -> list[dict | None]:
    """One model on every set: sample and grade (resumable, a store per set; the rows of all sets
    in one Sampler, so that a small set does not decode in a batch of its own), then rank 0
    merges and writes each set's results. sets: [{data, out, limit, problems}]."""
    # Load
    model = load_model(model_path, device, torch.bfloat16 if args.bf16 else torch.float32,
                       args.trust_remote_code, tp=args.tp).eval()
    configs, stores, todo = [], [], []  # a config and a store per set; todo: (set, problem)
    for j, s in enumerate(sets):
        config = {**{k: v for k, v in vars(args).items() if k not in ("model", "label", "summary")},
                  "data": s["data"], "out": str(s["out"]), "limit": s["limit"],
                  "model": model_path, "label": label, "stop": STOP_STRINGS}
        # resume only what this model (these very weights), data and config produced
        store, share = resume_share(s["out"] / label / "generations.jsonl", s["problems"],
                                    args.tp, fingerprint={**{k: config[k] for k in SHAPES_RESULTS},
                                                          "model": file_stamp(model_path),
                                                          "data": file_stamp(s["data"])})
        print0(f"[{label}] {Path(s['data']).name}: {len(s['problems'])} problems | "
               f"{len(s['problems']) - len(store.done)} to do on {world} rank(s)")
        configs.append(config), stores.append(store)
        todo += [(j, p) for p in share]
    prompts = [format_prompt(p["question"], args.template, tok) for _, p in todo]

    # Loop: a problem's record (its sample 0; all samples with --n > 1) is appended to its set's
    # store as soon as its last sample is back
    sampling = GradedSampling(args, device)
    for i, samples, _ in sampling.run(model, tok, [p for _, p in todo], prompts):
        j, p = todo[i]
        rec = {"id": p["id"], "prompt": prompts[i], "output": samples[0]["text"],
               "pred": samples[0]["pred"], "gold": p["answer"], "correct": samples[0]["correct"],
               "truncated": samples[0]["truncated"]}
        stores[j].append({**rec, "samples": samples} if args.n > 1 else rec)
    del model
    throughput = sampling.throughput()  # a collective: every rank, before rank 0 writes

    # Write: rank 0 merges each set's part files in problem order, then its results.json (the
    # throughput is the run's, every set's rows together)
    barrier()
    if rank != 0:
        for store in stores:
            store.close()
        return [None] * len(sets)
    results = []
    for s, store, config in zip(sets, stores, configs):
        records = store.merge([p["id"] for p in s["problems"]])
        res = {"label": label, **results_of(records, s["problems"], args.n),
               "throughput": throughput, "config": config}
        write_json(s["out"] / label / "results.json", res)
        lo, hi = res["ci95"]
        print0(f"[{label}] accuracy {res['accuracy']:.3f} [{lo:.3f}, {hi:.3f}] | n {res['n']} | "
               f"unparsed {res['n_unparsed']} | truncated {res['n_truncated']}" + "".join(
                   f" | {m}{k} {v:.3f}" for m in ("pass@", "maj@") for k, v in
                   res.get(m + "k", {}).items()) + f" -> {s['out'] / label}")
        results.append(res)
    return results


def regrade(out_root: Path):
    """--regrade: after a grader fix, every <label>/generations.jsonl is graded again
    (mathtext.grade, as the sampling loop grades) and its results.json rewritten from the new
    verdicts; the answers, the throughput and the config stay those of the run."""
    for gen in sorted(out_root.glob("*/generations.jsonl")):
        old = read_json(gen.parent / "results.json", {"accuracy": (int, float), "config": dict})
        cfg, records = old["config"], read_jsonl(gen, {"id": str, "output": str, "gold": str})
        changed = 0
        for r in records:
            for s in r.get("samples", []):
                s["pred"], s["correct"] = grade(s["text"], r["gold"], s.get("truncated", False))
            pred, correct = grade(r["output"], r["gold"], r.get("truncated", False))
            changed += correct != r["correct"]
            r["pred"], r["correct"] = pred, correct
        ids = {r["id"] for r in records}  # the problems, in the records' (problem) order
        problems = [p for p in load_problems(cfg["data"], cfg["split"]) if p["id"] in ids]
        res = {**old, **results_of(records, problems, cfg["n"])}
        write_jsonl(gen, records)
        write_json(gen.parent / "results.json", res)
        print(f"{gen.parent}: {changed} of {len(records)} verdicts changed, accuracy "
              f"{old['accuracy']:.3f} -> {res['accuracy']:.3f}")


def main(args):
    run = Path(args.run_dir)
    datas = args.data or [str(run / "00_toy" / "test.jsonl")]
    outs = [Path(o) for o in args.out or ([run / "07_eval"] if len(datas) == 1 else [])]
    if args.regrade:
        for out in outs:
            regrade(out)
        args.summary = True
    if args.summary:
        for out in outs or [run / "07_eval"]:
            if not list(out.glob("*/results.json")):
                fail(f"{out}: no results yet (run 07_eval.py first)")
            print(write_summary(out), end="")
        return

    # Init: every check before anything is written
    rank, world, device = dist_init()
    models = [str(m) for m in args.model or [run / "00_toy" / "model"]]
    labels = args.label or [default_label(m) for m in models]
    limits = args.limit or [0]
    if len(outs) != len(datas) or len(set(outs)) != len(outs) or \
            len(limits) not in (1, len(datas)):
        fail(f"--data {datas} --out {[str(o) for o in outs]} --limit {limits}: give one distinct "
             f"--out per --data (a single --data may go without: <run-dir>/07_eval) and one "
             f"--limit for all sets or one per --data")
    if len(labels) != len(models) or len(set(labels)) != len(labels):
        fail(f"labels {labels} for models {models}: give one distinct --label per --model")
    check_sampling_args(args)
    # a missing second model stops here, not after the first model's results are written
    toks = [load_tokenizer(m, args.trust_remote_code) for m in models]
    sets = []
    for data, out, limit in zip(datas, outs, limits * len(datas) if len(limits) == 1 else limits):
        problems = load_problems(data, args.split)[:limit or None]
        if not problems:
            fail(f"{data}: no problems")
        sets.append({"data": str(data), "out": out, "limit": limit, "problems": problems})
    print0(f"config: {json.dumps({**vars(args), 'model': models, 'label': labels})}")

    # Load, loop and write, one model after the other (evaluate), every set in one batch
    results = [evaluate(args, m, tok, label, sets, rank, world, device)
               for m, tok, label in zip(models, toks, labels)]

    # Write: the comparison table of each set
    if rank == 0:
        for j, s in enumerate(sets):
            write_summary(s["out"])
            if len(results) > 1:
                print(table([per_set[j] for per_set in results]), end="")

    # Cleanup
    dist_teardown()


if __name__ == "__main__":
    main(parser.parse_args())
