"""Training stages 03, 05, 06: the losses against hand and naive computations, weight alignment,
the SFT selection rule, and the training invariants (ln 2 at step 0, gradient accumulation,
resume with every RNG restored, NaN guard), on tiny real models and toy-world texts made here."""
import json
import math
import random

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from common import encode_prompt, encode_response, token_logps
from machinery import checkpoints
from machinery.optimization import adamw
from machinery.packing import collate_pairs
from conftest import load_stage, tiny_llama
from machinery.pairs import reference_logps

sft = load_stage("03_contrastive_sft")
cdpo = load_stage("05_train_cdpo")
stepdpo = load_stage("06_train_stepdpo")
LN2 = math.log(2)


# --------------------------------------------------------------------------------------------------
# Toy-world data made here: arithmetic problems, their step-by-step solutions, and wrong variants
# with one slipped digit (the errors the toy model makes)


def toy_problem(rng: random.Random):
    value, ops, steps = rng.randint(2, 50), [], []
    for k in range(rng.randint(2, 4)):
        r = rng.random()
        if r < 0.2:
            op, b, word = "*", rng.choice([2, 3]), "Multiply by"
        elif r < 0.6:
            op, b, word = "+", rng.randint(1, 50), "Add"
        else:
            op, b, word = "-", rng.randint(0, min(50, value)), "Subtract"
        new = {"+": value + b, "-": value - b, "*": value * b}[op]
        ops.append(f"{word} {b}.")
        steps.append((value, op, b, new))
        value = new
    return f"Start with {steps[0][0]}. " + " ".join(ops) + " What is the result?", steps


def solution(steps, slip_at=None, delta=0):
    """Step lines and final answer; with slip_at=k step k's result is off by delta and later
    steps carry the wrong value on."""
    lines, carry = [], None
    for k, (a, op, b, c) in enumerate(steps):
        a = carry if carry is not None else a
        c = {"+": a + b, "-": a - b, "*": a * b}[op] + (delta if k == slip_at else 0)
        lines.append(f"Step {k + 1}: {a} {op} {b} = {c}")
        carry = c
    return lines, carry


def toy_records(n: int, seed: int = 0):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        q, steps = toy_problem(rng)
        lines, answer = solution(steps)
        out.append({"id": f"toy-{i}", "question": q, "answer": str(answer), "steps": steps,
                    "prompt": f"Question: {q}\nAnswer:", "lines": lines})
    return out


def full_text(lines, answer):
    return "\n".join(lines) + f"\nThe answer is {answer}."


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """<run>/00_toy/model (a sentencepiece BPE tokenizer and a tiny random Llama), and the inputs
    of 03, 05 and 06 written as 01, 02 and 04 write them."""
    import sentencepiece as spm
    from transformers import AutoTokenizer, LlamaTokenizer
    run = tmp_path_factory.mktemp("trainrun")
    recs = toy_records(40)
    corpus = run / "corpus.txt"
    corpus.write_text("".join((r["prompt"] + " " + full_text(r["lines"], r["answer"]))
                              .replace("\n", " ") + "\n" for r in recs))
    tk = run / "tk"
    tk.mkdir()
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tk / "tokenizer"), vocab_size=100, model_type="bpe",
        split_digits=True, user_defined_symbols=["\n"], normalization_rule_name="identity",
        pad_id=0, bos_id=1, eos_id=2, unk_id=3, pad_piece="<pad>", minloglevel=2)
    model_dir = run / "00_toy" / "model"
    LlamaTokenizer.from_pretrained(str(tk), pad_token="<pad>").save_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    tiny_llama(vocab=len(tok), hidden=32, layers=2, heads=2).save_pretrained(model_dir)

    rng = random.Random(1)
    samples, scored, steps = [], [], []
    for r in recs:  # 01: 6 graded samples, a mix of right and slipped answers
        outs = []
        for _ in range(6):
            k = rng.randrange(len(r["steps"])) if rng.random() < 0.5 else None
            slip = rng.choice([-10, -1, 1, 10]) if k is not None else 0
            lines, ans = solution(r["steps"], k, slip)
            outs.append({"text": full_text(lines, ans), "pred": str(ans),
                         "correct": str(ans) == r["answer"]})
        samples.append({"id": r["id"], "question": r["question"], "answer": r["answer"],
                        "prompt": r["prompt"], "samples": outs})
        wrong, _ = solution(r["steps"], len(r["steps"]) - 1, 1)
        p = encode_prompt(tok, r["prompt"])
        c = encode_response(tok, full_text(r["lines"], r["answer"]), True)
        rej = encode_response(tok, full_text(wrong, int(r["answer"]) + 1), True)
        scored.append({"id": r["id"], "prompt_ids": p, "chosen_ids": c, "rejected_ids": rej,
                       "chosen_weights": [rng.random() for _ in c],
                       "rejected_weights": [rng.random() for _ in rej]})
        k = rng.randrange(len(r["steps"]))  # 02: first wrong step k, its correct replacement
        bad, _ = solution(r["steps"], k, 1)
        steps.append({"id": r["id"], "prompt": r["prompt"],
                      "prefix": "".join(line + "\n" for line in r["lines"][:k]),
                      "chosen": r["lines"][k], "rejected": bad[k], "step_idx": k + 1,
                      "rollouts": {}})
    for name, recs_ in (("01_sample/samples.jsonl", samples), ("02_localize/pairs.jsonl", steps),
                        ("04_score_tokens/pairs.jsonl", scored)):
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text("".join(json.dumps(x) + "\n" for x in recs_))
    return run


