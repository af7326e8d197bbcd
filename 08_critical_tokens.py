"""Stage 08 (study): do critical tokens exist, and does contrastive estimation find them?
The cDPO paper's pass@k figure in miniature (PAPERS.md A5, the released rollout rule).

For each of the first --limit rejected answers y of 04_score_tokens/pairs.jsonl (their token ids,
exactly as scored), with the base model at --temperature:

1. search rollouts: for every response position t, continue prompt + y_<=t --rollouts times;
   c_t = number of continuations that grade right: the answer extracted from the response
   (y_<=t + continuation) is_equiv the pair's gold answer, and --max-new-tokens did not cut it
   (mathtext.grade).
2. critical token (released rule): scan t from the start; the first t with c_t == 0 becomes the
   candidate; a later prefix with more than --cancel-frac of its rollouts right cancels it (kept as
   a fallback); the answer's critical token = the active candidate ("primary"), else the last
   cancelled one ("fallback"). Both counts are reported: a wrong answer nearly always has some
   all-wrong prefix (the wrong final number is written by then), so "found" alone says little.
3. The measurement, on fresh rollouts (seeds independent of step 1's: c_t* is 0 by the rule's
   definition, so step 1's rollouts cannot say how often keeping the token fails):
   kept      --rollouts continuations of prompt + y_<=t*; c = number right.
   replaced  the base model's next-token distribution at t* with the actual token's probability
             set to 0, --rollouts alternatives drawn from it (with replacement), one continuation
             each; d = number right.
4. pass@k = 1 - C(n-c, k) / C(n, k) (unbiased, n = rollouts; mathtext.pass_at_k) for
   k = 1, 2, 4, ... with the critical token kept (c) and replaced (d), averaged over answers.
5. How well 04's weights find t*: the rank of t* among the answer's rejected_weights (1 = the
   largest weight) and precision@k = share of answers whose t* is among its k largest weights,
   next to the chance level k / len(answer).

Reads  <run-dir>/04_score_tokens/pairs.jsonl, the base model (<run-dir>/00_toy/model)
Writes <run-dir>/08_critical_tokens/study.json     config, rule counts, pass@k curves, ranks
       <run-dir>/08_critical_tokens/answers.jsonl   per answer: c_t per position, t* and its
                                                    rule, kept c, replaced d, rank
       <run-dir>/08_critical_tokens/pass_at_k.png
Resumable and torchrun-ready like 01_sample.py (ranks take strides of the answers).

  python 08_critical_tokens.py --run-dir runs/toy                             # CPU, toy world
  torchrun --nproc_per_node=8 08_critical_tokens.py --run-dir runs/l3-8b \\
      --model meta-llama/Meta-Llama-3-8B --rollouts 64 --batch-size auto --bf16
"""
import argparse
from pathlib import Path

import torch

from common import (barrier, dist_init, dist_teardown, get_world, print0, read_jsonl, seed_for,
                    write_json)
from machinery.checks import numbers, token_ids
from machinery.flags import add_model_args, add_run_args, batch_size_arg
from machinery.generation import generate
from machinery.mathtext import grade, pass_at_k
from machinery.models import load_model, load_tokenizer
from machinery.resume import file_stamp, Progress, resume_share
from machinery.sampling import auto_batch_size

parser = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
add_run_args(parser, model="rollout model (default: <run-dir>/00_toy/model)",
             data="scored pairs (default: <run-dir>/04_score_tokens/pairs.jsonl)",
             out="08_critical_tokens", limit="rejected answers (the toy demo: 24)",
             seed="rollout seed", limit_default=24)
g = parser.add_argument_group("rollouts")
g.add_argument("--rollouts", type=int, default=16,
               help="continuations per prefix (%(default)s; paper: 64)")
g.add_argument("--temperature", type=float, default=1.0,
               help="rollout temperature (%(default)s)")
g.add_argument("--max-new-tokens", type=int, default=96,
               help="tokens per continuation, at most (%(default)s)")
g.add_argument("--cancel-frac", type=float, default=3 / 64,
               help="a later prefix with more than this share right cancels a candidate "
                    "(released: more than 3 of 64)")
g.add_argument("--batch-size", type=batch_size_arg, default=128,
               help="continuations decoded side by side (%(default)s), or auto: as many as "
                    "the free device memory holds (the KV cache of the longest prompt + answer "
                    "+ --max-new-tokens, sampling.auto_batch_size)")
