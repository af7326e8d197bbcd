"""Simple 1-2 step word problems in GSM8K format, for a small real model to half-solve.

    python runs/real_problems.py --out runs/smollm2/problems/train.jsonl --n 48 --seed 0
    python runs/real_problems.py --out runs/smollm2/problems/test.jsonl --n 64 --seed 1 \\
        --exclude runs/smollm2/problems/train.jsonl

Each line is {"id", "question", "answer": "<worked solution>\\n#### N", "kind"}, like GSM8K's
(calculator annotations <<a+b=c>> included), so mathtext.load_problems reads it as it reads
GSM8K. The same --n, --seed and --kinds give the same bytes. --exclude drops questions that
appear in another file (a test split disjoint from the training one).

Why: on real GSM8K, SmolLM2-135M-Instruct (runs/build_smollm2.py) is right on ~1% of samples even
for the easiest training problems, too few for cDPO (it needs problems with both right and wrong
samples) or Step-DPO (a prefix it can still finish correctly). These problems sit where it is right
about half the time.

Kinds (small numbers, every answer a positive integer); the default mix is add, sub, mul in turn:
  add      "Tom has 7 apples and gets 3 more. How many apples does Tom have now?"     (2-9 + 2-9)
  sub      "Mia had 12 shells and lost 5 of them. How many shells does Mia have left?" (b 1-9)
  mul      "Ben has 4 bags with 3 marbles in each of them. How many marbles does ..."  (2-5 x 2-5)
  div      "Leo shares 16 cookies equally among 4 friends. How many cookies does each ...?"
  add_sub  two steps: "... has 4 cookies. She buys 9 more and then gives 10 to Finn. How many ...?"
  add_add  two steps: "... has 5 pencils. She gets 4 more from Finn and then 2 more from a friend..."
  sub_sub  two steps: "Sam had 12 crayons. He gave 2 to Ivy and then lost 4. How many ... left?"
  mul_add  two steps: "... has 4 baskets with 4 marbles in each, and 6 more marbles. ... in all?"
  cost     two steps: "A ball costs $4 and a ruler costs $2. How much do 3 balls and 2 rulers cost?"

Measured greedy accuracy of runs/smollm2/model (generation.generate, max 128 new tokens, 2026-12-02;
--template chat = the question alone as the user message, unless said otherwise):

  | problems                                                       | n  | right | accuracy |
  |---|---|---|---|
  | default mix (add, sub, mul in turn), seed 0                    | 96 | 40    | 42%      |
  |   add / sub / mul of it                                        | 32 | 12/9/19 | 38/28/59% |
  | default mix, --template chat-boxed (27 answers cut at 128)     | 48 | 5     | 10%      |
  | add with numbers 1-5 (not 2-9)                                 | 32 | 18    | 56%      |
  | add with numbers 10-40                                         | 32 | 7     | 22%      |
  | add: "... has 7 apples. Mia gives him 3 more apples. ... in total?" | 32 | 8 | 25%     |
  | add: "There are 7 red apples and 3 blue apples in a box. ...?" | 32 | 12    | 38%      |
  | two-sentence phrasings tried first (add, sub, mul)             | 32 | 8-11  | 25-34%   |
  | div / add_sub / mul_add / cost                                 | 32 | 2/4/3/0 | 6/12/9/0% |
  | add_sub / add_add / sub_sub / mul_add / mul: 16 problems x 4 samples at temperature 0.7, |
  |   160 new tokens (2026-12-06; 11-33% of the two-step answers cut) | 64 | 4/2/7/4/22 | 6/3/11/6/34% |
  | GSM8K: data/gsm8k_test_64.jsonl (51 answers cut at 128)        | 64 | 1     | 2%       |

Its mistakes are the material both methods need: a right first line ("Emma has 8 + 3 = 11
crayons.") followed by a wrong second one ("Emma has now 11 - 3 = 6 crayons."), slips in the
arithmetic itself ("13 - 8 = 2"), and the occasional loop until the token limit. At temperature
0.7 (runs/real_cpu.sh, 48 problems x 4 samples) 24% of samples are right and half the problems get
both right and wrong samples.
"""
import argparse
import json
import random
from pathlib import Path

