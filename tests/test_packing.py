"""The packed batch layout (packing.pack_rows) computes what the padded layout computes.

Packed: each pair's context once, then the chosen and the rejected response, both with position
ids restarting where the context ends and a mask that hides each response from the other; pairs
(and SFT examples) packed into rows, padding only at the rows' ends. Checked against the padded
layout (one right-padded row per response, the classic layout): per-token log-probs, per-pair
losses and parameter gradients equal to 1e-5 in float32, on a toy-shaped Llama and on tiny random
models with each real family's config (GQA, qkv bias, tied embeddings), for pairs with and without
a shared context, with contexts of different lengths in one row; through LoRA with activation
checkpointing, both attention implementations that take a mask, and bf16. The fallback to the
padded layout where the model cannot take the mask. The stages' own runs: tests/test_train.py.
"""
import math
import random
from argparse import Namespace

import pytest
import torch

from common import token_logps
from machinery.packing import collate_pairs, pack_rows, packing_unsupported
from conftest import load_stage, tiny_llama
from real_parts import family_config
from machinery.optimization import batch_layout

pytestmark = pytest.mark.usefixtures("one_thread")
cdpo, stepdpo, sft = load_stage("05_train_cdpo"), load_stage("06_train_stepdpo"), \
    load_stage("03_contrastive_sft")


def test_pack_rows_by_hand():
    """Two pairs in one row: contexts first (but their last tokens), then each pair's last
    context token and responses; positions in each token's own sequence; logits kept for the
    tail only; the rejected's first token scored from the last context token."""
    items = [([11, 12, 13], [[21, 22], [31]]),  # context 3, chosen 2, rejected 1: 6 tokens
             ([14], [[23], [32, 33]]),  # context 1 (nothing shared but the first token): 4
             ([15, 16], [[24], [34]])]  # 4 tokens: a second row (row_tokens 10)
    b = pack_rows(items, pad_id=0, row_tokens=10, T=5)
    assert b["input_ids"].tolist() == [[11, 12, 13, 21, 22, 31, 14, 23, 32, 33],
                                       [0, 0, 0, 0, 0, 0, 15, 16, 24, 34]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 4, 3, 0, 1, 1, 2],
                                          [0, 0, 0, 0, 0, 0, 0, 1, 2, 2]]
    assert b["seq_doc"].tolist() == [[0, 0, 0, 0, 0, 0, 1, 1, 1, 1], [-1] * 6 + [0] * 4]
    assert b["seq_branch"].tolist() == [[0, 0, 0, 1, 1, 2, 0, 1, 2, 2], [0] * 6 + [0, 0, 1, 2]]
    assert b["attention_mask"].tolist() == [[1] * 10, [0] * 6 + [1] * 4]
    # logits for the last K = 8 positions (row 0's tail: 13 21 22 31 14 23 32 33); column c
    # scores tail token c+1 from tail position c, except 31 (from 13 at 0) and 32 (from 14 at
    # 4); row 1's tail is 16 24 34 (positions 5..7 of its window): 34 from 16 at 5
    assert b["source"].tolist() == [[0, 1, 0, 3, 4, 4, 6], [0, 1, 2, 3, 4, 5, 5]]
    # the padded layout's rows: chosen of each pair (11 12 13 21 22 | 14 23 | 15 16 24), then
    # rejected (11 12 13 31 | 14 32 33 | 15 16 34); response columns only, as flat indices
    # into the (2, 7) log-probs
    assert b["unpack"].tolist() == [[-1, -1, 0, 1], [4, -1, -1, -1], [-1, 12, -1, -1],
                                    [-1, -1, 2, -1], [5, 6, -1, -1], [-1, 13, -1, -1]]


def test_pack_rows_fills_rows_longest_first():
    items = [([1] * n, [[2] * 2, [3] * 2]) for n in (6, 2, 8, 1)]  # 10, 6, 12, 5 tokens
    b = pack_rows(items, pad_id=0, row_tokens=16, T=10)
    # longest first, each into the first row with room: 12 opens row 0, 10 row 1, 6 fills row 1
    # (16), 5 fits neither (12 + 5, 16 + 5 > 16) and opens row 2; rows padded at the start
    assert b["input_ids"].shape == (3, 16)
    assert b["attention_mask"].sum(1).tolist() == [12, 16, 5]
    assert b["seq_doc"][0, :4].tolist() == [-1] * 4
    assert b["source"].shape == (3, 2 * 5 - 1)  # row 1's two tails: 2 x (1 + 2 + 2) positions


