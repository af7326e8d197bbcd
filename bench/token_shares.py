"""Token cost of a preference pair in the padded and the packed batch layout, measured.

    python bench/token_shares.py                  # first 2000 GSM8K train problems, m = 1 and 4
    python bench/token_shares.py --json           # the same numbers as JSON
    python bench/token_shares.py --families llama3 --micro-batch-size 1 2 4 --n 500

padded: each pair is two rows, context + chosen and context + rejected, right-padded to the
longest row of the micro-batch (2m rows of T tokens); the context is computed twice and the
padding too, and the LM head (logits + log-softmax) runs at every slot. packed: each pair is one
sequence context + chosen + rejected, pairs packed first-fit decreasing into rows as long as the
micro-batch's longest pair (packing.pack_rows with --row-tokens 0), padding only at row starts, and
logits only for the last K positions of each row (K = the longest row tail, a pair's tail being
its last context token and its two responses). The transformer body scales with token slots, so
packed slots / padded slots is its compute ratio; the logits ratio is the LM head's.

Pairs as the recipes (runs/multigpu.sh) train them, encoded with the pipeline's own functions
and the real tokenizers that tests/real_parts.py builds offline (Llama-3, Qwen2; base flavour):
  cDPO (05)      context = mathtext.format_prompt(question, "fewshot") (encode_prompt: BOS once);
                 chosen, rejected = full answers (encode_response, eos=True).
  Step-DPO (06)  context = the prompt + the steps before the first wrong one; chosen, rejected =
                 one step each, no EOS (06_train_stepdpo.encode_step_pair).
Stand-ins, since no model's answers are at hand (only lengths matter): an answer is the GSM8K gold
solution with its <<...>> calculator annotations removed, each line written "Step k: line" as the
few-shot examples answer (--no-step-markers: lines as they are), the "#### N" line turned into
"The answer is N.", and a leading space (the prompt ends in "Answer:"). cDPO: chosen = the
problem's own answer, rejected = the next problem's (an unrelated answer of typical length).
Step-DPO: the first wrong step k is drawn uniformly among the answer's mathtext.split_steps
(random.Random(--seed)); context = prompt + steps[:k]; chosen = rejected = steps[k]. Pairs whose
context + longer response exceed --max-length are dropped as 05/06 drop them (counted).
Micro-batches of m pairs are taken in file order.
"""
import argparse
import importlib
import json
import random
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
parser.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/gsm8k/train.jsonl",
                    help="GSM8K train.jsonl (default: ../shared/data/gsm8k/train.jsonl)")
parser.add_argument("--n", type=int, default=2000, help="the first N problems (%(default)s)")
parser.add_argument("--micro-batch-size", type=int, nargs="+", default=[1, 4],
                    help="pairs per micro-batch (1 4: the recipes' 05 and 06 settings)")
parser.add_argument("--families", nargs="+", default=["llama3", "qwen2"], help="tokenizers")
parser.add_argument("--max-length", type=int, default=1024, help="05/06's pair filter")
parser.add_argument("--seed", type=int, default=0, help="draws the Step-DPO wrong step")
parser.add_argument("--no-step-markers", action="store_true",
                    help="gold lines as they are, without 'Step k: '")
parser.add_argument("--json", action="store_true", help="print JSON instead of markdown")
args = parser.parse_args()
if not args.data.is_file():
    sys.exit(f"token_shares: no GSM8K file at {args.data} (pass --data PATH/train.jsonl)")

t0 = time.time()
import real_parts  # noqa: E402  (tests/: the offline copies of the real tokenizers)
from common import encode_prompt, encode_response  # noqa: E402
from machinery.mathtext import format_prompt, split_steps  # noqa: E402
from machinery.models import load_tokenizer  # noqa: E402
encode_step_pair = importlib.import_module("06_train_stepdpo").encode_step_pair

ANNOTATION = re.compile(r"<<[^>]*>>")


def answer_text(gold: str) -> str:
    """A GSM8K gold solution in the shape the few-shot prompt asks a model to answer in."""
    body, _, final = gold.partition("####")
    lines = [ln.strip() for ln in ANNOTATION.sub("", body).splitlines() if ln.strip()]
    if not args.no_step_markers:
        lines = [f"Step {i}: {ln}" for i, ln in enumerate(lines, 1)]
    return " " + "\n".join(lines + [f"The answer is {final.strip()}."])


