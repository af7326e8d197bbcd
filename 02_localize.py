"""Stage 02 (Step-DPO): the first wrong step of each wrong answer by rollouts, paired with correct
replacement steps sampled from the model itself (PAPERS.md B2, without GPT-4o).

For a wrong answer split into steps s_1..s_n, let p_j = s_1..s_j (p_0 = the bare prompt) and
rate(j) = the share of --rollouts sampled continuations of p_j whose final answer equals the gold
one. The first wrong step is k = the first j with rate(j) <= --threshold while rate(j-1) is above
it: p_{k-1} can still be finished correctly, p_k no longer can. p_n is the graded wrong answer, so
rate(n) = 0 by definition and is never sampled; if rate(0) <= threshold the model cannot solve the
problem at all and the sample is skipped. Binary search over j needs at most ceil(log2 n) + 1
probes; --scan linear probes p_0, p_1, ... in order; the two agree when rate falls monotonically
with j. A rollout cut by --max-new-tokens never succeeds, and samples cut in 01 (unfinished, not
wrong) are not localized. Rectification: each distinct first step of a successful continuation of
p_{k-1} is a `chosen`, s_k the `rejected`; p_{k-1} is sampled again, up to --rectify-budget
continuations, only while none succeeded. With --judge-url an OpenAI-compatible endpoint locates
k instead (the first step it grades neutral or incorrect) and rollouts only rectify.

The paper's rule is --threshold 0; the toy default 0.125 (1 in 8) tolerates the toy model's
compensating slips. How often the located step is the exact one: summary.json's oracle_agreement
(toy runs), reported in README.md ("Step-DPO localization (02)") and BENCHMARKS.md ("Localization").

Reads <run-dir>/01_sample/samples.jsonl (+ step_values on toy runs); writes <run-dir>/02_localize/:
records.jsonl (one per wrong sample), summary.json and pairs.jsonl {id, problem_id, prompt, prefix,
chosen, rejected, step_idx, rollouts: {j: successes}, answer}.

  python 02_localize.py --run-dir runs/toy                                     # CPU, toy world
  torchrun --nproc_per_node=8 02_localize.py --run-dir runs/l3-8b \\
      --model meta-llama/Meta-Llama-3-8B --bf16 --batch-size auto --max-new-tokens 512 \\
      --temperature 0.8 --top-p 0.95 --threshold 0
"""
import argparse
import json
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from common import (barrier, dist_init, dist_teardown, encode_prompt, encode_steps, fail, print0,
                    read_jsonl, read_text, seed_for, write_json, write_jsonl)
from machinery.checks import each
from machinery.flags import add_model_args, add_run_args, batch_size_arg
from machinery.generation import Sampler
from machinery.judge import ask_judge, judge_message, parse_verdict
from machinery.mathtext import grade, split_steps, STOP_STRINGS
from machinery.models import load_model, load_tokenizer
from machinery.resume import file_stamp, Progress, resume_share
from machinery.sampling import auto_batch_size

parser = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
add_run_args(parser, model="HF id or dir (default: <run-dir>/00_toy/model)",
             data="samples (default: <run-dir>/01_sample/samples.jsonl)", out="02_localize",
             limit="problems", seed="rollout and rectification seed")
g = parser.add_argument_group("search")
g.add_argument("--per-problem", type=int, default=2, help="wrong samples used per problem")
g.add_argument("--rollouts", type=int, default=8, help="continuations sampled per prefix")
g.add_argument("--threshold", type=float, default=0.125, help="p_j is unrecoverable when rate(j) "
               "<= this (0.125: at most 1 in 8; 0: the paper's rule)")
g.add_argument("--scan", choices=["binary", "linear"], default="binary",
               help="binary search over prefixes, or probe them in order")
g.add_argument("--rectify-budget", type=int, default=32, help="most samples of p_{k-1} to rectify")
g = parser.add_argument_group("sampling")
g.add_argument("--temperature", type=float, default=0.5, help="rollout temperature")
g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
g.add_argument("--max-new-tokens", type=int, default=128, help="tokens per continuation")
g.add_argument("--stop", nargs="*", default=STOP_STRINGS, help="stop strings (mathtext's)")
g.add_argument("--batch-size", type=batch_size_arg, default=64, help="continuations decoded side "
               "by side, or auto: as many as free device memory holds (sampling.auto_batch_size)")
