"""Training mechanics of 03, 05 and 06: FSDP2, the optimizer, the step loop, checkpoints, metrics.
No losses here: each stage brings its own.

  flags        add_training_args (one vocabulary for the three training stages), warmup_steps,
               check_batch, fit_batch, batch_layout (--layout packed, or padded where the
               model's attention cannot take the packed rows' mask)
  model        training_policy -> load_for_training: rank 0 reads the checkpoint, FSDP2 per decoder
               layer (shard_model), optional LoRA (peft), bf16 and activation checkpointing
  optimizer    adamw (decay on matrices only), lr_at (warmup, cosine or linear decay),
               global_batch (seeded epochs), sync_gradients, clip_grad_norm
  the loop     optimize: the optimizer steps of 03 (SFT) and of the DPO family, around a
               per-micro-batch loss the stage passes in
  resume       save_checkpoint / load_checkpoint (torch.distributed.checkpoint, trained params,
               optimizer and every RNG a step draws from)
  metrics      MetricsLog (JSONL + one '|' line per step), peak_memory_gb
  saving       save_model gathers the full state dict, merges LoRA (merge_lora), writes safetensors
"""
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from batches import packing_unsupported
from common import (all_reduce_sum, barrier, dist_init, fail, get_rank, get_world, load_model,
                    print0, read_json, read_jsonl, seed_for, write_json, write_jsonl)



def add_training_args(parser, *, lr: float, epochs: int, batch_size: int, micro_batch_size: int,
                      warmup_ratio: float, schedule: str, weight_decay: float, max_length: int):
    """The optimization, scale and checkpoint flags of 03, 05 and 06 (one vocabulary); the
    stage passes its own defaults (the toy run)."""
    g = parser.add_argument_group("optimization")
    g.add_argument("--lr", type=float, default=lr, help="peak AdamW learning rate (%(default)s)")
    g.add_argument("--epochs", type=int, default=epochs, help="passes over the data (%(default)s)")
    g.add_argument("--max-steps", type=int, default=0,
                   help="optimizer steps; 0 = epochs * (records // batch size)")
    g.add_argument("--batch-size", type=int, default=batch_size,
                   help="records per optimizer step, all ranks together (%(default)s)")
    g.add_argument("--micro-batch-size", type=int, default=micro_batch_size,
                   help="records per forward on one rank; gradients accumulate (%(default)s)")
    g.add_argument("--warmup-ratio", type=float, default=warmup_ratio,
                   help="share of the steps with linear warmup (%(default)s)")
    g.add_argument("--warmup-steps", type=int, default=0,
                   help="warmup steps; > 0 overrides --warmup-ratio (the cDPO SFT release: 100)")
    g.add_argument("--schedule", default=schedule, choices=["cosine", "linear", "constant"],
                   help="decay after warmup (%(default)s)")
    g.add_argument("--weight-decay", type=float, default=weight_decay,
                   help="AdamW decay of the matrices (%(default)s)")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="clip at (%(default)s)")
    g.add_argument("--max-length", type=int, default=max_length,
                   help="drop records longer than this many tokens, prompt + response "
                        "(%(default)s)")
    g = parser.add_argument_group("batch layout")
    g.add_argument("--layout", default="packed", choices=["packed", "padded"],
                   help="packed (default): each pair's context once, then both responses, "
                        "records packed into rows without padding between them; padded: one "
                        "right-padded row per response (the classic layout; the fallback where "
                        "the attention takes no custom mask)")
    g.add_argument("--row-tokens", type=int, default=0,
                   help="packed rows hold up to this many tokens (0, the default: as many as "
                        "the micro-batch's longest record). Longer rows pack tighter, but "
                        "attention under a mask costs row length squared: BENCHMARKS.md")
    g = parser.add_argument_group("scale")
    g.add_argument("--lora-r", type=int, default=0, help="LoRA rank (alpha 2r); 0 = full tuning")
    g.add_argument("--bf16", action="store_true", help="bf16 compute, float32 master weights")
    g.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute activations in backward (less memory, ~30%% more time)")
    g.add_argument("--cpu-offload", action="store_true", help="FSDP2 parameters on the host")
    g.add_argument("--trust-remote-code", action="store_true",
                   help="allow model code from the checkpoint (off: it can execute anything)")
    g = parser.add_argument_group("checkpoints")
    g.add_argument("--save-every", type=int, default=0,
                   help="sharded checkpoint every N optimizer steps (0 = none)")
    g.add_argument("--keep-checkpoints", type=int, default=1,
                   help="checkpoints kept on disk, newest first (%(default)s)")
    g.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in the output dir")
    g.add_argument("--stop-after", type=int, default=0,
                   help="checkpoint and exit after this many steps (a job's time slot); run "
                        "again with --resume for the uninterrupted run's result (on GPUs: "
                        "README, Multi-GPU)")


