"""One cDPO training step on a randomly initialised Llama-3-8B-shaped model: tokens/s, peak memory
and MFU, with FSDP2 (fully_shard per decoder layer, then the root) and activation checkpointing.

    torchrun --nproc_per_node 1 bench/bench_gpu_step.py --shape 8b      # one 80 GB GPU, bf16
    torchrun --nproc_per_node 2 bench/bench_gpu_step.py --shape tiny    # the same code on CPU/gloo

On one GPU the parameters are kept in bf16 with AdamW states in bf16 too (16 GB weights +
16 GB gradients + 32 GB moments for 8B), so an 8B model fits an 80 GB card; on several GPUs FSDP2
shards all of it. The step is exactly 05_train_cdpo.py's: one concatenated (2B, T) forward through
common.token_logps, the loss of `cdpo_loss`, backward, clip, AdamW. Reference log-probs are taken
from the same model with no grad first (as 05 does before training). No weights are downloaded.
MFU = 6 * params * tokens / s / peak (989 TFLOP/s dense bf16 for an H100 SXM; --peak-tflops).
"""
import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from common import dist_init, dist_teardown, print0, token_logps  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--shape", default="8b", choices=["8b", "70b", "tiny"], help="model shape")
parser.add_argument("--batch-size", type=int, default=2, help="pairs per step per rank")
parser.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence (prompt+resp)")
parser.add_argument("--steps", type=int, default=4, help="timed steps (after one warm-up)")
parser.add_argument("--no-activation-checkpointing", action="store_true", help="keep activations")
parser.add_argument("--peak-tflops", type=float, default=989.0, help="device bf16 dense peak")

SHAPES = {  # Llama-3 configurations (vocab 128,256)
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                num_attention_heads=64, num_key_value_heads=8, vocab_size=128256),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=128256),
}


def main(args):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from transformers import LlamaConfig, LlamaForCausalLM
    spec = importlib.util.spec_from_file_location("cdpo", ROOT / "05_train_cdpo.py")
    cdpo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cdpo)

    rank, world, device = dist_init()
    on_gpu = device.type == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    cfg = LlamaConfig(**SHAPES[args.shape], max_position_embeddings=8192,
                      rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    if not args.no_activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    model.to_empty(device=device)
    with torch.no_grad():  # random init in place: the figures do not depend on the values
        for p in model.parameters():
            p.normal_(0, 0.02)
        rotary = model.model.rotary_emb  # its inv_freq buffer was on meta: recompute it
        rotary.inv_freq.copy_(rotary.compute_default_rope_parameters(cfg, device=device)[0])
    model.to(dtype)
    n_params = sum(p.numel() for p in model.parameters()) * world  # shards -> whole model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

    B, T = args.batch_size, args.seq_len
    g = torch.Generator().manual_seed(rank)
    ids = torch.randint(0, cfg.vocab_size, (2 * B, T), generator=g).to(device)  # (2B, T)
    mask = torch.ones_like(ids)
    weights = torch.zeros(2 * B, T - 1, device=device)
    weights[:, T // 4:] = torch.rand(2 * B, T - 1 - T // 4, generator=g).to(device)  # response
    with torch.no_grad():
        ref = token_logps(model, ids, mask)  # (2B, T-1): the reference pass of 05
    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()

    times = []
    for step in range(args.steps + 1):
        t0 = time.perf_counter()
        losses, _, _ = cdpo.cdpo_loss(token_logps(model, ids, mask), ref, weights, 0.1)
        losses.mean().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if on_gpu:
            torch.cuda.synchronize()
        if step:  # the first step warms up kernels and allocator
            times.append(time.perf_counter() - t0)
        print0(f"step {step} | loss {losses.mean().item():.4f} | {times[-1] if step else 0:.3f}s")
    dt = sorted(times)[len(times) // 2]
    tokens = 2 * B * T * world
    res = {"shape": args.shape, "world": world, "device": torch.cuda.get_device_name() if on_gpu
           else "cpu", "params_B": round(n_params / 1e9, 3), "pairs_per_rank": B, "seq_len": T,
           "activation_checkpointing": not args.no_activation_checkpointing,
           "step_s": round(dt, 3), "tokens_per_s": round(tokens / dt),
           "peak_mem_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 2) if on_gpu else None,
           # 6 N flops per token for forward + backward (+ the recompute of checkpointing, not
           # counted, as is usual for MFU)
           "mfu": round(6 * n_params * tokens / dt / (args.peak_tflops * 1e12 * world), 4)}
    print0(json.dumps(res))
    dist_teardown()


if __name__ == "__main__":
    main(parser.parse_args())
