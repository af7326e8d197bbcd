"""Shared mechanisms of the pipeline: processes, files, tokens, log-probs, models.

No algorithms live here: the losses, selection rules, token scoring and step localization are in
full view in their stages. Three modules beside this one hold what only some stages share:
sampling.py (generation and the long record-by-record stages), training.py (FSDP2, optimizer,
checkpoints) and batches.py (the padded and packed batch layouts). This file holds what nearly
every stage needs:

  errors       fail(msg): one clear line on stderr and exit code 2 (bad input is never a traceback)
  processes    dist_init / dist_teardown / print0 / all_reduce_sum: same code under python or
               torchrun (gloo on CPU; NCCL beside gloo on GPUs); seed_for
  files        read_jsonl / read_json / read_text: one line naming file:line and the field for
               any damage (not UTF-8, torn, no object, a missing or mistyped field; token_ids,
               numbers, each: the checks of id lists, weights and 01's samples); atomic writes
               (the long stages' append-and-resume by record id is sampling.ResumableJsonl)
  tokens       encode_prompt / encode_response / encode_steps (tokenized apart, BOS as the
               tokenizer adds it, EOS = the end id the model wrote)
  log-probs    token_logps: the one place where the label shift happens, chunked over positions
               (each chunk over the full vocabulary), for padded and packed batches alike
  models       load_tokenizer / load_model (safetensors only; --tp: tensor parallel), each
               after check_model_dir: configs that parse, whole weights files, a tokenizer that
               fits the model's vocabulary
  flags        add_run_args (--run-dir, --model, --data, --out, --limit, --seed) and
               add_model_args (--bf16, --tp, --trust-remote-code of the inference stages)
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

from batches import packed_attention_mask


# Errors
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


def all_reduce_sum(x: torch.Tensor, op=None) -> torch.Tensor:
    """Sum (or `op`, e.g. dist.ReduceOp.MAX) a tensor over ranks (identity in one process); used
    for metrics, never for gradients."""
    if dist.is_initialized():
        x = x.clone()
        dist.all_reduce(x, op=op or dist.ReduceOp.SUM)
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


def _kind(v) -> str:
    return "null" if v is None else type(v).__name__


def _value_error(value, spec) -> str | None:
    """What is wrong with a field's value: spec is a type or tuple of types (a bool is no int
    unless bool is named; type(None) allows null) or a check such as token_ids(vocab)."""
    if not isinstance(spec, (type, tuple)):
        return spec(value)
    types = spec if isinstance(spec, tuple) else (spec,)
    if isinstance(value, types) and (bool in types or not isinstance(value, bool)):
        return None
    return (f"should be {' or '.join('null' if t is type(None) else t.__name__ for t in types)}"
            f", got {_kind(value)}")


def _record_error(rec, required: dict | None, optional: dict | None = None) -> str | None:
    if not isinstance(rec, dict):
        return f"expected a JSON object, got {_kind(rec)}"
    for field, spec in (required or {}).items():
        if field not in rec:
            return f"missing field '{field}'"
    for field, spec in [*(required or {}).items(), *(optional or {}).items()]:
        if field in rec and (err := _value_error(rec[field], spec)):
            return f"field '{field}' {err}"
    return None


def token_id(vocab: int | None, null: bool = False):
    """Field check for read_jsonl: one token id, an int in [0, vocab) (or null where allowed)."""
    def check(x):
        if x is None and null:
            return None
        if type(x) is not int:
            return f"should be a token id (an integer), got {json.dumps(x)[:40]}"
        if x < 0 or vocab is not None and x >= vocab:
            return (f"holds token id {x}, outside this tokenizer's vocabulary [0, {vocab}) "
                    "(written with another tokenizer? re-run the stage that writes it)")
        return None
    return check


def token_ids(vocab: int | None):
    """Field check for read_jsonl: a list of token ids, each an int in [0, vocab)."""
    one = token_id(vocab)

    def check(v):
        if not isinstance(v, list):
            return f"should be a list of token ids, got {_kind(v)}"
        return next((f"item {i} {err}" for i, x in enumerate(v) if (err := one(x))), None)
    return check


def numbers(v) -> str | None:
    """Field check for read_jsonl: a list of finite numbers (token weights)."""
    if not isinstance(v, list):
        return f"should be a list of numbers, got {_kind(v)}"
    return next((f"item {i} should be a finite number, got {json.dumps(x)[:40]}"
                 for i, x in enumerate(v) if type(x) not in (int, float) or not math.isfinite(x)),
                None)


def each(required: dict, optional: dict | None = None):
    """Field check for read_jsonl: a list of JSON objects, each with the `required` fields and,
    where present, `optional` ones of their types (01's samples: text, pred, correct, ...)."""
    def check(v):
        if not isinstance(v, list):
            return f"should be a list, got {_kind(v)}"
        return next((f"item {i}: {err}" for i, x in enumerate(v)
                     if (err := _record_error(x, required, optional))), None)
    return check


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
            if err := _record_error(rec, required, optional):
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
    if err := _record_error(rec, required):
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
    out[b, t] = log p(x[b, t+1] | x[b, :t+1]).

    batch: a padded batch {input_ids, attention_mask} (B, T), 0/1 mask, left or right padding
    (position ids follow the mask, so a sequence scores the same whatever padding its batch
    needs); or a packed one from pack_rows (collate_pairs / collate_sft with packed=True): its
    rows hold several sequences, logits are computed only where a response token is scored,
    and the log-probs come back in the padded layout's rows and columns, response columns only.
    Returns (B, T-1), differentiable; positions whose target or context token is padding are 0
    (in a packed batch: every column but the responses'). This is the only label shift in the
    project: callers mask and reduce (sum for DPO, weighted sum for cDPO, span for Step-DPO).
    Chunks: at most 1/8 of the positions and at most chunk_bytes of float32 (B, c, V) each: the
    extra memory stays under 1/8 of float32 logits, in 8 chunks of a few kernels each where the
    budget allows (B 4 x T 1024 at vocabulary 128,256: 8 chunks of 0.25 GB).
    """
    ids, real = batch["input_ids"], batch["attention_mask"]  # (R, L)
    if "unpack" in batch:  # packed: logits for the last K positions of each row
        K = batch["source"].shape[1] + 1
        attention = packed_attention_mask(model, batch["seq_doc"], batch["seq_branch"],
                                          batch["position_ids"])
        logits = model(input_ids=ids, attention_mask=attention, logits_to_keep=K,
                       position_ids=batch["position_ids"], use_cache=False).logits  # (R, K, V)
        rescored = (batch["source"] != torch.arange(K - 1, device=ids.device)).nonzero(
            as_tuple=True)
        rescored = (*rescored, batch["source"][rescored])
    else:
        logits = model(input_ids=ids, attention_mask=real, position_ids=position_ids(real),
                       use_cache=False).logits  # (B, T, V)
        rescored = (torch.empty(0, dtype=torch.long, device=ids.device),) * 3
    B, K, V = logits.shape
    chunk = max(1, min(math.ceil((K - 1) / 8), chunk_bytes // (4 * B * V)))  # positions per chunk
    logps = _ChunkedTokenLogps.apply(logits, ids[:, ids.shape[1] - K + 1:], chunk, rescored)
    if "unpack" in batch:  # (R, K-1) -> the padded layout's (rows, T-1), 0 outside responses
        idx = batch["unpack"]
        return torch.where(idx >= 0, logps.flatten()[idx.clamp(min=0)], 0.0)
    valid = real[:, :-1].bool() & real[:, 1:].bool()  # (B, T-1)
    return torch.where(valid, logps, torch.zeros_like(logps))


# Models: Hugging Face format, safetensors only
DAMAGED = "the model dir is damaged (an interrupted copy or download?): copy or download it again"


def _check_safetensors(f: Path):
    """A whole safetensors file: an 8-byte header length, a JSON header, and exactly the bytes
    its tensors' offsets cover (an interrupted copy is shorter, an empty file has nothing)."""
    size = f.stat().st_size
    try:
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n) if 0 < n <= size - 8 else b"")
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"),
                  default=0)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        fail(f"{f}: {'an empty file' if size == 0 else 'no whole safetensors file'} ({size} "
             f"bytes); {DAMAGED}")
    if 8 + n + end != size:
        fail(f"{f}: {'cut off' if size < 8 + n + end else 'too long'}: {size} bytes where its "
             f"header promises {8 + n + end}; {DAMAGED}")