add_model_args(parser)
g = parser.add_argument_group("judge")
g.add_argument("--judge-url", default=None, help="OpenAI-compatible base URL (…/v1) to locate k")
g.add_argument("--judge-model", default="gpt-4o", help="model name sent to the judge")
g.add_argument("--judge-prompt", default=str(Path(__file__).parent / "prompts/judge_steps.txt"),
               help="prompt template with {problem}, {reference_solution}, {wrong_answer}")
g.add_argument("--judge-key-env", default="OPENAI_API_KEY", help="env var with the bearer token")
g.add_argument("--judge-workers", type=int, default=8, help="judge requests in flight")
g.add_argument("--judge-timeout", type=float, default=120.0, help="seconds per request")
# the config that the records in --out depend on: a resumed run must not change it
SHAPES_RECORDS = ("seed", "per_problem", "rollouts", "threshold", "scan", "rectify_budget",
                  "temperature", "top_p", "max_new_tokens", "stop", "judge_url", "judge_model")


class Localization:
    """One wrong sample's state, moved on once a round: the search for k, then rectification from
    p_{k-1} (up to max(budget, rollouts) samples). On non-monotone rates binary ends at some j with
    p_{j-1} recoverable and p_j not, linear at the first such j."""

    def __init__(self, n, threshold=0.0, scan="binary", rollouts=8, budget=32, k=None):
        self.threshold, self.scan, self.rollouts, self.budget = threshold, scan, rollouts, budget
        self.k = k  # the first wrong step: the judge's, or the search's once it is over
        self.lo, self.hi = 0, n  # lo < k <= hi: rate(lo) > threshold, p_hi unrecoverable
        self.probe = 0 if k is None else None  # prefix length to sample next; None: over
        self.conts, self.good = {}, {}  # j -> continuations of p_j, and those reaching gold

    def update(self, rate: float):  # the search, told rate(probe)
        self.lo, self.hi = (self.probe, self.hi) if rate > self.threshold else (self.lo, self.probe)
        if self.hi - self.lo <= 1:  # over: k = hi, or no k when p_0 is unrecoverable (hi = 0)
            self.probe, self.k = None, self.hi or None
        else:  # binary: 1 + ceil(log2 n) probes at most
            self.probe = self.lo + 1 if self.scan == "linear" else (self.lo + self.hi) // 2

    def request(self) -> tuple[int, int, int] | None:  # (j, first rollout, count); None: done
        if self.probe is not None:
            return self.probe, 0, self.rollouts
        j, cap = (self.k or 0) - 1, max(self.budget, self.rollouts)  # rectify from p_{k-1}
        done = len(self.conts.get(j, []))
        if self.k and not self.good.get(j) and done < cap:
            return j, done, min(self.rollouts, cap - done)
        return None  # no k (p_0 unrecoverable), a correct step found, or the budget spent

    def take(self, j: int, got: list, reached: list[bool]):  # reached: which end right, uncut
        self.conts.setdefault(j, []).extend(got)
        self.good.setdefault(j, []).extend(c for c, ok in zip(got, reached) if ok)
        if j == self.probe:
            self.update(len(self.good[j]) / len(self.conts[j]))


def distinct_first_steps(rejected: str, continuations: list[str]) -> list[str]:
    """The first step of each successful continuation, in order, each once (whitespace aside),
    never the wrong step itself, never blank (a newline after a prefix that ends in one)."""
    chosen, seen = [], {rejected.strip(), ""}
    for text in continuations:
        steps = split_steps(text)
        if steps and steps[0].strip() not in seen:
            seen.add(steps[0].strip())
            chosen.append(steps[0])
    return chosen


def select_wrong_samples(problems: list[dict], per_problem: int) -> list[dict]:
    """Up to per_problem distinct wrong, uncut answers per problem, ids '<problem id>-s<index>'."""
    out = []
    for rec in problems:
        seen = set()
        for i, s in enumerate(rec["samples"]):
            if s["correct"] or s.get("truncated") or s["text"] in seen or len(seen) >= per_problem:
                continue
            seen.add(s["text"])
            out.append({"id": f"{rec['id']}-s{i}", "sample_idx": i, "rec": rec, "text": s["text"]})
    return out


