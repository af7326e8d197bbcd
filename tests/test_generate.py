"""sampling.generate's KV cache (allocated once, written in place, compacted when a quarter of the
batch has finished) and --batch-size auto (sampling.auto_batch_size). Tiny real models, no mocks.

  cache     step by step, the logits through _KVBuffer equal those through transformers'
            DynamicCache (the previous cache), also after dropping rows; the buffers are never
            reallocated
  generate  with many rows ending early: greedy ids = transformers' generate, row by row; seeded
            samples do not depend on the batch's order or company, nor on compaction
  auto      kv_bytes_per_token = the bytes an actual cache holds per token (MHA, GQA, bf16,
            Llama / Qwen2 / deepseek layouts); the chosen batch is the arithmetic of its docstring,
            monotone in memory and lengths, clamped to [1, limit]
"""
import argparse
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig, LlamaForCausalLM

from common import encode_prompt, load_tokenizer, seed_for
from mathtext import STOP_STRINGS, format_prompt
from real_parts import family_config
from sampling import auto_batch_size, batch_size_arg, generate, kv_bytes_per_token, _kv_cache


pytestmark = pytest.mark.usefixtures("one_thread")


def gqa_llama(vocab: int, seed: int = 0) -> LlamaForCausalLM:
    """4 query heads sharing 2 KV heads; weights spread wide, so greedy text moves with every
    position and padding error."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, initializer_range=1.0, bos_token_id=1,
                      eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def toy(toy_world):
    """The toy tokenizer, 12 prompts of mixed lengths (6 questions twice), and a random GQA model
    on its vocabulary whose end ids are every 5th id: rows end after 1 to ~20 tokens, so the
    batch is compacted several times."""
    model_dir = toy_world / "00_toy" / "model"
    tok = load_tokenizer(model_dir)
    questions = [json.loads(x)["question"] for x in (toy_world / "00_toy" / "test.jsonl").open()]
    prompts = [encode_prompt(tok, format_prompt(q)) for q in questions[:6]] * 2
    model = gqa_llama(len(tok))
    model.generation_config.eos_token_id = list(range(3, len(tok), 5))
    return model, tok, prompts


# The cache


def test_kv_buffer_gives_the_logits_of_dynamic_cache():
    model = gqa_llama(64)
    torch.manual_seed(1)
    lengths = [7, 3, 5, 7, 2]
    P, N = max(lengths), 9
    ids = torch.randint(3, 64, (5, P))
    mask = torch.tensor([[0] * (P - n) + [1] * n for n in lengths])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    ours, ref = _kv_cache(model, P + N), DynamicCache(config=model.config)
    buffers = [(layer.keys, layer.values) for layer in ours.layers]
    assert all(k is None for k, _ in buffers)  # allocated by the first forward
    with torch.no_grad():
        for t in range(N):
            if t == 5:  # rows 1 and 3 leave: both caches keep rows 0, 2, 4
                keep = torch.tensor([0, 2, 4])
                ours.batch_select_indices(keep)
                ref.batch_select_indices(keep)
                ids, mask, pos = ids[keep], mask[keep], pos[keep]
            kw = dict(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
            a = model(past_key_values=ours, **kw).logits[:, -1]
            b = model(past_key_values=ref, **kw).logits[:, -1]
            assert torch.equal(a, b), t
            if t == 0:
                buffers = [(layer.keys, layer.values) for layer in ours.layers]
                assert buffers[0][0].shape == (5, 2, P + N, 8)  # (b, kv_heads, capacity, d)
            for (k, v), layer in zip(buffers, ours.layers):  # written in place, never copied
                assert layer.keys.data_ptr() == k.data_ptr()
                assert layer.values.data_ptr() == v.data_ptr()
            ids = a.argmax(-1, keepdim=True)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], -1)
            pos = pos[:, -1:] + 1
    assert ours.get_seq_length() == ref.get_seq_length() == P + N - 1


# generate


def count_compactions(monkeypatch) -> list:
    """The batch size left after each compaction of a cache, as generate calls them."""
    from transformers.cache_utils import Cache
    kept, select = [], Cache.batch_select_indices

    def spy(self, indices):
        kept.append(len(indices))
        return select(self, indices)

    monkeypatch.setattr(Cache, "batch_select_indices", spy)
    return kept


def test_greedy_with_early_ends_equals_transformers(toy, monkeypatch):
    model, tok, prompts = toy
    kept = count_compactions(monkeypatch)
    ours = generate(model, tok, prompts, max_new_tokens=24)
    lengths = [len(o["ids"]) for o in ours]
    assert min(lengths) <= 2 and max(lengths) >= 8 and len(set(lengths)) >= 4
    # compacted a few times, each time once a quarter of the rows left had finished
    assert 1 <= len(kept) < len(set(lengths)) and kept == sorted(kept, reverse=True)

    pad, P = tok.pad_token_id, max(map(len, prompts))
    input_ids = torch.tensor([[pad] * (P - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        hf = model.generate(input_ids=input_ids, attention_mask=mask, do_sample=False,
                            max_new_tokens=24, pad_token_id=pad, top_p=None, top_k=None,
                            temperature=None)[:, P:].tolist()
    ends = set(model.generation_config.eos_token_id)
    for i, (o, h) in enumerate(zip(ours, hf)):
        stop = next((j + 1 for j, t in enumerate(h) if t in ends), len(h))
        assert o["ids"] == h[:stop], i
        assert o["finish"] == ("eos" if o["ids"][-1] in ends else "length")


def test_samples_do_not_depend_on_the_batch_or_compaction(toy):
    model, tok, prompts = toy
    seeds = [seed_for(5, i) for i in range(len(prompts))]
    kw = dict(temperature=1.0, top_p=0.9, max_new_tokens=24, stop=tuple(STOP_STRINGS))
    full = generate(model, tok, prompts, seeds, **kw)
    assert len({len(o["ids"]) for o in full}) >= 4  # rows end at many different steps
    assert {o["finish"] for o in full} == {"eos", "length"}
    order = [7, 2, 11, 0, 5, 9, 1, 10, 3, 6, 8, 4]
    shuffled = generate(model, tok, [prompts[i] for i in order], [seeds[i] for i in order], **kw)
    assert [shuffled[order.index(i)] for i in range(len(prompts))] == full
    alone = [generate(model, tok, [p], [s], **kw)[0] for p, s in zip(prompts, seeds)]
    assert alone == full
    assert any(full[i]["ids"] != full[i + 6]["ids"] for i in range(6))  # same prompt, other seed


# --batch-size auto


def cached_bytes_per_token(model, dtype=torch.float32) -> float:
    """An independent count: the bytes transformers' own cache holds after one forward of a
    (3, 7) batch, per token."""
    model = model.to(dtype)
    with torch.no_grad():
        cache = model(input_ids=torch.randint(3, 60, (3, 7)), use_cache=True).past_key_values
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers) / (3 * 7)


@pytest.mark.parametrize("family", ["mha", "gqa", "llama3", "qwen2", "deepseek"])
def test_kv_bytes_per_token_counts_an_actual_cache(family):
    torch.manual_seed(0)
    model = {"mha": lambda: LlamaForCausalLM(LlamaConfig(
                 vocab_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=3,
                 num_attention_heads=6, num_key_value_heads=6)),
             "gqa": lambda: gqa_llama(64)}.get(
        family, lambda: AutoModelForCausalLM.from_config(family_config(family)))().eval()
    for dtype in (torch.float32, torch.bfloat16):
        assert kv_bytes_per_token(model.to(dtype)) == cached_bytes_per_token(model, dtype)
    cfg = model.config
    heads = {"mha": 6, "gqa": 2, "llama3": 2, "qwen2": 2, "deepseek": 4}[family]
    assert cfg.num_key_value_heads == heads
    # under tensor parallel over 2 ranks each holds half of the KV heads
    assert kv_bytes_per_token(model, shards=2) == kv_bytes_per_token(model) // 2


def test_auto_batch_size_arithmetic(capsys):
    model = gqa_llama(1000)  # float32, 2 layers, 2 KV heads of 8: 256 bytes per token
    assert kv_bytes_per_token(model) == 2 * 2 * 2 * 8 * 4
    P, N = 100, 50
    row = 256 * (P + N) + P * (4 * 32 + 3 * 64) * 4 + 1000 * 4 * 10
    assert auto_batch_size(model, P, N, "cpu", free=37 * row, margin=0) == 37
    assert auto_batch_size(model, P, N, "cpu", free=37 * row - 1, margin=0) == 36
    assert auto_batch_size(model, P, N, "cpu", free=100 * row, margin=0.25) == 75
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 3 and out[0].startswith("--batch-size auto: 37 rows")
    # more memory never fewer rows; longer prompts or outputs never more
    gib = 2 ** 30
    by_free = [auto_batch_size(model, P, N, "cpu", free=f) for f in (0, row, gib // 64, gib)]
    by_len = [auto_batch_size(model, p, n, "cpu", free=gib // 16) for p, n in
              ((10, 10), (100, 50), (100, 500), (1000, 500), (4000, 4000))]
    assert by_free == sorted(by_free) and by_free[0] == 1  # never 0, even when nothing fits
    assert by_len == sorted(by_len, reverse=True) and by_len[-1] < by_len[0]
    assert auto_batch_size(model, P, N, "cpu", free=gib, limit=64) == 64
    # the default reads the machine's free memory
    assert 1 <= auto_batch_size(model, P, N, "cpu") <= 1024


def test_batch_size_flag():
    assert batch_size_arg("auto") == "auto" and batch_size_arg("12") == 12
    for bad in ("0", "-3", "1.5", "big"):
        with pytest.raises(argparse.ArgumentTypeError):
            batch_size_arg(bad)
