"""common.py: what the numbered stages share and a method reader should see.

  bad input    fail(msg): one clear line on stderr and exit code 2, never a traceback
  processes    dist_init / dist_teardown / print0 / all_reduce_sum / all_reduce_max: the same
               code under python or torchrun (gloo on CPU; NCCL beside gloo on GPUs); seed_for
  files        read_jsonl (one line naming file:line and the field for any damage; the field
               checks are machinery/checks.py), read_json, read_text; atomic writes
  tokens       encode_prompt / encode_response / encode_steps: prompt and response tokenized
               apart, BOS as the tokenizer adds it, EOS = the end id the model wrote
  log-probs    token_logps: the batched log-prob routine every trained log-prob comes from,
               chunked over positions, for padded and packed batches alike
  FSDP         shard_model (fully_shard per decoder layer, then the root), load_for_training
               (rank 0 reads the checkpoint, the others get their shards by broadcast; optional
               LoRA), autocast_for
Everything else a stage calls lives in machinery/, one role a file (machinery/__init__.py lists
them). No algorithm lives here: the losses, the selection rule, the token scoring and the step
localization are in their stages.
"""
import datetime
import functools
import hashlib
import json
import math
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
import torch
import torch.distributed as dist

from machinery.checks import record_error
from machinery.packing import packed_forward, unpack_logps


# Bad input stops with one line
def fail(msg: str):
    """Stop on bad input: one line on stderr, exit code 2, no traceback."""
    print(f"error: {msg}", file=sys.stderr, flush=True)
    raise SystemExit(2)


# Processes: every stage runs unchanged under `python` (world 1) or `torchrun`
def process_group_backend(cuda: bool) -> str:
    """NCCL for GPU tensors plus gloo for CPU tensors on GPU machines: with --cpu-offload the
    parameters, gradients and the grad-norm reduction live on the host, and an NCCL-only group
    has no backend for a CPU tensor. gloo alone on CPU machines."""
    return "cuda:nccl,cpu:gloo" if cuda else "gloo"


def dist_timeout() -> datetime.timedelta:
    """How long a rank waits in a collective: $DIST_TIMEOUT_MINUTES, default 60 (NCCL's own
    default is 10). While rank 0 alone reads a 70B checkpoint or merges and writes the trained
    model, the other ranks wait in a collective for many minutes."""
    return datetime.timedelta(minutes=float(os.environ.get("DIST_TIMEOUT_MINUTES", 60)))


def cpu_threads() -> int:
    """Intra-op threads of this process: $CPU_THREADS, or an OMP_NUM_THREADS other than 1, else
    this machine's cores shared by its local ranks. torchrun sets OMP_NUM_THREADS=1 when it is
    unset, which would leave rank 0's load, LoRA merge and save (and AdamW on offloaded states)
    on one core."""
    if os.environ.get("CPU_THREADS"):
        return int(os.environ["CPU_THREADS"])
    if int(os.environ.get("OMP_NUM_THREADS", 1)) > 1:
        return int(os.environ["OMP_NUM_THREADS"])
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def dist_init() -> tuple[int, int, torch.device]:
    """Join the process group when launched by torchrun. Returns (rank, world, device)."""
    local = int(os.environ.get("LOCAL_RANK", 0))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local)  # before the group: NCCL binds each rank to its own GPU
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group(process_group_backend(cuda), timeout=dist_timeout(),
                                device_id=torch.device("cuda", local) if cuda else None)
        torch.set_num_threads(cpu_threads())
    return get_rank(), get_world(), torch.device("cuda", local) if cuda else torch.device("cpu")


def dist_teardown():
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def get_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def get_world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier():
    if dist.is_initialized():
        dist.barrier()


def print0(*args, **kwargs):
    if get_rank() == 0:
        print(*args, **kwargs, flush=True)


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """The sum of a tensor over ranks (itself in one process); for metrics, never gradients."""
    if dist.is_initialized():
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def all_reduce_max(x: torch.Tensor) -> torch.Tensor:
    """The elementwise maximum of a tensor over ranks (itself in one process)."""
    if dist.is_initialized():
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x


