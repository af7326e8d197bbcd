"""generation.generate and its Sampler (continuous batching over KV slots, each prompt computed
once), the static path it replaced (kept for models the slots cannot serve), and --batch-size auto
(sampling.auto_batch_size). Tiny real models, no mocks.

  cache     step by step, the logits through _KVBuffer equal those through transformers'
            DynamicCache, also after dropping rows; the buffers are never reallocated
  attention the decode step's shared-prefix attention (a prompt held once for its rows) equals
            attention written out row by row in float64, over uneven groups
  generate  greedy ids = transformers' generate and = the static path (today's generate), row by
            row, with prompt sharing and refilling on and off and at several batch sizes, on a
            random GQA model in float64 (where only a bug can move an id), the toy model and the
            real families' tiny configs; seeded samples do not depend on the batch size, the
            order, sharing or refilling; every step runs a full batch while rows wait; a prompt
            is computed once for all its rows, and one that extends a computed one computes only
            its new positions; rows added while results are read (02's rollouts)
  nucleus   the top-k nucleus keeps exactly the tokens a full sort keeps (fallbacks included)
  fallback  a sliding-window model goes through the static path and still equals transformers
  auto      kv_bytes_per_token = the bytes an actual cache holds per token (MHA, GQA, bf16,
            Llama / Qwen2 / deepseek layouts); the chosen batch is the arithmetic of its docstring,
            monotone in memory and lengths, clamped to [1, limit]
"""
import argparse
import gc
import json
import weakref

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig, LlamaForCausalLM

from common import encode_prompt, seed_for
from machinery.mathtext import format_prompt, STOP_STRINGS
from machinery.models import load_tokenizer
from real_parts import family_config
from machinery.generation import (_generate_static, _kv_cache, _nucleus, end_ids, sample_rows,
                                  Sampler, slots_supported)
from machinery.flags import batch_size_arg
from machinery.sampling import auto_batch_size, kv_bytes_per_token
from machinery.generation import generate


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