def random_pairs(V: int, n: int, seed: int, contexts=(1, 2, 9, 23, 40)) -> list[dict]:
    """Pairs with contexts of several lengths, 1 = the first token alone (nothing shared
    beyond it); responses of 1 to 12 tokens, weights and reference log-probs on every token."""
    rng = random.Random(seed)
    ids = lambda k: [rng.randrange(3, V) for _ in range(k)]  # noqa: E731
    pairs = []
    for i in range(n):
        c, r = ids(rng.randint(1, 12)), ids(rng.randint(1, 12))
        pairs.append({"id": str(i), "prompt_ids": ids(contexts[i % len(contexts)]),
                      "chosen_ids": c, "rejected_ids": r,
                      "chosen_weights": [rng.random() for _ in c],
                      "rejected_weights": [rng.random() for _ in r],
                      "ref_chosen_logps": [-rng.uniform(1, 8) for _ in c],
                      "ref_rejected_logps": [-rng.uniform(1, 8) for _ in r]})
    return pairs


def family_model(family: str):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(family_config(family, "instruct")).eval()


MODELS = {"toy": lambda: tiny_llama(vocab=400, hidden=64, layers=2, heads=4, tie=True),
          "llama3": lambda: family_model("llama3"),  # GQA 4:2, untied, vocab 128,256
          "qwen2": lambda: family_model("qwen2"),  # GQA, qkv bias, tied embeddings
          "deepseek": lambda: family_model("deepseek")}


def pair_losses(model, pairs, layout: dict):
    """token log-probs, per-pair cDPO and Step-DPO losses (the stages' own functions), and the
    gradient of their sum, in one layout."""
    b = collate_pairs(pairs, pad_id=0, **layout)
    model.zero_grad(set_to_none=True)
    logps = token_logps(model, b)  # (2B, T-1)
    weighted, _, _ = cdpo.cdpo_loss(logps, b["ref_logps"], b["weights"], beta=0.5)
    step, _, _ = stepdpo.step_dpo_loss(logps, b["ref_logps"], b["loss_mask"], beta=0.5)
    (weighted.sum() + step.sum()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logps.detach(), weighted.detach(), step.detach(), grads


def assert_layouts_agree(model, pairs, row_tokens: int, atol=1e-5):
    lp_a, w_a, s_a, g_a = pair_losses(model, pairs, {})
    lp_b, w_b, s_b, g_b = pair_losses(model, pairs, {"packed": True, "row_tokens": row_tokens})
    responses = collate_pairs(pairs, 0)["loss_mask"].bool()  # packed scores these alone
    torch.testing.assert_close(lp_b, torch.where(responses, lp_a, 0.0), atol=atol, rtol=0)
    torch.testing.assert_close(w_b, w_a, atol=atol, rtol=0)
    torch.testing.assert_close(s_b, s_a, atol=atol, rtol=0)
    assert g_a.keys() == g_b.keys() and g_a
    for n in g_a:
        torch.testing.assert_close(g_b[n], g_a[n], atol=atol, rtol=0, msg=n)
    assert max(g.abs().max() for g in g_a.values()) > 100 * atol  # gradients worth comparing


CASES = [("toy", 0), ("toy", 400)] + [(family, 400) for family in MODELS if family != "toy"]


@pytest.mark.parametrize("name,row_tokens", CASES)  # 0: one pair a row or so; 400: all in one
def test_packed_equals_padded(name, row_tokens):
    model = MODELS[name]()
    pairs = random_pairs(model.config.vocab_size, n=7, seed=1)
    b = collate_pairs(pairs, 0, packed=True, row_tokens=row_tokens)
    if row_tokens:  # contexts of different lengths share a row
        assert b["input_ids"].shape[0] == 1 and b["seq_doc"].max() == len(pairs) - 1
    assert_layouts_agree(model, pairs, row_tokens)


def test_eager_attention_takes_the_additive_mask():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, attn_implementation="eager")
    model = LlamaForCausalLM(cfg).eval()
    assert model.config._attn_implementation == "eager"
    assert_layouts_agree(model, random_pairs(300, n=5, seed=2), row_tokens=200)