add_model_args(parser)


def critical_position(correct: list[int], n: int,
                      cancel_frac: float) -> tuple[int | None, str | None]:
    """The released rule over per-position success counts (position t -> c_t of n rollouts):
    (t*, "primary") for the candidate still active at the end, (t*, "fallback") for the last
    cancelled one when none is, (None, None) when no prefix has every rollout wrong."""
    candidate, cancelled = None, None
    for t, c in enumerate(correct):
        if candidate is None and c == 0:
            candidate = t
        elif candidate is not None and c > cancel_frac * n:
            cancelled, candidate = candidate, None
    if candidate is not None:
        return candidate, "primary"
    return (cancelled, "fallback") if cancelled is not None else (None, None)


def count_right(model, tok, prefixes: list[list[int]], seeds: list[int], gold: str, n_prompt: int,
                args) -> list:
    """Continue each prefix once; 1 if the answer (the prefix's response part + continuation; the
    prompt's first n_prompt ids are left out, so a question's own numbers are never read as the
    answer) grades right (mathtext.grade: its extracted answer is_equiv the gold one, and it was
    not cut by --max-new-tokens)."""
    outs = generate(model, tok, prefixes, seeds, args.temperature, 1.0, args.max_new_tokens,
                    batch_size=args.batch_size)  # prefixes that extend each other share work
    return [int(grade(tok.decode(pre[n_prompt:] + out["ids"], skip_special_tokens=True), gold,
                      out["finish"] == "length")[1]) for pre, out in zip(prefixes, outs)]


def study_answer(model, tok, pair: dict, args) -> dict:
    """Search rollouts for the critical token of one rejected answer, then fresh rollouts with it
    kept and replaced."""
    P, y, n = pair["prompt_ids"], pair["rejected_ids"], args.rollouts
    positions = range(len(y) - 1)  # the last id is EOS: nothing follows it
    prefixes = [P + y[:t + 1] for t in positions for _ in range(n)]
    seeds = [seed_for(args.seed, pair["id"], "with", t, r) for t in positions for r in range(n)]
    right = count_right(model, tok, prefixes, seeds, pair["answer"], len(P), args)
    with_c = [sum(right[t * n:(t + 1) * n]) for t in positions]  # c_t
    t_star, rule = critical_position(with_c, n, args.cancel_frac)
    rec = {"id": pair["id"], "n_tokens": len(y), "with_correct": with_c, "critical": t_star,
           "rule": rule}
    if t_star is None:
        return rec
    # Keep y_t*: fresh continuations of the same prefix, seeds no search rollout used.
    seeds = [seed_for(args.seed, pair["id"], "kept", r) for r in range(n)]
    kept = count_right(model, tok, [P + y[:t_star + 1]] * n, seeds, pair["answer"], len(P), args)
    # Replace y_t*: the model's distribution at t* without the token it actually wrote.
    ids = torch.tensor([P + y[:t_star + 1]], device=next(model.parameters()).device)
    with torch.no_grad():
        probs = torch.softmax(model(input_ids=ids).logits[0, -2].float(), -1)  # (V,)
    probs[y[t_star]] = 0
    g = torch.Generator(probs.device).manual_seed(seed_for(args.seed, pair["id"], "alt"))
    alts = torch.multinomial(probs / probs.sum(), n, replacement=True, generator=g).tolist()
    prefixes = [P + y[:t_star] + [a] for a in alts]
    seeds = [seed_for(args.seed, pair["id"], "without", r) for r in range(n)]
    w = pair["rejected_weights"]
    rec.update(kept_correct=sum(kept),
               replaced_correct=sum(count_right(model, tok, prefixes, seeds, pair["answer"],
                                                len(P), args)),
               critical_token=tok.decode([y[t_star]]),
               weight_rank=1 + sum(x > w[t_star] for x in w))  # 1 = the largest weight
    return rec