def start(s: dict, tok, verdicts: dict, args) -> Localization | None:
    """A wrong sample's Localization, or None when it is skipped (the reason in its record). The
    context of p_j: prompt ids + the ids of s_1..s_j as the model wrote them (no EOS)."""
    steps = split_steps(s["text"])
    prompt_ids, step_ids = encode_prompt(tok, s["rec"]["prompt"]), encode_steps(tok, steps)
    s.update(steps=steps, ctx=[prompt_ids + sum(step_ids[:j], []) for j in range(len(steps) + 1)],
             record={"id": s["id"]})
    k = None
    if s["id"] in verdicts:
        try:
            s["record"]["judge_reply"] = reply = verdicts.pop(s["id"]).result()
        except RuntimeError as e:
            fail(f"{e} (the run is resumable: fix the endpoint and run again)")
        if not (k := parse_verdict(reply, len(steps))):
            s["record"]["status"] = "judge_unparsable" if k is None else "judge_no_error"
            return None
    if not steps:
        s["record"]["status"] = "no_steps"
        return None
    return Localization(len(steps), args.threshold, args.scan, args.rollouts,
                        args.rectify_budget, k)


def record_of(s: dict, loc: Localization | None) -> dict:
    """A wrong sample's record: where the search ended, the rollouts per prefix, and its pairs."""
    rec, steps, r = s["rec"], s["steps"], s["record"]
    k, conts, good = (loc.k, loc.conts, loc.good) if loc else (None, {}, {})
    r.update(problem_id=rec["id"], sample_idx=s["sample_idx"], n_steps=len(steps), step_idx=k,
             rollouts={str(j): len(cs) for j, cs in sorted(good.items())},
             sampled={str(j): len(cs) for j, cs in sorted(conts.items())},
             continuations=sum(map(len, conts.values())))
    if "step_values" in rec:  # a toy run: the toy world knows the exact first wrong step
        from machinery.toyworld import first_wrong_step
        r["oracle_step"] = first_wrong_step(steps, rec["step_values"])
    chosen = distinct_first_steps(steps[k - 1], [c["text"] for c in good[k - 1]]) if k else []
    r["pairs"] = [{"prefix": "".join(steps[:k - 1]), "chosen": c, "rejected": steps[k - 1]}
                  for c in chosen]
    r.setdefault("status", "p0_zero" if k is None else "paired" if chosen else "no_pairs")
    return r


