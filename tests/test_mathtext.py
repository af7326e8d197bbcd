"""mathtext: problem loading, prompts, step splitting, answer extraction and equivalence.

Fixture files always run. The checks over every GSM8K-test and MATH500 gold answer read the full
files in ../shared/data when present, else the subsets of them that data/ ships (64 GSM8K-test and
32 MATH500 problems, byte for byte: data/README.md), so a fresh clone runs them too; the MATH
train file and the loader's exact sizes need ../shared/data."""
import argparse
import itertools
import json
import multiprocessing
import os
import random
import re
import sys
import time
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from machinery import mathtext  # conftest.py puts the repo root on sys.path
from machinery.mathtext import (add_template_arg, cut_at_stop, extract_answer, format_prompt,
                                is_equiv, load_problems, pass_at_k, split_steps, TEMPLATES)

FIXTURES = Path(__file__).resolve().parent / "fixtures"
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"real data not found at {DATA}")
SUBSETS = {"gsm8k/test.jsonl": "gsm8k_test_64.jsonl", "math500/test.jsonl": "math500_test_32.jsonl"}
PMATRIX = "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}"


def real_file(rel: str) -> Path:
    """../shared/data/<rel> when it is there, else the subset of it in the repository's data/."""
    full = DATA / rel
    return full if full.is_file() else Path(__file__).resolve().parents[1] / "data" / SUBSETS[rel]


def stops_with(capsys, fn, *args) -> str:
    """Run fn expecting fail(): exit code 2 and one 'error: ...' line; return that line."""
    with pytest.raises(SystemExit) as e:
        fn(*args)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    return err


# load_problems

def test_load_gsm8k_format_fixture():
    probs = load_problems(str(FIXTURES / "gsm8k_small.jsonl"))
    assert [p["answer"] for p in probs] == ["15", "1600", "-2", "2.5", "2469134"]
    assert [p["id"] for p in probs] == ["fixtures-gsm8k_small-00000", "fixtures-gsm8k_small-00001",
                                        "fixtures-gsm8k_small-00002", "custom-7",
                                        "fixtures-gsm8k_small-00004"]
    assert probs[0]["question"].startswith("Tom has 12 apples")
    assert probs[0]["solution"] == ("He has 12 + 7 = <<12+7=19>>19 apples.\n"
                                    "Then 19 - 4 = <<19-4=15>>15.")
    assert load_problems(str(FIXTURES / "gsm8k_small.jsonl")) == probs  # stable ids


def test_load_math_format_fixture():
    probs = load_problems(str(FIXTURES / "math_small.jsonl"))
    assert [p["answer"] for p in probs] == ["\\frac{3}{4}", "\\frac{\\sqrt{2}}{2}", "9",
                                            "\\{1,2\\}", PMATRIX]
    assert [p["id"] for p in probs] == ["test/prealgebra/1.json", "test/algebra/2.json",
                                        "fixtures-math_small-00002", "fixtures-math_small-00003",
                                        "test/precalculus/5.json"]
    assert "problem" not in probs[0] and probs[0]["question"].startswith("What is")
    assert (probs[0]["level"], probs[0]["subject"], probs[3]["level"]) == (1, "Prealgebra", None)