def seed_for(*parts) -> int:
    """A stable 63-bit seed from any parts (seed, record id, sample index): independent of batch
    composition, rank count and resume point, so the same --seed gives the same samples."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


# Files: JSONL, JSON and text in (one line naming file:line and the field), atomic writes out
def _text(data: bytes, where: str, lines: bool = True) -> str:
    """UTF-8 text (a leading byte order mark dropped), or one line naming where (with lines: the
    line too) the first byte that is no UTF-8 sits: a spreadsheet's cp1252, a torn download."""
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        line, column = data.count(b"\n", 0, e.start) + 1, e.start - data.rfind(b"\n", 0, e.start)
        fail(f"{where}{f':{line}' if lines else ''}: not UTF-8 text (byte 0x{data[e.start]:02x} "
             f"at column {column}); re-save the file as UTF-8")


def read_jsonl(path, required: dict | None = None, locations: bool = False,
               optional: dict | None = None, parallel=(), partial: bool = False) -> list:
    """Read a JSONL file (UTF-8, a byte order mark allowed); `required` maps field -> type, tuple
    of types, or a check (token_ids(vocab), numbers, each(...)) every record must pass, and
    `optional` the same for fields a record may lack; `parallel` names (a, b) field pairs whose
    lists must be as long as each other where both are present (weights and their ids). A missing
    or empty file, bytes that are no UTF-8, a torn or malformed line, a value that is no object,
    a missing or mistyped field stop with one line naming file:line and the field. partial=True
    reads a resume file: its torn last line (a write killed midway) is dropped, and it may hold
    no record. With locations=True returns ("file:line", record) pairs, so callers can name the
    line in their own checks."""
    path = Path(path)
    if not path.is_file():
        fail(f"{path}: no such file (run the stage that writes it, or pass the right path)")
    records = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            if partial and not raw.endswith(b"\n"):
                break
            line = _text(raw, where, lines=False)
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                fail(f"{where}: malformed JSON ({e.msg}: column {e.colno}); " + (
                    "the last line is cut off (an interrupted write?): delete it or re-run the "
                    "stage that writes it" if not raw.endswith(b"\n") else
                    "fix or delete that line"))
            if err := record_error(rec, required, optional):
                fail(f"{where}: {err}")
            for a, b in parallel:
                if isinstance(rec.get(a), list) and len(rec[a]) != len(rec.get(b) or []):
                    fail(f"{where}: {a} has {len(rec[a])} entries for {len(rec.get(b) or [])} "
                         f"{b} (field '{a}' must be parallel to '{b}': one per id)")
            records.append((where, rec) if locations else rec)
    if not records and not partial:
        fail(f"{path}: empty file (no records); re-run the stage that writes it")
    return records


def read_json(path, required: dict | None = None,
              hint: str = "fix it, or re-run the stage that writes it") -> dict:
    """One JSON object from a file (a model's config.json, a resume record), with read_jsonl's
    one-line errors; `hint` says what to do about a damaged file."""
    text = read_text(path, hint)
    try:
        rec = json.loads(text)
    except json.JSONDecodeError as e:
        fail(f"{path}: malformed JSON ({e.msg}: line {e.lineno} column {e.colno}); {hint}")
    if err := record_error(rec, required):
        fail(f"{path}: {err}; {hint}")
    return rec


def read_text(path, hint: str = "pass the right path") -> str:
    """A text file (a prompt template): missing, empty or not UTF-8 stop with one line."""
    path = Path(path)
    if not path.is_file():
        fail(f"{path}: no such file; {hint}")
    text = _text(path.read_bytes(), str(path))
    if not text.strip():
        fail(f"{path}: empty file; {hint}")
    return text


