"""The pipeline in miniature on the real families' tokenizers and model layouts: a tiny random
Llama-3 (128,256 vocab, GQA, untied), Qwen2 (151,936 vocab, qkv bias, tied, no BOS) and
deepseek-math-7b layout (102,400 vocab, no GQA) from tests/real_parts.py, each stage run as a user
runs it (a subprocess on the files the previous stage wrote), with the Instruct chat template.

A random model is never right, so the pairs cannot come from sampling: 01 samples (for its prompts
and its output contract), then the samples are replaced by hand-written right and wrong answers
that drive 03's selection; 02's step pairs are hand-written too. What is checked is what real
tokenizers break and the toy tokenizer cannot: one BOS where the family has one (the chat template
already writes it) and none for Qwen2, responses that end with the end id they were written with
(Llama-3-Instruct ends turns with <|eot_id|>, and lists <|end_of_text|> as an end id as well),
weights parallel to ids, ln 2 at step 0, trained models that load with their tokenizer and
generation config, and torchrun = one process on Llama-3. The three chains run side by side
(`chains`); a stage that fails fails the tests that read its output, with its stderr.
"""
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from common import read_jsonl
from conftest import run_script
from real_parts import FAMILIES, build_family_model, missing_packages

pytestmark = pytest.mark.skipif(bool(missing_packages()), reason="not installed: "
                                + ", ".join(missing_packages()))

LN2 = math.log(2)
TRAIN = ["--max-steps", 2, "--batch-size", 2, "--micro-batch-size", 1]
METRICS = ("loss", "reward_acc", "chosen_reward", "rejected_reward", "margin", "grad_norm", "lr")


def problem(i: int) -> dict:
    """A GSM8K-format problem and hand-written answers in the pipeline's format: right, wrong at
    step 2 (off by one, carried to the end), wrong another way (added), and one cut short."""
    a, b = 19 + 7 * i, 4 + i

    def steps(result):
        return [f"Step 1: The shop starts with {a} pens.\n",
                f"Step 2: It sells {b}, so {a} - {b} = {result} pens are left.\n",
                f"The answer is {result}."]
    return {"question": f"A shop has {a} pens and sells {b} of them. How many pens are left?",
            "answer": f"It has {a} - {b} = <<{a}-{b}={a - b}>>{a - b} pens left.\n#### {a - b}",
            "gold": str(a - b), "right": steps(a - b), "wrong": steps(a - b + 1),
            "other": steps(a + b), "values": {"right": a - b, "wrong": a - b + 1, "other": a + b},
            "cut": f"Step 1: The shop starts with {a} pens.\nStep 2: It sells {b}, so {a} - 9"}


PROBLEMS = [problem(i) for i in range(6)]


def ends_of(family: str) -> tuple[int, int]:
    """(the chat turn's end id, another end id of the generation config, if there is one)."""
    f = FAMILIES[family]
    turn = f.id(f.eos["instruct"])
    return turn, next((e for e in f.end_ids["instruct"] if e != turn), turn)


def hand_samples(family: str, prob: dict) -> list[dict]:
    """What 01 would write if the model could solve the problem: the right answer twice (ended
    with the turn's end id), the step-2 slip twice (ended with the family's other end id), the
    other wrong answer once, and three answers cut by the token limit that agree with each other
    (the largest wrong group, if 03 did not set cut answers aside)."""
    turn, other = ends_of(family)

    def sample(text, pred, eos_id, truncated=False):
        return {"text": text, "pred": pred, "correct": pred == prob["gold"] and not truncated,
                "truncated": truncated, "eos_id": eos_id}
    text = {k: "".join(prob[k]) for k in ("right", "wrong", "other")}
    pred = {k: str(v) for k, v in prob["values"].items()}
    return ([sample(text["right"], pred["right"], turn)] * 2
            + [sample(text["wrong"], pred["wrong"], other)] * 2
            + [sample(text["other"], pred["other"], turn)]
            + [sample(prob["cut"], "9", None, truncated=True)] * 3)


def write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
                    encoding="utf-8")


def chat_prompt(tok, question: str) -> str:
    return tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                   add_generation_prompt=True)


# --------------------------------------------------------------------------------------------------
# The chains: one per family, each stage a subprocess on the files of the stages before it


