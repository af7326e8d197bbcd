"""What the first multi-GPU run depends on, shown on CPU with gloo and the real stages: gradient
accumulation keeps gradients sharded (peak memory), LoRA checkpoints hold only what is trained and
old ones are deleted, LoRA is merged in the gathered state dict exactly as peft merges it, a
LoRA run keeps its frozen base in bf16, and the process group can carry CPU tensors."""
import importlib.util
import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, run_script, tiny_llama


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def wide_model(mini_chain, tmp_path_factory):
    """A 34M-parameter model with the toy tokenizer: its float32 gradient (134 MB) stands well
    out of the resident set size's noise (~5 MB) and, with activation checkpointing, above a
    micro-batch's activations."""
    from transformers import AutoConfig, LlamaForCausalLM
    src = mini_chain / "00_toy" / "model"
    cfg = AutoConfig.from_pretrained(src)
    cfg.update(dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=8,
                    num_attention_heads=8, num_key_value_heads=8))
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("wide")
    LlamaForCausalLM(cfg).save_pretrained(out)
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, out / f.name)
    return out


def test_accumulation_keeps_gradients_sharded(mini_chain, wide_model, tmp_path, monkeypatch):
    """2 ranks, activation checkpointing. Peak memory of one step with 4 accumulated micro-batches
    of 1 pair (global batch 8) exceeds that of 1 micro-batch of 1 pair (batch 2) by no more than
    a micro-batch's activations (measured: 1 micro-batch of 2 pairs, batch 4). Full fine-tuning
    reduce-scatters every micro-batch; keeping the unsharded float32 gradients until the last
    micro-batch (FSDP2's set_requires_gradient_sync(False)) adds half the model's gradient per
    rank (67 MB here; measured on this machine: +16 MB reduce-scattering, +43 MB not, with one
    pair's activations 15 MB)."""
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")  # freed tensors leave the RSS at once
    n_params = sum(t.numel() for t in load_file(str(wide_model / "model.safetensors")).values())
    peak = {}
    for batch, micro in ((2, 1), (8, 1), (4, 2)):
        out = tmp_path / f"batch{batch}"
        run_script("05_train_cdpo", "--run-dir", mini_chain, "--model", wide_model, "--out", out,
                   "--limit", 8, "--max-steps", 2, "--batch-size", batch,
                   "--micro-batch-size", micro, "--activation-checkpointing", nproc=2)
        peak[batch] = metrics(out)[1]["peak_mem_gb"]  # step 1: step 0 also allocates AdamW
    blow_up = 4 * n_params / 2 / 1e9  # GB: the unsharded gradient beyond this rank's shard
    activations = peak[4] - peak[2]  # one more pair in the micro-batch
    assert peak[2] > 0.2 and blow_up > 3 * max(activations, 0.01), (peak, blow_up)
    assert peak[8] - peak[2] < activations + blow_up / 2, (
        f"accumulation 4 peaks at {peak[8]:.3f} GB, accumulation 1 at {peak[2]:.3f} GB, one "
        f"pair's activations {activations:.3f} GB: gradients were kept unsharded "
        f"({blow_up:.3f} GB)")


LORA = ["--lora-r", 4, "--lr", 1e-2, "--batch-size", 8, "--micro-batch-size", 2,
        "--warmup-ratio", 0.25]


def test_lora_checkpoints_hold_only_adapters_and_resume_exactly(mini_chain, tmp_path):
    """--save-every 1 on 2 ranks: one checkpoint left on disk (the newest), holding the adapters
    and their AdamW moments, not the frozen base; a run cut after step 2 and resumed ends with
    the uninterrupted run's losses and merged weights."""
    from torch.distributed.checkpoint import FileSystemReader
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    run_script("05_train_cdpo", "--run-dir", mini_chain, "--out", straight, *LORA,
               "--max-steps", 4, nproc=2)
    run_script("05_train_cdpo", "--run-dir", mini_chain, "--out", cut, *LORA, "--max-steps", 4,
               "--save-every", 1, "--stop-after", 3, nproc=2)
    ckpts = sorted(p.name for p in (cut / "checkpoints").glob("step*"))
    assert ckpts == ["step000003"], ckpts
    keys = FileSystemReader(str(cut / "checkpoints" / "step000003")).read_metadata() \
        .state_dict_metadata.keys()
    model_keys = [k for k in keys if k.startswith("model.")]
    assert model_keys and all(".lora_A." in k or ".lora_B." in k for k in model_keys), model_keys
    assert any(k.startswith("optim.state.") and ".lora_" in k for k in keys)
    run_script("05_train_cdpo", "--run-dir", mini_chain, "--out", cut, *LORA, "--max-steps", 4,
               "--resume", nproc=2)
    assert [r["loss"] for r in metrics(cut)] == pytest.approx(
        [r["loss"] for r in metrics(straight)], abs=1e-5)
    a, b = (load_file(str(d / "model" / "model.safetensors")) for d in (straight, cut))
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=0, msg=k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_lora_merge_equals_peft_merge_and_unload(dtype):
    """checkpoints.merge_lora on a plain state dict (what rank 0 gathers) = peft's merge_and_unload,
    for a float32 base and for the bf16 frozen base of a --bf16 LoRA run (merged in float32)."""
    from peft import LoraConfig, get_peft_model
    from machinery.checkpoints import merge_lora
    model = tiny_llama(vocab=64, hidden=32, tie=True).to(dtype)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=[
        "q_proj", "v_proj", "gate_proj", "down_proj"]))
    torch.manual_seed(1)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:  # peft starts B at 0 (a no-op adapter): give it something to merge
            p.data.normal_(0, 0.5)
    sd = {k: v.detach().clone() for k, v in peft_model.state_dict().items()}
    base = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
            for k, v in sd.items() if "lora_" not in k}
    merged = merge_lora(sd, peft_model)
    want = peft_model.merge_and_unload().state_dict()
    assert merged.keys() == want.keys() == base.keys()
    for k, v in want.items():  # ours stays float32 until save_model casts it to the save dtype
        torch.testing.assert_close(merged[k].to(v.dtype).float(), v.float(), atol=1e-6, rtol=0,
                                   msg=k)
    moved = {k for k in want if not torch.equal(want[k], base[k])}
    assert moved and all(k.endswith(("q_proj.weight", "v_proj.weight", "gate_proj.weight",
                                     "down_proj.weight")) for k in moved), moved