def metrics(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def weights(model_dir):
    return load_file(str(model_dir / "model.safetensors"))


def args_for(stage, run, *extra):
    return stage.parser.parse_args(["--run-dir", str(run), *map(str, extra)])


# --------------------------------------------------------------------------------------------------
# The losses


def naive_logps(model, ids):
    """Log-probs of ids[1:] from one unpadded forward and a full float32 log_softmax: (len-1,)."""
    x = torch.tensor([ids])
    return F.log_softmax(model(input_ids=x).logits[0, :-1].float(), -1).gather(
        -1, x[0, 1:, None]).squeeze(-1)


def random_pairs(n, vocab, seed):
    g = random.Random(seed)
    toks = lambda k: [g.randrange(4, vocab) for _ in range(k)]  # noqa: E731
    return [{"id": str(i), "prompt_ids": [1] + toks(g.randint(2, 6)),
             "chosen_ids": toks(g.randint(1, 7)) + [2], "rejected_ids": toks(g.randint(1, 7)) + [2]}
            for i in range(n)]


def test_cdpo_with_unit_weights_is_dpo_loss_and_gradients():
    """All weights 1 through the training path (collate, one concatenated forward, stored
    reference log-probs) equals textbook DPO computed sequence by sequence."""
    policy, ref_model, beta = tiny_llama(vocab=50, seed=0), tiny_llama(vocab=50, seed=1), 0.3
    pairs = random_pairs(3, 50, seed=0)
    for p, (c, r) in zip(pairs, reference_logps(ref_model, pairs, 0, 2, "cpu")):
        p["ref_chosen_logps"], p["ref_rejected_logps"] = c, r
        p["chosen_weights"], p["rejected_weights"] = [1.0] * len(c), [1.0] * len(r)
    b = collate_pairs(pairs, pad_id=0)
    logps = token_logps(policy, b)
    losses, _, _ = cdpo.cdpo_loss(logps, b["ref_logps"], b["weights"], beta)
    losses.mean().backward()
    got = {n: p.grad.clone() for n, p in policy.named_parameters()}
    policy.zero_grad()

    def logratio(p, side):
        ids, P = p["prompt_ids"] + p[f"{side}_ids"], len(p["prompt_ids"])
        with torch.no_grad():
            ref = naive_logps(ref_model, ids)[P - 1:].sum()
        return naive_logps(policy, ids)[P - 1:].sum() - ref

    dpo = torch.stack([-F.logsigmoid(beta * (logratio(p, "chosen") - logratio(p, "rejected")))
                       for p in pairs]).mean()
    dpo.backward()
    torch.testing.assert_close(losses.mean(), dpo, atol=1e-6, rtol=0)
    for n, p in policy.named_parameters():
        torch.testing.assert_close(got[n], p.grad, atol=1e-6, rtol=1e-5, msg=n)


def test_hand_computed_loss_both_forms():
    """A 2-pair batch, T-1 = 4 columns, given per-token log-probs; expected values by hand."""
    beta = 0.5
    # rows: chosen 0, chosen 1, rejected 0, rejected 1; column 0 is a prompt column (weight 0)
    pol = [[-9.0, -1.0, -0.5, -0.5], [-9.0, -0.2, 0.0, 0.0],
           [-9.0, -3.0, -1.0, 0.0], [-9.0, -2.0, -1.5, -4.0]]
    ref = [[-8.0, -1.5, -1.0, -1.0], [-7.0, -0.7, 0.0, 0.0],
           [-1.0, -2.0, -2.0, 0.0], [-5.0, -1.0, -1.0, -1.0]]
    w = [[0, 1, 1, 1], [0, 1, 0, 0], [0, 0.5, 0.25, 0], [0, 1, 0.1, 0.9]]
    # w * (pol - ref) by hand: chosen 0 [0, .5, .5, .5], chosen 1 [0, .5, 0, 0],
    # rejected 0 [0, -.5, .25, 0], rejected 1 [0, -1, -.05, -2.7]
    rc, rr = [0.5 * 1.5, 0.5 * 0.5], [0.5 * -0.25, 0.5 * -3.75]  # beta * row sums
    # sequence form: -log sigmoid(rc - rr) = log(1 + e^-(rc - rr))
    seq = [math.log1p(math.exp(-0.875)), math.log1p(math.exp(-2.125))]
    # position form: x = beta * (chosen - rejected) per column, mean of log(1 + e^-x) over all 8
    x = [0, 0.5, 0.125, 0.25] + [0, 0.75, 0.025, 1.35]
    pos = sum(math.log1p(math.exp(-v)) for v in x) / 8
    T = torch.tensor
    losses, c, r = cdpo.cdpo_loss(T(pol), T(ref), T(w), beta)
    assert losses.tolist() == pytest.approx(seq, abs=1e-6)
    assert c.tolist() == pytest.approx(rc) and r.tolist() == pytest.approx(rr)
    losses, c, r = cdpo.cdpo_position_loss(T(pol), T(ref), T(w), beta)
    assert losses.mean().item() == pytest.approx(pos, abs=1e-6)
    assert c.tolist() == pytest.approx(rc) and r.tolist() == pytest.approx(rr)
    assert pos != pytest.approx(sum(seq) / 2, abs=1e-3)  # the two forms really differ


def test_weights_land_on_their_tokens():
    """Rejected weights 1 on exactly one token j: the rejected reward must be beta * (log-ratio
    of token j alone), for every j. A weight list shifted by one token picks a neighbour's
    log-ratio and fails."""
    policy, ref_model, beta = tiny_llama(vocab=50, seed=2), tiny_llama(vocab=50, seed=3), 0.1
    pair, other = random_pairs(2, 50, seed=5)  # `other` pads the batch differently
    ids, P = pair["prompt_ids"] + pair["rejected_ids"], len(pair["prompt_ids"])
    with torch.no_grad():
        expected = (naive_logps(policy, ids) - naive_logps(ref_model, ids))[P - 1:]  # (R,)
    assert all(abs(expected[j] - expected[j + 1]) > 1e-4 for j in range(len(expected) - 1))
    batch = [pair, other]
    for p, (c, r) in zip(batch, reference_logps(ref_model, batch, 0, 2, "cpu")):
        p["ref_chosen_logps"], p["ref_rejected_logps"] = c, r
    for j in range(len(pair["rejected_ids"])):
        pair["rejected_weights"] = [float(k == j) for k in range(len(pair["rejected_ids"]))]
        b = collate_pairs(batch, pad_id=0)
        with torch.no_grad():
            logps = token_logps(policy, b)
        _, _, rejected = cdpo.cdpo_loss(logps, b["ref_logps"], b["weights"], beta)
        assert rejected[0].item() == pytest.approx(beta * expected[j].item(), abs=1e-6), j


def test_misaligned_weights_are_refused(run, tmp_path, capsys):
    recs = metrics(run / "04_score_tokens/pairs.jsonl")
    recs[3]["rejected_weights"] = recs[3]["rejected_weights"][1:]  # one short: shifted
    bad = tmp_path / "pairs.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in recs))
    with pytest.raises(SystemExit) as e:
        cdpo.load_pairs(bad, args_for(cdpo, run, "--data", bad))
    assert e.value.code == 2 and "rejected_weights has" in capsys.readouterr().err


def test_empty_prompt_is_refused(run, tmp_path, capsys):
    recs = metrics(run / "04_score_tokens/pairs.jsonl")
    recs[2]["prompt_ids"] = []  # nothing to score the first response token from
    bad = tmp_path / "pairs.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in recs))
    with pytest.raises(SystemExit) as e:
        cdpo.load_pairs(bad, args_for(cdpo, run, "--data", bad))
    assert e.value.code == 2 and "empty prompt_ids" in capsys.readouterr().err


def test_stepdpo_loss_is_dpo_on_context_and_steps(run):
    """06's encoding + loss equals DPO computed on (prompt + prefix, chosen step, rejected step),
    each sequence scored alone; and no step carries an EOS."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(run / "00_toy/model")
    policy, ref_model = tiny_llama(vocab=len(tok), seed=4), tiny_llama(vocab=len(tok), seed=5)
    beta = 0.4
    recs = metrics(run / "02_localize/pairs.jsonl")[:3]
    pairs = [stepdpo.encode_step_pair(tok, r) for r in recs]
    for p, r in zip(pairs, recs):
        assert p["prompt_ids"] == encode_prompt(tok, r["prompt"]) + \
            tok(r["prefix"], add_special_tokens=False).input_ids
        assert tok.eos_token_id not in p["chosen_ids"] + p["rejected_ids"]
    for p, (c, r) in zip(pairs, reference_logps(ref_model, pairs, tok.pad_token_id, 2, "cpu")):
        p["ref_chosen_logps"], p["ref_rejected_logps"] = c, r
    b = collate_pairs(pairs, tok.pad_token_id)
    with torch.no_grad():
        logps = token_logps(policy, b)
        step_losses, _, _ = stepdpo.step_dpo_loss(logps, b["ref_logps"], b["loss_mask"], beta)
        dpo_losses, _, _ = cdpo.cdpo_loss(logps, b["ref_logps"], b["loss_mask"], beta)

        def logratio(p, side):
            ids, P = p["prompt_ids"] + p[f"{side}_ids"], len(p["prompt_ids"])
            return (naive_logps(policy, ids) - naive_logps(ref_model, ids))[P - 1:].sum()

        naive = [-F.logsigmoid(beta * (logratio(p, "chosen") - logratio(p, "rejected")))
                 for p in pairs]
    torch.testing.assert_close(step_losses, dpo_losses)
    torch.testing.assert_close(step_losses, torch.stack(naive), atol=1e-6, rtol=0)


@pytest.mark.parametrize("stage", ["05", "06"])
def test_max_length_drops_pairs_and_stops_when_none_is_left(run, capsys, stage):
    """05 and 06 share the --max-length filter: pairs longer than it are dropped and counted, and
    a run with none left stops with one line."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(run / "00_toy/model")

    def load(*flags):
        if stage == "05":
            return cdpo.load_pairs(run / "04_score_tokens/pairs.jsonl", args_for(cdpo, run, *flags))
        return stepdpo.load_step_pairs(run / "02_localize/pairs.jsonl", tok,
                                       args_for(stepdpo, run, *flags))

    every = load()
    longest = max(len(p["prompt_ids"]) + max(len(p["chosen_ids"]), len(p["rejected_ids"]))
                  for p in every)
    kept = load("--max-length", longest - 1)
    assert 0 < len(kept) < len(every)
    assert f"dropped {len(every) - len(kept)} pairs longer than --max-length" in \
        capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        load("--max-length", 5)
    assert e.value.code == 2 and "no pairs left to train on" in capsys.readouterr().err


def test_step_with_eos_text_is_refused(run, tmp_path, capsys):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(run / "00_toy/model")
    recs = metrics(run / "02_localize/pairs.jsonl")[:2]
    recs[1]["chosen"] += tok.eos_token
    bad = tmp_path / "steps.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in recs))
    with pytest.raises(SystemExit) as e:
        stepdpo.load_step_pairs(bad, tok, args_for(stepdpo, run))
    assert e.value.code == 2 and "EOS" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# The SFT selection rule (03)


def samples_of(groups):
    """groups: [(answer, correct, size)] -> samples with distinct texts."""
    return [{"text": f"{a}#{i}", "pred": a, "correct": c} for a, c, n in groups for i in range(n)]


def select(groups, **kw):
    pos, neg, pair = sft.select_examples(samples_of(groups), random.Random(0), **kw)
    answer = lambda t: t.split("#")[0]  # noqa: E731
    return ([answer(s["text"]) for s in pos], [answer(s["text"]) for s in neg],
            pair and tuple(answer(s["text"]) for s in pair))


def test_selection_budget_half_of_wrong_samples():
    # wrong: A 3, B 2, C 1, D 1 -> E = 7, budget ceil(3.5) = 4: A (4 -> 1), B (1 -> -1), stop
    groups = [("C", False, 1), ("9", True, 4), ("A", False, 3), ("D", False, 1), ("B", False, 2),
              ("8", True, 2)]
    assert select(groups) == (["9"], ["A", "B"], ("9", "A"))
    # wrong: four groups of 2 -> budget 4: two admitted (4 -> 2 -> 0), then budget 0 refuses
    assert len(select([(x, False, 2) for x in "ABCD"] + [("1", True, 1)])[1]) == 2
    assert select(groups, neg_top_p=1.0)[1] == ["A", "B"]  # C, D: singletons after the first
    assert select(groups, pos_top_k=2)[0] == ["9", "8"]


def test_selection_singletons_only_as_first_pick():
    # all wrong answers distinct: E = 3, budget 2, only the first singleton gets in
    pos, neg, pair = select([("X", False, 1), ("Y", False, 1), ("Z", False, 1), ("5", True, 1)])
    assert len(neg) == 1 and pair == ("5", neg[0])
    # one wrong sample: E = 1, budget 1, admitted as the first pick
    assert select([("X", False, 1), ("5", True, 3)])[1] == ["X"]


def test_selection_skips_empty_answers_and_missing_sides():
    assert select([("", False, 5), ("X", False, 1), ("5", True, 2)]) == (["5"], ["X"], ("5", "X"))
    assert select([("5", True, 3)]) == (["5"], [], None)  # no wrong side: no pair
    assert select([("X", False, 2), ("", True, 9)]) == ([], ["X"], None)
    assert select([("", False, 4)]) == ([], [], None)


def test_selection_never_takes_an_answer_cut_by_the_token_limit():
    # "9" would be the largest correct group and "A" the largest wrong one, were they not cut
    samples = samples_of([("9", True, 3), ("8", True, 1), ("A", False, 3), ("B", False, 2)])
    for s in samples:
        s["truncated"] = s["pred"] in ("9", "A")
    pos, neg, pair = sft.select_examples(samples, random.Random(0))
    assert [s["pred"] for s in pos] == ["8"] and [s["pred"] for s in neg] == ["B"]
    assert [s["pred"] for s in pair] == ["8", "B"]


def test_selection_is_seeded_and_ties_break_reproducibly():
    groups = [(x, False, 2) for x in "PQRS"] + [(y, True, 3) for y in "12"]
    picks = {tuple(x["text"] for x in sft.select_examples(samples_of(groups), random.Random(s))[2])
             for s in range(40)}
    assert len(picks) > 2  # ties (2 correct and 4 wrong groups of equal size) broken at random
    a = sft.select_examples(samples_of(groups), random.Random(7))
    assert a == sft.select_examples(samples_of(groups), random.Random(7))


def test_contrastive_sft_end_to_end(run):
    out = run / "03_contrastive_sft"
    sft.main(args_for(sft, run, "--max-steps", 2, "--batch-size", 8))
    summary = json.loads((out / "summary.json").read_text())
    c = summary["counts"]
    assert c["problems"] == 40 and c["pairs"] + c.get("skipped_no_correct", 0) + \
        c.get("skipped_no_wrong", 0) == 40
    pairs = metrics(out / "pairs.jsonl")
    assert len(pairs) == c["pairs"] and set(pairs[0]) >= {"id", "prompt", "chosen", "rejected"}
    for rec in pairs:
        assert rec["chosen"].endswith(f"The answer is {rec['answer']}.")
        assert not rec["rejected"].endswith(f"The answer is {rec['answer']}.")
    for name in ("pos", "neg"):
        assert len(metrics(out / f"metrics_{name}.jsonl")) == 2
        assert (out / name / "model.safetensors").exists()
        assert (out / name / "tokenizer_config.json").exists()
        assert summary["train"][name]["steps"] == 2
    a, b = weights(out / "pos"), weights(out / "neg")
    assert any(not torch.equal(a[k], b[k]) for k in a)  # trained on different sets


# --------------------------------------------------------------------------------------------------
# Training invariants, through the stages' main()


@pytest.mark.parametrize("extra", [[], ["--uniform"], ["--form", "position"]])
def test_cdpo_step0_is_ln2_and_rewards_0(run, tmp_path, extra):
    cdpo.main(args_for(cdpo, run, "--out", tmp_path, "--max-steps", 2, "--batch-size", 6,
                       "--micro-batch-size", 4, *extra))
    m = metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in m] == [0, 1]
    assert m[0]["loss"] == pytest.approx(LN2, abs=1e-4)
    assert abs(m[0]["chosen_reward"]) < 1e-5 and abs(m[0]["rejected_reward"]) < 1e-5
    assert set(m[0]) >= {"step", "loss", "reward_acc", "chosen_reward", "rejected_reward",
                         "margin", "grad_norm", "lr", "tokens_per_s"}
    cfg = json.loads((tmp_path / "model" / "training_config.json").read_text())
    assert cfg["method"] == ("dpo" if extra == ["--uniform"] else "cdpo")


