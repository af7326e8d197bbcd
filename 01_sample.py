"""Stage 01: --n graded completions per problem, both methods' raw material (PAPERS.md A1, B2).

For each problem q with gold answer a, draw samples y_1..y_n ~ pi(. | prompt(q)) at --temperature
with nucleus --top-p, each stopped at EOS, at a stop string (mathtext.STOP_STRINGS: the model
starting the next question), at an end id of the model (every eos id of its generation config)
or after --max-new-tokens, and grade them: pred_k = extract_answer(y_k), correct_k =
is_equiv(pred_k, a). A sample cut by --max-new-tokens is marked truncated and never counts as
right (its "last number" may be a partial result); later stages never train on it as a whole
answer. Sample k of problem q is drawn with seed_for(--seed, q, k), so the same --seed gives the
same samples whatever the batching, the number of ranks or the point a run was resumed from.
Rows of several problems share one forward (--batch-size sequences; auto: as many as the KV cache
of the longest prompt + --max-new-tokens lets fit in the free device memory) for throughput. The
loop and its flags are sampling.GradedSampling's, shared with 07; the records are this stage's.
cDPO's recipe (PAPERS.md A1): --n 64, --top-p 0.95, --temperature 0.5 for Llama-3-8B on GSM8K
and 0.1 on MATH.

Reads  --data: <run-dir>/00_toy/train.jsonl by default (cDPO samples *training* questions), or
       gsm8k, math500, or any GSM8K / MATH-format JSONL (mathtext.load_problems)
Writes <run-dir>/01_sample/samples.jsonl  one record per problem: {id, question, answer, prompt,
                                          samples: [{text, pred, correct, truncated, eos_id}]}
                                          (+ step_values, solution, level, subject when the
                                          problem has them); eos_id = the end id that makes the
                                          text a whole answer (sampling.response_eos), null if cut
       <run-dir>/01_sample/summary.json   config, problems, sample accuracy, share of problems
                                          with both right and wrong samples, truncated share,
                                          throughput

Resumable: records are appended (one write + fsync each) as problems finish; a run killed at any
moment and started again with the same command skips the finished problems and drops a torn last
line. Under torchrun rank r samples problems r, r+W, ... into its own part file and rank 0 merges
them in problem order: the same file as one process writes.

  python 01_sample.py --run-dir runs/toy                                      # CPU, toy world
  torchrun --nproc_per_node=8 -- 01_sample.py --run-dir runs/l3-8b \\
      --model meta-llama/Meta-Llama-3-8B --data gsm8k --split train \\
      --n 64 --temperature 0.5 --top-p 0.95 --max-new-tokens 1024 --batch-size auto --bf16
(the `--` keeps torchrun from reading --n as an abbreviation of its own --nnodes / --nproc-per-node)
"""
import argparse
import json
from pathlib import Path

import torch

from common import barrier, dist_init, dist_teardown, fail, print0, write_json
from machinery.flags import add_model_args, add_run_args, add_sampling_args, check_sampling_args
from machinery.mathtext import format_prompt, load_problems, STOP_STRINGS
from machinery.models import load_model, load_tokenizer
from machinery.resume import file_stamp, resume_share
from machinery.sampling import GradedSampling, response_eos

parser = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
g = add_run_args(parser, model="HF id or local dir (default: <run-dir>/00_toy/model)",
                 data="gsm8k, math500 or a JSONL path (default: <run-dir>/00_toy/train.jsonl)",
                 out="01_sample", limit="problems",
                 seed="sample k of problem q uses seed_for(seed, q, k)")
g.add_argument("--split", default="train",
               help="hub split for gsm8k (%(default)s; a JSONL file is its own split)")
add_sampling_args(parser, n=8, temperature=1.0)
add_model_args(parser)

KEEP = ("step_values", "solution", "level", "subject")  # problem fields later stages read
SHAPES_SAMPLES = ("model", "data", "split", "template", "n", "temperature", "top_p",
                  "max_new_tokens", "seed")  # config a resumed run must share with the first


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
    check_sampling_args(args)
    config = {**vars(args), "stop": STOP_STRINGS}
    problems = load_problems(args.data, args.split)[:args.limit or None]
    if not problems:
        fail(f"{args.data}: no problems")
    print0(f"config: {json.dumps(config)}")

    # Load
    model = load_model(args.model, device, torch.bfloat16 if args.bf16 else torch.float32,
                       args.trust_remote_code, tp=args.tp).eval()
    tok = load_tokenizer(args.model, args.trust_remote_code)
    prompts = {p["id"]: format_prompt(p["question"], args.template, tok) for p in problems}
    # resume only what this model (these very weights), data and config produced
    store, todo = resume_share(out / "samples.jsonl", problems, args.tp,
                               fingerprint={**{k: config[k] for k in SHAPES_SAMPLES},
                                            "model": file_stamp(args.model),
                                            "data": file_stamp(args.data)})
    print0(f"{len(problems)} problems x {args.n} samples | {len(problems) - len(store.done)} "
           f"problems to do on {world} rank(s)")

    # Loop: a problem's record is appended as soon as its last sample is back
    sampling = GradedSampling(args, device)
    for i, samples, outs in sampling.run(model, tok, todo, [prompts[p["id"]] for p in todo]):
        p = todo[i]
        for s, o in zip(samples, outs):
            s["eos_id"] = response_eos(tok, o)  # 03 ends a chosen / rejected answer with it
        store.append({"id": p["id"], "question": p["question"], "answer": p["answer"],
                      "prompt": prompts[p["id"]], "samples": samples,
                      **{f: p[f] for f in KEEP if f in p}})
    throughput = sampling.throughput()  # a collective: every rank, before rank 0 writes

    # Write: rank 0 merges the ranks' part files in problem order, then the summary
    barrier()
    if rank == 0:
        summary = summarize(store.merge([p["id"] for p in problems]))
        summary["throughput"] = throughput
        summary["config"] = config
        write_json(out / "summary.json", summary)
        print0(" | ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                          for k, v in summary.items() if k not in ("config", "throughput"))
               + f" | {throughput['tokens_per_s']:.0f} tok/s -> {out}")
    else:
        store.close()

    # Cleanup
    dist_teardown()


if __name__ == "__main__":
    main(parser.parse_args())
