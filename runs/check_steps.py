"""How far to trust 02's step pairs on real text: its located step against the first wrong step,
and its chosen steps, both read by an arithmetic reader of the generated problems
(runs/real_problems.py, whose solutions carry every intermediate value as <<a+b=c>>).

    python runs/check_steps.py --run-dir runs/study

The toy world knows each step's value exactly (toyworld.first_wrong_step); real text needs a
reading. A step of the model's answer is *wrong* here when
  - an equation in it is false ("13 - 8 = 2"; a op b = c with op in + - * x / and numbers only), or
  - it states a number the problem never had: neither in the question, nor an intermediate value
    or the answer of the worked solution ("so Sam has a total of 17 balloons"), or
  - it states a final answer ("the answer is 3", mathtext.extract_answer on a marker) that is
    not the gold one.
The first wrong step is the first step that is wrong by this reading (steps as 02 splits them,
mathtext.split_steps). A chosen step is *right* when it is not wrong by the same reading. Both
are approximations (a right number in a wrong place passes), which is why the summary gives
counts and writes every disagreement to read: <run-dir>/02_localize/step_check.jsonl.
Writes <run-dir>/02_localize/step_check.json (09 prints it beside 02's summary).
"""
import argparse
import json
import re
import sys
from fractions import Fraction
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import read_jsonl, write_text  # noqa: E402
from machinery.mathtext import ANSWER_IS_RE, extract_answer, split_steps  # noqa: E402

NUM = r"\$?(\d+(?:\.\d+)?)"
EQUATION_RE = re.compile(NUM + r"\s*([-+*x×/])\s*" + NUM + r"\s*=\s*" + NUM)
NUMBER_RE = re.compile(r"(?<![\w.])\$?(\d+(?:\.\d+)?)(?![\w])")
ANNOTATION_RE = re.compile(r"<<[^=>]*=([^>]+)>>")
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b,
       "x": lambda a, b: a * b, "×": lambda a, b: a * b,
       "/": lambda a, b: a / b if b else None}


def known_numbers(question: str, solution: str, gold: str) -> set[Fraction]:
    """Every number a right answer may state: the question's, the worked solution's
    intermediate values and the gold answer."""
    nums = NUMBER_RE.findall(question) + ANNOTATION_RE.findall(solution) + [gold]
    return {Fraction(n) for n in nums}


def step_is_wrong(step: str, known: set[Fraction], gold: str) -> bool:
    for a, op, b, c in EQUATION_RE.findall(step):
        if OPS[op](Fraction(a), Fraction(b)) != Fraction(c):
            return True
    if any(Fraction(n) not in known for n in NUMBER_RE.findall(step)):
        return True
    if ANSWER_IS_RE.search(step):
        pred = extract_answer(step)
        return pred is not None and not (NUMBER_RE.fullmatch(pred.strip("$ ")) and
                                         Fraction(pred.strip("$ ")) == Fraction(gold))
    return False


def first_wrong(steps: list[str], known: set[Fraction], gold: str) -> int | None:
    """1-based index of the first wrong step, or None when every step reads right."""
    return next((k for k, s in enumerate(steps, 1) if step_is_wrong(s, known, gold)), None)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", required=True)
    run = Path(ap.parse_args().run_dir)
    problems = {r["id"]: r for r in read_jsonl(run / "01_sample" / "samples.jsonl")}
    pairs = read_jsonl(run / "02_localize" / "pairs.jsonl")
    located, agree, chosen_right, rows = {}, 0, 0, []
    for p in pairs:
        prob = problems[p["problem_id"]]
        if "solution" not in prob:
            sys.exit(f"{run}: its problems carry no worked solution (runs/real_problems.py's do)")
        known = known_numbers(prob["question"], prob["solution"], p["answer"])
        ok = not step_is_wrong(p["chosen"], known, p["answer"])
        chosen_right += ok
        key = (p["problem_id"], p["prefix"], p["rejected"])  # one located step per wrong sample
        if key not in located:
            steps = split_steps(p["prefix"]) + [p["rejected"]]  # 02's own steps s_1..s_k
            whole = first_wrong(steps, known, p["answer"])
            located[key] = whole == p["step_idx"]
            agree += located[key]
            if not located[key]:
                rows.append({"kind": "located", "id": p["id"], "step_idx": p["step_idx"],
                             "read_first_wrong": whole, "prefix": p["prefix"],
                             "rejected": p["rejected"]})
        if not ok:
            rows.append({"kind": "chosen", "id": p["id"], "chosen": p["chosen"],
                         "answer": p["answer"]})
    summary = {"located": len(located), "located_is_first_wrong": agree,
               "pairs": len(pairs), "chosen_right": chosen_right,
               "first_step_share": sum(k[1] == "" for k in located) / max(1, len(located))}
    write_text(run / "02_localize" / "step_check.json", json.dumps(summary, indent=1) + "\n")
    write_text(run / "02_localize" / "step_check.jsonl",
               "".join(json.dumps(r) + "\n" for r in rows))
    print(f"located steps that read as the first wrong one: {agree}/{len(located)}; chosen steps "
          f"that read right: {chosen_right}/{len(pairs)}; located at step 1: "
          f"{100 * summary['first_step_share']:.0f}%")


if __name__ == "__main__":
    main()
