"""08's critical-token rule against hand-worked cases and its --limit on a toy run; 09's sweep
table on result files written here. (pass@k: tests/test_mathtext.py.)"""
import json

import pytest

from common import encode_prompt, encode_response, read_jsonl
from machinery.models import load_tokenizer
from conftest import load_stage
from machinery.mathtext import format_prompt

study = load_stage("08_critical_tokens")
report = load_stage("09_report")


@pytest.mark.parametrize("counts, expected", [
    ([5, 3, 0, 0, 0], (2, "primary")),    # the first prefix from which every rollout fails
    ([5, 0, 4, 0, 0], (3, "primary")),    # 4 of 8 right after t=1 cancels it; t=3 is the next
    ([5, 0, 0, 0, 4], (1, "fallback")),   # cancelled and no later zero: the cancelled one
    ([5, 0, 0, 1, 0], (4, "primary")),    # cancelled, then a new zero
    ([8, 7, 6, 5, 4], (None, None)),      # never all wrong: no critical token
])
def test_critical_position_released_rule(counts, expected):
    """n = 8 rollouts; the released cancel share 3/64 means any success (1 > 0.375) cancels."""
    assert study.critical_position(counts, 8, 3 / 64) == expected


def test_a_small_success_share_does_not_cancel():
    # 64 rollouts: 3 right (<= 3/64) keeps the candidate, 4 right cancels it
    assert study.critical_position([10, 0, 3, 0], 64, 3 / 64) == (1, "primary")
    assert study.critical_position([10, 0, 4, 9], 64, 3 / 64) == (1, "fallback")
    assert study.critical_position([10, 0, 4, 0], 64, 3 / 64) == (3, "primary")


def test_summary_measures_kept_and_replaced_on_the_fresh_rollouts():
    """pass@k comes from the fresh rollouts' counts, never from the search count at t* (0 by the
    rule's definition), and the rule's two branches are counted apart."""
    recs = [{"id": "a", "n_tokens": 10, "with_correct": [3, 0, 0], "critical": 1,
             "rule": "primary", "kept_correct": 2, "replaced_correct": 6, "weight_rank": 1,
             "critical_token": "7"},
            {"id": "b", "n_tokens": 20, "with_correct": [0, 5, 1], "critical": 0,
             "rule": "fallback", "kept_correct": 0, "replaced_correct": 8, "weight_rank": 4,
             "critical_token": "+"},
            {"id": "c", "n_tokens": 5, "with_correct": [4, 4], "critical": None, "rule": None}]
    s = study.summarize(recs, 8)
    assert (s["answers"], s["with_critical"], s["found_primary"], s["found_fallback"]) == \
        (3, 2, 1, 1)
    assert s["k"] == [1, 2, 4, 8]
    assert s["pass_at_k_kept"][0] == pytest.approx((2 / 8 + 0) / 2)
    assert s["pass_at_k_replaced"][0] == pytest.approx((6 / 8 + 8 / 8) / 2)
    assert s["pass_at_k_kept"][-1] == pytest.approx(0.5)  # a has 2 right of 8: pass@8 = 1
    assert s["precision_at_k"] == {1: 0.5, 3: 0.5, 5: 1.0}


@pytest.mark.parametrize("limit, studied", [(0, 3), (2, 2)])
def test_limit_takes_the_first_k_answers_and_0_takes_all(toy_world, tmp_path, limit, studied):
    """--limit K studies the first K rejected answers; 0 means all of them, as in every stage."""
    tok = load_tokenizer(toy_world / "00_toy" / "model")
    wrong = encode_response(tok, " Step 1: 1 + 1 = 3\nThe answer is 3.", eos=True)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(
        {"id": f"p{i}", "prompt_ids": encode_prompt(tok, format_prompt(f"What is {i} + 1?")),
         "rejected_ids": wrong, "rejected_weights": [0.5] * len(wrong), "answer": str(i + 1)})
        + "\n" for i in range(3)))
    out = tmp_path / "out"
    study.main(study.parser.parse_args([
        "--run-dir", str(toy_world), "--data", str(data), "--out", str(out), "--limit", str(limit),
        "--rollouts", "1", "--max-new-tokens", "4"]))
    recs = read_jsonl(out / "answers.jsonl")
    assert [r["id"] for r in recs] == [f"p{i}" for i in range(studied)]
    s = json.loads((out / "study.json").read_text())
    assert s["answers"] == studied
    assert s["found_primary"] + s["found_fallback"] == s["with_critical"]
    for r in recs:  # an answer with a critical token has both fresh measurements
        assert (r["critical"] is None) == (r["rule"] is None)
        assert r["critical"] is None or {"kept_correct", "replaced_correct"} <= r.keys()


