"""The whole pipeline in miniature, 00 -> 09, each stage run as a user runs it (a subprocess on the
files the previous stage wrote). What it guards is the hand-off: a field renamed in one stage, ids
that no longer match their text, a default path that moved. Sizes are tiny, so the numbers are
checked for consistency, not for quality (that is the demo's job)."""
import json
import math

import pytest
from safetensors.torch import load_file

from common import encode_prompt, encode_response, read_jsonl
from machinery.models import load_tokenizer
from conftest import run_script
from machinery.mathtext import extract_answer, is_equiv

TRAIN = ["--max-steps", 3, "--batch-size", 4, "--micro-batch-size", 4]


@pytest.fixture(scope="module")
def chain(mini_chain):
    """mini_chain (00, 01, 03, 04) continued with 02, 05 (DPO and cDPO), 06, 07, 08 and 09."""
    run = mini_chain
    run_script("02_localize", "--run-dir", run, "--limit", 16, "--per-problem", 1,
               "--rollouts", 4, "--max-new-tokens", 96)
    run_script("05_train_cdpo", "--run-dir", run, "--uniform", *TRAIN)
    run_script("05_train_cdpo", "--run-dir", run, *TRAIN)
    run_script("06_train_stepdpo", "--run-dir", run, *TRAIN)
    run_script("07_eval", "--run-dir", run, "--limit", 8, "--max-new-tokens", 96,
               "--model", run / "00_toy/model", "--label", "base",
               "--model", run / "03_contrastive_sft/pos", "--label", "sft",
               "--model", run / "05_train_dpo/model", "--label", "dpo",
               "--model", run / "05_train_cdpo/model", "--label", "cdpo",
               "--model", run / "06_train_stepdpo/model", "--label", "stepdpo")
    run_script("08_critical_tokens", "--run-dir", run, "--limit", 2, "--rollouts", 2,
               "--max-new-tokens", 64)
    run_script("09_report", "--run-dir", run)
    return run


def test_01_samples_are_graded_against_their_gold(chain):
    recs = read_jsonl(chain / "01_sample/samples.jsonl")
    assert len(recs) == 48 and all(len(r["samples"]) == 8 for r in recs)
    for r in recs[:12]:
        for s in r["samples"]:
            assert s["pred"] == extract_answer(s["text"])
            assert s["correct"] == is_equiv(s["pred"], r["answer"])
    mixed = sum(0 < sum(s["correct"] for s in r["samples"]) < 8 for r in recs)
    assert mixed >= 10, "the memorized model should be right and wrong on the same problems"


def test_03_pairs_come_from_the_samples(chain):
    samples = {r["id"]: r for r in read_jsonl(chain / "01_sample/samples.jsonl")}
    pairs = read_jsonl(chain / "03_contrastive_sft/pairs.jsonl")
    assert pairs
    for p in pairs:
        by_text = {s["text"]: s for s in samples[p["id"]]["samples"]}
        assert by_text[p["chosen"]]["correct"] and not by_text[p["rejected"]]["correct"]
    for name in ("pos", "neg"):
        assert (chain / "03_contrastive_sft" / name / "model.safetensors").exists()


def test_04_ids_are_the_tokens_of_the_texts_and_weights_are_parallel(chain):
    tok = load_tokenizer(chain / "03_contrastive_sft/pos")
    texts = {p["id"]: p for p in read_jsonl(chain / "03_contrastive_sft/pairs.jsonl")}
    scored = read_jsonl(chain / "04_score_tokens/pairs.jsonl")
    assert {p["id"] for p in scored} == set(texts)
    for p in scored:
        src = texts[p["id"]]
        assert p["prompt_ids"] == encode_prompt(tok, src["prompt"])
        assert p["prompt_ids"].count(tok.bos_token_id) == 1
        assert p["chosen_ids"] == encode_response(tok, src["chosen"], eos=True)
        assert p["rejected_ids"] == encode_response(tok, src["rejected"], eos=True)
        assert len(p["rejected_weights"]) == len(p["rejected_ids"])
        assert len(p["chosen_weights"]) == len(p["chosen_ids"])
        assert all(0 <= w <= 1 for w in p["rejected_weights"])
    assert "<span" in (chain / "04_score_tokens/critical_tokens.html").read_text()


def test_02_step_pairs_are_steps_of_a_wrong_sample(chain):
    samples = {r["id"]: r for r in read_jsonl(chain / "01_sample/samples.jsonl")}
    summary = json.loads((chain / "02_localize/summary.json").read_text())
    assert summary["samples"] > 0 and summary["rollouts_per_sample"] > 0
    assert 0 <= summary["oracle_agreement"] <= 1  # toy data carries step_values
    for p in read_jsonl(chain / "02_localize/pairs.jsonl"):
        wrong = [s["text"] for s in samples[p["problem_id"]]["samples"] if not s["correct"]]
        assert any(t.startswith(p["prefix"] + p["rejected"]) for t in wrong)
        assert p["chosen"] != p["rejected"] and p["step_idx"] >= 1


@pytest.mark.parametrize("out", ["05_train_dpo", "05_train_cdpo", "06_train_stepdpo"])
def test_05_06_start_at_ln2_and_save_a_model(chain, out):
    if out == "06_train_stepdpo" and not read_jsonl(chain / "02_localize/pairs.jsonl"):
        pytest.fail("02 made no step pairs: 06 had nothing to train on")
    rows = [json.loads(line) for line in (chain / out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    weights = load_file(str(chain / out / "model/model.safetensors"))
    base = load_file(str(chain / "00_toy/model/model.safetensors"))
    assert weights.keys() == base.keys()
    assert any(not weights[k].equal(base[k]) for k in base), "training changed nothing"


def test_07_results_agree_with_generations(chain):
    for label in ("base", "sft", "dpo", "cdpo", "stepdpo"):
        res = json.loads((chain / "07_eval" / label / "results.json").read_text())
        gens = read_jsonl(chain / "07_eval" / label / "generations.jsonl")
        assert res["n"] == len(gens) == 8
        assert res["accuracy"] == pytest.approx(sum(g["correct"] for g in gens) / len(gens))


def test_08_09_study_and_report(chain):
    study = json.loads((chain / "08_critical_tokens/study.json").read_text())
    assert study["answers"] == 2
    assert (chain / "08_critical_tokens/pass_at_k.png").stat().st_size > 1000
    report = (chain / "results.md").read_text()
    for row in ("base", "SFT", "DPO", "cDPO", "Step-DPO"):
        assert row in report
    assert (chain / "training_curves.png").stat().st_size > 1000
