"""The text side of the pipeline: problems, prompts, steps and grading (no tensors).

  load_problems   gsm8k / math500 from the hub, or a local GSM8K- or MATH-format JSONL file,
                  as [{id, question, answer, ...extra fields}] with `answer` always a str
  format_prompt   plain / fewshot template (base models) or the model's chat template; cut_at_stop;
                  add_template_arg: the --template flag of the stages that prompt (01, 07)
  split_steps     a response as steps that join back to exactly the same text
  extract_answer  last \\boxed{}, else "The answer is ...", else "#### ...", else the last number
  grade           (pred, correct) of one sample; an answer cut by the token limit is never right
  pass_at_k       unbiased pass@k of n graded samples of which c are right (07, 08)
  majority        the most frequent answer, equal ones written differently grouped (07)
  is_equiv        plain numbers exactly in-process; the rest through math-verify in a worker
                  subprocess with a hard time limit (model text is parsed, never executed)
"""
import atexit
import json
import math
import os
import re
import select
import subprocess
import sys
import threading
import time
from collections import Counter
from fractions import Fraction
from pathlib import Path

from common import fail, read_jsonl


# Problems

HUB = {"gsm8k": ("openai/gsm8k", "main"), "math500": ("HuggingFaceH4/MATH-500", None)}


def _normalize_problem(rec: dict, where: str, default_id: str) -> dict | None:
    """One raw record -> {id, question, answer, ...extra}; None for a MATH record whose boxed
    answer is empty (two such problems exist in MATH train: no gold, so nothing to grade)."""
    rec = dict(rec)
    if "question" not in rec and "problem" not in rec:
        fail(f"{where}: missing field 'question' (GSM8K format) or 'problem' (MATH format)")
    key = "question" if "question" in rec else "problem"
    rec["question"] = rec.pop(key)
    if not isinstance(rec["question"], str) or not rec["question"].strip():
        fail(f"{where}: field '{key}' should be a non-empty string; fix that record")
    answer = rec.get("answer")
    if answer is None:
        # MATH without `answer`: the gold is the last boxed expression of the solution
        answer = last_boxed(rec.get("solution") or "")
        if answer is None:
            fail(f"{where}: no field 'answer' and no \\boxed{{}} in 'solution'; add an 'answer'")
    elif isinstance(answer, (int, float)):
        answer = str(answer)
    elif not isinstance(answer, str):
        fail(f"{where}: field 'answer' should be a string, got {type(answer).__name__}")
    elif "####" in answer:
        # GSM8K: worked solution, then "#### N" where N may carry thousands commas (1,600)
        worked, final = answer.rsplit("####", 1)
        final = final.strip().replace(",", "")
        if not NUMBER_RE.fullmatch(final):
            fail(f"{where}: field 'answer' should end in '#### <number>', got '#### {final}'")
        rec.setdefault("solution", worked.strip())
        answer = final
    given = [k for k in ("id", "unique_id") if rec.get(k) not in (None, "")]
    if given and (not isinstance(rec[given[0]], (str, int)) or isinstance(rec[given[0]], bool)):
        fail(f"{where}: field '{given[0]}' should be a string, got "
             f"{type(rec[given[0]]).__name__}")
    rec["answer"], rec["id"] = answer.strip(), str(rec[given[0]]) if given else default_id
    return rec if rec["answer"] else None


def load_problems(name_or_path: str, split: str = "test") -> list[dict]:
    """Problems as [{id, question, answer, ...}] from `gsm8k`, `math500` or a local JSONL file."""
    path = Path(name_or_path)
    if path.is_file() or path.suffix == ".jsonl":
        # folder/stem as name/split: a copy saved as gsm8k/test.jsonl gets the hub's ids
        name, split = path.parent.name or "local", path.stem
        rows = read_jsonl(path, locations=True)
    elif name_or_path in HUB:
        import datasets
        repo, config = HUB[name_or_path]
        split = "test" if name_or_path == "math500" else split  # MATH-500 has only a test split
        try:
            ds = datasets.load_dataset(repo, config, split=split)
        except Exception as e:
            fail(f"cannot load {repo} ({split}) from the hub ({type(e).__name__}: no network?); "
                 "pass a local JSONL path instead (a GSM8K- or MATH-format file: README, Data "
                 "contract)")
        name = name_or_path
        rows = [(f"{repo} {split} row {i}", rec) for i, rec in enumerate(ds)]
    else:
        fail(f"unknown dataset '{name_or_path}': pass gsm8k, math500 or a path to a .jsonl file")
    problems, seen, skipped = [], set(), []
    for index, (where, raw) in enumerate(rows):
        rec = _normalize_problem(raw, where, f"{name}-{split}-{index:05d}")
        if rec is None:
            skipped.append(where)
        elif rec["id"] in seen:
            fail(f"{where}: duplicate id '{rec['id']}'; ids must be unique (resume relies on them)")
        else:
            seen.add(rec["id"])
            problems.append(rec)
    if skipped:
        print(f"warning: skipped {len(skipped)} problem(s) with an empty answer: "
              f"{', '.join(skipped)}", file=sys.stderr)
    return problems