NAMES = ["Tom", "Mia", "Ben", "Lily", "Sam", "Emma", "Jack", "Ava", "Leo", "Zoe", "Max", "Ella",
         "Noah", "Ruby", "Owen", "Lucy", "Finn", "Nora", "Eli", "Ivy"]
HE = {n: "she" if n in {"Mia", "Lily", "Emma", "Ava", "Zoe", "Ella", "Ruby", "Lucy", "Nora", "Ivy"}
      else "he" for n in NAMES}
THINGS = ["apples", "stickers", "marbles", "pencils", "cookies", "books", "cards", "shells",
          "stamps", "balloons", "crayons", "toy cars", "oranges", "beads", "flowers", "coins"]
CONTAINERS = ["bags", "boxes", "jars", "packs", "baskets", "cups"]
ITEMS = [("pen", 3), ("notebook", 4), ("ruler", 2), ("cup of juice", 2), ("sandwich", 5),
         ("toy", 5), ("ball", 4), ("book", 3), ("hat", 2), ("kite", 1)]
KINDS = ("add", "sub", "mul", "div", "add_sub", "add_add", "sub_sub", "mul_add", "cost")
DEFAULT_KINDS = "add,sub,mul"


def cap(s: str) -> str:
    return s[0].upper() + s[1:]


def make(kind: str, r: random.Random) -> tuple[str, str, int]:
    """(question, worked solution, answer) of one problem of `kind`."""
    name, other = r.sample(NAMES, 2)
    he, things = HE[name], r.choice(THINGS)
    if kind == "add":
        a, b = r.randint(2, 9), r.randint(2, 9)
        q = f"{name} has {a} {things} and gets {b} more. How many {things} does {name} have now?"
        return q, f"{name} has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} {things} now.", a + b
    if kind == "sub":
        b = r.randint(1, 9)
        a = b + r.randint(1, 9)
        q = (f"{name} had {a} {things} and lost {b} of them. "
             f"How many {things} does {name} have left?")
        return q, f"{name} has {a} - {b} = <<{a}-{b}={a - b}>>{a - b} {things} left.", a - b
    if kind == "mul":
        a, b, box = r.randint(2, 5), r.randint(2, 5), r.choice(CONTAINERS)
        q = (f"{name} has {a} {box} with {b} {things} in each of them. "
             f"How many {things} does {name} have?")
        return q, f"{name} has {a} * {b} = <<{a}*{b}={a * b}>>{a * b} {things}.", a * b
    if kind == "div":
        k, each = r.randint(2, 4), r.randint(2, 5)
        total = k * each
        q = (f"{name} shares {total} {things} equally among {k} friends. "
             f"How many {things} does each friend get?")
        return q, f"Each friend gets {total} / {k} = <<{total}/{k}={each}>>{each} {things}.", each
    if kind == "add_sub":
        a, b = r.randint(3, 9), r.randint(2, 9)
        c = r.randint(2, a + b - 1)
        q = (f"{name} has {a} {things}. {cap(he)} buys {b} more and then gives {c} to {other}. "
             f"How many {things} does {name} have now?")
        s = (f"After buying, {name} has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} {things}.\n"
             f"After giving some away, {he} has {a + b} - {c} = <<{a + b}-{c}={a + b - c}>>"
             f"{a + b - c} {things}.")
        return q, s, a + b - c
    if kind == "add_add":
        a, b, c = r.randint(2, 6), r.randint(2, 5), r.randint(2, 5)
        q = (f"{name} has {a} {things}. {cap(he)} gets {b} more from {other} and then {c} more "
             f"from a friend. How many {things} does {name} have now?")
        s = (f"After {other}'s, {name} has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} {things}.\n"
             f"After the friend's, {he} has {a + b} + {c} = <<{a + b}+{c}={a + b + c}>>"
             f"{a + b + c} {things}.")
        return q, s, a + b + c
    if kind == "sub_sub":
        b, c = r.randint(1, 5), r.randint(1, 5)
        a = b + c + r.randint(1, 6)
        q = (f"{name} had {a} {things}. {cap(he)} gave {b} to {other} and then lost {c}. "
             f"How many {things} does {name} have left?")
        s = (f"After giving, {name} has {a} - {b} = <<{a}-{b}={a - b}>>{a - b} {things}.\n"
             f"After losing some, {he} has {a - b} - {c} = <<{a - b}-{c}={a - b - c}>>"
             f"{a - b - c} {things} left.")
        return q, s, a - b - c
    if kind == "mul_add":
        a, b, c, box = r.randint(2, 4), r.randint(2, 5), r.randint(1, 9), r.choice(CONTAINERS)
        q = (f"{name} has {a} {box} with {b} {things} in each, and {c} more {things}. "
             f"How many {things} does {name} have in all?")
        s = (f"The {box} hold {a} * {b} = <<{a}*{b}={a * b}>>{a * b} {things}.\n"
             f"In all {name} has {a * b} + {c} = <<{a * b}+{c}={a * b + c}>>{a * b + c} {things}.")
        return q, s, a * b + c
    if kind == "cost":
        (i1, p1), (i2, p2) = r.sample(ITEMS, 2)
        n1, n2 = r.randint(2, 4), r.randint(1, 3)
        pl = lambda item, n: item if n == 1 else item.replace("cup of", "cups of") if \
            item.startswith("cup of") else item + "s"  # noqa: E731
        q = (f"A {i1} costs ${p1} and a {i2} costs ${p2}. "
             f"How much do {n1} {pl(i1, n1)} and {n2} {pl(i2, n2)} cost?")
        s = (f"The {pl(i1, n1)} cost {n1} * {p1} = <<{n1}*{p1}={n1 * p1}>>{n1 * p1} dollars.\n"
             f"The {pl(i2, n2)} cost {n2} * {p2} = <<{n2}*{p2}={n2 * p2}>>{n2 * p2} dollars.\n"
             f"Together they cost {n1 * p1} + {n2 * p2} = <<{n1 * p1}+{n2 * p2}="
             f"{n1 * p1 + n2 * p2}>>{n1 * p1 + n2 * p2} dollars.")
        return q, s, n1 * p1 + n2 * p2
    raise ValueError(f"unknown kind {kind!r}; choose from {', '.join(KINDS)}")


