"""02_localize.py: the search over scripted success rates, rectification, the toy oracle, real runs
on the toy world (resume after a kill), and the judge against a local HTTP server."""
import http.server
import json
import math
import random
import re
import subprocess
import sys
import threading

import pytest

from machinery import judge, toyworld
from conftest import load_stage, ROOT
from machinery.mathtext import split_steps

loc = load_stage("02_localize")
STEP = re.compile(r"Step (\d+): (\d+) ([-+*]) (\d+) = (\d+)")
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


# -------------------------------------------------------------------------------------------------
# Toy texts: real toy problems, answered right or with one slip that later steps carry along


def toy_solution(rec: dict, start: int | None = None, slip: tuple[int, int] | None = None,
                 first: int = 1) -> str:
    """The response 00_toy trains on (" Step 1: a op b = c\\n...The answer is N."), from step
    `first` on, continuing from value `start`; slip = (k, d) adds d to step k's result, and the
    later steps compute on from the wrong value, as the toy model's errors do."""
    steps = [STEP.fullmatch(line).groups() for line in rec["answer"].split("\n")[:-1]]
    v = int(steps[0][1]) if start is None else start
    lines = []
    for idx, _, op, b, _ in steps[first - 1:]:
        c = OPS[op](v, int(b)) + (slip[1] if slip and slip[0] == int(idx) else 0)
        lines.append(f"Step {idx}: {v} {op} {b} = {c}\n")
        v = c
    return (" " if first == 1 else "") + "".join(lines) + f"The answer is {v}."


def slip_for(rec: dict, rng: random.Random) -> tuple[int, int]:
    """A one-digit slip (+-1 or +-10) at a random step that keeps every value >= 0."""
    while True:
        k, d = rng.randint(1, len(rec["step_values"])), rng.choice([1, -1, 10, -10])
        if "= -" not in toy_solution(rec, slip=(k, d)):  # no value below 0
            return k, d


def toy_samples(run, n: int, seed: int = 0) -> list[dict]:
    """01's samples.jsonl records for the first n toy train problems: one right answer and two
    wrong ones (different slips) per problem."""
    rng, out = random.Random(seed), []
    for line in list((run / "00_toy" / "train.jsonl").open())[:n]:
        rec = json.loads(line)
        gold = str(rec["step_values"][-1])
        texts = [toy_solution(rec)]
        while len(texts) < 3:  # two different wrong answers
            texts = list(dict.fromkeys(texts + [toy_solution(rec, slip=slip_for(rec, rng))]))
        out.append({"id": rec["id"], "question": rec["question"], "answer": gold,
                    "prompt": "Question: " + rec["question"] + "\nAnswer:",
                    "step_values": rec["step_values"], "solution": rec["answer"].split("\n####")[0],
                    "samples": [{"text": t, "pred": t.split()[-1][:-1],
                                 "correct": t.split()[-1][:-1] == gold} for t in texts]})
    return out