def batch_layout(args, model) -> dict:
    """collate keywords for --layout: packed where the model's attention can take the packed
    rows' mask (batches.packing_unsupported), else padded, said in one line."""
    if args.layout == "packed":
        why = packing_unsupported(model, args.max_length)
        if why is None:
            return {"packed": True, "row_tokens": args.row_tokens}
        print0(f"--layout packed: {why}; training on the padded layout")
    return {}


def warmup_steps(args, total: int) -> int:
    """--warmup-steps when given, else --warmup-ratio of the total steps."""
    return args.warmup_steps or round(args.warmup_ratio * total)


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


def decoder_layers(model):
    """The list of transformer blocks (Llama, Qwen2, Mistral, DeepSeek: model.model.layers)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.model.layers


def sharded() -> bool:
    """Training is FSDP2-sharded under torchrun: over several ranks, or over one GPU (that is how
    --cpu-offload works on a single card). Plain `python`, or one CPU process, trains one
    unsharded model (gloo's one-rank collectives made a toy step ~50x slower here)."""
    return dist.is_initialized() and (get_world() > 1 or torch.cuda.is_available())


def shard_model(model, device, bf16: bool = False, cpu_offload: bool = False,
                activation_checkpointing: bool = False):
    """FSDP2: fully_shard each decoder layer, then the root. Trained parameters stay float32
    masters; with --bf16 compute runs in bf16 and gradients are reduced in float32. Without a
    process group the model is only moved to the device."""
    if activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if not sharded():
        return model.to(device)
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
    kw = {}
    if bf16:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                               reduce_dtype=torch.float32)
    if cpu_offload:  # pinned host memory exists only with CUDA
        kw["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
    for layer in decoder_layers(model):
        fully_shard(layer, **kw)
    fully_shard(model, **kw)
    if any(p.is_meta for p in model.parameters()):  # built on meta: allocate, the caller fills it
        model.to_empty(device="cpu" if cpu_offload else device)
    elif not cpu_offload:
        model.to(device)
    # fully_shard moves buffers (rotary inv_freq) with the parameters: to the host when
    # offloading, where the forward (on the GPU) cannot use them and NCCL cannot broadcast them.
    for module in model.modules():
        for name, buf in module._buffers.items():
            if buf is not None:
                module._buffers[name] = buf.to(device)
    return model


def load_for_training(path, device, bf16=False, cpu_offload=False, activation_checkpointing=False,
                      lora=None, trust_remote_code=False):
    """The policy for 03/05/06. Under torchrun only rank 0 reads the checkpoint; other ranks build
    the model on the meta device and receive their shards by broadcast, so 8 ranks never each hold
    a 70B copy in host memory. `lora` is a peft.LoraConfig or None (full fine-tuning).

    Dtypes: trained parameters are float32 masters (LoRA adapters included). The frozen base of
    a LoRA run with --bf16 is kept in bf16: it is only read, by bf16 compute, and float32 would
    double it (Llama-3-70B: 141 GB instead of 282). Rank 0 reads a full-tuning checkpoint in its
    own dtype (Llama-3 ships bf16); the copy into each rank's float32 shard upcasts exactly."""
    from transformers import AutoConfig, AutoModelForCausalLM
    base_dtype = torch.bfloat16 if lora is not None and bf16 else torch.float32
    if not sharded() or get_world() == 1:
        model = load_model(path, "cpu", base_dtype, trust_remote_code)
    else:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                              set_model_state_dict)
        full = load_model(path, "cpu", base_dtype if lora is not None else "auto",
                          trust_remote_code) if get_rank() == 0 else None
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=base_dtype)
    if lora is not None:
        from peft import get_peft_model
        torch.manual_seed(0)  # LoRA A init: same on every rank and run
        model = get_peft_model(model, lora)  # adapters in float32 (peft's autocast_adapter_dtype)
        if get_world() > 1 and get_rank() == 0:
            torch.manual_seed(0)  # the LoRA init that is broadcast = the 1-process one
            full = get_peft_model(full, lora)
    model = shard_model(model, device, bf16, cpu_offload, activation_checkpointing)
    if get_world() > 1:
        sd = full.state_dict() if get_rank() == 0 else {}
        set_model_state_dict(model, sd, options=StateDictOptions(
            full_state_dict=True, broadcast_from_rank0=True))
        # Buffers (rotary inv_freq) are in no state dict: rank 0 sends its own, dtype included.
        names = [n for n, _ in model.named_buffers()]
        bufs = [full.get_buffer(n) for n in names] if get_rank() == 0 else [None] * len(names)
        meta = [[(b.dtype, b.shape) for b in bufs] if get_rank() == 0 else None]
        dist.broadcast_object_list(meta, src=0)
        for name, buf, (dtype, shape) in zip(names, bufs, meta[0]):
            owner, leaf = model.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2]
            t = buf.to(device) if get_rank() == 0 else torch.empty(shape, dtype=dtype,
                                                                   device=device)
            dist.broadcast(t, src=0)
            owner._buffers[leaf] = t
        del full
    return model