BAD_FILES = {  # name: (file text, what the one-line error must mention)
    "empty": ("", ["empty file"]),
    "blank_lines": ("\n\n", ["empty file"]),
    "not_json": ('{"question": "q", "answer": "#### 1"}\nnot json\n', [":2:", "malformed"]),
    "torn_last_line": ('{"question": "q", "answer": "#### 1"}\n{"question": "q2", "ans',
                       [":2:", "malformed"]),
    "not_object": ('[1, 2]\n', [":1:", "JSON object"]),
    "no_question": ('{"answer": "#### 1"}\n', [":1:", "'question'", "'problem'"]),
    "bad_gsm8k_answer": ('{"question": "q", "answer": "x\\n#### about 5"}\n', [":1:", "'answer'"]),
    "no_answer_no_box": ('{"problem": "p", "solution": "no box"}\n', [":1:", "'answer'", "boxed"]),
    "answer_not_str": ('{"problem": "p", "answer": ["1"]}\n', [":1:", "'answer'", "list"]),
    "duplicate_id": ('{"id": "a", "question": "q", "answer": "1"}\n'
                     '{"id": "a", "question": "q", "answer": "2"}\n', [":2:", "duplicate id"]),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_load_bad_file_stops_with_one_line(name, tmp_path, capsys):
    text, must = BAD_FILES[name]
    path = tmp_path / f"{name}.jsonl"
    path.write_text(text)
    err = stops_with(capsys, load_problems, str(path))
    assert str(path) in err and all(m in err for m in must), err


def test_load_unknown_name_and_missing_file(tmp_path, capsys):
    assert "unknown dataset 'gsm9k'" in stops_with(capsys, load_problems, "gsm9k")
    assert "no such file" in stops_with(capsys, load_problems, str(tmp_path / "nope.jsonl"))


def test_load_from_hub_normalizes_and_fails_offline(monkeypatch, capsys):
    # A stand-in `datasets` module: no network in tests, and the real hub rows look like this.
    calls = []

    def load_dataset(repo, config, split):
        calls.append((repo, config, split))
        return [{"question": "q", "answer": "work\n#### 1,234"}]
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    probs = load_problems("gsm8k", "train")
    assert calls == [("openai/gsm8k", "main", "train")]
    assert probs == [{"id": "gsm8k-train-00000", "question": "q", "answer": "1234",
                      "solution": "work"}]

    def offline(*a, **k):
        raise ConnectionError("no route to host")
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    err = stops_with(capsys, load_problems, "math500")
    assert "HuggingFaceH4/MATH-500" in err and "local JSONL path" in err


@needs_data
def test_load_real_files():
    sizes = {"gsm8k/train.jsonl": 7473, "gsm8k/test.jsonl": 1319, "math500/test.jsonl": 500,
             "math/train.jsonl": 11998}  # MATH train: 2 problems with an empty \boxed{} skipped
    for rel, n in sizes.items():
        probs = load_problems(str(DATA / rel))
        assert len(probs) == n and len({p["id"] for p in probs}) == n
        assert all(isinstance(p["answer"], str) and p["answer"] for p in probs)
        assert all(isinstance(p["question"], str) and p["question"] for p in probs)
        if rel.startswith("gsm8k"):
            assert all(re.fullmatch(r"-?\d+(\.\d+)?", p["answer"]) for p in probs)
            assert probs[0]["id"] == f"gsm8k-{rel[6:-6]}-00000"  # the hub's ids
        else:
            assert all("/" in p["id"] and {"level", "subject", "solution"} <= p.keys()
                       for p in probs)
    gsm = load_problems(str(DATA / "gsm8k/test.jsonl"))
    assert sum("," in json.loads(line)["answer"].split("####")[1]
               for line in open(DATA / "gsm8k/test.jsonl")) > 0  # commas exist in the file ...
    assert not any("," in p["answer"] for p in gsm)  # ... and none survive loading


def test_extract_answer_recovers_every_real_math_gold_from_its_solution():
    files = [real_file("math500/test.jsonl")] + [f for f in [DATA / "math/train.jsonl"]
                                                  if f.is_file()]
    for path in files:
        for line in open(path, encoding="utf-8"):
            rec = json.loads(line)
            if rec["answer"].strip():
                assert extract_answer(rec["solution"]) == rec["answer"].strip(), rec["unique_id"]


# prompts

def test_prompts_and_stop_strings(capsys):
    assert format_prompt("What is 2+2?") == "Question: What is 2+2?\nAnswer:"

    class ChatTok:
        chat_template = "{{ messages }}"

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            assert tokenize is False and add_generation_prompt is True
            return "<user>" + messages[0]["content"] + "<assistant>"
    assert format_prompt("What is 2+2?", "chat", ChatTok()) == "<user>What is 2+2?<assistant>"
    boxed = format_prompt("What is 2+2?", "chat-boxed", ChatTok())
    assert boxed == ("<user>What is 2+2?\nPlease reason step by step, and put your final answer "
                     "within \\boxed{}.<assistant>")
    assert "chat template" in stops_with(capsys, format_prompt, "q", "chat", None)
    few = format_prompt("What is 2+2?", "fewshot")
    assert few.endswith("\n\nQuestion: What is 2+2?\nAnswer:") and few.count("Question:") == 5
    for q, a in mathtext.FEWSHOT_EXAMPLES:  # the examples are right, and in the format we parse
        assert len(split_steps(" " + a)) == a.count("Step ")  # the answer line joins the last
        steps = [float(x) for x in re.findall(r"= (\d+(?:\.\d+)?)", a)]
        assert extract_answer(a) == str(int(steps[-1]))
        ops = {"+": float.__add__, "-": float.__sub__, "*": float.__mul__, "/": float.__truediv__}
        for x, op, y, val in re.findall(r"([\d.]+) ([-+*/]) ([\d.]+) = ([\d.]+)", a):
            assert ops[op](float(x), float(y)) == float(val), (x, op, y, val)
    assert "unknown prompt template" in stops_with(capsys, format_prompt, "q", "fancy")
    text = " 2 + 2 = 4.\nThe answer is 4.\n\nQuestion: What is 3+3?\nAnswer: 6\n\nProblem: x"
    assert cut_at_stop(text, mathtext.STOP_STRINGS) == " 2 + 2 = 4.\nThe answer is 4."
    assert cut_at_stop("no stop here") == "no stop here"


def test_template_flag():
    parser = argparse.ArgumentParser()
    add_template_arg(parser.add_argument_group("sampling"))
    assert parser.parse_args([]).template == "plain"
    assert all(parser.parse_args(["--template", t]).template == t for t in TEMPLATES)
    with pytest.raises(SystemExit):
        parser.parse_args(["--template", "alpaca"])


# split_steps

def test_split_steps_rules():
    toy = " Step 1: 12 + 7 = 19\nStep 2: 19 - 4 = 15\nThe answer is 15."
    assert split_steps(toy) == [" Step 1: 12 + 7 = 19\n", "Step 2: 19 - 4 = 15\nThe answer is 15."]
    assert split_steps("Let me think.\nStep 1: a\n  Step 2: b\nnote\nStep 3: c") == [
        "Let me think.\nStep 1: a\n", "  Step 2: b\nnote\n", "Step 3: c"]
    assert split_steps("First.\n\nSecond\nstill second.\n\n\nThird") == [
        "First.\n\n", "Second\nstill second.\n\n\n", "Third"]
    assert split_steps("a\nb\nc\n") == ["a\n", "b\n", "c\n"]
    assert split_steps("Not a Step 1: marker mid-line") == ["Not a Step 1: marker mid-line"]
    assert split_steps("") == []


def test_split_steps_joins_back_exactly_on_random_text():
    rng = random.Random(0)
    atoms = ["Step 1:", "Step 12:", "Step", " ", "  ", "\n", "\n\n", "\t", "x", "7", ":", "\r",
             "The answer is 3.", "\\boxed{1}", "é", "\n \n"]
    for _ in range(3000):
        text = "".join(rng.choice(atoms) for _ in range(rng.randint(0, 25)))
        steps = split_steps(text)
        assert "".join(steps) == text and all(steps)


# extract_answer

@pytest.mark.parametrize("text, want", [
    ("so $\\boxed{\\frac{1}{\\sqrt{2}}}$ and that is it", "\\frac{1}{\\sqrt{2}}"),
    ("first \\boxed{1}, then \\boxed{2}.", "2"),
    ("\\fbox{7}", "7"),
    ("it is \\boxed 5.", "5"),
    ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),
    ("\\boxed{" + PMATRIX + "}", PMATRIX),
    ("\\boxed{3} and a truncated \\boxed{\\frac{1}{", "3"),
    ("Step 1: 12 + 7 = 19\nThe answer is 19.", "19"),
    ("the answer is $\\frac{1}{2}$.\nThen more text 7", "\\frac{1}{2}"),
    ("The answer is: **1,600**.", "1,600"),
    ("The answer is:\n\n$$\\frac{1}{2}$$\n", "\\frac{1}{2}"),
    ("The answer is 3. No wait, the answer is 4.", "4"),
    ("The final answer is 12", "12"),
    ("work\n#### 72", "72"),
    ("He pays 1,200 dollars, then 34.5 more", "34.5"),
    ("The point is (3,4)", "4"),
    ("costs -7 now", "-7"),
    ("The answer is 4.\n\nQuestion: what is 9?", "4"),
    ("The answer is 18. She sells the rest for 2 dollars.", "18"),  # first sentence only
    ("The answer is $18.50. That is all.", "18.50"),  # a decimal point is no full stop
    ("The answer is 3.5.", "3.5"),
    # SmolLM2's own phrasings, found by runs/audit_grader.py: the first clause, a sum's result
    ("The answer is 18, because 20 - 2 = 18.", "18"),
    ("So, the answer is 12 balloons, and Sam has 12 balloons now.", "12 balloons"),
    ("The answer is 5 x 4 = 20 flowers.", "20 flowers"),
    ("The answer is $2 + $3 = $5.", "5"),
    ("The answer is 2 x 3 + 1 = 6 + 1 = 7.", "7"),
    ("in this case, the answer is actually 5.", "5"),
    ("It's a logic puzzle where the answer is only 2 coins.", "2 coins"),
    # a closing remark is not the answer: the last number before it is
    ("She has 6 - 4 = 2 apples left.\n\nThis is a classic example of a simple equation: "
     "2 + 4 = 6.", "2"),
    ("Jack has 20 shells.\n\nIt's a classic example of 1 + 1 = 2.", "20"),
    ("\n\nThis is 7.", "7"),  # nothing before the remark: the remark's own number
    ("Lily has 5 * 2 = 10 cards.\n\nThis is a multi-step calculation:\n\n2 + 1 = 3\n\n"
     "So Lily has 3 cards.", "3"),  # a remark that ends in its own conclusion is read whole
    # ... and what those rules must leave whole: a tuple, a system, thousands
    ("The answer is (3, 4).", "(3, 4)"),
    ("The answer is x = 1, y = 2.", "x = 1, y = 2"),
    ("The answer is 1,200 apples.", "1,200 apples"),
    ("no digits at all", None),
    ("", None),
    (None, None),
    ("\\boxed{}", None),
    ("{{{\\boxed{", None),
])
def test_extract_answer(text, want):
    assert extract_answer(text) == want


