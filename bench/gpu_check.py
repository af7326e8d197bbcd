"""The first-GPU check: an 8B-shaped random model through the pipeline's own training and sampling
code, each line PASS, FAIL or SKIP against runs/memory_plan.py's prediction (README's table).

    torchrun --nproc_per_node 1 bench/gpu_check.py            # one GPU, under 10 minutes
    torchrun --nproc_per_node 8 bench/gpu_check.py            # a node: the recipes' sharding
    torchrun --nproc_per_node 2 bench/gpu_check.py --shape tiny   # the same code on CPU/gloo

Phases (a phase the plan says cannot fit this machine is a SKIP that prints the arithmetic):
  full       full fine-tuning: common.load_for_training (rank 0 reads a bf16 checkpoint, FSDP2,
             float32 masters, bf16 compute, activation checkpointing), 4 accumulated
             micro-batches of 05's cDPO loss (--layout packed, the default, or padded),
             optimization.sync_gradients, clip, fused AdamW
  offload    the same with --cpu-offload (states in pinned host memory)
  lora       LoRA r16 on every projection over a bf16 frozen base, the same steps, then
             checkpoints.save_model (LoRA merged in the gathered state dict) checked against W + s B A
  sample     generation.generate at --batch-size auto (sampling.auto_batch_size), 512-token prompts
  resume     --resume on this device: a small LoRA model with dropout 0.1 (every step draws masks
             from the GPU's generator) through the training stages' step, 4 steps straight against 2, a
             checkpoint, a fresh model and 2 more, with deterministic kernels: PASS when losses
             and weights agree bit for bit (checkpoints.save_checkpoint holds every RNG state)
Each line: tokens/s, peak GPU memory (torch.cuda.max_memory_allocated) and, for full tuning, MFU
= 6 x params x tokens/s / (peak bf16 FLOP/s x GPUs) (recompute not counted, as usual), then what
the verdict checked and what it could not. PASS means every check listed passed:
  full, offload, lora  the model has the plan's parameter count (and LoRA its adapters' count),
                       every step's loss and gradient norm are finite, the measured peak is at
                       most 10% above the plan (GPU only: the plan is GPU memory), and LoRA's
                       saved weights are W + s B A
  sample               every row generated 1..N ids, all inside the vocabulary, ending as
                       generate says (an end id, or N ids), and on a GPU the memory the batch
                       took stays inside the budget --batch-size auto planned it for (80% of
                       the free memory)
  resume               bit for bit (above)
On CPU the memory checks cannot run: the line says so, and the verdict covers the rest. No
weights are downloaded: the checkpoint is random, written to --workdir.
"""
import argparse
import importlib.util
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "runs"))
import memory_plan  # noqa: E402
from common import (all_reduce_sum, dist_init, dist_teardown, get_rank,  # noqa: E402
                    get_world, load_for_training, print0, token_logps)
from machinery.checkpoints import (full_state_dict, load_checkpoint,  # noqa: E402
                                   save_checkpoint, save_model)
from machinery.models import load_model  # noqa: E402
from machinery.optimization import (adamw, clip_grad_norm, global_batch,  # noqa: E402
                                    MetricsLog, peak_memory_gb, sync_gradients)
from machinery.packing import collate_pairs  # noqa: E402
from machinery.sampling import auto_batch_size  # noqa: E402
from machinery.generation import generate  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--shape", default="llama3-8b", choices=[*memory_plan.SHAPES, "tiny"],
                    help="model shape (%(default)s; tiny: a CPU smoke run of the same code)")
parser.add_argument("--layers", type=int, default=0,
                    help="decoder layers (0 = the shape's); fewer keep the widths and kernels "
                         "but fit full tuning on a smaller machine")
parser.add_argument("--phases", default="full,offload,lora,sample,resume",
                    help="comma-separated")
parser.add_argument("--micro-batch-size", type=int, default=2, help="pairs per micro-batch")
parser.add_argument("--accumulation", type=int, default=4, help="micro-batches per step")
parser.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence")
parser.add_argument("--layout", default="packed", choices=["packed", "padded"],
                    help="training batches as 05 lays them out (%(default)s; the memory plan "
                         "assumes padded, an upper bound)")
