"""
Stage 02 (Step-DPO data): find the first wrong step of each wrong answer by rollouts, then pair it
with correct replacement steps sampled from the model itself (PAPERS.md B2, without GPT-4o).

For a wrong answer split into steps s_1..s_n, let p_j = s_1..s_j (p_0 = the bare prompt) and
rate(j) = the share of --rollouts sampled continuations of p_j whose final answer equals the gold
one. The first wrong step is k = the first j with rate(j) <= --threshold while rate(j-1) is above
it: p_{k-1} can still be finished correctly, p_k no longer can. p_n is the graded wrong answer
itself, so rate(n) = 0 by definition and is never sampled; if rate(0) <= threshold the model cannot
solve the problem at all and the sample is skipped. Binary search over j needs at most
ceil(log2 n) + 1 probes (the default); --scan linear probes p_0, p_1, ... in order. The two agree
whenever rate falls monotonically with j.

Defaults are the toy run's, measured against the toy world's exact first wrong step: the toy model
often writes a wrong value and then goes on from the right one (a second, compensating slip), so
a prefix holding the wrong step still reaches the gold answer in ~1 of 16 rollouts on average, and
a right prefix of a weak model fails all of them ~20% of the time. Threshold 0 at temperature 1
located the exact step in 70% of 605 samples; at most 1 success in 8 at temperature 0.5 in 80% of
480 (fewer samples pass p_0). Pass --threshold 0 --temperature 1 for the paper's rule.

A rollout cut by --max-new-tokens never counts as a success (its last number may be a partial
result), and samples that were themselves cut in 01 are not localized (counted in the summary as
truncated_samples_skipped): they are unfinished, not wrong, so rate(n) = 0 would not hold. The
context of p_j is the prompt ids and the ids of s_1..s_j cut from the tokenization of the whole
sample (common.encode_steps), so the rollouts continue from the very tokens the model wrote, not
from a re-tokenized seam.

Rectification: the first step of each distinct successful continuation of p_{k-1} is a `chosen`,
s_k is `rejected` (context = prompt + s_1..s_{k-1}); more continuations are sampled, up to
--rectify-budget, only when p_{k-1} has no successful one yet (judge mode). With --judge-url an
OpenAI-compatible chat endpoint labels the steps instead (prompt: --judge-prompt; k = the first
step graded neutral or incorrect; an unparsable verdict is counted and skipped).

Reads  <run-dir>/01_sample/samples.jsonl   {id, question, answer, prompt, samples: [{text, pred,
                                            correct, truncated}]} (+ step_values in the toy world)
Writes <run-dir>/02_localize/records.jsonl  one record per wrong sample (resume state, audit)
       <run-dir>/02_localize/pairs.jsonl    {id, problem_id, prompt, prefix, chosen, rejected,
                                            step_idx, rollouts: {j: successes}, answer}
       <run-dir>/02_localize/summary.json   counts, rollouts per sample, and in the toy world
                                            oracle agreement and pair precision (chosen step
                                            right and rejected step wrong, by step_values)

  python 02_localize.py --run-dir runs/toy                                     # CPU, toy world
  torchrun --nproc_per_node=8 02_localize.py --run-dir runs/l3-8b \\
      --model meta-llama/Meta-Llama-3-8B --bf16 --batch-size auto --max-new-tokens 512 \\
      --temperature 0.8 --top-p 0.95 --threshold 0
"""
import argparse
import importlib.util
import json
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from common import (Progress, ResumableJsonl, auto_batch_size, barrier, batch_size_arg,
                    dist_init, dist_teardown, encode_prompt, encode_steps, fail, file_stamp,
                    generate, get_world, load_model, load_tokenizer, print0, read_jsonl, seed_for,
                    work_share, write_json, write_jsonl)
from judge import ask_judge, judge_message, parse_verdict
from mathtext import STOP_STRINGS, grade, split_steps

_spec = importlib.util.spec_from_file_location("toy", Path(__file__).with_name("00_toy.py"))
toy = importlib.util.module_from_spec(_spec)  # the toy world's exact first wrong step (oracle)
_spec.loader.exec_module(toy)

# -------------------------------------------------------------------------------------------------
# CLI arguments
parser = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--run-dir", default="runs/toy", help="run directory")
parser.add_argument("--model", default=None, help="HF id or dir of the model that wrote the "
                    "samples (default: <run-dir>/00_toy/model)")