# Prompts

PLAIN_TEMPLATE = "Question: {question}\nAnswer:"
# Base models (Llama-3-8B, deepseek-math-7b-base) answer a bare plain prompt in any shape; a few
# worked examples in the answer format every stage expects (Step k lines, "The answer is N.")
# teach it in-context, as the cDPO recipe does with its few-shot blocks. Written for this project.
FEWSHOT_EXAMPLES = [
    ("A baker makes 48 rolls. She sells 30 of them and then bakes 12 more. How many rolls does "
     "she have now?",
     "Step 1: After selling, she has 48 - 30 = 18 rolls.\nStep 2: After baking, she has "
     "18 + 12 = 30 rolls.\nThe answer is 30."),
    ("Pens cost $3 each and a notebook costs $5. How much do 4 pens and 2 notebooks cost?",
     "Step 1: The pens cost 4 * 3 = 12 dollars.\nStep 2: The notebooks cost 2 * 5 = 10 "
     "dollars.\nStep 3: Together they cost 12 + 10 = 22 dollars.\nThe answer is 22."),
    ("A train travels 60 miles per hour for 2.5 hours. How many miles does it travel?",
     "Step 1: Distance is speed times time, 60 * 2.5 = 150 miles.\nThe answer is 150."),
    ("Sam had 120 stamps and gave a quarter of them to his sister. He then bought 15 more. How "
     "many stamps does he have?",
     "Step 1: A quarter of 120 is 120 / 4 = 30 stamps.\nStep 2: After giving them away he has "
     "120 - 30 = 90 stamps.\nStep 3: After buying more he has 90 + 15 = 105 stamps.\n"
     "The answer is 105."),
]
FEWSHOT_BLOCK = "".join(PLAIN_TEMPLATE.format(question=q) + " " + a + "\n\n"
                        for q, a in FEWSHOT_EXAMPLES)
# Instruct models that box their answers (Qwen2-Math, DeepSeek-Math-Instruct) are prompted with
# this line after the question ('chat-boxed'); a small chat model may answer the question alone
# better ('chat'): measure both on the same problems (07_eval.py --template, README).
CHAT_SUFFIX = "\nPlease reason step by step, and put your final answer within \\boxed{}."
TEMPLATES = ("plain", "fewshot", "chat", "chat-boxed")
# A base model under the plain template goes on to invent the next question: cut it there.
STOP_STRINGS = ["\n\nQuestion:", "\n\nProblem:"]


def add_template_arg(group):
    """--template (choices TEMPLATES), in the argument group of a stage that prompts (01, 07)."""
    group.add_argument("--template", default="plain", choices=TEMPLATES,
                       help="plain 'Question: ...\\nAnswer:' (toy, SFT'd models), fewshot (4 "
                            "worked examples first: base models), chat (the question as the user "
                            "message of the tokenizer's chat template) or chat-boxed (+ 'Please "
                            "reason step by step, and put your final answer within \\boxed{}.')")


def format_prompt(question: str, template: str = "plain", tokenizer=None) -> str:
    """'plain' for the toy model and SFT'd models (the response starts with a space), 'fewshot'
    for base models (4 worked examples, then the plain prompt), 'chat' for instruct models (the
    question is the user message, rendered by the tokenizer's chat template), 'chat-boxed' the
    same with CHAT_SUFFIX after the question."""
    if template == "plain":
        return PLAIN_TEMPLATE.format(question=question)
    if template == "fewshot":
        return FEWSHOT_BLOCK + PLAIN_TEMPLATE.format(question=question)
    if template in ("chat", "chat-boxed"):
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            fail(f"--template {template} needs a tokenizer with a chat template; use plain")
        content = question + (CHAT_SUFFIX if template == "chat-boxed" else "")
        return tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                             tokenize=False, add_generation_prompt=True)
    fail(f"unknown prompt template '{template}'; use {', '.join(TEMPLATES)}")