parser.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up)")
parser.add_argument("--peak-tflops", type=float, default=989.0,
                    help="bf16 dense peak of one GPU (H100 SXM 989; H200 989; A100 312)")
parser.add_argument("--workdir", default="", help="where the random checkpoint goes (temp dir)")
parser.add_argument("--out", default="", help="also write the results as JSON lines here")

TINY = dict(hidden=64, inter=128, layers=2, heads=4, kv_heads=2, vocab=512)


def random_checkpoint(shape: dict, path: Path):
    """A bf16 Llama-architecture checkpoint with random weights and a word-level tokenizer over
    its whole vocabulary (rank 0 writes it)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    cfg = LlamaConfig(hidden_size=shape["hidden"], intermediate_size=shape["inter"],
                      num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                      num_key_value_heads=shape["kv_heads"], vocab_size=shape["vocab"],
                      max_position_embeddings=8192, tie_word_embeddings=False, bos_token_id=1,
                      eos_token_id=2, rope_parameters={"rope_type": "default",
                                                       "rope_theta": 500000.0})
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)  # HF's own random init
    model.save_pretrained(path)
    words = Tokenizer(models.WordLevel({f"t{i}": i for i in range(shape["vocab"])}, unk_token="t0"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=words, bos_token="t1", eos_token="t2",
                            pad_token="t0").save_pretrained(path)
    del model


def pairs_batch(shape, micro, T, seed, device, packed: bool):
    """One micro-batch of m random pairs as 05 feeds it (packing.collate_pairs, in the packed or
    the padded layout): prompt + response = T tokens, a quarter prompt, random cDPO weights on
    the rejected side; reference log-probs filled in by the caller."""
    g = torch.Generator().manual_seed(seed)
    P = T // 4
    ids = lambda n: torch.randint(3, shape["vocab"], (n,), generator=g).tolist()  # noqa: E731
    pairs = [{"prompt_ids": ids(P), "chosen_ids": ids(T - P), "rejected_ids": ids(T - P),
              "rejected_weights": torch.rand(T - P, generator=g).tolist()} for _ in range(micro)]
    return {k: v.to(device) for k, v in collate_pairs(pairs, 0, packed=packed).items()}


def train_phase(args, shape, path, device, world, lora: bool, offload: bool) -> dict:
    """Steps of accumulated micro-batches through the stages' own policy; returns figures."""
    from peft import LoraConfig
    spec = importlib.util.spec_from_file_location("cdpo", ROOT / "05_train_cdpo.py")
    cdpo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cdpo)
    lora_cfg = LoraConfig(r=16, lora_alpha=32, target_modules=cdpo.LORA_TARGETS,
                          task_type="CAUSAL_LM") if lora else None
    on_gpu = device.type == "cuda"
    t0 = time.perf_counter()
    model = load_for_training(path, device, bf16=on_gpu, cpu_offload=offload,
                              activation_checkpointing=True, lora=lora_cfg)
    load_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())  # DTensor.numel() is already global
    n_trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    opt = adamw(model, 1e-5, 0.0)
    m, A, T = args.micro_batch_size, args.accumulation, args.seq_len
    batches = [pairs_batch(shape, m, T, get_rank() * A + k, device, args.layout == "packed")
               for k in range(A)]
    with torch.no_grad():  # 05's reference pass: the initial policy, before any update
        for b in batches:
            b["ref_logps"] = token_logps(model, b).float()
    peak_memory_gb(device)  # reset: the figure is the steps' own
    times, finite = [], True
    for step in range(args.steps + 1):
        t = time.perf_counter()
        loss = 0.0  # the step's summed loss, on the device: one host sync a step, below
        for k, b in enumerate(batches):
            sync_gradients(model, last_micro_batch=k == A - 1)
            logps = token_logps(model, b)
            losses, _, _ = cdpo.cdpo_loss(logps.float(), b["ref_logps"], b["weights"], 0.1)
            (losses.sum() / (m * A)).backward()
            loss = loss + losses.detach().sum()
        finite &= math.isfinite(float(loss)) and math.isfinite(clip_grad_norm(model, 1.0))
        opt.step()
        opt.zero_grad(set_to_none=True)
        if on_gpu:
            torch.cuda.synchronize()
        if step:  # step 0 warms up kernels and allocates AdamW's moments
            times.append(time.perf_counter() - t)
    dt = sorted(times)[len(times) // 2]
    tokens = world * sum(int(b["attention_mask"].sum()) for b in batches)  # computed, all ranks
    res = {"params": n_params, "trained": n_trained, "finite": finite, "load_s": round(load_s, 1),
           "step_s": round(dt, 3), "tokens_per_s": round(tokens / dt),
           "peak_gb": round(peak_memory_gb(device), 2)}
    if not lora:
        res["mfu"] = round(6 * n_params * tokens / dt / (args.peak_tflops * 1e12 * world), 4)
    if lora:  # save_model merges in the gathered state dict: check one layer against W + s B A
        sd = full_state_dict(model)
        out = Path(args.workdir) / "lora_merged"
        t = time.perf_counter()
        save_model(model, _tokenizer(path), out, dtype=torch.bfloat16)
        res["save_s"] = round(time.perf_counter() - t, 1)
        if get_rank() == 0:
            from safetensors import safe_open
            key = "base_model.model.model.layers.0.self_attn.q_proj"
            a, b = sd[f"{key}.lora_A.default.weight"], sd[f"{key}.lora_B.default.weight"]
            want = (sd[f"{key}.base_layer.weight"].float() + 2.0 * b.float() @ a.float())
            saved = {}
            for f in out.glob("*.safetensors"):
                with safe_open(str(f), "pt") as st:
                    if "model.layers.0.self_attn.q_proj.weight" in st.keys():
                        saved = st.get_tensor("model.layers.0.self_attn.q_proj.weight")
            res["merge_max_err"] = float((saved.float() - want.bfloat16().float()).abs().max())
    del model, opt
    return res


def _tokenizer(path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(path))


def sample_phase(args, shape, path, device) -> dict:
    on_gpu = device.type == "cuda"
    model = load_model(path, device, torch.bfloat16 if on_gpu else torch.float32)
    tok = _tokenizer(path)
    P, N = 512, 256 if on_gpu else 8
    free = torch.cuda.mem_get_info(device)[0] if on_gpu else None  # what auto-sizing sees
    batch = auto_batch_size(model, P, N, device, free=free) if on_gpu else 4
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, shape["vocab"], (batch, P), generator=g).tolist()
    peak_memory_gb(device)
    held = torch.cuda.memory_allocated(device) if on_gpu else 0
    t = time.perf_counter()
    outs = generate(model, tok, prompts, seeds=list(range(batch)), temperature=1.0, top_p=0.95,
                    max_new_tokens=N)
    dt = time.perf_counter() - t
    took = torch.cuda.max_memory_allocated(device) - held if on_gpu else None
    new = sum(len(o["ids"]) for o in outs)
    gen_eos = model.generation_config.eos_token_id  # generate stops at these and the tokenizer's
    ends = {tok.eos_token_id, *([gen_eos] if isinstance(gen_eos, int) else gen_eos or [])}
    well_formed = len(outs) == batch and all(
        1 <= len(o["ids"]) <= N and all(0 <= i < shape["vocab"] for i in o["ids"])
        and (o["finish"] == "length" and len(o["ids"]) == N
             or o["finish"] == "eos" and o["ids"][-1] in ends) for o in outs)
    res = {"batch": batch, "new_tokens": new, "tokens_per_s": round(new / dt),
           "peak_gb": round(peak_memory_gb(device), 2), "rows_ok": well_formed,
           "took_gb": round(took / 1e9, 2) if on_gpu else None,
           "budget_gb": round(0.8 * free / 1e9, 2) if on_gpu else None}
    del model
    return res