parser.add_argument("--data", default=None, help="graded samples (default: "
                    "<run-dir>/01_sample/samples.jsonl)")
parser.add_argument("--out", default=None, help="output dir (default: <run-dir>/02_localize)")
parser.add_argument("--limit", type=int, default=0, help="first K problems only (0: all)")
parser.add_argument("--seed", type=int, default=0, help="sampling seed")
# localization
parser.add_argument("--per-problem", type=int, default=2, help="wrong samples used per problem")
parser.add_argument("--rollouts", type=int, default=8, help="continuations sampled per prefix")
parser.add_argument("--threshold", type=float, default=0.125, help="a prefix whose success rate "
                    "is at or below this counts as unrecoverable (0.125: at most 1 of 8; 0: the "
                    "paper's 'no rollout succeeds')")
parser.add_argument("--scan", choices=["binary", "linear"], default="binary",
                    help="binary search over prefixes, or probe them all in order")
parser.add_argument("--rectify-budget", type=int, default=32, help="most continuations of "
                    "p_{k-1} sampled in search of a correct step")
# sampling
parser.add_argument("--temperature", type=float, default=0.5, help="rollout temperature")
parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
parser.add_argument("--max-new-tokens", type=int, default=128, help="tokens per continuation")
parser.add_argument("--stop", nargs="*", default=STOP_STRINGS, help="stop strings (default: "
                    "mathtext.STOP_STRINGS, as in 01: the model starting the next question)")
parser.add_argument("--batch-size", type=batch_size_arg, default=64, help="continuations per "
                    "generate call, or auto: as many as the free device memory holds (the KV "
                    "cache of the longest prompt + sample + --max-new-tokens, "
                    "common.auto_batch_size)")
parser.add_argument("--bf16", action="store_true", help="sample in bfloat16 (GPU)")
parser.add_argument("--trust-remote-code", action="store_true", help="allow model code from hub")
parser.add_argument("--tp", action="store_true", help="under torchrun: shard the model over "
                    "all ranks (tensor parallel) instead of a full copy per rank; for models "
                    "larger than one GPU")
# judge
parser.add_argument("--judge-url", default=None, help="OpenAI-compatible base URL (…/v1); the "
                    "judge then locates the step and rollouts only rectify")
parser.add_argument("--judge-model", default="gpt-4o", help="model name sent to the judge")
parser.add_argument("--judge-prompt", default=str(Path(__file__).parent / "prompts" /
                                                  "judge_steps.txt"),
                    help="prompt template with {problem}, {reference_solution}, {wrong_answer}")
parser.add_argument("--judge-key-env", default="OPENAI_API_KEY",
                    help="environment variable holding the bearer token (unset: none sent)")
parser.add_argument("--judge-workers", type=int, default=8, help="judge requests in flight")
parser.add_argument("--judge-timeout", type=float, default=120.0, help="seconds per request")

# config that the records already in --out depend on: a resumed run must not change it
SHAPES_RECORDS = ("seed", "per_problem", "rollouts", "threshold", "scan",
                  "rectify_budget", "temperature", "top_p", "max_new_tokens", "stop", "judge_url",
                  "judge_model")


# -------------------------------------------------------------------------------------------------
# Localization: a pure search over prefix success rates


def search_first_wrong(n: int, threshold: float = 0.0, scan: str = "binary"):
    """Generator: yields the prefix length j to probe next and receives rate(j); returns the first
    wrong step k in 1..n, or None when rate(0) <= threshold. rate(n) is 0 by definition (p_n is
    the graded wrong answer), so p_n is never probed. Binary search keeps rate(lo) > threshold
    and p_hi unrecoverable: 1 + ceil(log2 n) probes at most; on non-monotone rates it returns
    some j whose p_{j-1} is recoverable and p_j is not, the linear scan the first such j."""
    if (yield 0) <= threshold:
        return None
    if scan == "linear":
        for j in range(1, n):
            if (yield j) <= threshold:
                return j
        return n
    lo, hi = 0, n
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if (yield mid) > threshold:
            lo = mid
        else:
            hi = mid
    return hi