class Chain:
    """One family's run dir, filled by run_chain, and which of its stages have no output."""

    def __init__(self, family: str, run):
        from transformers import AutoTokenizer
        self.family, self.f, self.run = family, FAMILIES[family], run
        self.model = build_family_model(family, run / "base_model")
        self.tok = AutoTokenizer.from_pretrained(str(self.model))
        self.ends = self.f.end_ids["instruct"]
        self.data = run / "problems.jsonl"
        write_jsonl(self.data, [{"question": p["question"], "answer": p["answer"]}
                                for p in PROBLEMS])
        self.failed = {}  # stage -> why it has no output (its stderr, or the stage it needed)

    def need(self, *stages):
        """Fail the calling test, with the stage's own error, if a stage it reads did not run."""
        for s in stages:
            if s in self.failed:
                pytest.fail(f"{s} has no output: {self.failed[s]}", pytrace=False)


def sample01(c: Chain):
    run_script("01_sample", "--run-dir", c.run, "--model", c.model, "--data", c.data, "--n", 4,
               "--max-new-tokens", 24, "--batch-size", 8, "--temperature", 1.0,
               "--template", "chat")


def sft03(c: Chain):
    """03 on 01's records with hand-written samples in place of the random model's."""
    records = [{**rec, "samples": hand_samples(c.family, prob)}
               for rec, prob in zip(read_jsonl(c.run / "01_sample/samples.jsonl"), PROBLEMS)]
    write_jsonl(c.run / "hand/samples.jsonl", records)
    run_script("03_contrastive_sft", "--run-dir", c.run, "--data", c.run / "hand/samples.jsonl",
               "--model", c.model, "--max-steps", 1, "--batch-size", 2, "--micro-batch-size", 2)


def score04(c: Chain):
    run_script("04_score_tokens", "--run-dir", c.run, "--batch-size", 2)


def cdpo05(c: Chain):
    run_script("05_train_cdpo", "--run-dir", c.run, "--model", c.model, *TRAIN)


def cdpo05_two_ranks(c: Chain):
    """The same under torchrun, 2 ranks: Llama-3 only (the check is about FSDP2, not vocab)."""
    if c.family == "llama3":
        run_script("05_train_cdpo", "--run-dir", c.run, "--model", c.model, "--out",
                   c.run / "05_two_ranks", *TRAIN, nproc=2)


def stepdpo06(c: Chain):
    """06 on hand-written step pairs: after the right step 1, the right step 2 against the
    slip (step_idx 2: the first wrong step, counted from 1)."""
    pairs = [{"id": f"{rec['id']}-s2", "problem_id": rec["id"], "prompt": rec["prompt"],
              "prefix": p["right"][0], "chosen": p["right"][1], "rejected": p["wrong"][1],
              "step_idx": 2}
             for rec, p in zip(read_jsonl(c.run / "01_sample/samples.jsonl"), PROBLEMS)]
    write_jsonl(c.run / "02_localize/pairs.jsonl", pairs)
    run_script("06_train_stepdpo", "--run-dir", c.run, "--model", c.model, *TRAIN)


def eval07(c: Chain):
    run_script("07_eval", "--run-dir", c.run, "--model", c.run / "05_train_cdpo/model",
               "--label", "cdpo", "--data", c.data, "--limit", 4, "--max-new-tokens", 16,
               "--template", "chat")


# (name, the stages whose output it reads, what runs it), in the order they run
STAGES = [("01", (), sample01), ("03", ("01",), sft03), ("04", ("03",), score04),
          ("05", ("04",), cdpo05), ("05x2", ("04",), cdpo05_two_ranks),
          ("06", ("01",), stepdpo06), ("07", ("05",), eval07)]


def run_chain(c: Chain) -> Chain:
    """Every stage in order; a failing stage is recorded, and so is every stage after it that
    needs its output, so that only the tests reading those fail."""
    for name, needs, step in STAGES:
        missing = [n for n in needs if n in c.failed]
        if missing:
            c.failed[name] = f"not run, {missing[0]} failed"
            continue
        try:
            step(c)
        except (Exception, SystemExit) as e:  # run_script: a non-zero exit, with its stderr;
            c.failed[name] = f"{type(e).__name__}: {e}"  # a timeout; read_jsonl: a bad file
    return c