def resume_phase(args, device) -> dict:
    """Straight vs stopped-and-resumed LoRA training (module docstring); returns the losses of
    both and the largest weight difference."""
    from peft import LoraConfig
    # with CUBLAS_WORKSPACE_CONFIG (main sets it); an op with no deterministic kernel warns
    torch.use_deterministic_algorithms(True, warn_only=True)
    path = Path(args.workdir) / "resume_model"
    if get_rank() == 0 and not (path / "config.json").exists():
        random_checkpoint(TINY, path)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(3, TINY["vocab"], (16, 64), generator=g).to(device)  # 16 records

    def run(out, stop_after, resume):
        model = load_for_training(path, device, lora=LoraConfig(
            r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["q_proj", "v_proj", "up_proj"]))
        opt = adamw(model, 1e-3, 0.0)

        # the optimizer step of 03/05/06 (global_batch, micro-batches of 2, accumulation,
        # clip, AdamW), 4 steps of 8 records; stop_after: checkpoint there and stop
        step = load_checkpoint(out / "checkpoints", model, opt, resume)
        log = MetricsLog(out / "metrics.jsonl", resume_step=step)
        rank, world, norm = get_rank(), get_world(), 8 * 63  # the loss: mean over 8 x 63 tokens
        while step < 4:
            mine = global_batch(len(rows), 8, 0, step)[rank::world]
            total = torch.zeros((), dtype=torch.float64, device=device)
            for s in range(0, len(mine), 2):
                sync_gradients(model, last_micro_batch=s + 2 >= len(mine))
                idx = mine[s:s + 2]
                logps = token_logps(model, {"input_ids": rows[idx],
                                            "attention_mask": torch.ones_like(rows[idx])})
                nll = -logps.float().sum()  # (m, T-1) -> summed
                (nll * world / norm).backward()
                total += nll.detach().double()
            clip_grad_norm(model, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            log.log({"step": step, "loss": all_reduce_sum(total).item() / norm})
            step += 1
            if step == stop_after:
                save_checkpoint(out / "checkpoints", model, opt, step)
                break
        losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").open()]
        return losses, full_state_dict(model)

    straight, w_straight = run(Path(args.workdir) / "straight", 0, False)
    run(Path(args.workdir) / "cut", 2, False)
    resumed, w_resumed = run(Path(args.workdir) / "cut", 0, True)
    torch.use_deterministic_algorithms(False)
    diff = max(((w_straight[k] - w_resumed[k]).abs().max().item() for k in w_straight),
               default=0.0)
    return {"straight": straight, "resumed": resumed, "max_weight_diff": diff}


def main(args):
    if "resume" in args.phases.split(","):  # before CUDA starts: cuBLAS reads it once
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    rank, world, device = dist_init()
    on_gpu = device.type == "cuda"
    shape = dict(TINY if args.shape == "tiny" else memory_plan.SHAPES[args.shape])
    if args.layers:
        shape["layers"] = args.layers
    workdir = [args.workdir or (tempfile.mkdtemp(prefix="gpu_check_") if rank == 0 else None)]
    if torch.distributed.is_initialized():
        torch.distributed.broadcast_object_list(workdir, src=0)  # one dir for all ranks
    args.workdir = workdir[0]
    path = Path(args.workdir) / "random_model"
    if rank == 0 and not (path / "config.json").exists():
        t = time.perf_counter()
        random_checkpoint(shape, path)
        print0(f"random {args.shape} checkpoint ({memory_plan.n_params(shape)[0] / 1e9:.2f}B "
               f"parameters, {len(shape) and shape['layers']} layers) in "
               f"{time.perf_counter() - t:.0f}s: {path}")
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    gpu_gb = torch.cuda.get_device_properties(device).total_memory / 1e9 if on_gpu else 0.0
    host_gb = memory_plan.host_gb()
    results = []
    for phase in args.phases.split(","):
        lora, offload = phase == "lora", phase == "offload"
        if phase == "sample":
            res = sample_phase(args, shape, path, device)
            checks = {"rows well-formed": res["rows_ok"],
                      "memory within auto's budget": res["took_gb"] <= res["budget_gb"]
                      if on_gpu else None}
            line = (f"batch {res['batch']}{' (auto)' if on_gpu else ''}, {res['tokens_per_s']} "
                    f"new tokens/s, peak {res['peak_gb']} GB of {gpu_gb:.0f}" +
                    (f", generate took {res['took_gb']} GB of the {res['budget_gb']} GB "
                     "budget" if on_gpu else ""))
        elif phase == "resume":
            res = resume_phase(args, device)
            checks = {"bit for bit": res["straight"] == res["resumed"]
                      and res["max_weight_diff"] == 0.0}
            line = (f"losses straight {res['straight']}, resumed {res['resumed']}, largest "
                    f"weight difference {res['max_weight_diff']:.3g}")
        else:
            plan = memory_plan.plan(shape, world, 16 if lora else 0,
                                    memory_plan.ATTN + memory_plan.MLP if lora else [],
                                    args.micro_batch_size, 2, offload, T=args.seq_len)
            need_host = plan["host"]["offloaded states (node)"] + plan["host"]["rank 0 load"]
            if on_gpu and (plan["gpu_total"] > 0.95 * gpu_gb or need_host > 0.9 * host_gb):
                print0(f"SKIP {phase}: the plan needs {plan['gpu_total']:.1f} GB a GPU "
                       f"(of {gpu_gb:.0f}) and {need_host:.0f} GB of host memory (of "
                       f"{host_gb:.0f}); try --layers or more GPUs")
                continue
            res = train_phase(args, shape, path, device, world, lora, offload)
            res["planned_gb"] = round(plan["gpu_total"], 2)
            base = memory_plan.n_params(shape)[0]
            adapters = memory_plan.n_lora(shape, 16, memory_plan.ATTN + memory_plan.MLP)
            checks = {"parameters as planned": (res["params"], res["trained"]) == (
                          (base + adapters, adapters) if lora else (base, base)),
                      "finite loss and grad norm": res["finite"],
                      "peak <= 1.1 x plan": res["peak_gb"] <= 1.1 * plan["gpu_total"]
                      if on_gpu else None}
            if lora:  # rank 0 checks the saved file; the others have nothing to compare
                checks["merge = W + s B A"] = res.get("merge_max_err", 0.0) <= 0.02
            line = (f"{res['params'] / 1e9:.2f}B params ({res['trained'] / 1e9:.3f}B trained), "
                    f"{res['tokens_per_s']} tokens/s, peak {res['peak_gb']} GB vs planned "
                    f"{res['planned_gb']} GB" + (f", MFU {res['mfu']:.1%}" if "mfu" in res else "")
                    + (f", merge error {res.get('merge_max_err', 0):.2g}, save {res['save_s']}s"
                       if lora else ""))
        failed = [k for k, ok in checks.items() if ok is False]
        verdict = "FAIL" if failed else "PASS"
        line += (f" | failed: {', '.join(failed)}" if failed else "") + " | checked: " + ", ".join(
            k for k, ok in checks.items() if ok is not None) + "".join(
            f"; not checked on CPU: {k}" for k, ok in checks.items() if ok is None)
        res.update(phase=phase, verdict=verdict, checks=checks, shape=args.shape,
                   layers=shape["layers"],
                   world=world, device=torch.cuda.get_device_name(device) if on_gpu else "cpu")
        print0(f"{verdict} {phase}: {line}")
        results.append(res)
    if rank == 0 and args.out:
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in results))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # every rank is done with the workdir before rank 0 removes it
    if rank == 0 and not os.environ.get("GPU_CHECK_KEEP"):
        shutil.rmtree(args.workdir, ignore_errors=True)
    dist_teardown()
    if any(r["verdict"] == "FAIL" for r in results):
        raise SystemExit(1)


if __name__ == "__main__":
    main(parser.parse_args())