def write_outputs(out: Path, records: list[dict], problems: list[dict], config: dict):
    """pairs.jsonl and summary.json, from the records of every rank in sample order."""
    problems = {p["id"]: p for p in problems}
    pairs = [{"id": f"{r['id']}-c{c}", "problem_id": r["problem_id"],
              "prompt": problems[r["problem_id"]]["prompt"], **p, "step_idx": r["step_idx"],
              "rollouts": r["rollouts"], "answer": problems[r["problem_id"]]["answer"]}
             for r in records for c, p in enumerate(r["pairs"])]
    write_jsonl(out / "pairs.jsonl", pairs)
    located = [r for r in records if r.get("step_idx")]
    cost = [r["continuations"] for r in records]
    summary = {"samples": len(records), "located": len(located), "pairs": len(pairs),
               "truncated_samples_skipped": sum(bool(s.get("truncated")) and not s["correct"]
                                                for p in problems.values() for s in p["samples"]),
               "samples_with_pairs": sum(bool(r["pairs"]) for r in records),
               "skipped": dict(Counter(r["status"] for r in records if r["status"] != "paired")),
               "rollouts_per_sample": sum(cost) / len(records),
               "rollouts_per_located_sample": sum(r["continuations"] for r in located) /
               max(1, len(located)), "max_rollouts_per_sample": max(cost),
               "step_idx": dict(sorted(Counter(str(r["step_idx"]) for r in located).items()))}
    if any("oracle_step" in r for r in located):  # a toy run: against the exact first wrong step
        from machinery.toyworld import score_localization
        summary.update(score_localization(located, pairs, problems))
    write_json(out / "summary.json", {**summary, "config": config})
    print0(" | ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                      for k, v in summary.items()) + f" -> {out}")


def main(args):
    # Init
    rank, world, device = dist_init()
    run = Path(args.run_dir)
    out = Path(args.out or run / "02_localize")
    model_path = str(args.model or run / "00_toy" / "model")
    data = Path(args.data or run / "01_sample" / "samples.jsonl")
    if not 0 <= args.threshold < 1:
        fail(f"--threshold {args.threshold}: must be in [0, 1)")
    print0(f"config: {json.dumps(vars(args))}")
    problems = read_jsonl(data, {"id": str, "prompt": str, "answer": (str, int, float),
                                         "samples": each({"text": str, "correct": bool},
                                                         {"truncated": bool})}
                          )[:args.limit or None]
    wrong_samples = select_wrong_samples(problems, args.per_problem)
    if not wrong_samples:
        fail(f"{data}: no wrong samples to localize")
    template = read_text(args.judge_prompt, "check --judge-prompt") if args.judge_url else None

    # Load: the model; resume only what these very weights, samples and config produced
    tok = load_tokenizer(model_path, args.trust_remote_code)
    model = load_model(model_path, device, torch.bfloat16 if args.bf16 else torch.float32,
                       args.trust_remote_code, tp=args.tp).eval()
    store, mine = resume_share(out / "records.jsonl", wrong_samples, args.tp,
                               {**{k: vars(args)[k] for k in SHAPES_RECORDS},
                                "data": file_stamp(data), "model": file_stamp(model_path),
                                "judge_prompt": template})
    print0(f"{len(wrong_samples)} wrong samples from {len(problems)} problems | "
           f"{len(wrong_samples) - len(store.done)} to do on {world} rank(s)")
    if args.batch_size == "auto":  # a rollout context is a prompt + a prefix of its sample
        longest = max((len(encode_prompt(tok, s["rec"]["prompt"])) +
                       len(tok(s["text"], add_special_tokens=False).input_ids) for s in mine),
                      default=0)
        args.batch_size = auto_batch_size(model, longest, args.max_new_tokens, device,
                                          world if args.tp else 1)
    verdicts, pool = {}, ThreadPoolExecutor(args.judge_workers)  # threads only wait on HTTP
    for s in mine if template else []:  # all judge requests now, each read when its sample starts
        rec = s["rec"]
        msg = judge_message(template, rec.get("question", rec["prompt"]), rec.get("solution") or
                            f"The answer is {rec['answer']}.", split_steps(s["text"]))
        verdicts[s["id"]] = pool.submit(ask_judge, args.judge_url, args.judge_model, msg,
                                        os.environ.get(args.judge_key_env), args.judge_timeout)

    # Loop: one Sampler for the whole run. A sample in flight asks for the rollouts of one
    # prefix; once they are all back it moves on (its next probe, or rectification) and its next
    # rows queue at once, so every decode step is a full batch. Each context is computed once,
    # and a probe's context that extends or cuts an earlier one only computes what is new.
    sampler = Sampler(model, tok, args.batch_size, temperature=args.temperature, top_p=args.top_p,
                      max_new_tokens=args.max_new_tokens, stop=tuple(args.stop))
    progress, sampled, cut, t0 = Progress(len(mine), unit="samples"), 0, 0, time.time()
    waiting, asked = list(reversed(mine)), {}  # sample id -> (sample, Localization, ask, outs)

    def ask(s, loc):  # queue the rollouts that loc asks for next: (j, first rollout, count)
        j, r0, n = asked_for = loc.request()
        asked[s["id"]] = (s, loc, asked_for, {})
        for r in range(r0, r0 + n):
            sampler.add((s["id"], r), s["ctx"][j],
                        seed_for(args.seed, s["rec"]["id"], s["sample_idx"], j, r))

    def top_up():  # samples in flight: about two batches of rows queued or decoding
        while waiting and len(asked) * args.rollouts < 2 * args.batch_size:
            s = waiting.pop()
            if (loc := start(s, tok, verdicts, args)) is None:
                store.append(record_of(s, None))
                progress.update(1)
            else:
                ask(s, loc)

    top_up()
    for (sid, r), cont in sampler.results():  # cont: one rollout's continuation
        s, loc, (j, r0, n), outs = asked[sid]
        outs[r] = cont
        sampled, cut = sampled + 1, cut + (cont["finish"] == "length")
        if len(outs) < n:
            continue
        got = [outs[i] for i in range(r0, r0 + n)]
        prefix = "".join(s["steps"][:j])  # a rollout succeeds if p_j + it grades right, uncut
        loc.take(j, got, [grade(prefix + o["text"], str(s["rec"]["answer"]),
                                o["finish"] == "length")[1] for o in got])
        if loc.request() is None:
            del asked[sid]
            store.append(record_of(s, loc))
            progress.update(1, rollouts_per_s=sampled / (time.time() - t0),
                            truncated=cut / max(1, sampled))
        else:
            ask(s, loc)
        top_up()
    progress.close()

    # Write: rank 0 merges the ranks' records, then pairs and summary from the records
    store.close()
    barrier()
    if rank == 0:
        write_outputs(out, store.merge([s["id"] for s in wrong_samples]), problems, vars(args))

    # Cleanup
    dist_teardown()


if __name__ == "__main__":
    main(parser.parse_args())