def test_extract_answer_is_linear_on_pathological_text():
    start = time.monotonic()
    for text in ["\\boxed{" * 20_000, "\\boxed{1}" + "\\boxed{" * 20_000, "\\boxed . " * 20_000,
                 "{" * 100_000, "1," * 100_000, "The answer is " * 20_000]:
        extract_answer(text)
    assert time.monotonic() - start < 2


# pass_at_k


def test_pass_at_k_by_hand():
    # n=5 samples, c=2 right: pass@1 = 2/5; pass@2 = 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert pass_at_k(4, 3, 2) == 1.0 and pass_at_k(8, 0, 8) == 0.0


@pytest.mark.parametrize("n, c", [(6, 0), (6, 1), (6, 3), (6, 6), (5, 2)])
def test_pass_at_k_equals_the_share_of_k_subsets_with_a_right_sample(n, c):
    samples = [1] * c + [0] * (n - c)
    for k in range(1, n + 1):
        subsets = list(itertools.combinations(range(n), k))
        brute = sum(any(samples[i] for i in s) for s in subsets) / len(subsets)
        assert pass_at_k(n, c, k) == pytest.approx(brute)


# is_equiv

EQUIVALENT = [
    ("\\dfrac{1}{2}", "\\frac12"), ("0.5", "\\frac{1}{2}"), ("1,000", "1000"), ("0.50", "0.5"),
    ("10\\%", "10"), ("x=3", "3"), ("(-\\infty, 0]", "(-\\infty,0]"),
    ("\\begin{pmatrix} -1/3 \\\\ 2/3 \\\\ 5/3 \\end{pmatrix}",
     "\\begin{pmatrix} -\\frac{1}{3} \\\\ \\frac23 \\\\ 1\\frac23 \\end{pmatrix}"),
    ("\\text{(C)}", "C"), ("C", "\\text{(C)}"), ("\\$32,\\!348", "32348"),
    ("32348", "\\$32,\\!348"),
    ("11,\\! 111,\\! 111,\\! 100", "11111111100"), ("18 dollars", "18"), ("5 \\text{ cm}", "5"),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})"), ("A, C", "\\text{A,C}"),
    ("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt2}"), ("2,1", "1,2"), ("30^\\circ", "30"),
    ("1+\\sqrt{19}, 1-\\sqrt{19}", "1 \\pm \\sqrt{19}"), ("[-2,7]", "x \\in [-2,7]"),
]
NOT_EQUIVALENT = [
    ("4", "3"), ("\\frac{2}{1}", "\\frac{1}{2}"), ("(1,2)", "[1,2]"), ("x=4", "3"), ("12", "1,2"),
    ("0.1", "10\\%"), ("\\frac{1}{10}", "10\\%"), ("3x", "3"), ("5 pi", "5"),
    ("\\text{(A)}", "B"), ("(1,2)", "(2,1)"),
    ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix} 2 \\\\ 1 \\end{pmatrix}"),
]
GARBAGE = [None, "", "   ", 5, "x" * 100_000, "{" * 50_000, "\\frac{1}{", "}}{{", "\\boxed{",
           "__import__('os').system('echo hacked')", "\\input{/etc/passwd}", "\x00\ud800"]