def locate_first_wrong(n: int, success_rate, threshold: float = 0.0, scan: str = "binary"):
    """search_first_wrong driven by an oracle success_rate(j) -> float (tests, judges, scripts)."""
    search = search_first_wrong(n, threshold, scan)
    try:
        j = next(search)
        while True:
            j = search.send(success_rate(j))
    except StopIteration as stop:
        return stop.value


def distinct_first_steps(rejected: str, continuations: list[str]) -> list[str]:
    """Rectification: the first step of each successful continuation, in order, each step once
    (whitespace-insensitive) and never the wrong step itself. A blank first step (the model
    starting with an empty line after a prefix that ends in a newline) is no step: skipped."""
    chosen, seen = [], {rejected.strip(), ""}
    for text in continuations:
        steps = split_steps(text)
        if steps and steps[0].strip() not in seen:
            seen.add(steps[0].strip())
            chosen.append(steps[0])
    return chosen


def localize_job(n: int, rollouts: int, budget: int, threshold: float, scan: str,
                 reaches_gold, k: int | None = None):
    """One wrong sample as a coroutine, so the driver can batch many samples' rollouts into one
    generate call: yields (j, first rollout index, count) and receives that many continuations of
    p_j. Returns (k or None, {j: continuations}, {j: successful continuations}). With k given
    (the judge's), only the rectification from p_{k-1} runs."""
    conts, good = {}, {}

    def take(j, got):
        conts.setdefault(j, []).extend(got)
        good.setdefault(j, []).extend(c for c in got if reaches_gold(j, c))

    if k is None:
        search = search_first_wrong(n, threshold, scan)
        try:
            j = next(search)
            while True:
                take(j, (yield j, 0, rollouts))
                j = search.send(len(good[j]) / len(conts[j]))
        except StopIteration as stop:
            k = stop.value
        if k is None:
            return None, conts, good
    while not good.get(k - 1) and len(conts.get(k - 1, [])) < max(budget, rollouts):
        done = len(conts.get(k - 1, []))
        take(k - 1, (yield k - 1, done, min(rollouts, max(budget, rollouts) - done)))
    return k, conts, good


# -------------------------------------------------------------------------------------------------


def select_samples(problems: list[dict], per_problem: int) -> list[dict]:
    """Up to per_problem distinct wrong answers per problem, keyed '<problem id>-s<index>'
    (answers cut by the token limit are unfinished, not wrong: never picked)."""
    out = []
    for rec in problems:
        seen = set()
        for i, s in enumerate(rec["samples"]):
            if s["correct"] or s.get("truncated") or s["text"] in seen:
                continue
            if len(seen) < per_problem:
                seen.add(s["text"])
                out.append({"key": f"{rec['id']}-s{i}", "sample_idx": i, "rec": rec,
                            "text": s["text"]})
    return out


