"""04_score_tokens.py: the contrastive-estimation probability against naive computations, weights
aligned one to one with the ids, the HTML view, and a real run (and resume) on the toy world."""
import importlib.util
import json
import random
import re
import shutil

import pytest
import torch
import torch.nn.functional as F

from common import encode_prompt, encode_response
from machinery.heatmap import token_pieces
from machinery.models import load_tokenizer
from conftest import ROOT, load_stage, tiny_llama
from test_localize import slip_for, toy_solution

ce = load_stage("04_score_tokens")


def peaked(seed):
    """A tiny real Llama whose next-token distributions are far from uniform, so neighbouring
    positions get clearly different probabilities (a shift by one cannot hide)."""
    model = tiny_llama(vocab=64, seed=seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    return model


def naive_ce(pos, neg, ids: list[int], beta: float) -> torch.Tensor:
    """One unpadded sequence, full (T, V) softmax of (1+b) z_pos - b z_neg: (T-1,), token t+1."""
    x = torch.tensor([ids])
    zp, zn = pos(input_ids=x).logits[0].double(), neg(input_ids=x).logits[0].double()
    p = torch.softmax((1 + beta) * zp - beta * zn, -1)  # (T, V)
    return p[:-1].gather(-1, x[0, 1:, None]).squeeze(-1).float()


ITEMS = [{"id": "a", "prompt_ids": [1, 5, 9, 13], "chosen_ids": [7, 30, 31, 2],
          "rejected_ids": [7, 40, 2]},
         {"id": "b", "prompt_ids": [1, 44], "chosen_ids": [3, 2], "rejected_ids": [8] * 9 + [2]}]


@pytest.mark.parametrize("beta", [1.0, 0.5, 2.0])
def test_ce_probs_match_full_softmax(beta):
    pos, neg = peaked(0), peaked(1)
    seq = [1, 5, 9, 13, 7, 30, 31, 2, 17, 4]
    x = torch.tensor([seq])
    zp, zn = pos(input_ids=x).logits, neg(input_ids=x).logits
    ref = naive_ce(pos, neg, seq, beta)
    for chunk_bytes in (4 * 64, 4 * 5 * 64, 1 << 30):  # 1 position per chunk, uneven, one chunk
        got = ce.ce_token_probs(zp, zn, x, beta, chunk_bytes)[0]
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)
    # the identity p_CE ∝ p_pos^(1+b) / p_neg^b (log_softmax only shifts each position)
    lp, ln = F.log_softmax(zp[0].double(), -1), F.log_softmax(zn[0].double(), -1)
    q = lp.exp() ** (1 + beta) / ln.exp() ** beta  # (T, V), unnormalised
    q = (q / q.sum(-1, keepdim=True))[:-1].gather(-1, x[0, 1:, None]).squeeze(-1)
    torch.testing.assert_close(q.float(), ref, atol=1e-6, rtol=1e-5)


def test_batched_weights_equal_naive_per_token_and_a_shift_is_caught():
    pos, neg = peaked(2), peaked(3)
    scored = ce.score_batch(pos, neg, ITEMS, 1.0, pad_id=0, device="cpu")
    for it, (p_cho, p_rej) in zip(ITEMS, scored):
        assert len(p_cho) == len(it["chosen_ids"]) and len(p_rej) == len(it["rejected_ids"])
        P = len(it["prompt_ids"])
        for side, got in (("chosen", p_cho), ("rejected", p_rej)):
            ref = naive_ce(pos, neg, it["prompt_ids"] + it[f"{side}_ids"], 1.0)[P - 1:]
            torch.testing.assert_close(torch.tensor(got), ref, atol=1e-5, rtol=1e-4)
    # a weight list shifted by one token fails the same comparison
    it, got = ITEMS[0], scored[0][0]
    ref = naive_ce(pos, neg, it["prompt_ids"] + it["chosen_ids"], 1.0)[len(it["prompt_ids"]) - 1:]
    for shifted in ([ref[0].item()] + got[:-1], got[1:] + [got[-1]]):
        with pytest.raises(AssertionError):
            torch.testing.assert_close(torch.tensor(shifted), ref, atol=1e-5, rtol=1e-4)


def test_weight_i_belongs_to_token_i():
    """Change rejected token 3: weights 0..2 stay, weight 3 moves (its own token), later ones
    move too (their context changed)."""
    pos, neg = peaked(4), peaked(5)
    item = {"id": "x", "prompt_ids": [1, 10, 11], "chosen_ids": [20, 2],
            "rejected_ids": [21, 22, 23, 24, 25, 26, 2]}
    base = ce.score_batch(pos, neg, [item], 1.0, 0, "cpu")[0][1]
    for new in (50, 60):
        changed = ce.score_batch(pos, neg, [{**item, "rejected_ids": [21, 22, 23, new, 25, 26, 2]}],
                                 1.0, 0, "cpu")[0][1]
        rel = [abs(a - b) / b for a, b in zip(changed, base)]  # p spans many decades
        assert max(rel[:3]) < 1e-5 and rel[3] > 1e-2 and max(rel[4:]) > 1e-2


# The toy world: two models with the toy tokenizer, real pairs