@pytest.mark.parametrize("pred, gold", EQUIVALENT)
def test_is_equiv_accepts_equivalent_forms(pred, gold):
    assert is_equiv(pred, gold) is True


@pytest.mark.parametrize("pred, gold", NOT_EQUIVALENT)
def test_is_equiv_rejects_near_misses(pred, gold):
    assert is_equiv(pred, gold) is False


def test_is_equiv_garbage_is_false_and_never_raises():
    for junk in GARBAGE:
        assert is_equiv(junk, "1") is False and is_equiv("1", junk) is False


def test_is_equiv_hard_timeout_then_recovers():
    assert is_equiv("\\frac{1}{2}", "0.5")  # the worker is up: time only the hanging check
    start = time.monotonic()
    assert is_equiv(extract_answer("so \\boxed{9^{9^{9^{9}}}}"), "1") is False
    assert time.monotonic() - start < 10
    assert is_equiv("\\frac{2}{4}", "0.5")  # a fresh worker took over
    os.kill(mathtext._WORKER.proc.pid, 9)  # a worker that died between checks is replaced too
    time.sleep(0.2)
    assert is_equiv("\\frac{3}{6}", "0.5")


def test_worker_that_cannot_start_gives_false(monkeypatch, capsys):
    worker = mathtext._Worker()  # a private one: the shared worker stays healthy
    monkeypatch.setattr(sys, "executable", "/nonexistent/python")  # Popen raises OSError
    assert worker.check("\\frac{1}{2}", "0.5", 5.0) is False and not worker.broken
    monkeypatch.setattr(sys, "executable", "/bin/false")  # starts, never says "ready"
    assert worker.check("\\frac{1}{4}", "0.25", 5.0) is False and worker.broken
    assert "math-verify worker did not start" in capsys.readouterr().err