@pytest.fixture(scope="module")
def chains(tmp_path_factory) -> dict:
    """The three families' chains, side by side (a thread each): a stage is a single-threaded
    subprocess, mostly interpreter start-up and file loading, so 2 cores run two at once and the
    module takes about half the time it would take one after the other."""
    from concurrent.futures import ThreadPoolExecutor
    todo = [Chain(family, tmp_path_factory.mktemp(f"real-{family}")) for family in FAMILIES]
    with ThreadPoolExecutor(len(todo)) as pool:
        return {c.family: c for c in pool.map(run_chain, todo)}


@pytest.fixture(params=list(FAMILIES))
def fam(request, chains) -> Chain:
    return chains[request.param]


# --------------------------------------------------------------------------------------------------
# The models


def test_family_model_has_the_real_layout(fam):
    from transformers import AutoConfig, GenerationConfig
    cfg, f = AutoConfig.from_pretrained(str(fam.model)), fam.f
    assert cfg.vocab_size == f.config["vocab_size"] >= len(fam.tok)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (
        f.config["num_attention_heads"], f.config["num_key_value_heads"])
    assert cfg.rope_parameters["rope_theta"] == f.config["rope_theta"]
    assert cfg.tie_word_embeddings == f.config["tie_word_embeddings"]
    assert GenerationConfig.from_pretrained(str(fam.model)).eos_token_id == fam.ends
    weights = load_file(str(fam.model / "model.safetensors"))
    assert ("lm_head.weight" in weights) == (not cfg.tie_word_embeddings)
    attn = "model.layers.0.self_attn"
    biases = {p for p in ("q_proj", "k_proj", "v_proj", "o_proj") if f"{attn}.{p}.bias" in weights}
    assert biases == ({"q_proj", "k_proj", "v_proj"} if fam.family == "qwen2" else set())


# --------------------------------------------------------------------------------------------------
# 01 -> 03 -> 04: prompts, samples, pairs, scored ids


def samples01(fam) -> list[dict]:
    fam.need("01")
    return read_jsonl(fam.run / "01_sample/samples.jsonl")


def test_01_prompts_are_the_question_alone_in_the_chat_template(fam):
    prompts = [chat_prompt(fam.tok, p["question"]) for p in PROBLEMS]
    assert [r["prompt"] for r in samples01(fam)] == prompts


def test_01_samples_say_how_they_ended(fam):
    sampled = samples01(fam)
    assert [r["answer"] for r in sampled] == [p["gold"] for p in PROBLEMS]
    for rec in sampled:
        assert len(rec["samples"]) == 4
        for s in rec["samples"]:
            assert {"text", "pred", "correct", "truncated", "eos_id"} <= s.keys()
            assert s["eos_id"] in fam.ends or s["eos_id"] is None
            if s["truncated"]:
                assert s["eos_id"] is None and not s["correct"]


def test_03_pairs_are_the_hand_written_answers_with_their_end_ids(fam):
    sampled, sft = samples01(fam), fam.run / "03_contrastive_sft"
    fam.need("03")
    turn, other = ends_of(fam.family)
    expected = [{"id": rec["id"], "prompt": rec["prompt"], "chosen": "".join(p["right"]),
                 "rejected": "".join(p["wrong"]), "chosen_eos_id": turn,
                 "rejected_eos_id": other, "answer": p["gold"]}
                for rec, p in zip(sampled, PROBLEMS)]
    assert read_jsonl(sft / "pairs.jsonl") == expected
    for name in ("pos", "neg"):
        assert (sft / name / "model.safetensors").is_file()


def scored04(fam) -> list[dict]:
    fam.need("04")
    return read_jsonl(fam.run / "04_score_tokens/pairs.jsonl")


def test_04_prompts_start_as_the_family_starts_a_text(fam):
    """Llama-3 and deepseek: exactly one BOS, the one the chat template writes; Qwen2: none, and
    never the bos_token_id its model config names."""
    bos = fam.tok.bos_token_id
    for p in scored04(fam):
        assert p["prompt_ids"] == fam.tok(p["prompt"], add_special_tokens=False).input_ids
        if fam.f.bos:
            assert p["prompt_ids"][0] == bos and p["prompt_ids"].count(bos) == 1
        else:
            assert bos is None and fam.f.config["bos_token_id"] not in p["prompt_ids"]
            assert p["prompt_ids"][0] == fam.f.id("<|im_start|>")