def cut_at_stop(text: str, stops: list[str] = STOP_STRINGS) -> str:
    """`text` up to (not including) the earliest stop string."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut]


# Steps

STEP_RE = re.compile(r"^[ \t]*Step \d+:", re.M)
BLANK_RE = re.compile(r"\n(?:[ \t]*\n)+")  # a newline followed by one or more blank lines


def split_steps(text: str) -> list[str]:
    """Reasoning steps, with "".join(split_steps(t)) == t for every t.

    With "Step k:" lines every step starts at such a marker (a preamble joins the first step, a
    closing "The answer is ..." line stays in the last); else a step ends after each run of blank
    lines; else after each newline. Separators stay with the step before them."""
    markers = [m.start() for m in STEP_RE.finditer(text)]
    if markers:
        cuts = markers[1:]
    else:
        ends = [m.end() for m in BLANK_RE.finditer(text)]
        cuts = ends or [m.end() for m in re.finditer("\n", text)]
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]


# Answers

BOX_RE = re.compile(r"\\(?:boxed|fbox)\b\s*")
BARE_RE = re.compile(r"[^\s$]+")  # \boxed 5
ANSWER_IS_RE = re.compile(r"[Tt]he (?:final )?answer is")
# Commas only as thousands separators, so "(3,4)" ends in the number 4, not 34.
NUMBER_TEXT_RE = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?")
NUMBER_RE = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)")


def _braced(text: str, start: int, limit: int) -> str | None:
    """Content of the {...} group opening at text[start]; None if it does not close before
    text[limit]. Escaped characters (\\{, \\}, \\\\) do not count as braces."""
    depth, i = 0, start
    while i < limit:
        c = text[i]
        if c == "\\":
            i += 1
        elif c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1:i]
        i += 1
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last complete, non-empty \\boxed{...} / \\fbox{...} (or `\\boxed 5`)."""
    limit = len(text)
    for m in reversed(list(BOX_RE.finditer(text))):
        if text.startswith("{", m.end()):
            content = _braced(text, m.end(), limit)
            if content is None:
                limit = m.start()  # a box around this unclosed one cannot close either: O(n)
        else:
            bare = BARE_RE.match(text, m.end())
            content = bare.group(0).rstrip(".") if bare else None
        if content and content.strip():
            return content.strip()
    return None


SENTENCE_END_RE = re.compile(r"\.(?:\s|$)")  # a full stop, not a decimal point (18.50)
# ", because ...", ", and Sam has ...": a comma and a word end the answer's clause; "1,200",
# "(3, 4)" and "x = 1, y = 2" (no word of two letters after the comma) keep theirs
CLAUSE_END_RE = re.compile(r",\s+(?=[A-Za-z]{2})")
# "5 x 4 = 20 flowers", "$2 + $3 = $5": a sum of numbers worked out, its result last
WORKED_RE = re.compile(r"\d\s*[-+*/x×]\s*\$?\d[^=]*=\s*(?=[-$\d])")
HEDGE_RE = re.compile(r"(?:actually|only|just|simply|exactly|clearly)\s+(?=[-$\d])")  # is only 2
# A closing paragraph that comments on the answer instead of giving it ("\n\nThis is a classic
# example of a simple equation: 8 + 3 = 11."): the last-number rule reads the text before it.
REMARK_RE = re.compile(r"\n[ \t]*\n[ \t]*(?:This (?:is|problem)|That is|It's a|It is a|In this "
                       r"(?:example|case|problem)|Note)\b")
CONCLUSION_RE = re.compile(r"^[ \t]*(?:So|Therefore|Thus|Hence)\b", re.M)  # a remark's own end


