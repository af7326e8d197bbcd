"""01_sample.py and 07_eval.py on the toy world: batching and seeds, kill + restart, torchrun,
grading, metrics (pass@k, Wilson) and bad input. Real toy model and tokenizer, no mocks."""
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from common import encode_prompt, seed_for
from machinery.models import load_model, load_tokenizer
from conftest import ROOT, load_stage, tiny_llama
from machinery.mathtext import extract_answer, format_prompt, is_equiv, majority, STOP_STRINGS
from machinery.generation import generate

sample = load_stage("01_sample")
evaluate = load_stage("07_eval")
ENV = dict(os.environ, OMP_NUM_THREADS="1")
SAMPLE_ARGS = ["--limit", "12", "--n", "3", "--max-new-tokens", "24", "--seed", "1"]
EVAL_ARGS = ["--limit", "10", "--n", "2", "--temperature", "1", "--max-new-tokens", "24"]


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def run_stage(stage, *argv):
    """A stage's main() in this process (no interpreter start-up), like the command line."""
    stage.main(stage.parser.parse_args([str(a) for a in argv]))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def toy(toy_world):
    model_dir = toy_world / "00_toy" / "model"
    tok = load_tokenizer(model_dir)
    questions = [json.loads(x)["question"] for x in (toy_world / "00_toy" / "test.jsonl").open()]
    prompts = [encode_prompt(tok, format_prompt(q)) for q in questions[:6]]
    assert len(set(map(len, prompts))) > 2  # mixed lengths: left padding is exercised
    return load_model(model_dir), tok, prompts


@pytest.fixture(scope="module")
def ref01(toy_world, tmp_path_factory):
    """An uninterrupted 1-process run of 01 (batch 6: two problems per forward)."""
    out = tmp_path_factory.mktemp("ref01")
    run_stage(sample, "--run-dir", toy_world, "--out", out, "--batch-size", 6, *SAMPLE_ARGS)
    return lines(out / "samples.jsonl")