def write_samples(run, records):
    (run / "01_sample").mkdir(parents=True, exist_ok=True)
    (run / "01_sample" / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


# -------------------------------------------------------------------------------------------------
# The search over scripted rates


def scripted(rates):
    """Oracle over a list of rates for p_0..p_{n-1}; records the probes (p_n must never be)."""
    probes = []

    def rate(j):
        assert 0 <= j < len(rates) and j not in probes, j
        probes.append(j)
        return rates[j]
    return rate, probes


def locate(n: int, success_rate, threshold: float = 0.0, scan: str = "binary"):
    """The search of a Localization driven by an oracle success_rate(j) -> float: k or None."""
    state = loc.Localization(n, threshold, scan)
    while state.probe is not None:
        state.update(success_rate(state.probe))
    return state.k


@pytest.mark.parametrize("rates, k_binary, k_linear", [
    ([1.0, 0.5, 0.5, 0.0, 0.0], 3, 3),  # monotone, k in the middle
    ([0.75, 0.0, 0.0, 0.0], 1, 1),  # k = 1: the first step already loses the answer
    ([1.0, 1.0, 1.0, 1.0], 4, 4),  # k = n: every prefix is fine, the last step is wrong
    ([0.5], 1, 1),  # one step
    ([1.0, 0.0, 1.0, 1.0, 0.0], 4, 1),  # non-monotone: binary finds a later transition
    ([1.0, 0.25, 0.0, 0.5, 0.25, 0.0, 0.0], 5, 2),  # a lucky rollout after the error
])
def test_scripted_rates(rates, k_binary, k_linear):
    n = len(rates)
    for scan, want in (("binary", k_binary), ("linear", k_linear)):
        rate, probes = scripted(rates)
        k = locate(n, rate, 0.0, scan)
        assert k == want, (scan, probes)
        # whatever it returns is a transition: p_{k-1} recoverable, p_k not (or k = n)
        assert rates[k - 1] > 0 and (k == n or rates[k] == 0)
        assert probes[0] == 0 and len(probes) <= (1 + math.ceil(math.log2(n)) if scan == "binary"
                                                  else n)


def test_p0_zero_skips_after_one_probe():
    for scan in ("binary", "linear"):
        rate, probes = scripted([0.0, 1.0, 1.0])
        assert locate(3, rate, 0.0, scan) is None and probes == [0]


def test_threshold():
    rates = [1.0, 0.5, 0.125, 0.0]
    assert locate(4, scripted(rates)[0], 0.0, "linear") == 3
    assert locate(4, scripted(rates)[0], 0.2, "linear") == 2
    assert locate(4, scripted(rates)[0], 0.2, "binary") == 2


def test_binary_equals_linear_on_monotone_rates():
    rng = random.Random(0)
    for _ in range(3000):
        n = rng.randint(1, 40)
        threshold = rng.choice([0.0, 0.125, 0.3])
        rates = sorted((rng.choice([0.0, 0.125, 0.25, 0.5, 1.0, rng.random()]) for _ in range(n)),
                       reverse=True)
        rates[0] = max(rates[0], rng.choice([0.0, 0.5, 1.0]))
        rate_b, probes_b = scripted(rates)
        rate_l, _ = scripted(rates)
        k = locate(n, rate_b, threshold, "binary")
        assert k == locate(n, rate_l, threshold, "linear")
        first = next((j for j in range(n) if rates[j] <= threshold), n)  # first unrecoverable
        assert k == (None if first == 0 else first)
        assert len(probes_b) <= 1 + math.ceil(math.log2(n)) if n > 1 else len(probes_b) <= 1


def test_probe_count_bound_is_tight():
    """Every (n, k) with step-function rates: binary needs at most 1 + ceil(log2 n) probes, and
    some k needs exactly that many."""
    for n in range(1, 70):
        worst = 0
        for k in range(1, n + 1):
            rate, probes = scripted([1.0] * k + [0.0] * (n - k))
            assert locate(n, rate, 0.0, "binary") == k
            worst = max(worst, len(probes))
        assert worst == 1 + math.ceil(math.log2(n)), n


# -------------------------------------------------------------------------------------------------
# One sample's rounds (requests and rectification)


def drive(state, answer, reaches):
    """Run one Localization round by round, as 02's loop does; answer(j, r) gives the
    continuation text of rollout r of p_j, reaches(j, text) whether it ends at the gold answer.
    Returns ((k, conts, good), the requests made)."""
    requests = []
    while (req := state.request()) is not None:
        requests.append(req)
        j, r0, count = req
        got = [answer(j, r) for r in range(r0, r0 + count)]
        state.take(j, got, [reaches(j, text) for text in got])
    return (state.k, state.conts, state.good), requests


def test_job_binary_search_and_reuse_of_p_k_minus_1():
    # 4 steps, p_0 and p_1 recoverable (half the rollouts reach gold), p_2 and later not: k = 2
    reaches = lambda j, text: text.endswith("42.")  # noqa: E731
    answer = lambda j, r: (f"Step {j + 1}: x{r % 2}\nStep {j + 2}: y\n"  # noqa: E731
                           f"The answer is {42 if j < 2 and r % 2 else 7}.")
    (k, conts, good), requests = drive(
        loc.Localization(4, 0.0, "binary", rollouts=4, budget=32), answer, reaches)
    assert k == 2 and requests == [(0, 0, 4), (2, 0, 4), (1, 0, 4)]
    assert len(good[1]) == 2  # p_{k-1} was probed by the search: its successes are reused
    chosen = loc.distinct_first_steps("Step 2: 5 + 1 = 7\n", good[1])
    assert chosen == ["Step 2: x1\n"]


def test_job_with_judge_k_samples_more_only_when_needed():
    reaches = lambda j, text: "good" in text  # noqa: E731
    answer = lambda j, r: "Step 3: good\n" if r >= 13 else "Step 3: bad\n"
    (k, conts, good), requests = drive(
        loc.Localization(5, 0.0, "binary", rollouts=4, budget=20, k=3), answer, reaches)
    assert k == 3 and requests == [(2, 0, 4), (2, 4, 4), (2, 8, 4), (2, 12, 4)]
    assert len(conts[2]) == 16 and len(good[2]) == 3
    (k, conts, good), requests = drive(
        loc.Localization(5, 0.0, "binary", rollouts=4, budget=10, k=3), answer, reaches)
    assert requests[-1] == (2, 8, 2) and len(conts[2]) == 10 and good[2] == []  # budget holds


def test_rectification_pairs_from_toy_continuations():
    rejected = "Step 2: 19 - 4 = 16\n"
    continuations = ["Step 2: 19 - 4 = 15\nStep 3: 15 + 2 = 17\nThe answer is 17.",
                     "Step 2: 19 - 4 = 15\nStep 3: 15 + 2 = 17\nThe answer is 17.",  # duplicate
                     "Step 2: 19 - 4 = 16\nStep 3: 16 + 1 = 17\nThe answer is 17.",  # = rejected
                     "Step 2: 19 - 2 = 17\nStep 3: 17 + 0 = 17\nThe answer is 17.",
                     "Step 2: 19 - 4 = 15 \nStep 3: 15 + 2 = 17\nThe answer is 17."]  # spacing
    chosen = loc.distinct_first_steps(rejected, continuations)
    assert chosen == ["Step 2: 19 - 4 = 15\n", "Step 2: 19 - 2 = 17\n"]
    assert all(c != rejected and "</s>" not in c and "The answer" not in c for c in chosen)
    last = loc.distinct_first_steps("The answer is 9.", ["The answer is 8."])
    assert last == ["The answer is 8."]


def test_oracle_first_wrong_step_on_toy_texts(toy_world):
    rng = random.Random(1)
    for line in list((toy_world / "00_toy" / "train.jsonl").open())[:100]:
        rec = json.loads(line)
        split = split_steps
        m = len(rec["step_values"])
        assert len(split(toy_solution(rec))) == m  # "The answer is N." stays in the last step
        assert toyworld.first_wrong_step(split(toy_solution(rec)), rec["step_values"]) == m
        wrong_end = toy_solution(rec).replace("The answer is", "The answer is 1")
        assert toyworld.first_wrong_step(split(wrong_end), rec["step_values"]) == m
        extra = split(toy_solution(rec))
        extra[-1:] = [extra[-1].split("The")[0], f"Step {m + 1}: 1 + 1 = 2\nThe answer is 2."]
        assert toyworld.first_wrong_step(extra, rec["step_values"]) == m + 1
        k, d = slip_for(rec, rng)
        assert toyworld.first_wrong_step(split(toy_solution(rec, slip=(k, d))),
                                         rec["step_values"]) == k
        steps = split(toy_solution(rec))
        del steps[m - 1]  # the last step line is missing
        assert toyworld.first_wrong_step(steps, rec["step_values"]) == m
        steps = split(toy_solution(rec))
        steps[0] = steps[0].replace(" = ", " is ")  # malformed first step
        assert toyworld.first_wrong_step(steps, rec["step_values"]) == 1


# a real-model run in a fresh process: records without step_values
NO_TOY = r"""
import importlib.util, json, pathlib, sys
root, out = sys.argv[1], pathlib.Path(sys.argv[2])
sys.path.insert(0, root)
spec = importlib.util.spec_from_file_location("loc", root + "/02_localize.py")
loc = importlib.util.module_from_spec(spec)
spec.loader.exec_module(loc)
rec = {"id": "q", "prompt": "Q", "answer": "2", "samples": [
    {"text": "Step 1: 1 + 1 = 3\nThe answer is 3.", "correct": False}]}
s = {**loc.select_wrong_samples([rec], 2)[0], "steps": ["Step 1: 1 + 1 = 3\nThe answer is 3."],
     "record": {"id": "q-s0"}}
state = loc.Localization(1, k=1)
state.take(0, [{"text": "Step 1: 1 + 1 = 2\nThe answer is 2."}], [True])
loc.write_outputs(out, [loc.record_of(s, state)], [rec], {})
assert json.loads((out / "summary.json").read_text())["pairs"] == 1
assert "toyworld" not in sys.modules, "a real-model run imported the toy world"
"""


def test_real_runs_never_import_the_toy_world(tmp_path):
    """No stage imports another, and 02 imports the toy oracle only for records that carry
    step_values (toy runs): records of a real model are localized and written without it."""
    r = subprocess.run([sys.executable, "-c", NO_TOY, str(ROOT), str(tmp_path)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "importlib" not in (ROOT / "02_localize.py").read_text()


# -------------------------------------------------------------------------------------------------
# Real runs on the toy world


def args_for(run, model, *extra):
    return loc.parser.parse_args(["--run-dir", str(run), "--model", str(model), "--rollouts", "4",
                                  "--batch-size", "16", "--max-new-tokens", "32", *extra])


def read(path):
    return [json.loads(line) for line in path.open()]


def test_real_run_summary_and_resume_after_kill(toy_world, tmp_path, monkeypatch):
    """The untrained fixture model rarely reaches the gold answer, so most samples stop at p_0;
    the run must still account for every sample, and a run killed mid-way must finish with the
    same records as one that was not."""
    run, model = tmp_path / "run", toy_world / "00_toy" / "model"
    write_samples(run, toy_samples(toy_world, 6))
    loc.main(args_for(run, model, "--out", str(tmp_path / "whole")))
    whole = read(tmp_path / "whole" / "records.jsonl")
    summary = json.loads((tmp_path / "whole" / "summary.json").read_text())
    assert len(whole) == summary["samples"] == 12 and len({r["id"] for r in whole}) == 12
    assert summary["located"] + summary["skipped"].get("p0_zero", 0) == 12
    assert summary["rollouts_per_sample"] >= 4 and summary["config"]["rollouts"] == 4
    assert 0 <= summary.get("oracle_agreement", 0) <= 1
    for r in whole:
        bound = 4 * (math.ceil(math.log2(r["n_steps"])) + 1)
        assert r["continuations"] <= bound and r["rollouts"].keys() <= r["sampled"].keys()
        assert 1 <= r["oracle_step"] <= r["n_steps"] and r["status"] in ("p0_zero", "paired",
                                                                            "no_pairs")

    # kill after 20 of the 48 rollouts, leave a torn line behind, then run again
    class Dying(loc.Sampler):
        def results(self):
            for i, item in enumerate(super().results()):
                if i == 20:
                    raise KeyboardInterrupt
                yield item
    monkeypatch.setattr(loc, "Sampler", Dying)
    with pytest.raises(KeyboardInterrupt):
        loc.main(args_for(run, model))
    part = run / "02_localize" / "records.jsonl.part0"
    kept = read(part)
    assert 0 < len(kept) < 12
    with part.open("a") as f:
        f.write('{"id": "torn')
    monkeypatch.undo()
    loc.main(args_for(run, model))
    resumed = read(run / "02_localize" / "records.jsonl")
    assert resumed == whole  # per-row seeds: same samples whatever was in flight with them
    assert not list((run / "02_localize").glob("*.part*"))
    assert (run / "02_localize" / "pairs.jsonl").read_text() == \
        (tmp_path / "whole" / "pairs.jsonl").read_text()


def solver_sampler(records, finish="eos"):
    """A perfect toy solver in place of the model's Sampler: continues any prefix with correct
    arithmetic from its last value, so p_j reaches the gold answer exactly when s_1..s_j are
    right. The search must then find the exact first wrong step of every sample. finish: what
    every continuation reports as its end ("length": cut by --max-new-tokens)."""
    by_prompt = {r["prompt"]: r for r in records}

    class SolverSampler:
        def __init__(self, model, tok, *args, **kw):
            self.tok, self.queue = tok, []

        def add(self, key, prompt, seed=0):
            self.queue.append((key, prompt))

        def results(self):
            while self.queue:
                key, ids = self.queue.pop(0)
                text = self.tok.decode(ids, skip_special_tokens=True)
                prompt = text[:text.index("\nAnswer:") + len("\nAnswer:")]
                rec, done = by_prompt[prompt], STEP.findall(text[len(prompt):])
                start = int(done[-1][4]) if done else None
                worked = {"answer": rec["solution"] + "\n#### ?"}  # the gold steps, as 00_toy
                yield key, {"ids": [], "text": toy_solution(worked, start, first=len(done) + 1),
                            "finish": finish}
    return SolverSampler


def test_exact_rollouts_find_the_oracle_step(toy_world, tmp_path, monkeypatch):
    run = tmp_path / "run"
    records = toy_samples(toy_world, 12, seed=3)
    write_samples(run, records)
    monkeypatch.setattr(loc, "Sampler", solver_sampler(records))
    values = {r["id"]: r["step_values"] for r in records}
    cost = {}
    for scan in ("binary", "linear"):
        out = tmp_path / scan
        loc.main(args_for(run, toy_world / "00_toy" / "model", "--scan", scan, "--out", str(out)))
        summary = json.loads((out / "summary.json").read_text())
        assert summary["oracle_agreement"] == 1.0 and summary["located"] == 24
        assert summary["pair_precision"] == 1.0
        cost[scan] = summary["rollouts_per_sample"]
        pairs = read(out / "pairs.jsonl")
        assert len(pairs) == 24 and len({p["id"] for p in pairs}) == 24  # one right step each
        for p in pairs:
            k = p["step_idx"]
            assert p["chosen"] != p["rejected"] and p["prefix"].count("\n") == k - 1
            assert int(STEP.search(p["chosen"])[5]) == values[p["problem_id"]][k - 1]
            assert int(STEP.search(p["rejected"])[5]) != values[p["problem_id"]][k - 1]
            assert set(p) >= {"id", "problem_id", "prompt", "prefix", "chosen", "rejected",
                              "step_idx", "rollouts", "answer"}
            assert p["rollouts"][str(k - 1)] == 4  # the solver never fails from p_{k-1}
    assert cost["binary"] <= cost["linear"]


# -------------------------------------------------------------------------------------------------
# The judge


@pytest.mark.parametrize("reply, n, k", [
    ("Step 1 adds.\nFinal Decision: Step 1: correct; Step 2: incorrect", 3, 2),
    ("**Final Decision:** correct; neutral; incorrect.", 3, 2),  # neutral counts as wrong
    ("final decision: step 1: correct. final decision: step 1: incorrect", 3, 1),  # the last one
    ("Final Decision: Step 1: correct; Step 2: correct", 2, 0),  # no error found
    ("Step 2 is wrong.", 3, None),  # no decision line
    ("Final Decision: Step 1: correct; Step 3: incorrect", 3, None),  # numbering skips a step
    ("Final Decision: Step 1: correct; Step 2: maybe", 3, None),  # no label
    ("Final Decision: correct; correct; correct; incorrect", 3, None),  # past the last step
])
def test_parse_verdict(reply, n, k):
    assert judge.parse_verdict(reply, n) == k


class JudgeServer:
    """OpenAI-style /chat/completions on 127.0.0.1 with canned replies, for at most max_requests."""

    def __init__(self, replies, max_requests=20):
        self.requests, outer = [], self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append((self.path, body))
                assert len(outer.requests) <= max_requests
                text = body["messages"][0]["content"]
                reply = next(r for key, r in replies if key in text)
                data = json.dumps({"choices": [{"message": {"role": "assistant",
                                                            "content": reply}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *a):
                pass
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def test_judge_against_local_server(toy_world, tmp_path):
    records = toy_samples(toy_world, 3, seed=5)
    write_samples(tmp_path, records)
    wrong = [next(s for s in r["samples"] if not s["correct"]) for r in records]
    replies = [(records[0]["question"],  # first problem: step 2 is wrong
                "The second step subtracts wrongly.\nFinal Decision: Step 1: correct; "
                "Step 2: incorrect"),
               (records[1]["question"], "I am not sure."),  # unparsable
               ("", "Final Decision: " + "; ".join(["correct"] * 9))]  # no error found
    template = tmp_path / "judge.txt"
    template.write_text("P: {problem}\nREF: {reference_solution}\nWRONG:\n{wrong_answer}\n{x}")
    with JudgeServer(replies) as server:
        loc.main(args_for(tmp_path, toy_world / "00_toy" / "model", "--per-problem", "1",
                          "--judge-url", server.url,
                          "--judge-model", "judge-test", "--judge-prompt", str(template)))
    assert len(server.requests) == 3  # one per sample, sent concurrently
    path, body = next(r for r in server.requests if records[0]["question"] in str(r))
    assert path == "/v1/chat/completions" and body["model"] == "judge-test"
    msg = body["messages"][0]["content"]
    assert msg.startswith(f"P: {records[0]['question']}\nREF: {records[0]['solution']}")
    assert "WRONG:\n" + wrong[0]["text"].strip().split("\n")[0] in msg and msg.endswith("{x}")
    out = {r["problem_id"]: r for r in read(tmp_path / "02_localize" / "records.jsonl")}
    first = out[records[0]["id"]]
    assert first["step_idx"] == 2 and list(first["sampled"]) == ["1"]  # rollouts only rectify
    assert first["sampled"]["1"] <= 32 and "Final Decision" in first["judge_reply"]
    assert out[records[1]["id"]]["status"] == "judge_unparsable"
    assert out[records[2]["id"]]["status"] == "judge_no_error"
    summary = json.loads((tmp_path / "02_localize" / "summary.json").read_text())
    assert summary["skipped"]["judge_unparsable"] == 1 and summary["samples"] == 3


def test_bad_input_stops_with_one_line(tmp_path, capsys):
    write_samples(tmp_path, [{"id": "a", "prompt": "Q", "answer": "1", "samples": [
        {"text": " Step 1: 1 + 1 = 2\nThe answer is 2.", "pred": "2", "correct": True}]}])
    with pytest.raises(SystemExit) as e:
        loc.main(args_for(tmp_path, tmp_path / "no-model"))
    assert e.value.code == 2 and "no wrong samples" in capsys.readouterr().err


def test_cut_rollouts_never_succeed_and_cut_samples_are_not_localized(toy_world, tmp_path,
                                                                     monkeypatch):
    """The perfect solver again, but every continuation is reported cut by --max-new-tokens: its
    right final answer must not count, so no prefix is recoverable and nothing is paired. A
    sample that 01 marked truncated is not localized at all."""
    run = tmp_path / "run"
    records = toy_samples(toy_world, 6, seed=3)
    records[0]["samples"][1]["truncated"] = True  # unfinished, not wrong
    write_samples(run, records)
    monkeypatch.setattr(loc, "Sampler", solver_sampler(records, finish="length"))
    loc.main(args_for(run, toy_world / "00_toy" / "model"))
    summary = json.loads((run / "02_localize" / "summary.json").read_text())
    assert summary["samples"] == 11 and summary["truncated_samples_skipped"] == 1
    assert summary["pairs"] == 0 and summary["skipped"] == {"p0_zero": 11}