def test_uniform_writes_to_the_dpo_dir(run):
    cdpo.main(args_for(cdpo, run, "--uniform", "--max-steps", 1, "--batch-size", 4))
    assert (run / "05_train_dpo" / "model" / "model.safetensors").exists()


def test_stepdpo_step0_is_ln2_and_rewards_0(run):
    stepdpo.main(args_for(stepdpo, run, "--max-steps", 2, "--batch-size", 6))
    out = run / "06_train_stepdpo"
    m = metrics(out / "metrics.jsonl")
    assert m[0]["loss"] == pytest.approx(LN2, abs=1e-4)
    assert abs(m[0]["chosen_reward"]) < 1e-5 and abs(m[0]["rejected_reward"]) < 1e-5
    assert (out / "model" / "model.safetensors").exists()


@pytest.mark.parametrize("stage", ["05", "06", "03"])
def test_gradient_accumulation_equals_one_big_batch(run, tmp_path, stage, monkeypatch):
    """4 micro-batches of 2 give the gradient of one batch of 8, its scale included (one step).
    Clipping is off (--max-grad-norm inf) and the optimizer is SGD with lr 1, so the weight
    change is the gradient itself and the logged grad_norm its norm: a loss divided by the
    micro-batch instead of the global batch (4x here) changes both. Adam's first step is
    ~lr * sign(g), blind to any scale, and clipping at 1 would rescale every norm above 1 to 1."""
    mod = {"05": cdpo, "06": stepdpo, "03": sft}[stage]
    monkeypatch.setattr(mod, "adamw", lambda model, lr, wd: torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad], lr=lr))
    final, norm = {}, {}
    for mbs in (8, 2):
        out = tmp_path / f"mbs{mbs}"
        mod.main(args_for(mod, run, "--out", out, "--max-steps", 1, "--batch-size", 8, "--lr", 1,
                          "--micro-batch-size", mbs, "--warmup-ratio", 0, "--max-grad-norm", "inf",
                          *(["--which", "pos"] if stage == "03" else [])))
        final[mbs] = weights(out / "pos" if stage == "03" else out / "model")
        norm[mbs] = metrics(out / ("metrics_pos.jsonl" if stage == "03" else
                                   "metrics.jsonl"))[0]["grad_norm"]
    base = weights(run / "00_toy" / "model")
    moved = torch.cat([(final[8][k] - base[k]).flatten() for k in base])  # = -gradient
    assert moved.abs().max() > 1e-2  # the step moved them
    assert moved.norm().item() == pytest.approx(norm[8], rel=1e-4)  # clipping was off
    assert norm[2] == pytest.approx(norm[8], rel=1e-5)
    for k in final[8]:
        torch.testing.assert_close(final[2][k], final[8][k], atol=1e-6, rtol=0, msg=k)


