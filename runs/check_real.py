"""The invariants of a real-model run (runs/real_cpu.sh), checked on the files the stages wrote.

    python runs/check_real.py --run-dir runs/smollm2 --model runs/smollm2/model

  01  every sample graded (pred, correct, truncated, eos_id); some right and some wrong; at least
      one problem with both (cDPO needs it); a truncated sample is never right
  02  step pairs non-empty; chosen != rejected; prefix + rejected is a prefix of a sample's text
  03  pairs non-empty; pos/ and neg/ load as ordinary HF dirs (AutoModelForCausalLM from
      safetensors, AutoTokenizer with the base model's vocabulary), give finite logits on a
      prompt, and differ from each other (trained on different sets)
  04  weights parallel to ids, in [0, 1]; prompt_ids = the prompt tokenized as the tokenizer
      starts a text (SmolLM2: no BOS added, the template's <|im_start|> once at the front);
      chosen and rejected end with their end id (<|im_end|>)
  05  (cDPO and DPO) and 06 (Step-DPO): step 0 loss = ln 2 (policy = reference), rewards 0
      (a missing loss or reward field fails: it is not read as 0)
  07  every label's results.json: 0 <= lo <= accuracy <= hi <= 1, n > 0, for each data set
Prints one line per check and exits 1 on the first failure.
"""
import argparse
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def rows(path):
    path = Path(path)
    assert path.is_file(), f"{path}: missing"
    out = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()
           if line.strip()]
    assert out, f"{path}: empty"
    return out


def check_01(run: Path) -> str:
    recs = rows(run / "01_sample/samples.jsonl")
    samples = [s for r in recs for s in r["samples"]]
    for s in samples:
        assert {"text", "pred", "correct", "truncated", "eos_id"} <= s.keys(), s.keys()
        assert not (s["truncated"] and s["correct"]), "a truncated sample graded right"
    right = sum(s["correct"] for s in samples)
    mixed = sum(0 < sum(s["correct"] for s in r["samples"]) < len(r["samples"]) for r in recs)
    assert 0 < right < len(samples), f"01: {right} of {len(samples)} samples right"
    assert mixed > 0, "01: no problem has both right and wrong samples"
    cut = sum(s["truncated"] for s in samples)
    return (f"01 {len(recs)} problems, {len(samples)} samples: {right} right "
            f"({right / len(samples):.0%}), {mixed} problems mixed, {cut} truncated")


def check_02(run: Path) -> str:
    pairs = rows(run / "02_localize/pairs.jsonl")
    texts = {r["id"]: [s["text"] for s in r["samples"]]
             for r in rows(run / "01_sample/samples.jsonl")}
    for p in pairs:
        assert p["chosen"] != p["rejected"], f"02 {p['id']}: chosen == rejected"
        assert p["rejected"].strip(), f"02 {p['id']}: empty rejected step"
        assert any(t.startswith(p["prefix"] + p["rejected"]) for t in texts[p["problem_id"]]), \
            f"02 {p['id']}: prefix + rejected is no sample's beginning"
    return f"02 {len(pairs)} step pairs from {len({p['problem_id'] for p in pairs})} problems"


def check_03(run: Path, model: Path) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    pairs = rows(run / "03_contrastive_sft/pairs.jsonl")
    vocab = AutoTokenizer.from_pretrained(str(model)).get_vocab()
    weights = {}
    for side in ("pos", "neg"):
        d = run / "03_contrastive_sft" / side
        assert list(d.glob("*.safetensors")), f"03: no safetensors in {d}"
        tok = AutoTokenizer.from_pretrained(str(d))
        assert tok.get_vocab() == vocab, f"03: {d}'s tokenizer is not the base model's"
        lm = AutoModelForCausalLM.from_pretrained(str(d), use_safetensors=True).eval()
        ids = torch.tensor([tok(pairs[0]["prompt"], add_special_tokens=False).input_ids])
        with torch.no_grad():
            logits = lm(input_ids=ids).logits
        assert torch.isfinite(logits).all(), f"03: {d} gives non-finite logits"
        weights[side] = {k: v.detach().clone() for k, v in lm.state_dict().items()}
        del lm
    assert any(not torch.equal(weights["pos"][k], weights["neg"][k]) for k in weights["pos"]), \
        "03: pos/ and neg/ hold the same weights"
    return (f"03 {len(pairs)} pairs; pos/ and neg/ load as HF models (safetensors, the base "
            "model's tokenizer), give finite logits and differ")


