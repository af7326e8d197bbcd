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
    ([5, 3, 0, 0, 0], 2),        # the first prefix from which every rollout fails
    ([5, 0, 4, 0, 0], 3),        # 4 of 8 right after t=1 cancels it; t=3 is the next candidate
    ([5, 0, 0, 0, 4], 1),        # cancelled and no later zero: the cancelled one is the fallback
    ([5, 0, 0, 1, 0], 4),        # cancelled, then a new zero
    ([8, 7, 6, 5, 4], None),     # never all wrong: no critical token
])
def test_critical_position_released_rule(counts, expected):
    """n = 8 rollouts; the released cancel share 3/64 means any success (1 > 0.375) cancels."""
    assert study.critical_position(counts, 8, 3 / 64) == expected


def test_a_small_success_share_does_not_cancel():
    # 64 rollouts: 3 right (<= 3/64) keeps the candidate, 4 right cancels it
    assert study.critical_position([10, 0, 3, 0], 64, 3 / 64) == 1
    assert study.critical_position([10, 0, 4, 9], 64, 3 / 64) == 1  # cancelled fallback
    assert study.critical_position([10, 0, 4, 0], 64, 3 / 64) == 3


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
    assert [r["id"] for r in read_jsonl(out / "answers.jsonl")] == [f"p{i}" for i in range(studied)]
    assert json.loads((out / "study.json").read_text())["answers"] == studied


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
            (d / "results.json").write_text(json.dumps({"accuracy": acc}))
    lines = report.sweep(run)
    rows = [line for line in lines if line.startswith("| DPO") or line.startswith("| Step-DPO")]
    assert rows == ["| DPO (05 --uniform) | 1e-05 | 0.1 | **60.0** | 58.0 |",
                    "| DPO (05 --uniform) | 3e-05 | 0.1 | 30.0 | 35.0 |",
                    "| Step-DPO (06) | 1e-05 | 0.5 | **70.0** | 66.0 |",
                    "| Step-DPO (06) | 0.0001 | 0.5 | 50.0 | 52.0 |"]
    assert report.sweep(tmp_path / "no-sweep-here") == []