@pytest.mark.parametrize("stage", ["05", "06", "03"])
def test_packed_layout_trains_as_the_padded_one(run, tmp_path, stage, monkeypatch):
    """--layout packed (the default) and --layout padded: the same step-0 loss (ln 2 for the
    DPO family) and the same update (SGD with lr 1: the weight change is the clipped gradient)."""
    mod = {"05": cdpo, "06": stepdpo, "03": sft}[stage]
    monkeypatch.setattr(mod, "adamw", lambda model, lr, wd: torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad], lr=lr))
    final, loss0 = {}, {}
    for layout in ("padded", "packed"):
        out = tmp_path / layout
        mod.main(args_for(mod, run, "--out", out, "--max-steps", 1, "--batch-size", 8, "--lr", 1,
                          "--micro-batch-size", 8, "--warmup-ratio", 0, "--layout", layout,
                          *(["--which", "pos"] if stage == "03" else [])))
        final[layout] = weights(out / "pos" if stage == "03" else out / "model")
        loss0[layout] = metrics(out / ("metrics_pos.jsonl" if stage == "03" else
                                       "metrics.jsonl"))[0]["loss"]
    if stage != "03":
        assert loss0["packed"] == pytest.approx(LN2, abs=1e-6)
    assert loss0["packed"] == pytest.approx(loss0["padded"], abs=1e-6)
    base = weights(run / "00_toy" / "model")
    assert max((final["padded"][k] - base[k]).abs().max() for k in base) > 1e-2  # it moved
    for k in base:
        torch.testing.assert_close(final["packed"][k], final["padded"][k], atol=1e-6, rtol=0,
                                   msg=k)