@pytest.fixture(scope="module")
def ref07(toy_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref07")
    run_stage(evaluate, "--run-dir", toy_world, "--out", out, "--batch-size", 8, *EVAL_ARGS)
    return out / "base"


# generation.generate: batching and seeds


def test_batched_greedy_equals_one_at_a_time(toy):
    model, tok, prompts = toy
    # the toy model, and a random one whose greedy text moves with every position and pad error
    rand = tiny_llama(vocab=len(tok), hidden=32, seed=3)
    rand.config.initializer_range = 1.0
    rand.init_weights()
    for m in (model, rand.eval()):
        batched = generate(m, tok, prompts, max_new_tokens=20, stop=tuple(STOP_STRINGS))
        alone = [generate(m, tok, [p], max_new_tokens=20, stop=tuple(STOP_STRINGS))[0]
                 for p in prompts]
        assert batched == alone
    assert len({tuple(o["ids"]) for o in alone}) > 1  # not one degenerate continuation


def test_sampling_depends_on_the_seed_not_on_the_batch(toy):
    model, tok, prompts = toy
    seeds = [seed_for(0, "p", i) for i in range(len(prompts))]
    kw = dict(temperature=1.0, top_p=0.9, max_new_tokens=20, stop=tuple(STOP_STRINGS))
    full = generate(model, tok, prompts, seeds, **kw)
    order = [4, 1, 5, 0, 3, 2]
    shuffled = generate(model, tok, [prompts[i] for i in order], [seeds[i] for i in order], **kw)
    assert [shuffled[order.index(i)] for i in range(6)] == full
    assert [generate(model, tok, [p], [s], **kw)[0] for p, s in zip(prompts, seeds)] == full
    assert generate(model, tok, prompts[:1], [seeds[0] + 1], **kw)[0] != full[0]


# 01_sample.py


def test_sample_records_and_grading(ref01):
    assert [r["id"] for r in ref01] == [f"toy-train-{i:05d}" for i in range(12)]
    for r in ref01:
        assert r["prompt"] == format_prompt(r["question"]) and r["step_values"]
        assert len(r["samples"]) == 3
        for s in r["samples"]:  # the stored grade is what re-grading the stored text gives
            assert s["pred"] == extract_answer(s["text"])
            # a cut answer is never right, even where its last number is the gold one
            assert s["correct"] == (not s["truncated"] and is_equiv(s["pred"], r["answer"]))
            assert (s["eos_id"] is None) == s["truncated"]
    assert len({s["text"] for r in ref01 for s in r["samples"]}) > 30  # samples, not copies


def test_sample_batch_size_auto(toy_world, tmp_path, ref01, capsys):
    """--batch-size auto sizes the batch from the free memory (here: all 36 rows in one
    generate call, where ref01 made 6 calls of 6): the same samples."""
    run_stage(sample, "--run-dir", toy_world, "--out", tmp_path, "--batch-size", "auto",
              *SAMPLE_ARGS)
    assert lines(tmp_path / "samples.jsonl") == ref01
    chosen = re.search(r"--batch-size auto: (\d+) rows", capsys.readouterr().out)
    assert chosen and int(chosen[1]) >= 36


def kill_after_records(cmd, part, records: int) -> int:
    """Start cmd, SIGKILL it once `part` holds `records` lines; the lines it held then."""
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        if part.exists() and part.read_bytes().count(b"\n") >= records:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return part.read_bytes().count(b"\n")


def test_sample_killed_and_restarted_equals_uninterrupted(toy_world, tmp_path, ref01):
    args = ["--run-dir", toy_world, "--out", tmp_path, "--batch-size", 3, *SAMPLE_ARGS]
    part = tmp_path / "samples.jsonl.part0"
    held = kill_after_records([sys.executable, str(ROOT / "01_sample.py"), *map(str, args)],
                              part, 2)
    assert 2 <= held < 12 and not (tmp_path / "samples.jsonl").exists()
    with open(part, "a") as f:  # and a record torn mid-write
        f.write('{"id": "toy-train-00011", "question": "Tom')
    run_stage(sample, *args)
    assert lines(tmp_path / "samples.jsonl") == ref01  # batch 3 vs 6: same samples too
    assert not list(tmp_path.glob("*.part*"))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["throughput"]["samples"] == 3 * (12 - held)  # only the rest was sampled
    right = sum(s["correct"] for r in ref01 for s in r["samples"])
    assert summary["sample_accuracy"] == right / 36 and summary["problems"] == 12


def test_sample_two_ranks_equal_one(toy_world, tmp_path, ref01):
    # `--`: torchrun would read the stage's --n as an abbreviation of its own options
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--", str(ROOT / "01_sample.py"), "--run-dir", str(toy_world), "--out", str(tmp_path),
           "--batch-size", "4", *SAMPLE_ARGS, "--limit", "6"]
    subprocess.run(cmd, env=ENV, check=True, capture_output=True, timeout=120)
    assert lines(tmp_path / "samples.jsonl") == ref01[:6]
    assert json.loads((tmp_path / "summary.json").read_text())["throughput"]["ranks"] == 2