def test_bf16_lora_keeps_its_frozen_base_in_bf16(mini_chain):
    """--lora-r with --bf16: the frozen base is bf16 (half of float32), the adapters trained in
    float32."""
    from peft import LoraConfig
    from common import load_for_training
    model = load_for_training(mini_chain / "00_toy" / "model", torch.device("cpu"), bf16=True,
                              lora=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert {d for n, d in dtypes.items() if "lora_" in n} == {torch.float32}
    assert {d for n, d in dtypes.items() if "lora_" not in n} == {torch.bfloat16}


def test_process_group_carries_cpu_tensors(tmp_path):
    """On GPUs the group is NCCL for CUDA tensors plus gloo for CPU ones (--cpu-offload's
    parameters and gradient norms live on the host); the runtime accepts that spec, and dist_init
    under torchrun makes a group whose CPU collectives work and sets explicit thread counts."""
    from common import process_group_backend
    assert process_group_backend(cuda=True) == "cuda:nccl,cpu:gloo"
    assert process_group_backend(cuda=False) == "gloo"
    script = tmp_path / "pg.py"
    script.write_text(
        "import json, sys, torch, torch.distributed as dist\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from common import dist_init, dist_teardown, get_rank\n"
        "rank, world, device = dist_init()\n"
        "x = torch.ones(3) * (rank + 1)\n"
        "dist.all_reduce(x)\n"
        f"open(f'{tmp_path}/rank{{rank}}.json', 'w').write(json.dumps(dict(sum=x.tolist(), "
        "backend=dist.get_backend_config(), threads=torch.get_num_threads())))\n"
        # Without destroy_process_group a gloo rank can abort at exit ("terminate called without an
        # active exception", about 1 run in 4 here) when its peer closes the socket first.
        "dist_teardown()\n")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node", "2", str(script)], capture_output=True, text=True,
                       timeout=120, env={**__import__("os").environ, "CPU_THREADS": "3"})
    assert r.returncode == 0, r.stderr[-3000:]
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["sum"] == [3.0] * 3 and "cpu:gloo" in got["backend"] and got["threads"] == 3, got


def test_cpu_threads(monkeypatch):
    """torchrun's OMP_NUM_THREADS=1 does not pin rank 0's host work to one core: the cores are
    shared by the local ranks, unless CPU_THREADS or a larger OMP_NUM_THREADS says otherwise."""
    import os
    from common import cpu_threads
    cores = len(os.sched_getaffinity(0))
    monkeypatch.delenv("CPU_THREADS", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert cpu_threads() == cores
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(2 * cores))
    assert cpu_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "6")
    assert cpu_threads() == 6
    monkeypatch.setenv("CPU_THREADS", "5")
    assert cpu_threads() == 5
    monkeypatch.setenv("CPU_THREADS", "1")
    assert cpu_threads() == 1


@pytest.mark.parametrize("nproc", [1, 2])
def test_gpu_check_counts_parameters_once(tmp_path, nproc):
    """bench/gpu_check.py on CPU (its tiny shape, the same code): its parameter count (hence its
    MFU) is the model's on any number of ranks (DTensor.numel() is already global), its LoRA
    count the adapters', and its LoRA save merges W + s B A."""
    from transformers import LlamaConfig, LlamaForCausalLM
    sys.path.insert(0, str(ROOT / "runs"))
    import memory_plan
    out = tmp_path / "check.jsonl"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node", str(nproc), str(ROOT / "bench" / "gpu_check.py"),
                        "--shape", "tiny", "--phases", "full,lora", "--seq-len", "32",
                        "--steps", "1", "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    full, lora = (json.loads(line) for line in out.read_text().splitlines())
    assert full["world"] == lora["world"] == nproc
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)  # importing it runs nothing
    s = gpu_check.TINY
    cfg = LlamaConfig(hidden_size=s["hidden"], intermediate_size=s["inter"],
                      num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                      num_key_value_heads=s["kv_heads"], vocab_size=s["vocab"],
                      tie_word_embeddings=False)
    assert full["params"] == full["trained"] == sum(
        p.numel() for p in LlamaForCausalLM(cfg).parameters())
    assert lora["trained"] == memory_plan.n_lora(s, 16, memory_plan.ATTN + memory_plan.MLP)
    assert lora["merge_max_err"] == 0.0 and full["verdict"] == lora["verdict"] == "PASS"
