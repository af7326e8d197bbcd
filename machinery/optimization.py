"""What the optimizer step of 03, 05 and 06 calls: small functions that return a value.

  batches      check_batch, fit_batch (the global batch), global_batch (a step's record indices:
               seeded epochs), batch_layout (--layout packed, or padded where the model's
               attention cannot take the packed rows' mask)
  optimizer    adamw (decay on matrices only), lr_at and warmup_steps (warmup, then cosine or
               linear decay)
  gradients    sync_gradients (FSDP2 accumulation), clip_grad_norm (over all ranks' shards),
               stop_if_not_finite (before a bad update is applied)
  metrics      MetricsLog (JSONL + one '|' line per step), peak_memory_gb
The loop itself is in each stage; checkpoints and saving are machinery/checkpoints.py.
"""
import json
import math
import sys
from pathlib import Path

import torch

from common import (all_reduce_max, fail, get_rank, get_world, print0, read_jsonl, seed_for,
                    write_jsonl)
from machinery.checkpoints import latest_checkpoint
from machinery.packing import packing_unsupported


def check_batch(args):
    """Stop early on a global batch the ranks cannot share."""
    if args.batch_size < 1 or args.micro_batch_size < 1:
        fail("--batch-size and --micro-batch-size must be >= 1")
    if args.batch_size % get_world():
        fail(f"--batch-size {args.batch_size} is not divisible by {get_world()} ranks")


def fit_batch(args, n: int, what: str) -> int:
    """The global batch for n records: --batch-size, or all there is (down to a multiple of the
    ranks) when a tiny run has fewer records; at least one record per rank."""
    world = get_world()
    if n < world:
        fail(f"{n} {what} for {world} ranks: need at least one per rank")
    B = min(args.batch_size, n - n % world)
    if B < args.batch_size:
        print0(f"only {n} {what}: the global batch is {B}, not --batch-size {args.batch_size}")
    return B


def global_batch(n: int, batch_size: int, seed: int, step: int) -> list[int]:
    """Record indices of optimizer step `step`. Each epoch is a fresh seeded permutation of
    range(n) cut into n // batch_size batches (the remainder waits for another epoch's shuffle).
    A pure function of (seed, step): --resume needs no data state and ranks agree without talking;
    rank r then takes batch[r::world]."""
    per_epoch = n // batch_size
    epoch, k = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(seed_for(seed, "epoch", epoch))
    order = torch.randperm(n, generator=g).tolist()
    return order[k * batch_size:(k + 1) * batch_size]


def batch_layout(args, model) -> dict:
    """collate keywords for --layout: packed where the model's attention can take the packed
    rows' mask (packing.packing_unsupported), else padded, said in one line."""
    if args.layout == "packed":
        why = packing_unsupported(model, args.max_length)
        if why is None:
            return {"packed": True, "row_tokens": args.row_tokens}
        print0(f"--layout packed: {why}; training on the padded layout")
    return {}


def adamw(model, lr: float, weight_decay: float, betas=(0.9, 0.999), fused: bool = True):
    """AdamW over the trained parameters (LoRA: the adapters only). Weight decay applies to the
    matrices (ndim >= 2: linear weights, embeddings, LoRA's A and B), not to 1-D parameters
    (norm gains, biases). fused=True: PyTorch's fused kernel on GPU and CPU alike (so also for
    --cpu-offload's host states); its default for FSDP2's DTensor parameters, and for any CPU
    tensor, is a Python loop over the tensors. (00_toy keeps that loop, fused=False: the fused
    kernel rounds differently, and the toy model's weights stay what they were.)"""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)


def warmup_steps(args, total: int) -> int:
    """--warmup-steps when given, else --warmup-ratio of the total steps."""
    return args.warmup_steps or round(args.warmup_ratio * total)


def lr_at(step: int, total: int, peak: float, warmup: int, schedule: str = "cosine") -> float:
    """Linear warmup over `warmup` steps, then cosine or linear decay to 0 at `total` steps."""
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    if schedule == "cosine":
        return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
    if schedule == "linear":
        return peak * max(0.0, 1 - frac)
    return peak  # constant


def sync_gradients(model, last_micro_batch: bool):
    """FSDP2 gradient accumulation. Full fine-tuning reduce-scatters every micro-batch: skipping
    the sync would keep each layer's whole (unsharded, float32) gradient on every rank until the
    last micro-batch, 4 bytes per parameter per GPU (Llama-3-70B: 282 GB). LoRA's gradients are
    small, so it reduces once per step, after the last micro-batch."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(last_micro_batch or not hasattr(model, "peft_config"))


def clip_grad_norm(model, max_norm: float) -> float:
    """Clip the global gradient norm (all ranks' shards together); returns the norm before."""
    norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                          max_norm)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def stop_if_not_finite(loss: float, grad_norm: float, step: int, ckpt, model_dir):
    """Exit with code 1, before the update is applied, when the step's loss or gradient norm is
    not finite (a NaN would spread into every weight), naming the last good checkpoint."""
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return
    last = latest_checkpoint(ckpt)
    print0(f"error: non-finite loss {loss} (grad norm {grad_norm}) at step {step}; stopped "
           f"before applying it. {model_dir} was not written; last good checkpoint: "
           f"{f'step {last} in {ckpt}' if last else 'none'}; try a lower --lr or check the data",
           file=sys.stderr)
    raise SystemExit(1)


class MetricsLog:
    """One JSONL record and one '|'-separated log line per optimizer step (rank 0 writes).
    Resuming keeps the records of steps before the resume point and drops the rest."""

    def __init__(self, path, resume_step: int = 0):
        self.path = Path(path)
        if get_rank() == 0:
            kept = []
            if resume_step and self.path.exists():
                kept = [r for r in read_jsonl(self.path) if r["step"] < resume_step]
            write_jsonl(self.path, kept)

    def log(self, rec: dict):
        if get_rank() != 0:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")
        fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
        print(" | ".join(f"{k} {fmt(v)}" for k, v in rec.items()), flush=True)


def peak_memory_gb(device) -> float:
    """This process's peak memory since the previous call, in GB, then reset: allocated memory
    on a GPU; on CPU the peak resident set size (VmHWM, reset by writing 5 to
    /proc/self/clear_refs; Linux only, 0.0 elsewhere)."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        return peak / 1e9
    try:
        with open("/proc/self/status") as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return kb * 1024 / 1e9
    except (OSError, StopIteration):
        return 0.0


def peak_memory_all_ranks(device) -> float:
    """The largest peak_memory_gb over ranks (and its reset on each)."""
    peak = torch.tensor([peak_memory_gb(device)], dtype=torch.float64, device=device)
    return all_reduce_max(peak).item()
