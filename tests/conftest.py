"""Shared test helpers: load numbered stages (01_x is no identifier) and build tiny real models."""
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def load_stage(name: str):
    """Import a numbered stage script (e.g. '05_train_cdpo') as a module; importing runs nothing."""
    spec = importlib.util.spec_from_file_location(f"stage_{name}", ROOT / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def tiny_llama(vocab: int = 64, hidden: int = 32, layers: int = 2, heads: int = 2, seed: int = 0,
               tie: bool = False):
    """A randomly initialised real LlamaForCausalLM, small enough for any test."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=heads, max_position_embeddings=512,
                      tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture
def tiny_model():
    return tiny_llama()


@pytest.fixture(scope="session")
def toy_world(tmp_path_factory):
    """A tiny toy world built once per test session by the real 00_toy.py (seconds, untrained
    quality): <run>/00_toy/{model/, train.jsonl, dev.jsonl, test.jsonl}. Returns the run dir."""
    import subprocess
    run = tmp_path_factory.mktemp("toyrun")
    cmd = [sys.executable, str(ROOT / "00_toy.py"), "--run-dir", str(run), "--n-train", "300",
           "--n-test", "20", "--n-dev", "20", "--max-steps", "20", "--min-steps", "20",
           "--hidden", "32", "--layers", "2", "--heads", "2"]
    subprocess.run(cmd, check=True, capture_output=True)
    return run