def test_sweep_table_marks_each_methods_best_dev_config(tmp_path):
    run = tmp_path / "run"
    grid = [("dpo", 1e-5, 0.1, 0.60, 0.58), ("dpo", 3e-5, 0.1, 0.30, 0.35),
            ("stepdpo", 1e-5, 0.5, 0.70, 0.66), ("stepdpo", 1e-4, 0.5, 0.50, 0.52)]
    for method, lr, beta, dev, test in grid:
        label = f"sweep-{method}-lr{lr:g}-b{beta:g}"
        (run / "sweep" / label / "model").mkdir(parents=True)
        (run / "sweep" / label / "model" / "training_config.json").write_text(
            json.dumps({"method": method, "lr": lr, "beta": beta}))
        for split, acc in (("dev", dev), ("test", test)):
            d = run / "sweep" / f"07_eval_{split}" / label
            d.mkdir(parents=True)
            (d / "results.json").write_text(json.dumps({"accuracy": acc, "n": 40}))
    lines = report.sweep(run)
    assert "dev = the toy dev split (40 problems, to choose by)" in "\n".join(lines)
    rows = [line for line in lines if line.startswith("| DPO") or line.startswith("| Step-DPO")]
    assert rows == ["| DPO (05 --uniform) | 1e-05 | 0.1 | **60.0** | 58.0 |",
                    "| DPO (05 --uniform) | 3e-05 | 0.1 | 30.0 | 35.0 |",
                    "| Step-DPO (06) | 1e-05 | 0.5 | **70.0** | 66.0 |",
                    "| Step-DPO (06) | 0.0001 | 0.5 | 50.0 | 52.0 |"]
    assert report.sweep(tmp_path / "no-sweep-here") == []


def fake_real_run(run):
    """The files runs/real_cpu.sh leaves in its run dir, written by hand with known counts."""
    def write(rel, obj):
        (run / rel).parent.mkdir(parents=True, exist_ok=True)
        (run / rel).write_text(json.dumps(obj) if rel.endswith(".json") else
                               "".join(json.dumps(r) + "\n" for r in obj))

    model = str(run / "model")
    for d, data, n, acc, cut in (("07_eval", "problems/test.jsonl", 64, 0.5, 2),
                                 ("07_eval_gsm8k", "data/gsm8k_test_64.jsonl", 16, 0.0625, 13),
                                 ("07_eval_math500", "data/math500_test_32.jsonl", 16, 0.0, 9)):
        for k, label in enumerate(("base", "sft", "dpo", "cdpo", "stepdpo")):
            write(f"{d}/{label}/results.json", {
                "label": label, "accuracy": acc, "ci95": [acc / 2, min(1, acc * 2 + 0.01)],
                "n": n, "n_unparsed": 0, "n_truncated": cut + k,
                "config": {"model": model if label == "base" else f"{run}/{label}",
                           "data": str(run / data), "max_new_tokens": 128}})
    write("01_sample/samples.jsonl", [
        {"id": f"q{i}", "samples": [{"correct": c, "truncated": t} for c, t in
                                    ((i % 2 == 0, False), (False, i == 1), (False, False))]}
        for i in range(4)])
    write("03_contrastive_sft/pairs.jsonl", [{"id": "a"}, {"id": "b"}])
    write("04_score_tokens/pairs.jsonl", [{"id": "a", "rejected_ids": [1] * 700},
                                          {"id": "b", "rejected_ids": [1] * 760}])
    write("02_localize/summary.json", {"samples": 30, "located": 19, "pairs": 30,
                                       "rollouts_per_sample": 11.25})
    for d in ("05_train_dpo", "05_train_cdpo", "06_train_stepdpo"):
        write(f"{d}/metrics.jsonl", [{"step": 0, "loss": 0.6931, "margin": 0.0, "dt": 1.0,
                                      "reward_acc": 0.0, "chosen_reward": 0.0},
                                     {"step": 1, "loss": 0.6925, "margin": 0.0042, "dt": 1.0,
                                      "reward_acc": 1.0, "chosen_reward": 0.001}])