def test_shared_prefix_attention_equals_attention_over_each_rows_sequence():
    """_shared_prefix_attention, rows of uneven groups (a free group between them, prompts of
    different lengths, a group of one), against attention written out row by row in float64:
    softmax(q [K_prompt; K_own]^T / sqrt(d)) [V_prompt; V_own], each query head on its kv head.
    The columns a row must not see hold random numbers, not zeros, so reading one shows."""
    import types
    from machinery.generation import _shared_prefix_attention
    torch.manual_seed(0)
    h, g, d, P, kv = 2, 3, 8, 6, 5
    group_of, prompt_len, own_len = [2, 0, 2, 0, 3], [4, 0, 6, 2], [1, 4, 0, 2, 3]
    layer = types.SimpleNamespace(prefix_keys=torch.randn(4, h, P + 2, d, dtype=torch.float64),
                                  prefix_values=torch.randn(4, h, P + 2, d, dtype=torch.float64))
    b = len(group_of)
    query = torch.randn(b, h * g, 1, d, dtype=torch.float64)
    key, value = torch.randn(2, b, h, kv, d, dtype=torch.float64)
    # the Sampler's step for these rows: groups 0..3 with places of 2 (group 1 is free)
    pack = torch.tensor([1, 3, 0, 0, 0, 2, 4, 0])  # (G x r,)
    unpack = torch.tensor([4, 0, 5, 1, 6])  # (b,)
    sees = [[c < prompt_len[group_of[s]] for c in range(P)] + [c <= own_len[s] for c in range(kv)]
            for s in range(b)]
    step = dict(layers=[layer], groups=4, places=2, prompt_len=P, pack=pack, unpack=unpack)
    ours, _ = _shared_prefix_attention(types.SimpleNamespace(layer_idx=0), query, key, value,
                                       torch.tensor(sees)[:, None, None, :], d ** -0.5,
                                       shared_prefix=step)
    assert ours.shape == (b, 1, h * g, d)
    for s in range(b):
        n_prompt, n_own = prompt_len[group_of[s]], own_len[s] + 1
        K = torch.cat([layer.prefix_keys[group_of[s], :, :n_prompt], key[s, :, :n_own]], 1)
        V = torch.cat([layer.prefix_values[group_of[s], :, :n_prompt], value[s, :, :n_own]], 1)
        for head in range(h * g):
            weights = torch.softmax(K[head // g] @ query[s, head, 0] / d ** 0.5, 0)
            torch.testing.assert_close(ours[s, 0, head], weights @ V[head // g])


# generate

COMBOS = [dict(batch_size=bs, share_prompts=share, refill=refill)
          for bs in (None, 5) for share in (True, False) for refill in (True, False)]


def hf_greedy(model, tok, prompts, max_new_tokens):
    """transformers' greedy generate on one left-padded batch, each row cut after its end id."""
    pad, P = tok.pad_token_id, max(map(len, prompts))
    input_ids = torch.tensor([[pad] * (P - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        hf = model.generate(input_ids=input_ids, attention_mask=mask, do_sample=False,
                            max_new_tokens=max_new_tokens, pad_token_id=pad, top_p=None,
                            top_k=None, temperature=None)[:, P:].tolist()
    ends = set(end_ids(model, tok))
    return [h[:next((j + 1 for j, t in enumerate(h) if t in ends), len(h))] for h in hf]


@pytest.fixture(scope="module")
def wide(toy):
    """The toy fixture's GQA model in float64: its weights are spread so wide that float32
    rounding of another batch shape moves ids; in float64 only a mistake can."""
    model, tok, prompts = toy
    return model.double(), tok, prompts


def test_greedy_with_early_ends_equals_transformers_and_the_static_path(wide):
    model, tok, prompts = wide
    hf = hf_greedy(model, tok, prompts, 24)
    lengths = [len(h) for h in hf]
    assert min(lengths) <= 2 and max(lengths) >= 8 and len(set(lengths)) >= 4
    static = _generate_static(model, tok, prompts, [0] * len(prompts), 0.0, 1.0, 24, ())
    assert [o["ids"] for o in static] == hf
    for kw in COMBOS:
        ours = generate(model, tok, prompts, max_new_tokens=24, **kw)
        assert ours == static, kw
    ends = set(model.generation_config.eos_token_id)
    assert all(o["finish"] == ("eos" if o["ids"][-1] in ends else "length") for o in static)


def test_a_finished_sampler_frees_its_buffers_without_the_cycle_collector(wide):
    """Dropped after its run, a Sampler's KV buffers go at once (reference counting): nothing it
    holds refers back to it. A cycle (the decode step's dict holding the layers that hold the
    dict) kept them until Python's cycle collector ran: 08 grew by ~1 GB per answer."""
    model, tok, prompts = wide
    gc.collect()
    gc.disable()
    try:
        sampler = Sampler(model, tok, 4, max_new_tokens=8)
        for i, p in enumerate(prompts[:6]):
            sampler.add(i, p)
        assert len(list(sampler.results())) == 6
        held = weakref.ref(sampler.cache.layers[0].keys)  # a row-slot buffer
        del sampler
        assert held() is None
    finally:
        gc.enable()


def test_samples_do_not_depend_on_batch_order_sharing_or_refill(wide):
    model, tok, prompts = wide
    seeds = [seed_for(5, i) for i in range(len(prompts))]
    kw = dict(temperature=1.0, top_p=0.9, max_new_tokens=24, stop=tuple(STOP_STRINGS))
    static = _generate_static(model, tok, prompts, seeds, **kw)  # today's generate
    assert len({len(o["ids"]) for o in static}) >= 4  # rows end at many different steps
    assert {o["finish"] for o in static} == {"eos", "length"}
    for combo in COMBOS:
        assert generate(model, tok, prompts, seeds, **kw, **combo) == static, combo
    order = [7, 2, 11, 0, 5, 9, 1, 10, 3, 6, 8, 4]
    shuffled = generate(model, tok, [prompts[i] for i in order], [seeds[i] for i in order],
                        batch_size=3, **kw)
    assert [shuffled[order.index(i)] for i in range(len(prompts))] == static
    alone = [generate(model, tok, [p], [s], **kw)[0] for p, s in zip(prompts, seeds)]
    assert alone == static
    assert any(static[i]["ids"] != static[i + 6]["ids"] for i in range(6))  # same prompt, seed


def test_toy_model_float32_sharing_and_refill_change_no_id(toy_world):
    """The trained toy model in float32, as the stages run it: 6 questions x 4 samples."""
    model_dir = toy_world / "00_toy" / "model"
    tok = load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    questions = [json.loads(x)["question"] for x in (toy_world / "00_toy" / "test.jsonl").open()]
    prompts = [encode_prompt(tok, format_prompt(q)) for q in questions[:6] for _ in range(4)]
    seeds = list(range(len(prompts)))
    for temperature, top_p in ((0.0, 1.0), (1.0, 0.95)):
        kw = dict(temperature=temperature, top_p=top_p, max_new_tokens=40,
                  stop=tuple(STOP_STRINGS))
        static = [o for s in range(0, 24, 8) for o in _generate_static(
            model, tok, prompts[s:s + 8], seeds[s:s + 8], **kw)]
        for combo in COMBOS:
            assert generate(model, tok, prompts, seeds, **kw, **combo) == static, combo
    assert [o["ids"] for o in generate(model, tok, prompts[::4], max_new_tokens=40)] == \
        hf_greedy(model, tok, prompts[::4], 40)


@pytest.mark.parametrize("family", ["llama3", "qwen2", "deepseek"])
def test_real_families_equal_transformers(family):
    """The real families' tiny configs (their vocabularies, GQA layouts, qkv bias, tying) with
    their real tokenizers' chat prompts: greedy ids = transformers' in every combination."""
    from real_parts import build_family_model
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        model_dir = build_family_model(family, d)
        tok = load_tokenizer(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    qs = ["What is 2 + 3?", "Tom has 7 apples and eats 2. How many are left?", "Add 10 and 5."]
    prompts = [encode_prompt(tok, format_prompt(q, "chat", tok)) for q in qs] * 2
    hf = hf_greedy(model, tok, prompts, 12)
    for kw in COMBOS[::3]:
        assert [o["ids"] for o in generate(model, tok, prompts, max_new_tokens=12, **kw)] == hf


def test_full_batch_every_step_and_each_prompt_once(wide, monkeypatch):
    """While rows wait, every decode step runs batch_size rows; the prompt of n rows is
    computed once, and a prompt that extends one computed before only computes its new ids."""
    model, tok, prompts = wide
    widths = []
    forward = model.forward

    def spy(*args, **kw):
        ids = kw["input_ids"]
        if ids.shape[1] == 1 and ids.shape[0] > 0 and kw["position_ids"].shape[1] == 1:
            widths.append(ids.shape[0])
        return forward(*args, **kw)
    monkeypatch.setattr(model, "forward", spy)
    p = prompts[0]
    sampler = Sampler(model, tok, 4, temperature=1.0, max_new_tokens=24)
    for k in range(16):
        sampler.add(k, p, seed=k)
    outs = dict(sampler.results())
    assert len(outs) == 16 and sampler.computed == len(p)  # one prompt, computed once
    # every step is full until fewer than 4 rows are left to finish
    lengths = sorted(len(o["ids"]) for o in outs.values())
    assert widths[:len(widths) - max(lengths)].count(4) == len(widths) - max(lengths)
    assert sum(widths) == sum(n - 1 for n in lengths)  # the first token comes from the prompt
    # each position held once: the prompt in one group slot for all 16 rows, (1, kv_heads,
    # prompt, head_dim); the rows' own positions in (batch_size, kv_heads, max_new_tokens, ...)
    assert sampler.cache.layers[0].prefix_keys.shape == (1, 2, len(p), 8)
    assert sampler.cache.layers[0].keys.shape == (4, 2, 24, 8)
    sampler = Sampler(model, tok, 64, max_new_tokens=24)  # 2 rows take 2 slots, not 64
    sampler.add(0, p)
    sampler.add(1, prompts[1])
    dict(sampler.results())
    assert sampler.cache.layers[0].keys.shape[0] == 2
    # extensions: p, p + 3 ids, p[:4] + 2 other ids: computed 3, then 2 (+1: the last position
    # of a prompt is recomputed for its logits when all of it is shared)
    sampler = Sampler(model, tok, 4, max_new_tokens=4)
    for k, q in enumerate([p, p + [7, 8, 9], p[:4] + [5, 6], p[:3]]):
        sampler.add(k, q)
    dict(sampler.results())
    assert sampler.computed == len(p) + 3 + 2 + 1


def test_rows_added_while_reading_results(wide):
    """02's way: the results of one row decide the next rows, added while the Sampler runs."""
    model, tok, prompts = wide
    kw = dict(temperature=1.0, top_p=0.9, max_new_tokens=10)
    sampler = Sampler(model, tok, 3, **kw)
    sampler.add(("a", 0), prompts[0], 0)
    got = {}
    for key, out in sampler.results():
        got[key] = out
        if key[1] < 4:  # each result asks for two more rows, from its own continuation
            for j in range(2):
                nxt = (key[0] + str(j), key[1] + 1)
                if nxt not in got:
                    sampler.add(nxt, prompts[0] + out["ids"][:3], seed_for(*nxt))
    assert len(got) == 1 + 2 + 4 + 8 + 16
    for (name, depth), out in list(got.items())[:6]:
        if depth:  # the same row alone gives the same text
            parent = got[(name[:-1], depth - 1)]
            alone = generate(model, tok, [prompts[0] + parent["ids"][:3]],
                             [seed_for(name, depth)], **kw)[0]
            assert alone == out


def test_nucleus_keeps_what_a_full_sort_keeps():
    """Against the full-sort nucleus (the rule as written): rows whose nucleus lies in the top
    64, beyond 64, beyond 1,024, and rows with tied probabilities."""
    torch.manual_seed(0)
    V = 5000
    logits = torch.cat([torch.randn(4, V) * 8, torch.randn(4, V) * 0.5, torch.zeros(2, V)])
    logits[8, :3] = 5.0  # three tied leaders
    for top_p in (0.5, 0.9, 0.95, 0.999):
        probs = torch.softmax(logits, -1)
        sorted_p, idx = probs.sort(-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p
        want = torch.zeros_like(probs).scatter_(-1, idx, sorted_p * keep)
        kept, ids = _nucleus(probs, top_p)
        assert (ids.diff(dim=-1) > 0).all()  # each row's ids ascending, none twice
        got = torch.zeros_like(probs).scatter_(-1, ids, kept)
        assert torch.equal(got > 0, want > 0) and torch.equal(got, want), top_p
        cdf = want.cumsum(-1)  # the whole vocabulary's CDF, the tokens outside at 0
        for _ in range(20):
            u = torch.rand(len(probs))
            assert torch.equal(sample_rows(logits, 1.0, top_p, u), torch.searchsorted(
                cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0].clamp(max=V - 1))


def test_sliding_window_models_take_the_static_path():
    from transformers import MistralConfig, MistralForCausalLM
    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, sliding_window=6,
                        bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = MistralForCausalLM(cfg).eval().double()
    assert not slots_supported(model)

    class Tok:  # ids only: generate decodes the output text
        eos_token_id, pad_token_id = 2, 0

        def decode(self, ids, skip_special_tokens=False):
            return " ".join(map(str, ids))
    prompts = [[1, 5, 9, 13, 17, 21, 25, 29, 33], [1, 7, 11]]
    ours = generate(model, Tok(), prompts, max_new_tokens=12)
    assert [o["ids"] for o in ours] == hf_greedy(model, Tok(), prompts, 12)


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