def test_is_equiv_from_threads_and_forked_processes():
    pairs = [(f"\\frac{{{k}}}{{{2 * k}}}", "0.5") for k in range(1, 9)] + [("\\frac{1}{3}", "0.5")]
    want = [True] * 8 + [False]
    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(lambda pq: is_equiv(*pq), pairs)) == want
    with multiprocessing.get_context("fork").Pool(2) as pool:
        assert pool.starmap(is_equiv, pairs) == want


# real gold answers, written as a model would write them

def model_rewrites(gold: str) -> list[str]:
    """Ways a model writes the same answer differently from the MATH gold."""
    return [gold.replace("\\frac", "\\dfrac"), re.sub(r"\s+", "", gold),
            re.sub(r"\\text\{([^{}]*)\}", r"\1", gold),
            re.sub(r"\\frac\{(\d)\}\{(\d)\}", r"\\frac\1\2", gold)]


def test_every_math500_gold_equals_itself_as_a_model_writes_it():
    fails = []
    for p in load_problems(str(real_file("math500/test.jsonl"))):
        gold = p["answer"]
        outputs = [f"... so the answer is \\boxed{{{gold}}}.", f"The answer is ${gold}$.",
                   f"$\\boxed{{{gold}}}$\n\nProblem: next one, \\boxed{{0}}"]
        preds = [extract_answer(o) for o in outputs] + model_rewrites(gold)
        fails += [(p["id"], pred, gold) for pred in preds if not is_equiv(pred, gold)]
    assert fails == []


def test_every_gsm8k_test_gold_equals_itself_as_a_model_writes_it():
    fails = []
    for p in load_problems(str(real_file("gsm8k/test.jsonl"))):
        gold = p["answer"]
        commas = f"{int(gold):,}"
        outputs = [f"... so the answer is \\boxed{{{gold}}}", f"The answer is {gold}.",
                   f"The answer is ${commas}.", f"Step 1: 2 + 2 = 4\n#### {commas}",
                   f"So she pays {gold} dollars.\n\nQuestion: 99"]
        fails += [(p["id"], o, gold) for o in outputs if not is_equiv(extract_answer(o), gold)]
        if is_equiv(str(int(gold) + 1), gold):
            fails.append((p["id"], "off by one", gold))
    assert fails == []


def test_the_shipped_subsets_are_cut_from_the_full_files():
    """What the fallback reads is what it stands in for: every line of data/'s subsets is a line
    of the full file (when ../shared/data is there to compare with)."""
    for rel, name in SUBSETS.items():
        subset = (Path(__file__).resolve().parents[1] / "data" / name).read_text("utf-8")
        assert subset.count("\n") in (64, 32)
        if (DATA / rel).is_file():
            full = set((DATA / rel).read_text("utf-8").splitlines())
            assert set(subset.splitlines()) <= full
