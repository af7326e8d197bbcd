"""08's critical-token rule against hand-worked cases and its --limit on a toy run; 09's sweep
table on result files written here. (pass@k: tests/test_mathtext.py.)"""
import json

import pytest

from common import encode_prompt, encode_response, load_tokenizer, read_jsonl
from conftest import load_stage
from mathtext import format_prompt

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
            "last.") in block
    assert "a first wrong step located in 19, 30 step pairs" in block