def _clean(span: str) -> str | None:
    """An answer written in running text: its first sentence and clause (after a ':' and line
    breaks: "The answer is 18. She sells..." and "The answer is 18, because ..." -> "18"), the
    result of a worked sum ("5 x 4 = 20 flowers" -> "20 flowers"), without '.' or '$' around it.
    (A real model's phrasings, from runs/audit_grader.py on SmolLM2's answers.)"""
    span = span.lstrip(": \t\n").split("\n", 1)[0]
    span = SENTENCE_END_RE.split(span, 1)[0]
    span = CLAUSE_END_RE.split(span, 1)[0]
    span = HEDGE_RE.sub("", WORKED_RE.split(span)[-1].strip(), count=1)
    return span.strip("$* ") or None  # also markdown bold: "The answer is **18**."


def extract_answer(text: str) -> str | None:
    """The final answer of a response, or None. Never raises."""
    if not isinstance(text, str):
        return None
    text = cut_at_stop(text)
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    for marker in (list(ANSWER_IS_RE.finditer(text)), list(re.finditer("####", text))):
        if marker and (span := _clean(text[marker[-1].end():])):
            return span
    remark = REMARK_RE.search(text)
    if remark and not CONCLUSION_RE.search(text, remark.end()):  # unless it concludes itself
        text = text[:remark.start()] if NUMBER_TEXT_RE.search(text, 0, remark.start()) else text
    numbers = NUMBER_TEXT_RE.findall(text)
    return numbers[-1].replace(",", "") if numbers else None


def grade(text: str, gold: str, truncated: bool = False) -> tuple[str | None, bool]:
    """(pred, correct) of one response. An answer cut by the token limit is never right: its
    'last number' may be a partial result that happens to equal the gold one."""
    pred = extract_answer(text)
    return pred, not truncated and is_equiv(pred, gold)


def vote_key(pred: str) -> str:
    """Answers that are the same written differently share a key: no spacing, \\left/\\right,
    $ or trailing period; \\dfrac = \\frac; plain numbers as exact fractions (1,000 = 1000.0)."""
    s = re.sub(r"\s+|\\[!,; ]|\\left|\\right|\\?\$", "", pred).rstrip(".")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    try:
        return str(Fraction(s.replace(",", "")))
    except (ValueError, ZeroDivisionError):
        return s


def majority(preds: list) -> str | None:
    """The most frequent extracted answer (ties: the one seen first); unparsed ones do not vote."""
    votes = Counter(vote_key(p) for p in preds if p is not None)
    if not votes:
        return None
    best = max(votes.values())
    return next(p for p in preds if p is not None and votes[vote_key(p)] == best)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n graded samples of which c are right, k <= n: the chance that k of
    them drawn without replacement hold a right one, 1 - C(n-c, k) / C(n, k) (1 when n-c < k)."""
    return 1.0 if n - c < k else 1.0 - math.comb(n - c, k) / math.comb(n, k)


# Equivalence

MAX_ANSWER_CHARS = 1000  # a final answer is short; anything longer is garbage and slow to parse
MEMO_SIZE = 100_000
STARTUP_TIMEOUT = 60.0  # importing sympy on a busy machine; not charged to a check's `timeout`
THOUSANDS_RE = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d*)?")
# A trailing unit after a number: "5 \text{ cm}", "18 dollars" (words of 2+ letters; not "pi")
UNIT_RE = re.compile(r"(?<=\d)(?:\s*\\(?:text|mbox|mathrm)\{[^{}]*\}"
                     r"|\s+(?!pi\b)[A-Za-z]{2,}(?:\s+[A-Za-z]+)*)$")

# math-verify parses LaTeX into sympy and compares sets, intervals, matrices, equations, units.
# Its own timeouts use signal.alarm, which cannot interrupt C-level work such as the big-int power
# in 9^{9^{9^{9}}}, so they are off here and the parent kills the whole worker instead.
WORKER_SRC = r"""
import json, logging, os, resource, sys, warnings
logging.disable(logging.CRITICAL)
warnings.simplefilter("ignore")
resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))  # a runaway bignum fails, not the host
reply, sys.stdout = sys.stdout, open(os.devnull, "w")  # a stray library print cannot desync us
from math_verify import parse, verify
print("ready", file=reply, flush=True)
for line in sys.stdin:
    pred, gold = json.loads(line)
    try:
        g = parse("\\boxed{" + gold + "}", parsing_timeout=None)
        p = parse("\\boxed{" + pred + "}", parsing_timeout=None)
        ok = bool(verify(g, p, timeout_seconds=None))
    except Exception:  # MemoryError, RecursionError, a parser bug: not equivalent
        ok = False
    print(json.dumps(ok), file=reply, flush=True)