def test_real_run_table_goes_between_its_own_readme_markers(tmp_path):
    """make real's last step (09 --readme-block real-results): every figure of its README block
    comes from the run's files, the toy block is left as it was, and its picture gets its own
    name in docs/."""
    run = tmp_path / "runs" / "smollm2"
    fake_real_run(run)
    readme = tmp_path / "README.md"
    toy = "<!-- results:begin -->\ntoy figures\n<!-- results:end -->\n"
    readme.write_text(f"# x\n\n{toy}\n## real\n\n<!-- real-results:begin -->\nold\n"
                      "<!-- real-results:end -->\n\ntail\n")
    report.main(report.parser.parse_args(["--run-dir", str(run), "--readme", str(readme),
                                          "--readme-block", "real-results"]))
    text = readme.read_text()
    assert toy in text and text.endswith("<!-- real-results:end -->\n\ntail\n")
    block = text.split("<!-- real-results:begin -->\n")[1].split("<!-- real-results:end -->")[0]
    assert "old" not in block and (tmp_path / "docs" / "real-results-training_curves.png").exists()
    assert "(docs/real-results-training_curves.png)" in block
    assert f"| base ({run}/model) | 50.0 [25.0, 100.0] | 50.0 | 64 | 0 |" in block
    assert ("| method | gsm8k_test_64.jsonl (07_eval_gsm8k, n=16, 128 new tokens) | "
            "math500_test_32.jsonl (07_eval_math500, n=16, 128 new tokens) |") in block
    assert f"| base ({run}/model) | 1/16, 13 cut | 0/16, 9 cut |" in block
    assert "| Step-DPO (06) | 1/16, 17 cut | 0/16, 13 cut |" in block
    assert ("01 wrote 12 samples of 4 problems: 2 right (17%), 1 cut by the token limit (8%: "
            "never graded right, never trained on); 2 problems have both right and wrong "
            "samples. 03 made 2 pairs. 04 scored 1,460 rejected tokens of 2 pairs.") in block
    assert ("cDPO (05): 2 steps, loss 0.6931 at step 0 -> 0.6925, reward margin 0.0042 at the "
            "last, chosen reward +0.0005 (mean of the last 2 steps).") in block
    assert "a first wrong step located in 19, 30 step pairs" in block


# 09's paired statistics, each against a computation that does not share its formula

def two_sided_exact_by_enumeration(b: int, c: int) -> float:
    """The exact two-sided binomial test by its definition: the total probability, under
    Binomial(b + c, 1/2), of every outcome no more likely than the one observed."""
    from fractions import Fraction
    from math import comb
    n = b + c
    pmf = [Fraction(comb(n, k), 2 ** n) for k in range(n + 1)]
    return float(sum(p for p in pmf if p <= pmf[b]))


@pytest.mark.parametrize("b, c", [(0, 0), (1, 9), (9, 1), (0, 10), (5, 5), (12, 30), (7, 8),
                                  (0, 1), (40, 61)])
def test_mcnemar_p_is_the_exact_binomial_test(b, c):
    expected = 1.0 if b + c == 0 else two_sided_exact_by_enumeration(b, c)
    assert report.mcnemar_p(b, c) == pytest.approx(expected, rel=1e-12)
    assert report.mcnemar_p(1, 9) == pytest.approx(22 / 1024)  # by hand: 2 (1 + 10) / 2^10


def test_paired_interval_matches_the_normal_interval_on_many_problems():
    """2,000 problems, differences in {-1, 0, 1}: the bootstrap's 95% interval must be close to
    mean +- 1.96 sd / sqrt(n) (the central limit theorem), and a constant difference has none."""
    import numpy as np
    rng = np.random.default_rng(7)
    d = rng.choice([-1.0, 0.0, 1.0], size=2000, p=[0.2, 0.65, 0.15])
    half = 1.96 * d.std(ddof=1) / np.sqrt(len(d))
    lo, hi = report.paired_interval(d)
    assert lo == pytest.approx(d.mean() - half, abs=0.1 * half)
    assert hi == pytest.approx(d.mean() + half, abs=0.1 * half)
    assert report.paired_interval(np.full(50, 0.25)) == (0.25, 0.25)


def test_paired_table_per_seed_and_pooled(tmp_path):
    """Two seeds on 100 problems. Base is right on 0-49 (shared by the seeds); DPO seed 0 on 0-49
    too, seed 1 on 0-47 (Δ -2: b=0, c=2, p=0.5); cDPO seed 0 on 0-59 (Δ +10, b=10, c=0,
    p=2/2^10), seed 1 on 0-53 plus 90-91 (Δ +6, b=6, c=0, p=2/2^6); pooled mean Δ +8."""
    run = tmp_path / "run"
    right = {("base", 0): range(50), ("dpo", 0): range(50), ("dpo", 1): range(48),
             ("cdpo", 0): range(60), ("cdpo", 1): [*range(54), 90, 91]}
    for (label, seed), ids in right.items():
        d = (run if seed == 0 else tmp_path / f"run-s{seed}") / "07_eval" / label
        d.mkdir(parents=True)
        (d / "generations.jsonl").write_text("".join(
            json.dumps({"id": f"q{i:03d}", "correct": i in ids}) + "\n" for i in range(100)))
    dirs = report.run_dirs(run, 2)
    rows = {line.split(" | ")[0]: line for line in report.paired(dirs, "base")}
    cells = rows["| cDPO (05)"].split(" | ")
    assert cells[1].startswith("+10.0 [") and cells[1].endswith(f"p={2 / 2 ** 10:.3g}")
    assert cells[2].startswith("+6.0 [") and cells[2].endswith(f"p={2 / 2 ** 6:.3g}")
    assert cells[3].startswith("+8.0 [")
    lo = float(cells[1].split("[")[1].split(",")[0])
    assert 0 < lo < 10  # ten problems all one way: the interval excludes zero
    dpo = rows["| DPO (05 --uniform)"].split(" | ")
    assert dpo[1].startswith("+0.0 [+0.0, +0.0], p=1") and dpo[2].endswith("p=0.5")
    vs_dpo = {line.split(" | ")[0]: line for line in report.paired(dirs, "dpo")}
    assert vs_dpo["| cDPO (05)"].split(" | ")[1].startswith("+10.0 [")
    assert vs_dpo["| cDPO (05)"].split(" | ")[2].startswith("+8.0 [")
    assert "| base" not in "\n".join(vs_dpo)  # base has no seed-1 run of its own: shown once