def check_04(run: Path, model: Path) -> str:
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(model))
    lead = tok("7").input_ids[:-len(tok("7", add_special_tokens=False).input_ids)]
    pairs = rows(run / "04_score_tokens/pairs.jsonl")
    for p in pairs:
        for side in ("chosen", "rejected"):
            ids, w = p[f"{side}_ids"], p[f"{side}_weights"]
            assert len(ids) == len(w), f"04 {p['id']}: {side} weights not parallel to ids"
            assert all(0.0 <= x <= 1.0 for x in w), f"04 {p['id']}: {side} weight out of [0, 1]"
            assert ids[-1] in {tok.eos_token_id, *_ends(model)}, \
                f"04 {p['id']}: {side} does not end with an end id ({ids[-1]})"
        bare = tok(p["prompt"], add_special_tokens=False).input_ids
        want = bare if bare[:len(lead)] == lead else lead + bare
        assert p["prompt_ids"] == want, f"04 {p['id']}: prompt ids are not the tokenizer's"
        if tok.bos_token_id is not None:
            assert p["prompt_ids"][:2].count(tok.bos_token_id) <= 1, f"04 {p['id']}: two BOS"
    starts = tok.convert_ids_to_tokens(pairs[0]["prompt_ids"][:2])
    return (f"04 {len(pairs)} scored pairs; weights parallel to ids; prompts start {starts} "
            f"(tokenizer adds {tok.convert_ids_to_tokens(lead) or 'nothing'})")


def _ends(model: Path) -> set[int]:
    gen = json.loads((model / "generation_config.json").read_text())
    eos = gen.get("eos_token_id")
    return set() if eos is None else {eos} if isinstance(eos, int) else set(eos)


def check_train(run: Path, stage: str) -> str:
    m = rows(run / stage / "metrics.jsonl")
    first = m[0]
    missing = {"step", "loss", "chosen_reward", "rejected_reward", "margin"} - first.keys()
    assert not missing, f"{stage}: step 0 metrics lack {sorted(missing)}"
    assert first["step"] == 0, f"{stage}: first metrics step {first['step']}"
    assert abs(first["loss"] - math.log(2)) < 1e-3, f"{stage}: step 0 loss {first['loss']} != ln 2"
    for k in ("chosen_reward", "rejected_reward"):
        assert abs(first[k]) < 1e-3, f"{stage}: step 0 {k} {first[k]}"
    assert (run / stage / "model" / "model.safetensors").is_file(), f"{stage}: no model"
    last = m[-1]
    return (f"{stage} {len(m)} steps: step 0 loss {first['loss']:.4f} (ln 2) and rewards 0; "
            f"last loss {last['loss']:.4f}, margin {last['margin']:.3f}")


def check_07(run: Path) -> str:
    found = []
    for path in sorted((run).glob("07_eval*/*/results.json")):
        r = json.loads(path.read_text())
        lo, hi = r["ci95"]
        assert r["n"] > 0, f"{path}: n = 0"
        assert 0 <= lo <= r["accuracy"] <= hi <= 1, f"{path}: CI {r['ci95']} vs {r['accuracy']}"
        found.append(f"{path.parent.parent.name}/{path.parent.name}")
    assert found, f"{run}: no 07_eval*/<label>/results.json"
    return f"07 {len(found)} results with 95% CIs: {', '.join(found)}"


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", default="runs/smollm2")
    ap.add_argument("--model", default="runs/smollm2/model")
    args = ap.parse_args()
    run, model = Path(args.run_dir), Path(args.model)
    checks = [lambda: check_01(run), lambda: check_02(run), lambda: check_03(run, model),
              lambda: check_04(run, model), lambda: check_train(run, "05_train_cdpo"),
              lambda: check_train(run, "05_train_dpo"),
              lambda: check_train(run, "06_train_stepdpo"), lambda: check_07(run)]
    for c in checks:
        try:
            print("ok  " + c(), flush=True)
        except AssertionError as e:
            print(f"FAIL {e}", flush=True)
            sys.exit(1)


if __name__ == "__main__":
    main()