"""


class _Worker:
    """This process's math-verify subprocess: started on first use, killed when a check overruns
    its time limit, restarted for the next check. A lock serializes checks, so threads share it."""

    def __init__(self):
        self.proc, self.lock, self.memo, self.broken = None, threading.Lock(), {}, False

    def close(self):
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def _readline(self, timeout: float) -> str | None:
        """One reply line within `timeout` seconds; None on timeout or a dead worker."""
        fd, buf, deadline = self.proc.stdout.fileno(), b"", time.monotonic() + timeout
        poller = select.poll()  # not select.select: big training processes have fds > 1024
        poller.register(fd, select.POLLIN)
        while not buf.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(left * 1000):
                return None
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return None
            buf += chunk
        return buf.decode().strip()

    def _start(self) -> bool:
        self.proc = subprocess.Popen([sys.executable, "-u", "-c", WORKER_SRC],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        if self._readline(STARTUP_TIMEOUT) == "ready":
            return True
        self.close()
        self.broken = True  # not installed or not importable: retrying would fail the same way
        print("warning: the math-verify worker did not start (is math-verify installed?); "
              "non-numeric answers count as wrong", file=sys.stderr)
        return False

    def check(self, pred: str, gold: str, timeout: float) -> bool:
        with self.lock:
            if (pred, gold) in self.memo:
                return self.memo[pred, gold]
            if self.proc is not None and self.proc.poll() is not None:
                self.close()  # killed from outside between checks: not this pair's fault
            if self.broken:
                return False
            try:
                if self.proc is None and not self._start():
                    return False
                self.proc.stdin.write((json.dumps([pred, gold]) + "\n").encode())
                self.proc.stdin.flush()
                reply = self._readline(timeout)
            except OSError:  # broken pipe, or no process to be had (fds, memory): not memoized
                self.close()
                return False
            if reply is None:
                self.close()  # hung (or died) on this pair: a fresh worker takes the next check
            if len(self.memo) >= MEMO_SIZE:
                self.memo.pop(next(iter(self.memo)))  # oldest first
            self.memo[pred, gold] = reply == "true"
            return reply == "true"


_WORKER = _Worker()
atexit.register(_WORKER.close)
os.register_at_fork(after_in_child=_WORKER.__init__)  # a forked child must not share the pipe


def _squash(s: str) -> str:
    """Spacing, sizing and \\text{} wrappers removed, for a cheap exact-string match: it catches
    answers math-verify cannot parse, such as "\\text{A, C}" vs "A,C" or "\\text{June 20}"."""
    s = re.sub(r"\\(?:text|mbox|mathrm)\s*\{([^{}]*)\}", r"\1", s)
    return re.sub(r"\s+|\\[!,; ]|\\(?:left|right)(?![a-z])|\\?\$", "", s).rstrip(".")


def _as_number(s: str) -> Fraction | None:
    """A plain number, perhaps with $, thousands separators, spacing or a unit; else None."""
    s = UNIT_RE.sub("", s)
    s = re.sub(r"\\[!,;]|\\?\$|\s|\{,\}", "", s).rstrip(".")
    if THOUSANDS_RE.fullmatch(s):
        s = s.replace(",", "")
    return Fraction(s) if NUMBER_RE.fullmatch(s) else None


def is_equiv(pred: str, gold: str, timeout: float = 5.0) -> bool:
    """Is the predicted answer mathematically the gold one? Never raises; at most `timeout`
    seconds (plus a one-off worker start). Plain numbers compare exactly in-process (1,000 ==
    1000, 0.50 == 0.5; no x100 percent tolerance, PAPERS.md C3); the rest goes to math-verify
    (fractions, radicals, intervals, tuples, matrices, `x=3` vs `3`, multiple choice)."""
    if not isinstance(pred, str) or not isinstance(gold, str):
        return False
    # A percent sign is dropped, never scaled (10\% == 10, not 0.1); a closing "." goes too
    pred, gold = (re.sub(r"\\?%", "", s).strip().rstrip(".").strip() for s in (pred, gold))
    if not pred or not gold or max(len(pred), len(gold)) > MAX_ANSWER_CHARS:
        return False
    if _squash(pred) == _squash(gold):
        return True
    a, b = _as_number(pred), _as_number(gold)
    if a is not None and b is not None:
        return a == b
    return _WORKER.check(pred, gold, timeout)
