"""Checkpoints and the trained model: resume exactly, and write an ordinary HF model at the end.

  resume       save_checkpoint / load_checkpoint / latest_checkpoint: torch.distributed.checkpoint
               of the trained parameters and optimizer, plus every RNG a step draws from
               (rng_state), so --resume continues bit for bit
  saving       save_model: the full state dict gathered to rank 0 (full_state_dict), LoRA merged
               into the base weights (merge_lora: W + s B A), safetensors written atomically
"""
import json
import os
import random
import shutil
from pathlib import Path

import torch

from common import barrier, fail, get_rank, print0, read_json, sharded, write_json


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
    print0(f"resumed at step {step} from {ckpt_dir}")
    return step


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