def check_model_dir(path) -> dict:
    """A local model dir, checked before anything loads it, so that damage stops with one line
    naming the file while the stage has written nothing: its JSON configs parse (a torn
    generation_config.json would silently drop end ids), every safetensors file is whole and
    every shard its index names exists. Returns its config.json ({} for a hub id: those are
    from_pretrained's to check)."""
    p = Path(path)
    if not p.is_dir():
        return {}
    config = {name: read_json(p / name, hint=DAMAGED) for name in (
        "config.json", "generation_config.json", "tokenizer_config.json",
        "special_tokens_map.json") if (p / name).is_file()}
    if (p / "model.safetensors.index.json").is_file():
        index = read_json(p / "model.safetensors.index.json", {"weight_map": dict}, DAMAGED)
        for shard in sorted(set(map(str, index["weight_map"].values()))):
            if not (p / shard).is_file():
                fail(f"{p / shard}: no such file, though the index names it; {DAMAGED}")
    for f in sorted(p.glob("*.safetensors")):
        _check_safetensors(f)
    return config.get("config.json", {})


def _check_exists(path):
    """A path that is clearly local (not a hub id) must exist."""
    if not Path(path).exists() and (str(path).startswith((".", "/", "runs"))
                                    or str(path).count("/") > 1):
        fail(f"model '{path}' not found (run the stage that writes it, or pass the right path)")