def pair_lengths(tok, problems: list[dict], kind: str) -> list[tuple[int, int, int]]:
    """(P, Rc, Rr) token counts of each pair, encoded as 05 (cdpo) or 06 (stepdpo) encode it."""
    rng, out = random.Random(args.seed), []
    answers = [answer_text(p["answer"]) for p in problems]
    for i, p in enumerate(problems):
        prompt = format_prompt(p["question"], "fewshot")
        if kind == "cdpo":
            ids = (encode_prompt(tok, prompt), encode_response(tok, answers[i], eos=True),
                   encode_response(tok, answers[(i + 1) % len(answers)], eos=True))
        else:
            steps = split_steps(answers[i])
            k = rng.randrange(len(steps))
            pair = encode_step_pair(tok, {"id": str(i), "prompt": prompt, "chosen": steps[k],
                                          "prefix": "".join(steps[:k]), "rejected": steps[k]})
            ids = (pair["prompt_ids"], pair["chosen_ids"], pair["rejected_ids"])
        out.append(tuple(map(len, ids)))
    return out


def layout_costs(pairs: list[tuple[int, int, int]], m: int) -> dict:
    """Token slots and logit positions of both layouts, summed over micro-batches of m pairs."""
    tot = {"padded_slots": 0, "packed_slots": 0, "packed_logits": 0}
    for s in range(0, len(pairs), m):
        mb = pairs[s:s + m]
        tot["padded_slots"] += 2 * len(mb) * max(P + max(Rc, Rr) for P, Rc, Rr in mb)
        cap = max(map(sum, mb))  # rows as long as the longest pair: --row-tokens 0
        rows = []  # [tokens, tail] of each row
        for P, Rc, Rr in sorted(mb, key=sum, reverse=True):
            row = next((r for r in rows if r[0] + P + Rc + Rr <= cap), None)
            if row is None:
                rows.append(row := [0, 0])
            row[0] += P + Rc + Rr
            row[1] += 1 + Rc + Rr  # the last context token scores the first response token
        tot["packed_slots"] += len(rows) * max(r[0] for r in rows)  # rows padded to one length
        tot["packed_logits"] += len(rows) * max(r[1] for r in rows)
    tot["padded_logits"] = tot["padded_slots"]  # the padded LM head runs at every slot
    return tot


problems = [json.loads(line) for line in args.data.open(encoding="utf-8") if line.strip()]
problems = problems[:args.n]
results = []
for family in args.families:
    tok = load_tokenizer(real_parts.tokenizer_dir(family, "base"))
    for kind in ("cdpo", "stepdpo"):
        every = pair_lengths(tok, problems, kind)
        pairs = [p for p in every if p[0] + max(p[1:]) <= args.max_length]
        n = len(pairs)
        P, Rc, Rr = (sum(p[i] for p in pairs) / n for i in range(3))
        for m in args.micro_batch_size:
            c = {k: v / n for k, v in layout_costs(pairs, m).items()}  # per pair
            results.append({
                "kind": kind, "family": family, "m": m, "pairs": n, "dropped": len(every) - n,
                "P": P, "Rc": Rc, "Rr": Rr, "context_share_padded": 2 * P / (2 * P + Rc + Rr),
                "tokens_padded": 2 * P + Rc + Rr, "tokens_packed": P + Rc + Rr, **c,
                "body_ratio": c["packed_slots"] / c["padded_slots"],
                "logits_ratio": c["packed_logits"] / c["padded_logits"]})
runtime = time.time() - t0

if args.json:
    print(json.dumps({"n": args.n, "data": str(args.data), "step_markers": not args.no_step_markers,
                      "seed": args.seed, "runtime_s": round(runtime, 1), "rows": results},
                     indent=1))
else:
    print("| kind | tokenizer | m | pairs | P | Rc | Rr | context share (padded) | tokens/pair "
          "padded | packed | slots/pair padded | packed | body packed/padded | logits/pair "
          "padded | packed | logits packed/padded |")
    print("|" + "---|" * 16)
    for r in results:
        print(f"| {r['kind']} | {r['family']} | {r['m']} | {r['pairs']} | {r['P']:.0f} | "
              f"{r['Rc']:.0f} | {r['Rr']:.0f} | {r['context_share_padded']:.1%} | "
              f"{r['tokens_padded']:.0f} | {r['tokens_packed']:.0f} | {r['padded_slots']:.0f} | "
              f"{r['packed_slots']:.0f} | {r['body_ratio']:.3f} | {r['padded_logits']:.0f} | "
              f"{r['packed_logits']:.0f} | {r['logits_ratio']:.3f} |")
    dropped = {f"{r['kind']}/{r['family']}": r["dropped"] for r in results if r["dropped"]}
    print(f"\n{args.n} GSM8K train problems, gold solutions as answers "
          f"({'Step k: lines' if not args.no_step_markers else 'plain lines'}), seed {args.seed}; "
          f"dropped over --max-length {args.max_length}: {dropped or 'none'}; {runtime:.0f} s")