def write_text(path, text: str):
    """Write to a temp file in the same directory, fsync, then rename: readers see old or new."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def jsonl_text(records) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def write_jsonl(path, records):
    write_text(path, jsonl_text(records))


# Tokens: prompt and response are tokenized apart and their ids concatenated (never the joined
# string), so the ids a weight was computed for are the ids the trainer sees.
@functools.lru_cache(maxsize=16)
def _leading_specials(tok) -> tuple[int, ...]:
    """The ids the tokenizer itself puts before any text: (bos,) for Llama-3 and Llama-2 style
    tokenizers, () for Qwen2 and SmolLM2 (whose bos_token exists but is never added)."""
    full = tok("7", add_special_tokens=True).input_ids
    bare = tok("7", add_special_tokens=False).input_ids
    return tuple(full[:full.index(bare[0])]) if bare and bare[0] in full else ()


def encode_prompt(tok, text: str) -> list[int]:
    """Prompt ids that start the way the tokenizer starts a text: its BOS exactly once where it
    adds one (a chat template often carries it in the text already: then it is not added again),
    and none where it adds none, even if it defines a bos_token."""
    ids = tok(text, add_special_tokens=False).input_ids
    lead = list(_leading_specials(tok))
    return ids if ids[:len(lead)] == lead else lead + ids


def encode_response(tok, text: str, eos: bool | int | None) -> list[int]:
    """Response ids, no BOS. `eos`: the end-of-turn id to append to a full solution (an int: the
    id the model really ended with, e.g. <|eot_id|> rather than <|end_of_text|>; True: the
    tokenizer's eos_token_id); False / None for a Step-DPO step (a step is not an ending) or an
    answer cut by the token limit (it did not end)."""
    ids = tok(text, add_special_tokens=False).input_ids
    if eos is True:
        eos = tok.eos_token_id
    return ids if eos is None or eos is False else ids + [int(eos)]


def encode_steps(tok, steps: list[str]) -> list[list[int]]:
    """The ids of each step of one response, cut from the tokenization of the whole response, so
    that prefix ids + step ids are the tokens the model wrote. Tokenizing a step on its own can
    differ at the seams: GPT-2-style byte-level BPE writes "\n\nStep 2" as "\n", "\n", "Step"
    but "...\n\n" alone as one "\n\n" token. A token that straddles a step boundary belongs to
    the step it starts in; a step left with no token of its own gets []."""
    text = "".join(steps)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    bounds, at = [], 0
    for s in steps:
        at += len(s)
        bounds.append(at)  # character offset where each step ends
    out, k = [[] for _ in steps], 0
    for i, (start, _) in zip(enc.input_ids, enc.offset_mapping):
        while k < len(steps) - 1 and start >= bounds[k]:
            k += 1
        out[k].append(i)
    return out


# Log-probs
def _spans(n: int, chunk: int):
    return [(s, min(s + chunk, n)) for s in range(0, n, chunk)]


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) positions that count only real tokens: a left-padded row starts at 0 at its first
    token, so padding never shifts a sequence's rotary positions."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class _ChunkedTokenLogps(torch.autograd.Function):
    """log softmax(z)[y] = z[y] - logsumexp(z), computed a few positions at a time in float32.

    Forward keeps only the (B, T-1) result; backward rebuilds softmax chunk by chunk from the
    logits: d/dz (z[y] - lse(z)) = onehot(y) - softmax(z). Peak memory beyond the logits is one
    float32 chunk, never a float32 (B, T, V) copy.

    Column t scores targets[:, t] from the logits at position t, except at the few `rescored`
    (rows, cols, sources) slots, scored from position `sources` instead: in a shared-context
    row the rejected response's first token follows the chosen response in the row but the
    context in its sequence (pack_rows).
    """

    @staticmethod
    def forward(ctx, logits, targets, chunk, rescored):  # logits (B, T, V), targets (B, T-1)
        # Taking the full logits (not a logits[:, :-1] view) spares a (B, T, V) zero-fill in the
        # slice's backward: our gradient is the only logits-sized buffer we add.
        out = torch.empty(targets.shape, dtype=torch.float32, device=logits.device)
        for s, e in _spans(targets.shape[1], chunk):
            z = logits[:, s:e].float()  # (B, c, V)
            out[:, s:e] = z.gather(-1, targets[:, s:e, None]).squeeze(-1) - torch.logsumexp(z, -1)
            del z
        rows, cols, srcs = rescored  # (n,) each; n = 0 in a padded batch
        if len(rows):
            z = logits[rows, srcs].float()  # (n, V)
            out[rows, cols] = z.gather(-1, targets[rows, cols, None]).squeeze(-1) \
                - torch.logsumexp(z, -1)
        ctx.save_for_backward(logits, targets, rows, cols, srcs)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad_out):  # grad_out (B, T-1)
        logits, targets, rows, cols, srcs = ctx.saved_tensors
        grad = torch.empty_like(logits)  # (B, T, V)
        grad[:, -1] = 0
        if len(rows):  # a rescored column's gradient goes to its source position (below)
            g_slots, grad_out = grad_out[rows, cols].float()[:, None], grad_out.clone()
            grad_out[rows, cols] = 0
        for s, e in _spans(targets.shape[1], ctx.chunk):
            g_out = grad_out[:, s:e, None].float()  # (B, c, 1)
            g = torch.softmax(logits[:, s:e].float(), -1).mul_(-g_out)  # (B, c, V)
            g.scatter_add_(-1, targets[:, s:e, None], g_out)
            grad[:, s:e] = g
            del g
        if len(rows):
            g = torch.softmax(logits[rows, srcs].float(), -1).mul_(-g_slots)  # (n, V)
            g.scatter_add_(-1, targets[rows, cols, None], g_slots)
            grad.index_put_((rows, srcs), g.to(grad.dtype), accumulate=True)
        return grad, None, None, None


def token_logps(model, batch: dict, chunk_bytes: int = 1 << 30) -> torch.Tensor:
    """Float32 log-prob of each next token given the tokens before it in its own sequence:

        out[b, t] = log p(x[b, t+1] | x[b, :t+1])        (B, T-1)

    batch: a padded batch {input_ids, attention_mask} (B, T), 0/1 mask, left or right padding
    (position ids follow the mask, so a sequence scores the same whatever padding its batch
    needs). Positions whose target or context token is padding are 0. Differentiable; callers
    mask and reduce (sum for DPO, weighted sum for cDPO, the step's span for Step-DPO).
    A packed batch (machinery.packing: collate_pairs / collate_sft with packed=True) keeps the
    same contract: its rows hold several sequences, logits are computed only where a response
    token is scored, and the log-probs come back in the padded layout's rows and columns, 0
    outside the responses.
    Every log-prob a stage trains on is shifted here. Three places shift labels on their own,
    for what this routine does not compute: 04's contrastive estimation (two models' logits
    combined before the softmax), 08's next-token distribution at one position, and 00's
    cross-entropy, which trains the toy model and is kept as it was so its weights stay the same.
    Chunks: at most 1/8 of the positions and at most chunk_bytes of float32 (B, c, V) each: the
    extra memory stays under 1/8 of float32 logits.
    """
    ids, real = batch["input_ids"], batch["attention_mask"]  # (B, T)
    if "unpack" in batch:  # packed rows: logits (R, K, V) for the last K positions of each row
        logits, targets, rescored = packed_forward(model, batch)
    else:
        logits = model(input_ids=ids, attention_mask=real, position_ids=position_ids(real),
                       use_cache=False).logits  # (B, T, V)
        targets = ids[:, 1:]  # (B, T-1): the label shift
        rescored = (torch.empty(0, dtype=torch.long, device=ids.device),) * 3
    B, K, V = logits.shape
    chunk = max(1, min(math.ceil((K - 1) / 8), chunk_bytes // (4 * B * V)))  # positions per chunk
    logps = _ChunkedTokenLogps.apply(logits, targets, chunk, rescored)  # (B, K-1)
    if "unpack" in batch:
        return unpack_logps(logps, batch)
    valid = real[:, :-1].bool() & real[:, 1:].bool()  # (B, T-1)
    return torch.where(valid, logps, torch.zeros_like(logps))


# FSDP2: sharding a model for training
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

    from machinery.models import load_model  # it needs this module: imported on use
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


def lora_config(r: int, targets: list[str], lora_dropout: float):
    """peft's LoraConfig of rank r (alpha 2r) on the `targets` projections; None for r = 0 (full
    fine-tuning)."""
    if not r:
        return None
    from peft import LoraConfig
    return LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=lora_dropout, target_modules=targets,
                      task_type="CAUSAL_LM")


def autocast_for(device, bf16: bool):
    """bf16 compute in one process (under FSDP2 its MixedPrecisionPolicy does it); else a no-op."""
    return torch.autocast(device.type, torch.bfloat16, enabled=bf16 and not sharded())
