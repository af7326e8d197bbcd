"""Scale without changing tools: training under torchrun (2 CPU processes, gloo, FSDP2) gives the
1-process result, and a run cut short and resumed gives the uninterrupted one. Real stages as
subprocesses on the miniature toy chain's pairs; no mocked runtime.
(01_sample under torchrun: tests/test_sample_eval.py.)"""
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_script

# lr 1e-4, not larger: at step 0 chosen and rejected share most tokens, so some gradient entries
# cancel to float32 rounding noise, which Adam (update ~ lr * g / |g|) turns into steps of up to
# ~lr in whichever direction the noise falls. Any split into ranks or micro-batches sums in another
# order, so those entries differ by a few percent of lr: 2.8e-5 at lr 1e-3 (over the 1e-5 bar),
# 1.4e-6 at lr 1e-4, while the loss still moves 0.69 -> 0.64 in 4 steps.
# Clipping off: AdamW's update does not change when every gradient is multiplied by a constant, so
# losses and weights cannot see a gradient's scale; each step's logged grad_norm (taken before
# clipping, over all ranks' shards) does, and is compared too.
TRAIN = ["--max-steps", 4, "--batch-size", 8, "--micro-batch-size", 2, "--lr", 1e-4,
         "--warmup-ratio", 0.25, "--max-grad-norm", "inf"]


def losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def grad_norms(out):
    return [json.loads(line)["grad_norm"]
            for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_steps(a, b):
    """Per-step losses and gradient norms of two runs: a gradient off by a factor (a lost or
    doubled `* world`, a loss divided by one rank's share of the batch) fails the second."""
    assert losses(b) == pytest.approx(losses(a), abs=1e-4)
    assert grad_norms(b) == pytest.approx(grad_norms(a), rel=1e-4)


def assert_same_weights(a, b, atol):
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=atol, rtol=0, msg=k)


@pytest.fixture(scope="module")
def one_process(mini_chain, tmp_path_factory):
    out = tmp_path_factory.mktemp("cdpo1")
    run_script("05_train_cdpo", "--run-dir", mini_chain, "--out", out, *TRAIN)
    return out


def test_two_processes_equal_one(mini_chain, one_process, tmp_path):
    """Same global batch of 8: 1 rank x 4 micro-batches of 2 vs 2 ranks x 2 micro-batches."""
    run_script("05_train_cdpo", "--run-dir", mini_chain, "--out", tmp_path, *TRAIN, nproc=2)
    a = losses(one_process)
    assert len(a) == len(losses(tmp_path)) == 4
    assert_same_steps(one_process, tmp_path)
    assert a[-1] != pytest.approx(a[0], abs=1e-3), "the loss never moved: nothing was compared"
    assert_same_weights(one_process / "model", tmp_path / "model", atol=1e-5)
    base = load_file(str(mini_chain / "00_toy/model/model.safetensors"))
    trained = load_file(str(one_process / "model/model.safetensors"))
    moved = torch.cat([(trained[k] - base[k]).abs().flatten() for k in base])
    assert moved.median() > 1e-5 * 10, "weights barely moved: 1e-5 would compare nothing"


def test_two_processes_stop_and_resume_equal_straight(mini_chain, one_process, tmp_path):
    """--stop-after 2 writes a sharded checkpoint and exits; --resume finishes the run."""
    run_script("05_train_cdpo", "--run-dir", mini_chain, "--out", tmp_path, *TRAIN,
               "--stop-after", 2, nproc=2)
    assert not (tmp_path / "model").exists() and len(losses(tmp_path)) == 2
    assert (tmp_path / "checkpoints" / "step000002").is_dir()
    run_script("05_train_cdpo", "--run-dir", mini_chain, "--out", tmp_path, *TRAIN, "--resume",
               nproc=2)
    assert_same_steps(one_process, tmp_path)
    assert_same_weights(one_process / "model", tmp_path / "model", atol=1e-5)


def test_sft_stop_and_resume_equal_straight(mini_chain, tmp_path):
    """03 trains two models: a stop in the first, a resume that finishes it and starts the second,
    a stop there, and a resume that keeps the finished first model and completes the second."""
    sft = ["--run-dir", mini_chain, "--max-steps", 4, "--batch-size", 4, "--micro-batch-size", 2]
    run_script("03_contrastive_sft", *sft, "--out", tmp_path / "straight")
    cut = tmp_path / "cut"
    run_script("03_contrastive_sft", *sft, "--out", cut, "--stop-after", 2)
    assert not (cut / "pos").exists()
    run_script("03_contrastive_sft", *sft, "--out", cut, "--stop-after", 2, "--resume")
    assert (cut / "pos" / "train.json").exists() and not (cut / "neg").exists()
    run_script("03_contrastive_sft", *sft, "--out", cut, "--resume")
    for name in ("pos", "neg"):
        assert_same_weights(tmp_path / "straight" / name, cut / name, atol=1e-6)


def test_lora_two_processes_equal_one_and_save_a_merged_model(mini_chain, tmp_path):
    """--lora-r: adapters only are trained, merged on save into an ordinary model whose
    non-adapted tensors are the base model's; 2 ranks give the 1-rank result."""
    lora = [*TRAIN, "--lora-r", 4, "--lr", 1e-2]
    run_script("05_train_cdpo", "--run-dir", mini_chain, "--out", tmp_path / "one", *lora)
    run_script("05_train_cdpo", "--run-dir", mini_chain, "--out", tmp_path / "two", *lora,
               nproc=2)
    assert_same_steps(tmp_path / "one", tmp_path / "two")
    assert_same_weights(tmp_path / "one" / "model", tmp_path / "two" / "model", atol=1e-5)
    base = load_file(str(mini_chain / "00_toy/model/model.safetensors"))
    merged = load_file(str(tmp_path / "one" / "model/model.safetensors"))
    assert merged.keys() == base.keys()
    changed = {k for k in base if not merged[k].equal(base[k])}
    assert changed and all(k.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight",
                                       "o_proj.weight", "gate_proj.weight", "up_proj.weight",
                                       "down_proj.weight")) for k in changed), changed


def test_memory_options_change_memory_not_results(mini_chain, one_process, tmp_path):
    """--activation-checkpointing (recompute in backward) and --cpu-offload (FSDP2 keeps
    parameters, gradients and optimizer state on the host) under 2 ranks: the same numbers."""
    run_script("05_train_cdpo", "--run-dir", mini_chain, "--out", tmp_path, *TRAIN,
               "--activation-checkpointing", "--cpu-offload", nproc=2)
    assert_same_steps(one_process, tmp_path)
    assert_same_weights(one_process / "model", tmp_path / "model", atol=1e-5)