def test_resume_equals_straight_run(run, tmp_path, monkeypatch):
    """A run killed during step 3 (after the checkpoint at step 2) and resumed gives the same
    per-step losses and final weights as an uninterrupted run."""
    common = ["--max-steps", 4, "--batch-size", 8, "--micro-batch-size", 4, "--lr", 3e-3]
    cdpo.main(args_for(cdpo, run, "--out", tmp_path / "straight", *common))

    calls, real = [0], cdpo.cdpo_loss

    def dies_in_step_3(*a, **kw):  # 2 micro-batches per step: call 5 is step 3's first
        calls[0] += 1
        if calls[0] == 5:
            raise KeyboardInterrupt("killed")
        return real(*a, **kw)

    out = tmp_path / "resumed"
    monkeypatch.setattr(cdpo, "cdpo_loss", dies_in_step_3)
    with pytest.raises(KeyboardInterrupt):
        cdpo.main(args_for(cdpo, run, "--out", out, "--save-every", 2, *common))
    monkeypatch.setattr(cdpo, "cdpo_loss", real)
    assert not (out / "model").exists() and (out / "checkpoints" / "step000002").is_dir()
    cdpo.main(args_for(cdpo, run, "--out", out, "--save-every", 2, "--resume", *common))

    a, b = metrics(tmp_path / "straight" / "metrics.jsonl"), metrics(out / "metrics.jsonl")
    assert [r["step"] for r in b] == [0, 1, 2, 3]
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], abs=1e-6)
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-5)
    wa, wb = weights(tmp_path / "straight" / "model"), weights(out / "model")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=1e-6, rtol=0, msg=k)


