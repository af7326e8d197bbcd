"""00_toy.py and the toy world: problems, prompt text, tokenizer contract, saved model, and same seed
-> same files and weights."""
import hashlib
import json
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from machinery import toyworld
from conftest import load_stage
from machinery.mathtext import format_prompt, split_steps

toy = load_stage("00_toy")
STEP = re.compile(r"Step (\d+): (\d+) ([-+*]) (\d+) = (\d+)")
TINY = ["--n-train", "300", "--n-test", "20", "--n-dev", "20", "--max-steps", "20",
        "--min-steps", "20", "--hidden", "32", "--layers", "2", "--heads", "2"]  # = toy_world


def records(run, split):
    return [json.loads(line) for line in (run / "00_toy" / f"{split}.jsonl").open()]


def test_problems_are_deterministic_and_stable_in_n():
    a = toyworld.make_split("test", 300, seed=0)
    assert a == toyworld.make_split("test", 300, seed=0)
    assert a[:50] == toyworld.make_split("test", 50, seed=0)  # same ids for any n
    assert a != toyworld.make_split("test", 300, seed=1)
    assert toyworld.make_split("train", 50, seed=0) != a[:50]  # one stream per split
    assert len({r["id"] for r in a}) == 300 and a[42]["id"] == "toy-test-00042"


def test_answers_follow_the_question_and_stay_in_range():
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
    counts = {"+": 0, "-": 0, "*": 0}
    for r in toyworld.make_split("dev", 500, seed=3):
        lines = r["answer"].split("\n")
        steps = [STEP.fullmatch(line).groups() for line in lines[:-1]]
        assert 2 <= len(steps) <= 5 and lines[-1] == f"#### {r['step_values'][-1]}"
        v = int(steps[0][1])
        assert 2 <= v <= 50 and r["question"].startswith(f"{r['question'].split()[0]} has {v} ")
        operands = []
        for k, (idx, a, op, b, c) in enumerate(steps, 1):
            a, b, c = int(a), int(b), int(c)
            assert int(idx) == k and a == v and c == ops[op](a, b) == r["step_values"][k - 1]
            assert 0 <= c < 1000 and (b in (2, 3) if op == "*" else 1 <= b <= 50)
            counts[op] += 1
            operands += [] if op == "*" else [b]
            v = c
        # The question states the start value and the +/- operands in order, and one
        # "doubles"/"triples" per multiplication.
        assert [int(x) for x in re.findall(r"\d+", r["question"])] == [int(steps[0][1])] + operands
        n_mul = r["question"].count("doubles") + r["question"].count("triples")
        assert n_mul == sum(s[2] == "*" for s in steps)
    assert counts["*"] > 0.1 * sum(counts.values()) and min(counts.values()) > 0


def test_prompt_response_format_and_first_wrong_step():
    r = {"question": "Mia has 12 marbles. She finds 7 more. She loses 4. How many marbles does "
                     "Mia have now?",
         "answer": "Step 1: 12 + 7 = 19\nStep 2: 19 - 4 = 15\n#### 15", "step_values": [19, 15]}
    # the prompt the toy model learns is byte for byte the one 01 and 07 send (mathtext's plain)
    assert toyworld.prompt_of(r) == "Question: " + r["question"] + "\nAnswer:"
    assert toyworld.prompt_of(r) == format_prompt(r["question"], "plain")
    resp = toyworld.response_of(r)
    assert resp == " Step 1: 12 + 7 = 19\nStep 2: 19 - 4 = 15\nThe answer is 15."
    steps = split_steps(resp)
    assert steps == [" Step 1: 12 + 7 = 19\n", "Step 2: 19 - 4 = 15\nThe answer is 15."]
    assert toyworld.step_is_right(steps[0], 1, [19, 15])
    assert toyworld.step_is_right(steps[1], 2, [19, 15])
    assert not toyworld.step_is_right(steps[1], 1, [19, 15])  # right value, wrong step number
    assert toyworld.first_wrong_step(split_steps(resp.replace("= 15", "= 16")), [19, 15]) == 2
    assert toyworld.first_wrong_step(split_steps(resp.replace("= 19", "= 18")), [19, 15]) == 1
    assert toyworld.first_wrong_step(split_steps(resp.replace("7 = 19", "7 is 19")),
                                     [19, 15]) == 1
    assert toyworld.first_wrong_step(split_steps(" Step 1: 12 + 7 = 19\nThe answer is 19."),
                                     [19, 15]) == 2  # a missing step is the first wrong one


def test_tokenizer_contract(toy_world):
    tok = AutoTokenizer.from_pretrained(toy_world / "00_toy" / "model")
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert set(tok.all_special_ids) == {0, 1, 2, 3}  # "\n" and "▁0".."▁9" are ordinary pieces
    recs = records(toy_world, "dev") + records(toy_world, "test")
    for r in recs:
        p, resp = toyworld.prompt_of(r), toyworld.response_of(r)
        ip = tok(p, add_special_tokens=False).input_ids
        ir = tok(resp, add_special_tokens=False).input_ids
        assert tok.decode(ip + ir, skip_special_tokens=True) == p + resp  # (a)
        assert tok.decode(ir, skip_special_tokens=True) == resp  # (b) leading space, newlines
        assert tok(p).input_ids == [1] + ip and 1 not in ip + ir  # (c) exactly one BOS
        assert tok.unk_token_id not in ip + ir
        assert tok.decode([1] + ip + ir + [2, 0, 0], skip_special_tokens=True) == p + resp
    toy.check_tokenizer(tok, [toyworld.prompt_of(r) for r in recs],
                        [toyworld.response_of(r) for r in recs])
    # The legacy conversion (prefix space added, first space stripped on decode) must be caught.
    legacy = AutoTokenizer.from_pretrained(toy_world / "00_toy" / "model", add_prefix_space=True)
    with pytest.raises(AssertionError):
        toy.check_tokenizer(legacy, [toyworld.prompt_of(recs[0])],
                            [toyworld.response_of(recs[0])])


def test_saved_model_reloads_from_safetensors(toy_world):
    out = toy_world / "00_toy"
    files = {f.name for f in (out / "model").iterdir()}
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt")) for f in files)
    assert not (out / "model.tmp").exists()
    model = AutoModelForCausalLM.from_pretrained(out / "model", use_safetensors=True).eval()
    tok = AutoTokenizer.from_pretrained(out / "model")
    assert model.config.vocab_size == len(tok) and model.config.tie_word_embeddings
    g = model.generation_config
    assert (g.bos_token_id, g.eos_token_id, g.pad_token_id) == (1, 2, 0)
    ids = torch.tensor([tok(toyworld.prompt_of(records(toy_world, "test")[0])).input_ids])
    assert model(input_ids=ids).logits.shape == (1, ids.shape[1], len(tok))
    assert [len(records(toy_world, s)) for s in ("train", "dev", "test")] == [300, 20, 20]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 20 and summary["special_ids"]["eos"] == 2
    assert sum(summary["first_wrong_step"].values()) == round((1 - summary["test_acc"]) * 20)


def test_same_seed_same_files_and_weights(toy_world, tmp_path):
    toy.main(toy.parser.parse_args(["--run-dir", str(tmp_path)] + TINY))
    for name in ["train.jsonl", "dev.jsonl", "test.jsonl", "model/model.safetensors",
                 "model/tokenizer.json"]:
        a, b = (run / "00_toy" / name for run in (toy_world, tmp_path))
        assert hashlib.sha256(a.read_bytes()).digest() == hashlib.sha256(b.read_bytes()).digest()