def summarize(records: list[dict], n: int) -> dict:
    """How many answers have a critical token and by which branch of the rule, pass@k on the
    fresh rollouts with it kept and replaced, and how 04's weights rank it, over the answers
    that have one (n = rollouts)."""
    found = [r for r in records if r["critical"] is not None]
    ks = [k for k in (1, 2, 4, 8, 16, 32, 64) if k <= n]

    def mean(xs):
        return sum(xs) / max(1, len(xs))

    return {
        "answers": len(records), "with_critical": len(found),
        "found_primary": sum(r["rule"] == "primary" for r in found),
        "found_fallback": sum(r["rule"] == "fallback" for r in found),
        "k": ks,
        "pass_at_k_kept": [mean([pass_at_k(n, r["kept_correct"], k) for r in found]) for k in ks],
        "pass_at_k_replaced": [mean([pass_at_k(n, r["replaced_correct"], k) for r in found])
                               for k in ks],
        "weight_rank_mean": mean([r["weight_rank"] for r in found]),
        "precision_at_k": {k: mean([r["weight_rank"] <= k for r in found]) for k in (1, 3, 5)},
        "chance_at_k": {k: mean([min(1, k / r["n_tokens"]) for r in found]) for k in (1, 3, 5)},
        "critical_tokens": [r["critical_token"] for r in found],
    }


def plot(summary: dict, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(summary["k"], [100 * v for v in summary["pass_at_k_replaced"]], "o-",
            label="critical token replaced")
    ax.plot(summary["k"], [100 * v for v in summary["pass_at_k_kept"]], "s--",
            label="critical token kept")
    ax.set_xscale("log", base=2)
    ax.set(xlabel="k", ylabel="pass@k (%)", ylim=(-3, 103),
           title=f"Critical tokens ({summary['with_critical']} wrong answers, fresh rollouts)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(args):
    # Init
    rank, world, device = dist_init()
    run = Path(args.run_dir)
    out = Path(args.out or run / "08_critical_tokens")
    data = Path(args.data or run / "04_score_tokens" / "pairs.jsonl")
    model_path = str(args.model or run / "00_toy" / "model")
    tok = load_tokenizer(model_path, args.trust_remote_code)
    ids = token_ids(len(tok))  # 04's ids, of this model's tokenizer
    pairs = read_jsonl(data, required={"id": str, "prompt_ids": ids, "rejected_ids": ids,
                                       "rejected_weights": numbers, "answer": str},
                       parallel=[("rejected_weights", "rejected_ids")])[:args.limit or None]

    # Load
    model = load_model(model_path, device, torch.bfloat16 if args.bf16 else torch.float32,
                       args.trust_remote_code, tp=args.tp).eval()
    print0(f"critical-token study: {len(pairs)} answers x {args.rollouts} rollouts per position")
    # resume only what this model (these very weights), these pairs and this config produced;
    # "record" 2: kept and replaced on fresh rollouts (version 1's records lack them)
    shapes = ("rollouts", "temperature", "max_new_tokens", "cancel_frac", "seed")
    store, todo = resume_share(out / "answers.jsonl", pairs, args.tp,
                               fingerprint={**{k: vars(args)[k] for k in shapes}, "record": 2,
                                            "model": file_stamp(model_path),
                                            "data": file_stamp(data)})
    if args.batch_size == "auto":  # a rollout prefix is a prompt + a prefix of its answer
        longest = max((len(p["prompt_ids"]) + len(p["rejected_ids"]) for p in todo), default=0)
        args.batch_size = auto_batch_size(model, longest, args.max_new_tokens, device,
                                          get_world() if args.tp else 1)

    # Loop: one answer at a time, its record appended as soon as it is done
    progress = Progress(len(todo), "answers")
    for pair in todo:
        store.append(study_answer(model, tok, pair, args))
        progress.update()
    progress.close()

    # Write: rank 0 merges the ranks' part files in pair order, then the study and its figure
    barrier()
    if rank == 0:
        records = store.merge([p["id"] for p in pairs])
        summary = summarize(records, args.rollouts)
        write_json(out / "study.json", {"config": vars(args), **summary})
        plot(summary, out / "pass_at_k.png")
        print0(f"critical token found in {summary['with_critical']}/{len(records)} answers "
               f"({summary['found_primary']} primary, {summary['found_fallback']} fallback) | "
               f"fresh rollouts: pass@1 replaced {summary['pass_at_k_replaced'][0]:.3f} vs kept "
               f"{summary['pass_at_k_kept'][0]:.3f} | CE rank {summary['weight_rank_mean']:.1f} | "
               f"precision@3 {summary['precision_at_k'][3]:.2f} "
               f"(chance {summary['chance_at_k'][3]:.2f})")
    else:
        store.close()

    # Cleanup
    dist_teardown()


if __name__ == "__main__":
    main(parser.parse_args())