def test_grader_audit_counts_agreement_and_hand_verdicts(tmp_path):
    """runs/audit_grader.py on a run of four answers: two both graders read alike, one cut by
    the token limit (left out), one on which they differ (the project's grader reads the last
    number, 4; the second the result of the last sum, 8), with a hand verdict for it."""
    import subprocess
    import sys
    from conftest import ROOT
    run = tmp_path / "run"
    (run / "07_eval" / "base").mkdir(parents=True)
    remark = "There are 8 x 2 = 16 cards, so Jack has 16 / 2 = 8 cards in his 4 jars."
    recs = [("The answer is 18, because 20 - 2 = 18.", "18", False),
            ("So Tom has 7 apples.", "8", False),
            ("Tom has 3 + 4 =", "7", True),
            (remark, "8", False)]
    (run / "07_eval" / "base" / "generations.jsonl").write_text("".join(
        json.dumps({"id": f"q{i}", "output": o, "gold": g, "truncated": t}) + "\n"
        for i, (o, g, t) in enumerate(recs)))
    def audit(hand):
        subprocess.run([sys.executable, str(ROOT / "runs" / "audit_grader.py"), "--run-dir",
                        str(run), "--hand", str(hand)], capture_output=True, check=True)
        unread = (run / "grader_audit_unread.jsonl").read_text().splitlines()
        return json.loads((run / "grader_audit.json").read_text()), unread

    found, unread = audit(tmp_path / "no-hand-verdicts.jsonl")
    assert (found["answers"], found["same_verdict"], found["disagreements"]) == (3, 2, 1)
    assert found["rows"][0]["project"] == ["4", False]
    assert found["rows"][0]["second"] == ["8", True]
    assert [json.loads(u)["output"] for u in unread] == [remark]  # to be read by hand
    hand = tmp_path / "hand.jsonl"
    hand.write_text(json.dumps({"output": remark, "gold": "8", "right": True}) + "\n")
    found, unread = audit(hand)
    assert (found["read_by_hand"], found["project_right"], found["second_right"]) == (1, 0, 1)
    assert unread == []


def test_step_reader_of_real_text_by_hand():
    """runs/check_steps.py's reading of a real answer's steps against a generated problem
    ("Emma has 8 crayons and gets 3 more ... then gives 5 away": values 8, 3, 5, 11, 6)."""
    import importlib.util
    from conftest import ROOT
    spec = importlib.util.spec_from_file_location("check_steps", ROOT / "runs" / "check_steps.py")
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    known = check.known_numbers(
        "Emma has 8 crayons. She buys 3 more and then gives 5 to Finn. How many ...?",
        "After buying, Emma has 8 + 3 = <<8+3=11>>11 crayons.\nThen 11 - 5 = <<11-5=6>>6.", "6")
    assert known == {8, 3, 5, 11, 6}
    wrong = lambda step: check.step_is_wrong(step, known, "6")  # noqa: E731
    assert not wrong("Emma has 8 + 3 = 11 crayons.\n")
    assert not wrong("Let's break it down step by step:\n\n")  # no claim: not wrong
    assert wrong("Emma has 8 + 3 = 12 crayons.")            # a false equation
    assert wrong("Then she has 11 - 5 = 6 crayons and 2 x 3 = 5 pens.")  # the second one
    assert wrong("So Emma has a total of 17 crayons.")      # a number the problem never had
    assert wrong("The answer is 11.")                       # a known number, not the answer
    assert not wrong("The answer is 6.") and not wrong("So, the answer is $6.")
    steps = ["Emma has 8 crayons.\n", "She buys 3, so 8 + 3 = 11.\n", "She gives 5: 11 - 5 = 7.\n",
             "The answer is 7."]
    assert check.first_wrong(steps, known, "6") == 3
    assert check.first_wrong(steps[:2], known, "6") is None
