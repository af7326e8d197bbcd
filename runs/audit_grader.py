"""Audit the project's grader (mathtext.grade: extract_answer + is_equiv) on a real model's answers
against a second grader written separately (runs/second_grader.py), and against a reading by hand
where the two disagree.

    python runs/audit_grader.py --run-dir runs/study [--run-dir runs/smollm2 ...]

Reads every answer a run holds whose gold answer is a plain number: 01's samples and every 07
evaluation's generations (07_eval*/<label>/generations.jsonl). Answers cut by the token limit are
left out (both graders would have to call them wrong: mathtext.grade never grades one right).
Prints and writes <first run-dir>/grader_audit.json: how often the two graders give the same
verdict, and, for the answers on which they differ, the verdict read by hand where
runs/grader_audit_hand.jsonl has one ({"output", "gold", "right": bool, "why"}; the hand file is
matched by output text and gold, so it applies to any run that wrote the same answer).
Disagreements without a hand verdict go to <first run-dir>/grader_audit_unread.jsonl, to be read.
"""
import argparse
import json
import sys
from fractions import Fraction
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import second_grader  # noqa: E402
from common import read_jsonl, write_text  # noqa: E402
from machinery.mathtext import grade  # noqa: E402

HAND = Path(__file__).with_name("grader_audit_hand.jsonl")


def numeric(gold: str) -> bool:
    try:
        Fraction(gold.replace(",", ""))
        return True
    except (ValueError, ZeroDivisionError):
        return False


def answers(run: Path):
    """(where, output, gold) of every answer of a run that was not cut and has a numeric gold."""
    samples = run / "01_sample" / "samples.jsonl"
    if samples.exists():
        for r in read_jsonl(samples):
            for s in r["samples"]:
                if not s.get("truncated") and numeric(r["answer"]):
                    yield f"{samples}:{r['id']}", s["text"], r["answer"]
    for gen in sorted(run.glob("07_eval*/*/generations.jsonl")):
        for r in read_jsonl(gen):
            if not r.get("truncated") and numeric(r["gold"]):
                yield f"{gen}:{r['id']}", r["output"], r["gold"]


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", action="append", required=True, help="a run; repeat for more")
    ap.add_argument("--hand", default=str(HAND), help="verdicts read by hand (%(default)s)")
    args = ap.parse_args()
    hand = Path(args.hand)
    hand = {(h["output"], h["gold"]): h for h in read_jsonl(hand, {"output": str, "gold": str,
                                                                   "right": bool})} \
        if hand.exists() else {}
    seen, agree, rows, unread = set(), 0, [], []
    for run in map(Path, args.run_dir):
        for where, output, gold in answers(run):
            if (output, gold) in seen:  # the same answer twice (greedy reruns) is audited once
                continue
            seen.add((output, gold))
            pred, right = grade(output, gold)
            pred2, right2 = second_grader.grade(output, gold)
            if right == right2:
                agree += 1
                continue
            h = hand.get((output, gold))
            rows.append({"where": where, "gold": gold, "project": [pred, right],
                         "second": [pred2, right2], "hand": h["right"] if h else None})
            if not h:
                unread.append({"output": output, "gold": gold, "project": pred,
                               "second": pred2, "right": None, "why": ""})
    n = len(seen)
    read = [r for r in rows if r["hand"] is not None]
    summary = {
        "answers": n, "same_verdict": agree, "same_share": agree / max(1, n),
        "disagreements": len(rows), "read_by_hand": len(read),
        "project_right": sum(r["project"][1] == r["hand"] for r in read),
        "second_right": sum(r["second"][1] == r["hand"] for r in read),
        "rows": rows}
    out = Path(args.run_dir[0])
    write_text(out / "grader_audit.json", json.dumps(summary, indent=1) + "\n")
    write_text(out / "grader_audit_unread.jsonl", "".join(json.dumps(u) + "\n" for u in unread))
    print(f"{n} answers (not cut, numeric gold): same verdict on {agree} "
          f"({100 * summary['same_share']:.1f}%); {len(rows)} disagreements, {len(read)} read by "
          f"hand: the project's grader right on {summary['project_right']}, the second on "
          f"{summary['second_right']}; {len(unread)} unread in {out}/grader_audit_unread.jsonl")


if __name__ == "__main__":
    main()