@pytest.fixture(scope="module")
def toy_pair_run(toy_world, tmp_path_factory):
    """A run dir with 03's outputs: pos = the fixture's toy model, neg = a perturbed copy, and
    pairs (chosen = right answer, rejected = one slip carried along) from toy problems."""
    from transformers import AutoModelForCausalLM
    run = tmp_path_factory.mktemp("ce_run")
    sft = run / "03_contrastive_sft"
    shutil.copytree(toy_world / "00_toy" / "model", sft / "pos")
    neg = AutoModelForCausalLM.from_pretrained(sft / "pos")
    torch.manual_seed(0)
    with torch.no_grad():
        for p in neg.parameters():
            p.add_(0.5 * p.std() * torch.randn_like(p))
    neg.save_pretrained(sft / "neg")
    load_tokenizer(sft / "pos").save_pretrained(sft / "neg")
    rng, pairs = random.Random(0), []
    for line in list((toy_world / "00_toy" / "train.jsonl").open())[:7]:
        rec = json.loads(line)
        pairs.append({"id": rec["id"], "prompt": "Question: " + rec["question"] + "\nAnswer:",
                      "chosen": toy_solution(rec),
                      "rejected": toy_solution(rec, slip=slip_for(rec, rng)),
                      "answer": str(rec["step_values"][-1])})
    pairs[0]["chosen"] += " <b>&</b>"  # text that must be escaped in the HTML
    (sft / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    ce.main(ce.parser.parse_args(["--run-dir", str(run), "--batch-size", "3"]))
    return run, pairs


def read(path):
    return [json.loads(line) for line in path.open()]


def test_toy_run_writes_aligned_ids_and_weights(toy_pair_run):
    run, pairs = toy_pair_run
    out = read(run / "04_score_tokens" / "pairs.jsonl")
    tok = load_tokenizer(run / "03_contrastive_sft" / "pos")
    assert [r["id"] for r in out] == [p["id"] for p in pairs]
    for r, p in zip(out, pairs):
        assert r["prompt_ids"] == encode_prompt(tok, p["prompt"])
        for side in ("chosen", "rejected"):
            assert r[f"{side}_ids"] == encode_response(tok, p[side], eos=True)
            assert r[f"{side}_ids"][-1] == tok.eos_token_id
            assert len(r[f"{side}_weights"]) == len(r[f"{side}_ids"])
            assert all(0 <= w <= 1 for w in r[f"{side}_weights"])
        assert r["rejected"] == p["rejected"] and r["answer"] == p["answer"]
    # one record recomputed independently: chosen p_t and rejected 1 - p_t
    from transformers import AutoModelForCausalLM
    pos, neg = (AutoModelForCausalLM.from_pretrained(run / "03_contrastive_sft" / s).eval()
                for s in ("pos", "neg"))
    r = out[4]
    P = len(r["prompt_ids"])
    with torch.no_grad():
        p_cho = naive_ce(pos, neg, r["prompt_ids"] + r["chosen_ids"], 1.0)[P - 1:]
        p_rej = naive_ce(pos, neg, r["prompt_ids"] + r["rejected_ids"], 1.0)[P - 1:]
    torch.testing.assert_close(torch.tensor(r["chosen_weights"]), p_cho, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.tensor(r["rejected_weights"]), 1 - p_rej, atol=1e-5,
                               rtol=1e-4)
    summary = json.loads((run / "04_score_tokens" / "summary.json").read_text())
    assert summary["pairs"] == 7 and summary["config"]["ce_beta"] == 1.0


def test_toy_run_resumes_after_a_kill(toy_pair_run, tmp_path):
    run, _ = toy_pair_run
    whole = (run / "04_score_tokens" / "pairs.jsonl").read_text()
    out = tmp_path / "scores"
    out.mkdir()
    lines = whole.splitlines(keepends=True)
    (out / "pairs.jsonl.part0").write_text("".join(lines[2:5]) + lines[5][:40])  # + a torn line
    ce.main(ce.parser.parse_args(["--run-dir", str(run), "--out", str(out), "--batch-size", "2"]))
    assert (out / "pairs.jsonl").read_text() == whole
    assert not list(out.glob("*.part*"))


def test_html_has_one_shaded_span_per_rejected_token(toy_pair_run):
    run, pairs = toy_pair_run
    page = (run / "04_score_tokens" / "critical_tokens.html").read_text()
    out = read(run / "04_score_tokens" / "pairs.jsonl")
    assert len(re.findall(r'<span class="t"', page)) == sum(len(r["rejected_ids"]) for r in out)
    assert "&lt;b&gt;&amp;&lt;/b&gt;" in page and "<b>" not in page  # escaped answer text
    assert "&lt;/s&gt;</span>" in page and "</s>" not in page  # the EOS token, escaped
    assert "<script" not in page and "http" not in page.replace("http-equiv", "")  # self-contained
    for p in pairs:
        assert f"gold answer: {p['answer']}" in page


def test_token_pieces_rebuild_the_text(toy_world):
    tok = load_tokenizer(toy_world / "00_toy" / "model")
    text = " Step 1: 12 + 7 = 19\nStep 2: 19 - 4 = 15\nThe answer is 15."
    ids = encode_response(tok, text, eos=True)
    pieces = token_pieces(tok, ids, encode_prompt(tok, "Question: x\nAnswer:")[-1])
    assert len(pieces) == len(ids) and "".join(pieces) == text + tok.eos_token
    assert pieces[0].startswith(" ")  # the leading space of the first token survives


def test_html_renders_in_headless_chromium(toy_pair_run, tmp_path):
    spec = importlib.util.spec_from_file_location("screenshot_html",
                                                  ROOT / "bench" / "screenshot_html.py")
    shot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(shot)
    if shot.find_browser() is None:
        pytest.skip("no chromium on PATH (apt-get install -y chromium)")
    run, _ = toy_pair_run
    png = shot.screenshot(run / "04_score_tokens" / "critical_tokens.html", tmp_path / "ct.png")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000  # a page, not a blank