def problems(n: int, seed: int, kinds: list[str], exclude: set[str] = frozenset()) -> list[dict]:
    """n distinct problems, kinds in turn (k-th problem: kinds[k % len(kinds)]), none of whose
    questions is in `exclude`."""
    r = random.Random(f"real-problems/{seed}")
    out, seen = [], set(exclude)
    while len(out) < n:
        kind = kinds[len(out) % len(kinds)]
        q, solution, answer = make(kind, r)
        if q in seen:
            continue
        seen.add(q)
        out.append({"id": f"real-s{seed}-{len(out):05d}", "question": q,
                    "answer": f"{solution}\n#### {answer}", "kind": kind})
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSONL file to write")
    ap.add_argument("--n", type=int, default=64, help="problems (%(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="(%(default)s)")
    ap.add_argument("--kinds", default=DEFAULT_KINDS,
                    help=f"comma-separated, used in turn; of {', '.join(KINDS)} (%(default)s)")
    ap.add_argument("--exclude", action="append", default=[],
                    help="a JSONL file whose questions are skipped (repeat for more)")
    args = ap.parse_args()
    kinds = args.kinds.split(",")
    for k in kinds:
        if k not in KINDS:
            ap.error(f"unknown kind {k!r}; choose from {', '.join(KINDS)}")
    exclude = {json.loads(line)["question"] for path in args.exclude for line in
               Path(path).read_text(encoding="utf-8").splitlines() if line.strip()}
    recs = problems(args.n, args.seed, kinds, exclude)
    out, text = Path(args.out), "".join(json.dumps(r) + "\n" for r in recs)
    if out.is_file() and out.read_text(encoding="utf-8") == text:
        # left untouched: the stages' resume checks stamp input files by size and mtime
        print(f"{out}: the same {len(recs)} problems already, left as it is")
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(out)
    print(f"wrote {len(recs)} problems to {out}")


if __name__ == "__main__":
    main()