def test_lora_with_activation_checkpointing():
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(family_model("qwen2"), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"]))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()  # checkpointing is active in training mode; dropout is 0
    for lora in (m for m in model.modules() if hasattr(m, "lora_B")):  # B = 0 at init: move it
        for linear in lora.lora_B.values():
            torch.nn.init.normal_(linear.weight, std=0.02)
    assert_layouts_agree(model, random_pairs(model.config.vocab_size, n=5, seed=3), 300)


def test_bf16_packed_is_as_close_to_float32_as_padded():
    """In bf16 the layouts round differently; each stays as close to the float32 result."""
    model = MODELS["toy"]()
    pairs = random_pairs(400, n=6, seed=4)
    exact = pair_losses(model, pairs, {})[0]
    errors = []
    for layout in ({}, {"packed": True, "row_tokens": 300}):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logps = token_logps(model, collate_pairs(pairs, 0, **layout)).detach()
        assert logps.dtype == torch.float32
        errors.append(((logps - exact) * collate_pairs(pairs, 0)["loss_mask"]).abs().max().item())
    assert errors[1] < 2 * errors[0] + 1e-2, errors


def test_sft_packing_equals_padding():
    model = MODELS["toy"]()
    rng = random.Random(5)
    examples = [{"prompt_ids": [rng.randrange(3, 400) for _ in range(rng.randint(1, 30))],
                 "response_ids": [rng.randrange(3, 400) for _ in range(rng.randint(1, 20))]}
                for _ in range(9)]
    out = []
    for layout in ({}, {"packed": True, "row_tokens": 128}):
        b = sft.collate_sft(examples, 0, **layout)
        model.zero_grad(set_to_none=True)
        nll = -(token_logps(model, b) * b["loss_mask"]).sum(-1)  # (B,) per example
        nll.sum().backward()
        out.append((b["input_ids"].numel(), nll.detach(), {n: p.grad.clone() for n, p in
                                                            model.named_parameters()}))
    (n_padded, nll_a, g_a), (n_packed, nll_b, g_b) = out
    assert n_packed < n_padded
    torch.testing.assert_close(nll_b, nll_a, atol=1e-5, rtol=0)
    for n in g_a:
        torch.testing.assert_close(g_b[n], g_a[n], atol=1e-5, rtol=0, msg=n)


def test_step0_is_ln2_in_the_packed_layout():
    """Policy = reference: every pair's loss is ln 2, whatever shares its row."""
    model = MODELS["toy"]()
    pairs = random_pairs(400, n=6, seed=6)
    layout = {"packed": True, "row_tokens": 300}
    b = collate_pairs(pairs, 0, **layout)
    with torch.no_grad():
        ref = token_logps(model, b)
    losses, _, _ = cdpo.cdpo_loss(token_logps(model, b), ref, b["weights"], beta=0.1)
    torch.testing.assert_close(losses, torch.full((6,), math.log(2)), atol=1e-6, rtol=0)


def test_fallback_to_padded_where_the_mask_cannot_be_taken(capsys):
    from transformers import MistralConfig, MistralForCausalLM
    args = Namespace(layout="packed", row_tokens=0, max_length=64)
    model = tiny_llama()
    assert batch_layout(args, model) == {"packed": True, "row_tokens": 0}
    model.config._attn_implementation = "flash_attention_2"  # takes no custom mask
    assert batch_layout(args, model) == {}
    assert capsys.readouterr().out.count("\n") == 1  # one line says so
    cfg = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
               num_attention_heads=2, num_key_value_heads=2)
    windowed = MistralForCausalLM(MistralConfig(**cfg, sliding_window=32))
    assert "sliding window 32" in packing_unsupported(windowed, longest=64)
    assert batch_layout(args, windowed) == {}
    assert packing_unsupported(MistralForCausalLM(MistralConfig(**cfg, sliding_window=64)),
                               longest=64) is None  # the window never bites: packed is exact
    assert batch_layout(Namespace(layout="padded", row_tokens=0, max_length=64), tiny_llama()) \
        == {}
