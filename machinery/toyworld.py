"""The toy world's pure parts: its problems, the text its model reads and writes, and the exact
first wrong step of any attempt (the oracle). No model here: 00_toy.py writes the data and trains
the model on it; 02 imports the oracle on toy runs only (records with `step_values`), to measure
its rollout localization against the truth.

  problem   2-5 operations: start value 2-50, add or subtract at most 50, multiply by 2 or 3 with
            probability 0.2, every value in [0, 1000); GSM8K format {id, question, answer:
            "Step k: a op b = c" lines then "#### N", step_values: [c_1, ..., c_n]}
  prompt    mathtext's plain template, as 01 and 07 prompt: "Question: " + question + "\\nAnswer:"
  response  " Step 1: 12 + 7 = 19\\nStep 2: 19 - 4 = 15\\nThe answer is 15."
  oracle    step_is_right / first_wrong_step: a step is right when it is the line
            "Step k: a op b = c" with c = step_values[k-1]; score_localization: 02's located
            steps and pairs against it
"""
import random
import re
from collections import Counter

from machinery.mathtext import format_prompt

NAMES = [("Mia", "She"), ("Tom", "He"), ("Ana", "She"), ("Ben", "He"), ("Zoe", "She"),
         ("Sam", "He"), ("Lily", "She"), ("Max", "He")]
OBJECTS = ["marbles", "apples", "stickers", "coins", "books", "cards", "shells", "pencils"]
ADD = ["{he} finds {b} more.", "{he} buys {b} more.", "{he} gets {b} more from a friend."]
SUB = ["{he} loses {b}.", "{he} gives away {b}.", "{he} sells {b}."]
MUL = {2: "Then the number doubles.", 3: "Then the number triples."}
STEP_LINE = re.compile(r"\s*Step (\d+): (-?\d+) ([-+*]) (-?\d+) = (-?\d+)(?:\n|$)")


def make_problem(rng: random.Random, pid: str) -> dict:
    """One word problem; v stays in [0, 1000) after every operation."""
    (name, he), obj = rng.choice(NAMES), rng.choice(OBJECTS)
    v = rng.randint(2, 50)
    sentences, steps, values = [f"{name} has {v} {obj}."], [], []
    for k in range(1, rng.randint(2, 5) + 1):
        r, m = rng.random(), rng.choice((2, 3))
        if r < 0.2 and v * m < 1000:
            c, line, text = v * m, f"{v} * {m} = {v * m}", MUL[m]
        elif (r < 0.6 and v > 0) or v > 949:  # subtract; also when adding could leave the range
            b = rng.randint(1, min(50, v))
            c, line, text = v - b, f"{v} - {b} = {v - b}", rng.choice(SUB).format(he=he, b=b)
        else:
            b = rng.randint(1, 50)
            c, line, text = v + b, f"{v} + {b} = {v + b}", rng.choice(ADD).format(he=he, b=b)
        sentences.append(text)
        steps.append(f"Step {k}: {line}")
        values.append(c)
        v = c
    question = " ".join(sentences) + f" How many {obj} does {name} have now?"
    return {"id": pid, "question": question, "answer": "\n".join(steps) + f"\n#### {v}",
            "step_values": values}


def make_split(split: str, n: int, seed: int) -> list[dict]:
    # One random stream per split, so the test problems do not depend on --n-train.
    rng = random.Random(f"toy-{split}-{seed}")
    return [make_problem(rng, f"toy-{split}-{i:05d}") for i in range(n)]


def prompt_of(rec: dict) -> str:
    """The plain prompt of mathtext, the one 01 and 07 send: one template for training and use."""
    return format_prompt(rec["question"], "plain")


def response_of(rec: dict) -> str:
    steps, final = rec["answer"].split("\n#### ")
    return f" {steps}\nThe answer is {final}."


def step_is_right(step: str, k: int, step_values: list[int]) -> bool:
    """Is `step` the line `Step k: a op b = c` with the true value c = step_values[k-1]?"""
    m = STEP_LINE.match(step)
    return k <= len(step_values) and m is not None and int(m[1]) == k and \
        int(m[5]) == step_values[k - 1]


def first_wrong_step(steps: list[str], step_values: list[int]) -> int:
    """First k whose step (mathtext.split_steps) is not the line `Step k: a op b = c` with
    c = step_values[k-1] (missing or malformed counts as wrong). When every value is right the
    ending went wrong: split_steps keeps "The answer is N." in the last step, so that step (or a
    superfluous one after the last value) is the first wrong one."""
    for k in range(1, len(step_values) + 1):
        if k > len(steps) or not step_is_right(steps[k - 1], k, step_values):
            return k
    return min(len(step_values) + 1, len(steps))


def score_localization(located: list[dict], pairs: list[dict], problems: dict) -> dict:
    """02's summary figures on a toy run: how often a located step (record `step_idx`) is the
    exact first wrong step (`oracle_step`, from first_wrong_step), how far off the rest are, and
    pair precision: the share of pairs whose chosen step is right and rejected step wrong (what
    Step-DPO should train on: a right step preferred to a wrong one). problems: id -> record."""
    compared = [r for r in located if "oracle_step" in r]
    offsets = Counter(r["step_idx"] - r["oracle_step"] for r in compared)
    right = [step_is_right(p["chosen"], p["step_idx"], v) and
             not step_is_right(p["rejected"], p["step_idx"], v)
             for p in pairs for v in [problems[p["problem_id"]]["step_values"]]]
    return {"oracle_agreement": offsets[0] / len(compared), "oracle_compared": len(compared),
            "located_minus_oracle": {str(d): n for d, n in sorted(offsets.items())},
            "pair_precision": sum(right) / max(1, len(right))}