def training_policy(args, model_path, device, lora_targets: list[str], lora_dropout: float):
    """The model, its AdamW and its autocast as add_training_args' flags describe them (03, 05,
    06): FSDP2 over the ranks (load_for_training), with LoRA of rank --lora-r (alpha 2r) on
    lora_targets when that is set."""
    lora = None
    if args.lora_r:
        from peft import LoraConfig
        lora = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=lora_dropout,
                          target_modules=lora_targets, task_type="CAUSAL_LM")
    model = load_for_training(model_path, device, args.bf16, args.cpu_offload,
                              args.activation_checkpointing, lora, args.trust_remote_code)
    return model, adamw(model, args.lr, args.weight_decay), autocast_for(device, args.bf16)


def autocast_for(device, bf16: bool):
    """bf16 compute in one process (under FSDP2 its MixedPrecisionPolicy does it); else a no-op."""
    return torch.autocast(device.type, torch.bfloat16, enabled=bf16 and not sharded())


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
    return all_reduce_sum(peak, dist.ReduceOp.MAX).item()


def rng_state() -> dict:
    """Every generator a training step draws from: torch's CPU generator (LoRA dropout on CPU),
    this rank's GPU generator (dropout on a GPU) and Python's `random`; numpy draws nothing here.
    The data order needs no state: global_batch is a pure function of (seed, step)."""
    state = {"cpu": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()  # the current device: dist_init sets it
    return state


def set_rng_state(state: dict):
    torch.set_rng_state(state["cpu"])
    random.setstate(state["python"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def _train_state(model, opt):
    """(model, optimizer) state dicts of the trained parameters only: a LoRA checkpoint holds the
    adapters and their moments, not the frozen base (70B: ~1 GB instead of 141 GB per save)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    msd, osd = get_state_dict(model, opt, options=StateDictOptions(ignore_frozen_params=True))
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in msd.items() if k in trained}, osd  # a tied lm_head slips through


def latest_checkpoint(ckpt_dir) -> int | None:
    """The step of the newest whole checkpoint in ckpt_dir, or None. A damaged latest.json, or
    one naming a checkpoint that is not there, stops with one line."""
    latest = Path(ckpt_dir) / "latest.json"
    if not latest.exists():
        return None
    hint = f"delete {ckpt_dir} to train from the start"
    step = read_json(latest, {"step": int}, hint)["step"]
    if not (Path(ckpt_dir) / f"step{step:06d}" / ".metadata").is_file():
        fail(f"{Path(ckpt_dir) / f'step{step:06d}'}: no whole checkpoint, though {latest} names "
             f"it; {hint}")
    return step


def save_checkpoint(ckpt_dir, model, opt, step: int, keep: int = 1):
    """Sharded torch.distributed.checkpoint of the trained parameters + optimizer, plus each
    rank's RNG states (rng_state); then all but the newest `keep` checkpoints are deleted (after
    latest.json names the new one, so a kill at any point leaves one whole checkpoint). The
    schedule is a pure function of `step` and the data order of (seed, step), so (weights,
    moments, step, RNG) is everything --resume needs to continue exactly."""
    import torch.distributed.checkpoint as dcp
    ckpt_dir = Path(ckpt_dir)
    msd, osd = _train_state(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(ckpt_dir / f"step{step:06d}"))
    torch.save(rng_state(), ckpt_dir / f"step{step:06d}" / f"rng{get_rank()}.pt")
    barrier()
    if get_rank() == 0:
        write_json(ckpt_dir / "latest.json", {"step": step})
        for old in sorted(ckpt_dir.glob("step*"))[:-keep]:
            shutil.rmtree(old)
    barrier()


def load_checkpoint(ckpt_dir, model, opt, resume: bool = True) -> int:
    """--resume: restore the latest checkpoint in ckpt_dir (weights, moments, RNG states) and
    return its step (0 when there is none). Call it after the model is built: load_for_training
    seeds LoRA's initialization, and the restored RNG states must come after that. A fresh run
    (resume=False) starts clean: rank 0 deletes what an earlier run left there."""
    if not resume:
        if get_rank() == 0 and Path(ckpt_dir).exists():
            shutil.rmtree(ckpt_dir)
        return 0
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
    step = latest_checkpoint(ckpt_dir)
    if step is None:
        return 0
    path = Path(ckpt_dir) / f"step{step:06d}"
    msd, osd = _train_state(model, opt)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=str(path))
    # dcp.load fails on any trained tensor the checkpoint lacks; the frozen ones are not in it
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=StateDictOptions(strict=False))
    set_rng_state(torch.load(path / f"rng{get_rank()}.pt", weights_only=True))
    return step


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


def optimize(args, model, opt, n: int, B: int, micro_batch_loss, normaliser, ckpt: Path,
             metrics: Path, model_dir: Path, derived=None) -> dict | None:
    """The optimizer steps of 03, 05 and 06 over n records, B per step; the stage brings the loss:

      micro_batch_loss(indices) -> (loss, stats): over those records, the loss summed (a scalar
          with gradient) and other sums to log, 0-d tensors by name ('tokens': input tokens,
          logged per second)
      normaliser(batch) -> what the step's loss is a mean over, given the global batch's record
          indices: B pairs (DPO family) or the batch's response tokens (SFT)
      derived(means) -> further metrics from the logged means (DPO: the reward margin)

    --max-steps steps, or --epochs passes over the records. Logs one record a step to `metrics`
    (the loss and each stat summed over the global batch / normaliser), checkpoints into `ckpt`.
    Returns {steps, final_loss} when all steps are done (the caller saves the model to
    model_dir), None when --stop-after ended the run early; a non-finite loss or gradient norm
    stops with exit code 1 before that update.
    """
    rank, world, device = dist_init()  # already joined by main(): this only returns them
    mbs = args.micro_batch_size
    total = args.max_steps or args.epochs * (n // B)
    warmup = warmup_steps(args, total)
    step = load_checkpoint(ckpt, model, opt, args.resume)  # fresh run: starts clean
    if step:
        print0(f"resumed at step {step} from {ckpt}")
    log = MetricsLog(metrics, resume_step=step)

    model.train()
    loss = float("nan")
    while step < total:
        t0 = time.time()
        peak_memory_gb(device)  # reset: each step logs its own peak
        lr = lr_at(step, total, args.lr, warmup, args.schedule)
        for group in opt.param_groups:
            group["lr"] = lr
        batch = global_batch(n, B, args.seed, step)  # the same B indices on every rank
        mine = batch[rank::world]  # this rank's share
        norm = normaliser(batch)
        sums = 0  # then float64 (1 + len(stats),): [loss, *stats] summed over this rank's share
        for s in range(0, len(mine), mbs):
            sync_gradients(model, last_micro_batch=s + mbs >= len(mine))
            loss_sum, stats = micro_batch_loss(mine[s:s + mbs])
            # The step's loss is (sum over the global batch) / norm. Each micro-batch adds its
            # sum / norm, times world because FSDP averages gradients over ranks: the update is
            # the 1-process update on the whole global batch, for any split into ranks and
            # micro-batches.
            (loss_sum * world / norm).backward()
            sums = sums + torch.stack([loss_sum.detach(), *stats.values()]).double()
        grad_norm = clip_grad_norm(model, args.max_grad_norm)
        totals = dict(zip(["loss", *stats], all_reduce_sum(sums).cpu().tolist()))  # all ranks
        tokens = totals.pop("tokens")
        means = {k: v / norm for k, v in totals.items()}  # the loss: mean over pairs or tokens
        loss = means["loss"]
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            last = latest_checkpoint(ckpt)
            print0(f"error: non-finite loss {loss} (grad norm {grad_norm}) at step {step}; "
                   f"stopped before applying it. {model_dir} was not written; last good "
                   f"checkpoint: {f'step {last} in {ckpt}' if last else 'none'}; try a lower "
                   "--lr or check the data", file=sys.stderr)
            raise SystemExit(1)
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.time() - t0
        log.log({"step": step, **means, **(derived(means) if derived else {}),
                 "grad_norm": grad_norm, "lr": lr, "tokens_per_s": tokens / dt, "dt": dt,
                 "peak_mem_gb": peak_memory_all_ranks(device)})
        step += 1
        if step < total and (args.save_every and step % args.save_every == 0
                             or step == args.stop_after):
            save_checkpoint(ckpt, model, opt, step, args.keep_checkpoints)
        if step == args.stop_after and step < total:
            print0(f"stopped after step {step} (--stop-after); --resume finishes {model_dir}")
            return None
    return {"steps": total, "final_loss": loss}


def full_state_dict(model) -> dict:
    """All parameters gathered to rank 0 on CPU (other ranks get {}); plain dict unsharded."""
    if not sharded():
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                 cpu_offload=True))


def merge_lora(sd: dict, model) -> dict:
    """Fold each LoRA adapter into its base weight inside a gathered peft state dict, one tensor
    at a time in float32, and return the base model's state dict (names without peft's
    'base_model.model.' and '.base_layer'):

        W' = W + s * B @ A        W (out, in), A (r, in), B (out, r), s = lora_alpha / r

    (peft's merge_and_unload computes the same; doing it here needs no second model on the host)."""
    from peft.tuners.lora import LoraLayer
    for name, layer in model.named_modules():
        if isinstance(layer, LoraLayer):
            if layer.use_dora.get("default") or getattr(layer, "fan_in_fan_out", False):
                raise NotImplementedError(f"{name}: only plain LoRA on Linear layers is merged")
            a = sd.pop(f"{name}.lora_A.default.weight").float()  # (r, in)
            b = sd.pop(f"{name}.lora_B.default.weight").float()  # (out, r)
            w = sd[f"{name}.base_layer.weight"]  # (out, in)
            sd[f"{name}.base_layer.weight"] = torch.addmm(w.float(), b, a,
                                                          alpha=layer.scaling["default"])
    return {k.removeprefix("base_model.model.").replace(".base_layer.", "."): v
            for k, v in sd.items()}


def save_model(model, tok, out_dir, extra: dict | None = None, dtype=torch.float32):
    """Write an ordinary HF model dir (safetensors, `dtype`: the training recipe's, bf16 with
    --bf16) on rank 0; LoRA adapters are merged first (merge_lora), so later stages load a plain
    model. Writes into a temp dir and renames: a kill leaves no half-written model."""
    sd = full_state_dict(model)
    if get_rank() == 0:
        out_dir = Path(out_dir)
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        base = model.get_base_model() if hasattr(model, "peft_config") else model
        if hasattr(model, "peft_config"):
            sd = merge_lora(sd, model)
        # Tied weights (embeddings = LM head) come back from an FSDP gather as separate tensors,
        # which save_pretrained would store twice: keep each parameter's first name.
        seen = set()
        for name, p in base.named_parameters(remove_duplicate=False):
            if id(p) in seen:
                sd.pop(name.replace(".base_layer.", "."), None)
            seen.add(id(p))
        for k in sd:  # one tensor at a time: no second full copy on the host
            sd[k] = sd[k].to(dtype)
        base.save_pretrained(tmp, state_dict=sd, safe_serialization=True)
        write_json(tmp / "config.json", {**json.loads((tmp / "config.json").read_text()),
                                         "dtype": str(dtype).removeprefix("torch.")})
        tok.save_pretrained(tmp)
        if extra:
            write_json(tmp / "training_config.json", extra)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    barrier()