def test_sample_tensor_parallel_equals_one_process(toy_world, tmp_path, ref01):
    """--tp: the model sharded over 2 ranks (transformers' tp_plan, gloo), both ranks on the same
    batches, rank 0 writing: the 1-process records (sums over shards agree to ~1e-7 here, far
    from flipping a draw)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--", str(ROOT / "01_sample.py"), "--run-dir", str(toy_world), "--out", str(tmp_path),
           "--batch-size", "6", *SAMPLE_ARGS, "--limit", "6", "--tp"]
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "tensor parallel, 1/2 of each layer per rank" in r.stdout + r.stderr
    assert lines(tmp_path / "samples.jsonl") == ref01[:6]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["throughput"]["samples"] == 6 * 3  # counted once, not once per rank


# 07_eval.py


def test_eval_killed_and_restarted_equals_uninterrupted(toy_world, tmp_path, ref07):
    args = ["--run-dir", toy_world, "--out", tmp_path, "--batch-size", 2, *EVAL_ARGS]
    part = tmp_path / "base" / "generations.jsonl.part0"
    held = kill_after_records([sys.executable, str(ROOT / "07_eval.py"), *map(str, args)], part, 2)
    assert 2 <= held < 10 and not (tmp_path / "base" / "results.json").exists()
    with open(part, "a") as f:
        f.write('{"id": "toy-test-00009", "prompt": "Question')
    run_stage(evaluate, *args)
    assert lines(tmp_path / "base" / "generations.jsonl") == lines(ref07 / "generations.jsonl")
    res, ref = (json.loads((d / "results.json").read_text()) for d in (tmp_path / "base", ref07))
    assert {k: v for k, v in res.items() if k not in ("throughput", "config")} == \
        {k: v for k, v in ref.items() if k not in ("throughput", "config")}


def test_eval_several_sets_in_one_run_equal_each_alone(toy_world, tmp_path, ref07, capsys):
    """Two sets in one run, their rows in one batch: the same file twice (so their ids collide)
    at limits 10 and 6. Each set's generations and results are what the run of that set alone
    wrote (ref07): sample k of problem q draws from seed_for(seed, q, k) wherever its row sits."""
    test = toy_world / "00_toy" / "test.jsonl"
    run_stage(evaluate, "--run-dir", toy_world, "--batch-size", 5, *EVAL_ARGS,  # --limit 10
              "--data", test, "--out", tmp_path / "a", "--data", test, "--out", tmp_path / "b",
              "--limit", 6)
    ref = lines(ref07 / "generations.jsonl")
    assert lines(tmp_path / "a" / "base" / "generations.jsonl") == ref
    assert lines(tmp_path / "b" / "base" / "generations.jsonl") == ref[:6]
    res_a, res_b, res_ref = (json.loads((d / "results.json").read_text()) for d in
                             (tmp_path / "a" / "base", tmp_path / "b" / "base", ref07))
    drop = ("throughput", "config")
    assert {k: v for k, v in res_a.items() if k not in drop} == \
        {k: v for k, v in res_ref.items() if k not in drop}
    assert res_b["n"] == 6 and res_b["n_correct"] == sum(g["correct"] for g in ref[:6])
    assert (res_a["config"]["limit"], res_b["config"]["limit"]) == (10, 6)
    assert res_b["config"]["out"] == str(tmp_path / "b") and res_b["config"]["data"] == str(test)
    assert res_a["throughput"]["samples"] == 2 * (10 + 6)  # one run: both sets' rows
    for bad in (["--data", test, "--data", test],  # several sets: an --out each
                ["--data", test, "--out", tmp_path / "c", "--data", test, "--out", tmp_path / "c"],
                ["--data", test, "--out", tmp_path / "c", "--limit", 1, "--limit", 2,
                 "--limit", 3]):
        with pytest.raises(SystemExit) as e:
            run_stage(evaluate, "--run-dir", toy_world, *bad)
        assert e.value.code == 2 and "one distinct --out per --data" in capsys.readouterr().err


def test_eval_results_agree_with_generations(mini_chain, tmp_path):
    """Gold answers set to the model's own sample-0 answer on half the problems: exactly those
    that were not cut by the token limit must grade right, and results.json must agree with
    generations.jsonl. (mini_chain's model has memorized its problems, so it ends its answers;
    the 20-step toy_world model runs into --max-new-tokens every time.)"""
    problems = lines(mini_chain / "00_toy" / "train.jsonl")[:10]
    data = tmp_path / "own.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in problems))
    args = ["--run-dir", mini_chain, "--limit", "10", "--n", "2", "--temperature", "1",
            "--max-new-tokens", "40", "--data"]
    run_stage(evaluate, *args, data, "--out", tmp_path / "first")
    gens = lines(tmp_path / "first" / "base" / "generations.jsonl")
    hits = [g["id"] for g in gens if g["pred"] is not None][::2]
    cut = {g["id"] for g in gens if g["truncated"]}
    assert set(hits) - cut and cut, "want hits that ended and answers cut by the token limit"
    pred = {g["id"]: g["pred"] for g in gens}
    data.write_text("".join(json.dumps({**p, "answer": pred[p["id"]] if p["id"] in hits
                                        else p["answer"]}) + "\n" for p in problems))
    run_stage(evaluate, *args, data, "--out", tmp_path)
    res = json.loads((tmp_path / "base" / "results.json").read_text())
    gens = lines(tmp_path / "base" / "generations.jsonl")
    right = {g["id"] for g in gens if g["correct"]}
    assert right >= set(hits) - cut and not right & cut  # a cut answer is never right
    assert res["accuracy"] == sum(g["correct"] for g in gens) / len(gens) > 0
    assert res["n"] == 10 and res["n_unparsed"] == sum(g["pred"] is None for g in gens)
    assert res["n_truncated"] == len(cut)
    assert res["ci95"] == evaluate.wilson(sum(g["correct"] for g in gens), 10)
    for g in gens:
        assert g["output"] == g["samples"][0]["text"] and len(g["samples"]) == 2
        for s in g["samples"]:
            assert s["pred"] == extract_answer(s["text"])
            assert s["correct"] == (not s["truncated"] and is_equiv(s["pred"], g["gold"]))
    c = [sum(s["correct"] for s in g["samples"]) for g in gens]
    assert res["pass@k"]["2"] == sum(x > 0 for x in c) / 10  # pass@n = any sample right
    assert res["config"]["data"] == str(data) and res["config"]["stop"] == STOP_STRINGS


def test_eval_side_by_side_and_summary(toy_world, tmp_path, capsys):
    model = toy_world / "00_toy" / "model"
    run_stage(evaluate, "--run-dir", toy_world, "--out", tmp_path, "--model", model,
              "--model", model, "--label", "a", "--label", "b", "--limit", "4",
              "--max-new-tokens", "8")
    table = capsys.readouterr().out.split("| label |", 1)[1]
    assert "| a |" in table and "| b |" in table
    run_stage(evaluate, "--run-dir", toy_world, "--out", tmp_path, "--summary")
    md = (tmp_path / "summary.md").read_text()
    assert md.splitlines()[0] == \
        "| label | data | accuracy | 95% CI | n | n_unparsed | n_truncated |"
    assert len(md.splitlines()) == 4 and "| 4 |" in md
    with pytest.raises(SystemExit) as e:  # label a holds 8-token answers: no resuming with 16
        run_stage(evaluate, "--run-dir", toy_world, "--out", tmp_path, "--model", model,
                  "--label", "a", "--limit", "4", "--max-new-tokens", "16")
    assert e.value.code == 2 and "max_new_tokens" in capsys.readouterr().err


def test_accuracy_by_level_and_subject():
    recs = [{"correct": c, "pred": "1"} for c in (True, False, True, True)]
    probs = [{"level": 1, "subject": "Algebra"}, {"level": 1, "subject": "Geometry"},
             {"level": 2, "subject": "Algebra"}, {"level": 2, "subject": "Algebra"}]
    res = evaluate.results_of(recs, probs, n=1)
    assert res["accuracy"] == 0.75 and res["n_unparsed"] == 0
    assert res["by_level"] == {"1": {"accuracy": 0.5, "n": 2}, "2": {"accuracy": 1.0, "n": 2}}
    assert res["by_subject"] == {"Algebra": {"accuracy": 1.0, "n": 3},
                                 "Geometry": {"accuracy": 0.0, "n": 1}}
    assert "by_level" not in evaluate.results_of(recs, [{}] * 4, n=1)


def test_default_labels():
    assert evaluate.default_label("runs/toy/00_toy/model") == "base"
    assert evaluate.default_label("runs/toy/05_train_cdpo/model") == "05_train_cdpo"
    assert evaluate.default_label("runs/toy/03_contrastive_sft/pos") == "03_contrastive_sft_pos"
    assert evaluate.default_label("meta-llama/Meta-Llama-3-8B") == "Meta-Llama-3-8B"


# Metrics against hand computations


def test_pass_at_k_sizes():  # pass_at_k itself: tests/test_mathtext.py
    assert evaluate.powers_of_two(8) == [1, 2, 4, 8] and evaluate.powers_of_two(6) == [1, 2, 4]


def test_wilson_by_hand():
    # 8 of 10, z^2 = 3.8415: center = (.8 + .19207) / 1.38415 = .71675,
    # half = 1.96 * sqrt(.016 + .0096036) / 1.38415 = .22658 -> [.4902, .9433]
    z = 1.959963984540054
    center = (0.8 + z * z / 20) / (1 + z * z / 10)
    half = z * math.sqrt(0.8 * 0.2 / 10 + z * z / 400) / (1 + z * z / 10)
    assert evaluate.wilson(8, 10) == pytest.approx([center - half, center + half])
    assert evaluate.wilson(8, 10) == pytest.approx([0.4902, 0.9433], abs=1e-4)  # textbook value
    assert evaluate.wilson(0, 10) == pytest.approx([0.0, 0.2775], abs=1e-4)
    assert evaluate.wilson(50, 100) == pytest.approx([0.4038, 0.5962], abs=1e-4)


def test_majority_vote_groups_equal_answers():
    assert majority(["1,000", "7", "1000.0", None, None, "7 "]) == "1,000"
    assert majority(["\\dfrac{1}{2}", "0.5", "3"]) == "\\dfrac{1}{2}"
    assert majority([None, None]) is None


# Bad input: one line on stderr, exit code 2, nothing written


@pytest.mark.parametrize("stage", [sample, evaluate], ids=["01", "07"])
@pytest.mark.parametrize("case", ["dataset", "model", "n", "greedy-n", "top-p", "empty"])
def test_bad_input(stage, case, toy_world, tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text("")
    bad = {"dataset": ["--data", "gsm9k"], "model": ["--model", tmp_path / "no_model"],
           "n": ["--n", "0"], "greedy-n": ["--n", "2", "--temperature", "0"],
           "top-p": ["--top-p", "0"], "empty": ["--data", tmp_path / "empty.jsonl"]}[case]
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        run_stage(stage, "--run-dir", toy_world, "--out", out, *bad)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error: ") and "\n" not in err, err
    assert not out.exists()


def test_bad_input_on_the_command_line(toy_world, tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "07_eval.py"), "--run-dir", str(toy_world),
                        "--out", str(tmp_path / "out"), "--data", "gsm9k"],
                       env=ENV, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "gsm9k" in r.stderr
    assert not (tmp_path / "out").exists()


def test_resume_refuses_records_of_a_retrained_model(toy_world, tmp_path, capsys):
    """Same path, same flags, new weights: the old generations must not be passed off as the
    new model's (07 and 01 alike); one line, exit 2."""
    import shutil
    model = tmp_path / "model"
    shutil.copytree(toy_world / "00_toy" / "model", model)
    args = ["--run-dir", toy_world, "--model", model, "--limit", "2", "--max-new-tokens", "8"]
    run_stage(evaluate, *args, "--out", tmp_path / "eval", "--label", "m")
    run_stage(sample, *args, "--out", tmp_path / "sample", "--n", "2")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes())  # "retrained": rewritten, new modification time
    capsys.readouterr()
    for stage, out in ((evaluate, ["--out", tmp_path / "eval", "--label", "m"]),
                       (sample, ["--out", tmp_path / "sample", "--n", "2"])):
        with pytest.raises(SystemExit) as e:
            run_stage(stage, *args, *out)
        err = capsys.readouterr().err
        assert e.value.code == 2 and "model" in err and "another run" in err, err