def test_04_responses_are_their_texts_and_end_with_the_id_they_ended_with(fam):
    scored = scored04(fam)
    texts = {p["id"]: p for p in read_jsonl(fam.run / "03_contrastive_sft/pairs.jsonl")}
    assert {p["id"] for p in scored} == set(texts)
    turn, other = ends_of(fam.family)
    for p in scored:
        for side, end in (("chosen", turn), ("rejected", other)):
            ids = p[f"{side}_ids"]
            assert ids == fam.tok(texts[p["id"]][side], add_special_tokens=False).input_ids + [end]
            assert ids[-1] in fam.ends and fam.f.config["bos_token_id"] not in ids[:-1]
            assert len(p[f"{side}_weights"]) == len(ids)
            assert all(0 <= w <= 1 for w in p[f"{side}_weights"])


# --------------------------------------------------------------------------------------------------
# 05, 06: training from the family's model


@pytest.mark.parametrize("stage, out_dir", [("05", "05_train_cdpo"), ("06", "06_train_stepdpo")])
def test_05_06_start_at_ln2_and_save_a_model_that_loads(fam, stage, out_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    fam.need(stage)
    out = fam.run / out_dir
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1]
    assert rows[0]["loss"] == pytest.approx(LN2, abs=1e-4)
    trained, base = (load_file(str(d / "model.safetensors")) for d in (out / "model", fam.model))
    assert trained.keys() == base.keys()
    assert any(not trained[k].equal(base[k]) for k in base), "training changed nothing"
    model = AutoModelForCausalLM.from_pretrained(str(out / "model"))
    assert model.config.vocab_size == fam.f.config["vocab_size"]
    assert GenerationConfig.from_pretrained(str(out / "model")).eos_token_id == fam.ends
    tok = AutoTokenizer.from_pretrained(str(out / "model"))
    assert (tok.bos_token_id, tok.eos_token_id, len(tok)) == (
        fam.tok.bos_token_id, fam.tok.eos_token_id, len(fam.tok))
    assert tok.chat_template == fam.tok.chat_template
    texts = [chat_prompt(fam.tok, p["question"]) + "".join(p["right"]) for p in PROBLEMS]
    assert tok(texts).input_ids == fam.tok(texts).input_ids


def test_05_two_processes_equal_one_on_llama3(chains):
    """Same global batch of 2: one process with 2 micro-batches of 1, or 2 ranks (gloo, FSDP2)
    with one pair each."""
    fam = chains["llama3"]
    fam.need("05", "05x2")
    cdpo, two_ranks = fam.run / "05_train_cdpo", fam.run / "05_two_ranks"
    one, two = read_jsonl(cdpo / "metrics.jsonl"), read_jsonl(two_ranks / "metrics.jsonl")
    assert two[0]["loss"] == pytest.approx(LN2, abs=1e-4)
    assert [r[k] for r in two for k in METRICS] == pytest.approx(
        [r[k] for r in one for k in METRICS], abs=1e-5)
    a, b = (load_file(str(d / "model/model.safetensors")) for d in (cdpo, two_ranks))
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=0, msg=k)


# --------------------------------------------------------------------------------------------------
# 07


def test_07_evaluates_the_trained_model_on_the_same_prompts(fam):
    sampled, evaluated = samples01(fam), fam.run / "07_eval/cdpo"
    fam.need("07")
    res = json.loads((evaluated / "results.json").read_text())
    gens = read_jsonl(evaluated / "generations.jsonl")
    assert res["n"] == len(gens) == 4
    assert res["accuracy"] == pytest.approx(sum(g["correct"] for g in gens) / 4)
    assert [g["prompt"] for g in gens] == [r["prompt"] for r in sampled[:4]]
    for g in gens:
        assert g["gold"] == PROBLEMS[[r["id"] for r in sampled].index(g["id"])]["gold"]
        assert isinstance(g["truncated"], bool) and not (g["truncated"] and g["correct"])