def main(args):
    # Init
    rank, world, device = dist_init()
    run = Path(args.run_dir)
    out = Path(args.out or run / "02_localize")
    samples_path = args.data or run / "01_sample" / "samples.jsonl"
    if not 0 <= args.threshold < 1:
        fail(f"--threshold {args.threshold}: must be in [0, 1)")
    print0(f"config: {json.dumps(vars(args))}")
    problems = read_jsonl(samples_path, {"id": str, "prompt": str, "answer": (str, int, float),
                                         "samples": list})
    problems = problems[:args.limit] if args.limit else problems
    chosen_samples = select_samples(problems, args.per_problem)
    if not chosen_samples:
        fail(f"{samples_path}: no wrong samples to localize")
    template = None
    if args.judge_url:
        if not Path(args.judge_prompt).is_file():
            fail(f"--judge-prompt {args.judge_prompt}: no such file")
        template = Path(args.judge_prompt).read_text(encoding="utf-8")

    # Load
    tok = load_tokenizer(args.model or run / "00_toy" / "model", args.trust_remote_code)
    model = load_model(args.model or run / "00_toy" / "model", device,
                       torch.bfloat16 if args.bf16 else torch.float32, args.trust_remote_code,
                       tp=args.tp)
    model.eval()
    # resume only what this model (these very weights), these samples and this config produced
    share, shares = work_share(args.tp)  # samples share, share + shares, ... are this rank's
    store = ResumableJsonl(out / "records.jsonl", share, writer=rank == 0 or not args.tp,
                           fingerprint={**{k: vars(args)[k] for k in SHAPES_RECORDS},
                                        "data": file_stamp(samples_path),
                                        "model": file_stamp(args.model or run / "00_toy/model"),
                                        "judge_prompt": template})
    mine = [s for s in chosen_samples[share::shares] if s["key"] not in store.done]
    print0(f"{len(chosen_samples)} wrong samples from {len(problems)} problems | "
           f"{len(chosen_samples) - len(store.done)} to do on {world} rank(s)")
    if args.batch_size == "auto":  # a rollout context is a prompt + a prefix of its sample
        longest = max((len(encode_prompt(tok, s["rec"]["prompt"])) +
                       len(tok(s["text"], add_special_tokens=False).input_ids) for s in mine),
                      default=0)
        args.batch_size = auto_batch_size(model, longest, args.max_new_tokens, device,
                                          get_world() if args.tp else 1)

    # Judge verdicts (threads only wait on HTTP; grading stays in the main thread)
    verdicts = {}
    if template is not None:
        key = os.environ.get(args.judge_key_env)
        pool = ThreadPoolExecutor(args.judge_workers)
        for s in mine:
            rec = s["rec"]
            reference = rec.get("solution") or f"The answer is {rec['answer']}."
            msg = judge_message(template, rec.get("question", rec["prompt"]), reference,
                                split_steps(s["text"]))
            verdicts[s["key"]] = pool.submit(ask_judge, args.judge_url, args.judge_model, msg,
                                             key, args.judge_timeout)

    # Loop: keep batch-size / rollouts samples in flight, batch all their pending rollouts
    def start(s):
        """Attach steps, prefixes and context ids to a sample; its localize_job, or None (skip)."""
        rec, steps = s["rec"], split_steps(s["text"])
        prompt_ids, gold = encode_prompt(tok, rec["prompt"]), str(rec["answer"])
        prefixes = ["".join(steps[:j]) for j in range(len(steps) + 1)]
        # context of p_j: prompt ids + the ids of s_1..s_j as the whole sample tokenizes (no EOS:
        # p_j is no ending)
        step_ids = encode_steps(tok, steps)
        ctx = [prompt_ids + sum(step_ids[:j], []) for j in range(len(steps) + 1)]
        s.update(steps=steps, prefixes=prefixes, ctx=ctx, record={"id": s["key"]})
        # a continuation (a generate output) succeeds when p_j + it grades right, uncut
        reaches = lambda j, c: grade(prefixes[j] + c["text"], gold,  # noqa: E731
                                     c["finish"] == "length")[1]
        k = None
        if s["key"] in verdicts:
            try:
                reply = verdicts.pop(s["key"]).result()
            except RuntimeError as e:
                fail(f"{e} (the run is resumable: fix the endpoint and run again)")
            k = parse_verdict(reply, len(steps))
            s["record"]["judge_reply"] = reply
            if not k:
                s["record"]["status"] = "judge_unparsable" if k is None else "judge_no_error"
                return None
        if not steps:
            s["record"]["status"] = "no_steps"
            return None
        return localize_job(len(steps), args.rollouts, args.rectify_budget, args.threshold,
                            args.scan, reaches, k)

    def finish(s, k, conts, good):
        rec, steps, r = s["rec"], s["steps"], s["record"]
        r.update(problem_id=rec["id"], sample_idx=s["sample_idx"], n_steps=len(steps),
                 step_idx=k, rollouts={str(j): len(g) for j, g in sorted(good.items())},
                 sampled={str(j): len(c) for j, c in sorted(conts.items())},
                 continuations=sum(map(len, conts.values())))
        if "step_values" in rec:
            r["oracle_step"] = toy.first_wrong_step(steps, rec["step_values"])
        chosen = distinct_first_steps(steps[k - 1], [c["text"] for c in good[k - 1]]) if k else []
        r["pairs"] = [{"prefix": s["prefixes"][k - 1], "chosen": c, "rejected": steps[k - 1]}
                      for c in chosen]
        r.setdefault("status", "p0_zero" if k is None else "paired" if chosen else "no_pairs")
        store.append(r)

    progress = Progress(len(mine), unit="samples")
    pending, active, n_rollouts, n_cut, t0 = list(reversed(mine)), {}, 0, 0, time.time()
    while pending or active:
        while pending and len(active) < max(1, args.batch_size // args.rollouts):
            s = pending.pop()
            job = start(s)
            if job is None:
                finish(s, None, {}, {})
                progress.update(1)
                continue
            active[s["key"]] = (s, job, next(job))
        rows = [(key, j, r) for key, (s, job, (j, r0, count)) in active.items()
                for r in range(r0, r0 + count)]
        outs = []
        for b in range(0, len(rows), args.batch_size):
            chunk = rows[b:b + args.batch_size]
            outs += generate(
                model, tok, [active[key][0]["ctx"][j] for key, j, _ in chunk],
                seeds=[seed_for(args.seed, active[key][0]["rec"]["id"],
                                active[key][0]["sample_idx"], j, r) for key, j, r in chunk],
                temperature=args.temperature, top_p=args.top_p,
                max_new_tokens=args.max_new_tokens, stop=tuple(args.stop))
        n_rollouts += len(rows)
        n_cut += sum(o["finish"] == "length" for o in outs)
        by_key = {}
        for (key, _, _), o in zip(rows, outs):
            by_key.setdefault(key, []).append(o)
        for key, got in by_key.items():
            s, job, _ = active[key]
            try:
                active[key] = (s, job, job.send(got))
            except StopIteration as stop:
                del active[key]
                finish(s, *stop.value)
                progress.update(1, rollouts_per_s=n_rollouts / (time.time() - t0),
                                truncated=n_cut / max(1, n_rollouts))
    progress.close()

    # Write: merge the ranks' records, then pairs and summary from the records
    barrier()
    if rank == 0:
        records = store.merge([s["key"] for s in chosen_samples])
        write_outputs(out, records, {p["id"]: p for p in problems}, vars(args))
    else:
        store.close()
    dist_teardown()


def write_outputs(out: Path, records: list[dict], problems: dict, config: dict):
    pairs = []
    for r in records:
        rec = problems[r["problem_id"]]
        for c, p in enumerate(r["pairs"]):
            pairs.append({"id": f"{r['id']}-c{c}", "problem_id": r["problem_id"],
                          "prompt": rec["prompt"], **p, "step_idx": r["step_idx"],
                          "rollouts": r["rollouts"], "answer": rec["answer"]})
    write_jsonl(out / "pairs.jsonl", pairs)
    located = [r for r in records if r.get("step_idx")]
    summary = {"samples": len(records), "located": len(located), "pairs": len(pairs),
               "truncated_samples_skipped": sum(bool(s.get("truncated")) and not s["correct"]
                                                for rec in problems.values()
                                                for s in rec["samples"]),
               "samples_with_pairs": sum(bool(r["pairs"]) for r in records),
               "skipped": dict(Counter(r["status"] for r in records if r["status"] != "paired")),
               "rollouts_per_sample": sum(r["continuations"] for r in records) / len(records),
               "rollouts_per_located_sample": sum(r["continuations"] for r in located) /
               max(1, len(located)),
               "max_rollouts_per_sample": max(r["continuations"] for r in records),
               "step_idx": dict(sorted(Counter(str(r["step_idx"]) for r in located).items()))}
    compared = [r for r in located if "oracle_step" in r]
    if compared:
        summary["oracle_agreement"] = sum(r["step_idx"] == r["oracle_step"]
                                          for r in compared) / len(compared)
        summary["oracle_compared"] = len(compared)
        offsets = Counter(r["step_idx"] - r["oracle_step"] for r in compared)
        summary["located_minus_oracle"] = {str(d): n for d, n in sorted(offsets.items())}
        # what Step-DPO trains on: a right step preferred to a wrong one
        values = [problems[p["problem_id"]]["step_values"] for p in pairs]
        right = [toy.step_is_right(p["chosen"], p["step_idx"], v)
                 and not toy.step_is_right(p["rejected"], p["step_idx"], v)
                 for p, v in zip(pairs, values)]
        summary["pair_precision"] = sum(right) / max(1, len(right))
    summary["config"] = config
    write_json(out / "summary.json", summary)
    print0(" | ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                      for k, v in summary.items() if k != "config") + f" -> {out}")


if __name__ == "__main__":
    main(parser.parse_args())