def test_checkpoint_restores_every_generator(tmp_path):
    """A checkpoint holds the state of every generator a training step draws from (torch's CPU
    generator, Python's random and, on a GPU, the device's generator), and load_checkpoint
    restores them over the reseeding a restart does (load_for_training seeds LoRA's init)."""
    model = tiny_llama()
    opt = adamw(model, 1e-3, 0.0)
    cuda = torch.cuda.is_available()

    def draws():
        return (torch.rand(4).tolist(), random.random(),
                torch.rand(4, device="cuda").tolist() if cuda else None)

    torch.manual_seed(1), random.seed(1)
    checkpoints.save_checkpoint(tmp_path, model, opt, step=3)
    expected = draws()
    torch.manual_seed(0), random.seed(0)  # a restart (torch.manual_seed seeds the GPUs too)
    assert checkpoints.load_checkpoint(tmp_path, model, opt) == 3
    assert draws() == expected


def test_lora_dropout_stop_and_resume_equals_straight(run, tmp_path, monkeypatch):
    """03 with LoRA (dropout 0.1: every step draws dropout masks) stopped after step 2 and
    resumed gives the straight run's losses and weights, bit for bit on CPU. A resume that does
    not restore the RNG states (the GPU's were not checkpointed before) draws step 0's masks
    again at step 2 and ends elsewhere: the comparison can tell."""
    import shutil
    sft_args = ["--which", "pos", "--lora-r", 4, "--lr", 1e-2, "--max-steps", 4,
                "--batch-size", 8, "--micro-batch-size", 4]
    straight, cut, unrestored = tmp_path / "straight", tmp_path / "cut", tmp_path / "unrestored"
    sft.main(args_for(sft, run, "--out", straight, *sft_args))
    sft.main(args_for(sft, run, "--out", cut, *sft_args, "--stop-after", 2))
    assert not (cut / "pos").exists() and len(metrics(cut / "metrics_pos.jsonl")) == 2
    shutil.copytree(cut, unrestored)
    sft.main(args_for(sft, run, "--out", cut, *sft_args, "--resume"))
    with monkeypatch.context() as m:
        m.setattr(checkpoints, "set_rng_state", lambda state: None)
        sft.main(args_for(sft, run, "--out", unrestored, *sft_args, "--resume"))

    loss = lambda out: [r["loss"] for r in metrics(out / "metrics_pos.jsonl")]  # noqa: E731
    assert loss(cut) == loss(straight)
    a, b = weights(straight / "pos"), weights(cut / "pos")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert loss(unrestored)[:2] == loss(straight)[:2]
    assert abs(loss(unrestored)[2] - loss(straight)[2]) > 1e-6 * loss(straight)[2], \
        "dropout made no difference: the test would not notice a lost RNG state"


def test_nan_loss_stops_and_keeps_the_last_good_save(run, tmp_path, monkeypatch, capsys):
    real = cdpo.cdpo_loss
    calls = [0]

    def nan_at_step_2(*a, **kw):
        calls[0] += 1
        losses, c, r = real(*a, **kw)
        return (losses * float("nan") if calls[0] == 3 else losses), c, r

    monkeypatch.setattr(cdpo, "cdpo_loss", nan_at_step_2)
    with pytest.raises(SystemExit) as e:
        cdpo.main(args_for(cdpo, run, "--out", tmp_path, "--max-steps", 4, "--batch-size", 4,
                           "--save-every", 1))
    err = capsys.readouterr().err
    assert e.value.code == 1 and "non-finite loss nan" in err and "at step 2" in err
    assert "last good checkpoint: step 2" in err
    assert not (tmp_path / "model").exists()
    assert [r["step"] for r in metrics(tmp_path / "metrics.jsonl")] == [0, 1]