def load_tokenizer(path, trust_remote_code: bool = False):
    """The tokenizer of a model dir or hub id. A local dir is checked whole first
    (check_model_dir: the stages read the tokenizer before anything is written, so damaged
    weights stop them there too), and a tokenizer with more tokens than the model's config has
    embeddings (another model's tokenizer files) is refused."""
    from transformers import AutoTokenizer
    _check_exists(path)
    cfg = check_model_dir(path)
    try:
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001: the tokenizers library raises plain Exceptions
        if Path(path).is_dir():  # name the damaged file where one is
            for f in sorted(Path(path).glob("*.json")):
                read_json(f, hint=DAMAGED)
        fail(f"cannot load tokenizer from '{path}' ({type(e).__name__}: "
             f"{(str(e).splitlines() or [''])[0][:200]}); pass a model dir or hub id with one")
    vocab = cfg.get("vocab_size") or (cfg.get("text_config") or {}).get("vocab_size")
    if isinstance(vocab, int) and len(tok) > vocab:
        fail(f"{path}: the tokenizer has {len(tok)} tokens, the model's vocabulary (config.json "
             f"vocab_size) {vocab}: tokenizer files of another model? copy this model's own")
    if tok.pad_token_id is None:  # Llama-3 has none; padding is always masked, EOS serves
        tok.pad_token = tok.eos_token
    return tok


def load_model(path, device="cpu", dtype=torch.float32, trust_remote_code: bool = False,
               tp: bool = False):
    """An HF causal LM from a local dir or hub id. Pickle checkpoints (.bin/.pt) are refused:
    loading them can execute code. trust_remote_code stays off unless a flag asks. A local dir
    is checked first (check_model_dir); what from_pretrained still refuses stops with one line.
    tp (under torchrun): tensor parallel over all ranks with transformers' tp_plan, each rank
    holding 1/world of every layer: how a 70B model samples on 8 GPUs of 80 GB."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, DistributedConfig
    p = Path(path)
    if p.is_dir() and not list(p.glob("*.safetensors")):
        if list(p.glob("*.bin")) or list(p.glob("*.pt")):
            fail(f"{path}: only pickle weights (.bin/.pt) found; convert them to safetensors")
        fail(f"{path}: no model.safetensors in this directory (run the stage that writes it)")
    _check_exists(path)
    check_model_dir(path)
    try:
        sharded = {"distributed_config": DistributedConfig(tp_plan="auto")} if (
            tp and get_world() > 1) else {}
        model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code,
            **sharded)
    except torch.OutOfMemoryError:
        raise
    except (OSError, ValueError, TypeError, KeyError, RuntimeError, SafetensorError) as e:
        fail(f"cannot load model '{path}' ({type(e).__name__}: "
             f"{(str(e).splitlines() or [''])[0][:200]}); check its config.json and weights")
    if sharded:
        print0(f"{path}: tensor parallel, 1/{get_world()} of each layer per rank")
    return model.to(device)


# Flags that several stages share (the training flags: training.add_training_args)
def add_run_args(parser, *, data: str, out: str, limit: str, model: str | None = None,
                 seed: str | None = None, limit_default: int = 0):
    """The "run" group a stage starts with, one flag vocabulary (DESIGN.md): --run-dir, --model,
    --data, --out, --limit and, where the stage draws anything, --seed. The keywords are the
    stage's help texts (`out`: the output's default path in the run dir; `limit`: what --limit
    counts). Returns the group, for a stage's own run flags (--split, --label, --pos-model)."""
    g = parser.add_argument_group("run")
    g.add_argument("--run-dir", default="runs/toy",
                   help="run directory shared by all stages (%(default)s)")
    if model:
        g.add_argument("--model", default=None, help=model)
    g.add_argument("--data", default=None, help=data)
    g.add_argument("--out", default=None, help=f"output dir (default: <run-dir>/{out})")
    g.add_argument("--limit", type=int, default=limit_default,
                   help=f"use the first K {limit} (0: all; default %(default)s)")
    if seed:
        g.add_argument("--seed", type=int, default=0, help=f"{seed} (%(default)s)")
    return g


def add_model_args(parser):
    """--bf16, --tp and --trust-remote-code, as every stage that runs models without training
    them (01, 02, 04, 07, 08) takes them."""
    g = parser.add_argument_group("model")
    g.add_argument("--bf16", action="store_true", help="run the model(s) in bfloat16: on GPUs, "
                   "and on CPUs with bf16 matrix units (AVX512-BF16, AMX), where sampling is "
                   "1.5-1.9x faster but greedy text drifts from float32's (BENCHMARKS.md)")
    g.add_argument("--tp", action="store_true", help="under torchrun: shard the model over all "
                   "ranks (tensor parallel) instead of a full copy per rank; for models larger "
                   "than one GPU")
    g.add_argument("--trust-remote-code", action="store_true",
                   help="allow model code from the checkpoint (off: it can execute anything)")
    return g