def test_regrade_applies_the_current_grader_to_stored_answers(tmp_path):
    """07 --regrade: a stored verdict from an older grader (the answer before a closing remark was
    once read as the remark's last number, 40) is graded again, results.json follows (accuracy,
    Wilson interval), and the answers, the throughput and the config stay."""
    ev = evaluate
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps({"id": f"q{i}", "question": f"q {i}?",
                                        "answer": f"#### {g}"}) + "\n"
                            for i, g in enumerate(["4", "7", "9"])))
    out = tmp_path / "07_eval"
    (out / "base").mkdir(parents=True)
    recs = [{"id": "q0", "output": "She has 9 - 5 = 4 left.\n\nThis is a classic example: 4 x 10 "
             "= 40.", "pred": "40", "gold": "4", "correct": False, "truncated": False},
            {"id": "q1", "output": "The answer is 7.", "pred": "7", "gold": "7", "correct": True,
             "truncated": False},
            {"id": "q2", "output": "So 4 + 5 =", "pred": "5", "gold": "9", "correct": False,
             "truncated": True}]
    (out / "base" / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    old = {"label": "base", "accuracy": 1 / 3, "ci95": ev.wilson(1, 3), "n": 3, "n_correct": 1,
           "n_unparsed": 0, "n_truncated": 1, "throughput": {"seconds": 1.5},
           "config": {"data": str(data), "split": "test", "n": 1}}
    (out / "base" / "results.json").write_text(json.dumps(old))
    ev.main(ev.parser.parse_args(["--out", str(out), "--regrade"]))
    res = json.loads((out / "base" / "results.json").read_text())
    assert (res["accuracy"], res["n_correct"], res["ci95"]) == (2 / 3, 2, ev.wilson(2, 3))
    assert res["throughput"] == old["throughput"] and res["config"] == old["config"]
    new = [json.loads(line) for line in (out / "base" / "generations.jsonl").read_text()
           .splitlines()]
    # q2: cut by the token limit, never right, whatever its last number
    assert [(r["pred"], r["correct"]) for r in new] == [("4", True), ("7", True), ("5", False)]
    assert [r["output"] for r in new] == [r["output"] for r in recs]
    assert "| base | test.jsonl | 0.667 |" in (out / "summary.md").read_text()
