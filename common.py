"""Shared mechanisms of the pipeline: tensors, models, files and processes. No algorithms live here.

The losses, selection rules, token scoring and step localization are in full view in their stages.
This file holds what two or more stages share:

  errors       fail(msg): one clear line on stderr and exit code 2 (bad input is never a traceback)
  processes    dist_init / dist_teardown / print0 / all_reduce_sum: same code under python or torchrun
  files        read_jsonl (file:line errors), atomic writes, ResumableJsonl (append + resume by id)
  tokens       encode_prompt / encode_response / encode_steps (tokenized apart, BOS as the
               tokenizer adds it, EOS = the end id the model wrote)
  log-probs    token_logps: the one place where the label shift happens, chunked over positions
  batches      collate_pairs: (prompt, chosen, rejected, weights, reference log-probs) -> (2B, T)
  sampling     generate: batched per-row seeded sampling over a KV cache allocated once, that
               stops at every end id and stop string and says why it stopped; sample_problems;
               response_eos; auto_batch_size (--batch-size auto: the rows free memory holds)
  models       load_model / load_tokenizer / save_model (safetensors only), shard_model (FSDP2)
  training     add_training_args, training_policy, adamw, lr_at, global_batch (seeded epochs),
               reference_logps, clip_grad_norm, save_checkpoint / load_checkpoint
               (torch.distributed.checkpoint),
               MetricsLog (JSONL + one '|' line per step), Progress (one updating line with ETA)
"""
import datetime
import functools
import hashlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
import torch
import torch.distributed as dist
from transformers.cache_utils import CacheLayerMixin


# --------------------------------------------------------------------------------------------------
# Errors


def fail(msg: str):
    """Stop on bad input: one line on stderr, exit code 2, no traceback."""
    print(f"error: {msg}", file=sys.stderr, flush=True)
    raise SystemExit(2)


# --------------------------------------------------------------------------------------------------
# Processes: every stage runs unchanged under `python` (world 1) or `torchrun` (gloo on CPU, nccl on GPU)


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


def seed_for(*parts) -> int:
    """A stable 63-bit seed from any parts (seed, record id, sample index): independent of batch
    composition, rank count and resume point, so the same --seed gives the same samples."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


# --------------------------------------------------------------------------------------------------
# Files: JSONL in, atomic JSON/JSONL out, and append-and-resume for long stages


def read_jsonl(path, required: dict | None = None, locations: bool = False) -> list:
    """Read a JSONL file; `required` maps field -> type (or tuple of types) every record must have.
    A missing file, an empty file, a malformed or torn line, or a missing / mistyped field stops
    with one line naming file:line and the field. With locations=True returns ("file:line", record)
    pairs, so callers can name the line in their own checks."""
    path = Path(path)
    if not path.is_file():
        fail(f"{path}: no such file (run the stage that writes it, or pass the right path)")
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                fail(f"{path}:{lineno}: malformed JSON ({e.msg}); fix or delete that line")
            if not isinstance(rec, dict):
                fail(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            for field, typ in (required or {}).items():
                if field not in rec:
                    fail(f"{path}:{lineno}: missing field '{field}'")
                if not isinstance(rec[field], typ) or isinstance(rec[field], bool) and typ is int:
                    want = getattr(typ, "__name__", str(typ))
                    fail(f"{path}:{lineno}: field '{field}' should be {want}, "
                         f"got {type(rec[field]).__name__}")
            records.append((f"{path}:{lineno}", rec) if locations else rec)
    if not records:
        fail(f"{path}: empty file (no records); re-run the stage that writes it")
    return records


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


class ResumableJsonl:
    """Append-only JSONL keyed by record id, for stages that run for hours.

    Each record is written as one line with one write() and fsync, so after a kill the file holds
    whole records plus at most one torn last line; opening the file again drops that tail and
    `done` says which ids to skip. Under torchrun each rank appends to its own part file
    (`<path>.part<rank>`); `merge` (rank 0, after a barrier) writes the final file atomically in
    the order of `ids` and removes the parts.
    """

    def __init__(self, path, rank: int = 0, fingerprint: dict | None = None, writer: bool = True):
        """rank: which part file is this process's. writer=False (a --tp follower, which computes
        what rank 0 computes) reads the parts and keeps `done` but writes nothing."""
        self.path, self.writer = Path(path), writer
        self.part = self.path.with_name(f"{self.path.name}.part{rank}")
        self.part.parent.mkdir(parents=True, exist_ok=True)
        self.done = {}
        if fingerprint is not None:  # resume only what the same inputs and settings produced
            stamp = self.path.with_name(f"{self.path.name}.fingerprint.json")
            fingerprint = json.loads(json.dumps(fingerprint))  # tuples -> lists, as stored
            prev = json.loads(stamp.read_text()) if stamp.exists() else None
            parts = self.path.parent.glob(f"{self.path.name}.part*")
            if prev not in (None, fingerprint) and (self.path.exists() or any(parts)):
                changed = sorted(k for k in {*prev, *fingerprint}
                                 if prev.get(k) != fingerprint.get(k))
                fail(f"{self.path} holds records of another run ({', '.join(changed)} changed: a "
                     "retrained model or rewritten input counts); pass another --out or delete it")
            barrier()  # every rank has compared before rank 0 rewrites the stamp
            if rank == 0 and writer:
                write_json(stamp, fingerprint)
        for part in self.path.parent.glob(f"{self.path.name}.part*"):
            self._load(part, truncate=part == self.part and writer)
        if self.path.exists():  # a finished earlier run: everything in it is done
            for rec in read_jsonl(self.path):
                self.done[rec["id"]] = rec
        self._f = open(self.part, "a", encoding="utf-8") if writer else None

    def _load(self, part: Path, truncate: bool):
        good = 0  # byte offset after the last whole line
        with open(part, "rb") as f:
            for line in f:
                if not line.endswith(b"\n"):
                    break
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    break
                self.done[rec["id"]] = rec
                good += len(line)
        if truncate and part.stat().st_size != good:
            os.truncate(part, good)

    def append(self, rec: dict):
        if self.writer:
            self._f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            self._f.flush()
            os.fsync(self._f.fileno())
        self.done[rec["id"]] = rec

    def merge(self, ids: list[str]) -> list[dict]:
        """Rank 0 only: collect every rank's records, write the final file in `ids` order."""
        self.close()
        for part in self.path.parent.glob(f"{self.path.name}.part*"):
            self._load(part, truncate=False)
        missing = [i for i in ids if i not in self.done]
        if missing:
            raise RuntimeError(f"{self.path}: {len(missing)} records missing after merge")
        records = [self.done[i] for i in ids]
        text = jsonl_text(records)
        if not (self.path.is_file() and self.path.read_text(encoding="utf-8") == text):
            write_text(self.path, text)  # unchanged: keep its mtime, later stages' stamps hold
        for part in self.path.parent.glob(f"{self.path.name}.part*"):
            part.unlink()
        return records

    def close(self):
        if self._f is not None:
            self._f.close()


def file_stamp(path) -> list:
    """What identifies a model or an input file for resume checks: every file of a model dir
    (weights, config, generation config, tokenizer, chat template) or the file itself, with size
    and modification time, so a retrained model, a changed tokenizer or end id, or a rewritten
    file no longer matches, while the same files reached by another path still do. A hub id is
    stamped by the files of its cached snapshot, whose directory name is the commit."""
    p = Path(path)
    if not p.exists():
        try:
            from huggingface_hub import snapshot_download
            p = Path(snapshot_download(str(path), local_files_only=True))
        except Exception:  # not cached (or not a hub id): the name is all there is
            return [str(path)]
        return [p.name] + file_stamp(p)
    files = sorted(f for f in p.iterdir() if f.is_file()) if p.is_dir() else [p]
    return [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]


# --------------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------------
# Log-probs


def _spans(n: int, chunk: int):
    return [(s, min(s + chunk, n)) for s in range(0, n, chunk)]


class _ChunkedTokenLogps(torch.autograd.Function):
    """log softmax(z)[y] = z[y] - logsumexp(z), computed a few positions at a time in float32.

    Forward keeps only the (B, T-1) result; backward rebuilds softmax chunk by chunk from the
    logits: d/dz (z[y] - lse(z)) = onehot(y) - softmax(z). Peak memory beyond the logits is one
    float32 chunk, never a float32 (B, T, V) copy.
    """

    @staticmethod
    def forward(ctx, logits, targets, chunk):  # logits (B, T, V), targets (B, T-1)
        # Position t scores targets[:, t] = input_ids[:, t+1]; the last position predicts nothing.
        # Taking the full logits (not a logits[:, :-1] view) spares a (B, T, V) zero-fill in the
        # slice's backward: our gradient is the only logits-sized buffer we add.
        out = torch.empty(targets.shape, dtype=torch.float32, device=logits.device)
        for s, e in _spans(targets.shape[1], chunk):
            z = logits[:, s:e].float()  # (B, c, V)
            out[:, s:e] = z.gather(-1, targets[:, s:e, None]).squeeze(-1) - torch.logsumexp(z, -1)
            del z
        ctx.save_for_backward(logits, targets)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad_out):  # grad_out (B, T-1)
        logits, targets = ctx.saved_tensors
        grad = torch.empty_like(logits)  # (B, T, V)
        grad[:, -1] = 0
        for s, e in _spans(targets.shape[1], ctx.chunk):
            g_out = grad_out[:, s:e, None].float()  # (B, c, 1)
            g = torch.softmax(logits[:, s:e].float(), -1).mul_(-g_out)  # (B, c, V)
            g.scatter_add_(-1, targets[:, s:e, None], g_out)
            grad[:, s:e] = g
            del g
        return grad, None, None


def token_logps(model, input_ids, attention_mask, chunk_bytes: int = 1 << 30) -> torch.Tensor:
    """Float32 log-prob of each next token given its prefix: out[b, t] = log p(x[b, t+1] | x[b, :t+1]).

    input_ids, attention_mask: (B, T), 0/1 mask, left or right padding. Returns (B, T-1),
    differentiable; positions whose target or context token is padding are 0. Position ids follow the mask, so a
    sequence scores the same whatever padding its batch needs. This is the only label shift in
    the project: callers mask and reduce (sum for DPO, weighted sum for cDPO, span for Step-DPO).
    Chunks: at most 1/8 of the positions and at most chunk_bytes of float32 (B, c, V) each: the
    extra memory stays under 1/8 of float32 logits, in 8 chunks of a few kernels each where the
    budget allows (B 4 x T 1024 at vocabulary 128,256: 8 chunks of 0.25 GB; 4M-element chunks
    made that 128 chunks of tiny kernels).
    """
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)
    logits = model(input_ids=input_ids, attention_mask=attention_mask,
                   position_ids=position_ids, use_cache=False).logits  # (B, T, V)
    B, T, V = logits.shape
    chunk = max(1, min(math.ceil((T - 1) / 8), chunk_bytes // (4 * B * V)))  # positions per chunk
    logps = _ChunkedTokenLogps.apply(logits, input_ids[:, 1:], chunk)  # (B, T-1)
    valid = attention_mask[:, :-1].bool() & attention_mask[:, 1:].bool()  # (B, T-1)
    return torch.where(valid, logps, torch.zeros_like(logps))


# --------------------------------------------------------------------------------------------------
# Batches


def pad_right(seqs: list[list], value) -> torch.Tensor:
    """(B, T) tensor of the sequences right-padded with `value`."""
    T = max(len(s) for s in seqs)
    return torch.tensor([list(s) + [value] * (T - len(s)) for s in seqs])


def collate_pairs(pairs: list[dict], pad_id: int) -> dict:
    """Preference pairs -> one concatenated batch: rows 0..B-1 chosen, rows B..2B-1 rejected.

    Each pair holds token ids `prompt_ids`, `chosen_ids`, `rejected_ids` and optionally per-token
    `chosen_weights` / `rejected_weights` and reference log-probs `ref_chosen_logps` /
    `ref_rejected_logps` (see reference_logps), each aligned one to one with the response ids.
    Response token j sits at input position P+j (P = len(prompt_ids)); its log-prob is column
    P+j-1 of token_logps, so its weight and reference log-prob go to that column. Returns
    input_ids, attention_mask (2B, T), loss_mask, weights (and ref_logps when every pair has
    them) (2B, T-1), float32, zero outside the responses.
    """
    rows, loss_masks, weights, refs = [], [], [], []
    for side in ("chosen", "rejected"):
        for p in pairs:
            prompt, resp = p["prompt_ids"], p[f"{side}_ids"]
            w = p.get(f"{side}_weights") or [1.0] * len(resp)
            assert len(w) == len(resp), f"{p.get('id')}: {side}_weights not aligned with ids"
            rows.append(prompt + resp)
            P = len(prompt)
            loss_masks.append([0.0] * (P - 1) + [1.0] * len(resp))
            weights.append([0.0] * (P - 1) + [float(x) for x in w])
            if p.get(f"ref_{side}_logps") is not None:
                ref = p[f"ref_{side}_logps"]
                assert len(ref) == len(resp), f"{p.get('id')}: ref_{side}_logps not aligned"
                refs.append([0.0] * (P - 1) + list(ref))
    input_ids = pad_right(rows, pad_id)
    attention_mask = pad_right([[1] * len(r) for r in rows], 0)
    T = input_ids.shape[1]
    pad_t = lambda xs: torch.tensor([x + [0.0] * (T - 1 - len(x)) for x in xs])  # noqa: E731
    out = {"input_ids": input_ids, "attention_mask": attention_mask,
           "loss_mask": pad_t(loss_masks), "weights": pad_t(weights)}
    if len(refs) == len(rows):
        out["ref_logps"] = pad_t(refs)
    return out


@torch.no_grad()
def reference_logps(model, pairs: list[dict], pad_id: int, batch_size: int, device,
                    autocast=None) -> list[tuple[list[float], list[float]]]:
    """Per pair, the float32 log-probs of its chosen and rejected response tokens under `model`.

    Called with the initial policy before the first update, this is DPO's reference model in a
    single no-grad pass, so training keeps one model in memory. Under torchrun rank r scores
    pairs r, r+W, ... and the results are shared; every rank runs the same number of forwards
    (FSDP gathers each layer collectively), a rank with nothing left scoring a dummy batch.
    `autocast`: the context manager the training forward runs under (bf16 in one process), so
    that policy and reference agree at step 0. Returns [(chosen logps, rejected logps)] in order.
    """
    import contextlib
    rank, world = get_rank(), get_world()
    was_training = model.training
    model.eval()
    mine = list(range(rank, len(pairs), world))
    n_batches = math.ceil(math.ceil(len(pairs) / world) / batch_size)
    out = {}
    for k in range(n_batches):
        idx = mine[k * batch_size:(k + 1) * batch_size]
        batch = [pairs[i] for i in idx] or pairs[:1]  # dummy keeps collective forwards in step
        b = collate_pairs([{f: p[f] for f in ("prompt_ids", "chosen_ids", "rejected_ids")}
                           for p in batch], pad_id)
        with autocast or contextlib.nullcontext():
            lp = token_logps(model, b["input_ids"].to(device),
                             b["attention_mask"].to(device)).float().cpu()  # (2b, T-1)
        for j, i in enumerate(idx):
            p, P = pairs[i], len(pairs[i]["prompt_ids"]) - 1  # column of response token 0
            out[i] = (lp[j, P:P + len(p["chosen_ids"])].tolist(),
                      lp[len(batch) + j, P:P + len(p["rejected_ids"])].tolist())
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, out)
        out = {i: v for part in parts for i, v in part.items()}
    model.train(was_training)
    return [out[i] for i in range(len(pairs))]


# --------------------------------------------------------------------------------------------------
# Sampling


def _sample_rows(logits, temperature, top_p, u):
    """One next token per row. logits (B, V); u (B,) uniforms in [0, 1). Greedy when
    temperature == 0; otherwise nucleus sampling by inverting each row's CDF at its own u, so a
    row's draw depends on its logits and its seed only, never on the other rows."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, -1)  # (B, V)
    if top_p < 1.0:
        sorted_p, idx = probs.sort(-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p  # smallest set whose mass reaches top_p
        probs = torch.zeros_like(probs).scatter_(-1, idx, sorted_p * keep)
    # Invert in vocabulary order: sorted order could be reshuffled by near-ties between batches
    cdf = probs.cumsum(-1)  # (B, V)
    pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)  # (B, 1): first cdf > u
    return pick.clamp_(max=cdf.shape[-1] - 1)[:, 0]


@functools.lru_cache(maxsize=8)
def _may_end_stop(tok, stop: tuple[str, ...], vocab: int) -> list[bool]:
    """[vocab] bools: tokens that could complete a stop string (their text holds a stop string's
    last character, or a partial UTF-8 byte), so generate decodes a row's tail only after them."""
    if any(not s or s[-1].isspace() for s in stop):  # spaces decode apart from context: check all
        return [True] * vocab
    n = min(vocab, len(tok))
    pieces = tok.batch_decode([[i] for i in range(n)])
    ends = {s[-1] for s in stop} | {"\ufffd"}
    return [any(c in p for c in ends) for p in pieces] + [True] * (vocab - n)


def end_ids(model, tok) -> list[int]:
    """Every id that ends a turn: the tokenizer's eos and each eos id of the model's generation
    config (Llama-3-Instruct lists <|end_of_text|> and <|eot_id|>; its chat turns end with the
    second), as transformers' own generate stops at."""
    cfg = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [] if cfg is None else [cfg] if isinstance(cfg, int) else list(cfg)
    return sorted({int(i) for i in ids} | ({tok.eos_token_id} - {None}))


class _KVBuffer(CacheLayerMixin):
    """One attention layer's keys and values, allocated once for a whole generate call:
    (b, kv_heads, capacity, head_dim) each, capacity = longest prompt + max_new_tokens. A forward
    writes its q new positions in place at [:, :, length:length + q] and attends to the views
    [:, :, :length + q]: the shapes transformers' DynamicLayer builds with torch.cat, so the
    same attention, without copying the layer's whole cache every step."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity, self.length = capacity, 0

    def lazy_initialization(self, key_states, value_states):
        """Shapes, dtype and device (and under TP this rank's heads) as the first forward gives."""
        self.keys = key_states.new_empty((*key_states.shape[:2], self.capacity,
                                          key_states.shape[-1]))
        self.values = value_states.new_empty((*value_states.shape[:2], self.capacity,
                                              value_states.shape[-1]))
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        """key_states (b, h, q, d_k), value_states (b, h, q, d_v) -> every position so far."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        self.keys[:, :, self.length:end] = key_states
        self.values[:, :, self.length:end] = value_states
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0  # (kv_length, kv_offset), as DynamicLayer

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.capacity

    def batch_select_indices(self, indices: torch.Tensor):
        """Keep the rows `indices` (n,), moved to the front of the same buffers; only the filled
        positions are copied, and no second buffer is allocated."""
        n, end = len(indices), self.length
        self.keys[:n, :, :end] = self.keys[indices, :, :end]
        self.values[:n, :, :end] = self.values[indices, :, :end]
        self.keys, self.values = self.keys[:n], self.values[:n]


def _kv_cache(model, capacity: int):
    """A transformers Cache for `model`, laid out from its config as the model's own default
    DynamicCache (one layer per decoder layer), with every full-attention layer a _KVBuffer. The
    other kinds (sliding-window, linear-attention, shared-KV layers) keep transformers' own
    layer: their memory is bounded by the window or the state size."""
    from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
    layers = DynamicCache(config=model.config).layers
    return Cache(layers=[_KVBuffer(capacity) if type(layer) is DynamicLayer else layer
                         for layer in layers])


@torch.no_grad()
def generate(model, tok, prompts: list[list[int]], seeds: list[int] | None = None,
             temperature: float = 0.0, top_p: float = 1.0, max_new_tokens: int = 256,
             stop: tuple[str, ...] = ()) -> list[dict]:
    """Continue each prompt (token ids, BOS included). Left padding + a KV cache allocated once
    (_KVBuffer); a row stops at any end id (end_ids), at any stop string, or after
    max_new_tokens. Row i draws its step-t token with uniform t of its own CPU generator seeded by
    seeds[i], so its text does not depend on the device or on what else is in the batch.
    A finished row stays in the batch, its tokens ignored, until a quarter of the batch has
    finished; then the finished rows leave the batch and the cache together. One host sync per
    step: the new tokens, for the end and stop checks.
    Returns [{"ids": generated ids (the end id kept if produced), "text": decoded text cut at a
    stop string, "finish": "eos" | "stop" | "length" (cut by max_new_tokens: truncated)}]."""
    device = next(model.parameters()).device
    ends = set(end_ids(model, tok))
    B, P = len(prompts), max(len(p) for p in prompts)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    input_ids = torch.tensor([[pad] * (P - len(p)) + p for p in prompts], device=device)  # (B, P)
    # the attention mask of every step, written once: the prompts' padding, then ones
    mask = torch.ones(B, P + max_new_tokens, dtype=torch.long, device=device)  # (B, P + N)
    mask[:, :P] = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    position_ids = (mask[:, :P].cumsum(-1) - 1).clamp(min=0)  # (B, P)
    u = None
    if temperature > 0:
        u = torch.stack([torch.rand(max_new_tokens, generator=torch.Generator().manual_seed(s))
                         for s in (seeds or [0] * B)]).to(device)  # (B, max_new_tokens)
    ids = [[] for _ in range(B)]  # generated ids of each prompt, on the host
    finish = ["length"] * B
    live = list(range(B))  # the prompt of each batch row
    live_idx = torch.arange(B, device=device)  # (b,) the same, on the device
    running = [True] * B  # per batch row: False once finished (until the row leaves)
    window = max((len(s) for s in stop), default=0) + 2  # tokens that surely hold a stop string
    may_stop, past = None, _kv_cache(model, P + max_new_tokens)
    for t in range(max_new_tokens):
        # logits_to_keep=1: only the last position's logits, (b, 1, V). The prefill of a
        # 256 x 800-token batch at vocabulary 128,256 would otherwise build (b, P, V) logits of
        # 52 GB in bf16, just to read their last column.
        logits = model(input_ids=input_ids, attention_mask=mask[:, :P + t],
                       position_ids=position_ids, past_key_values=past, use_cache=True,
                       logits_to_keep=1).logits[:, -1]  # (b, V)
        nxt = _sample_rows(logits, temperature, top_p, None if u is None else u[live_idx, t])
        if stop and may_stop is None:
            may_stop = _may_end_stop(tok, tuple(stop), logits.shape[-1])
        # The step's one host sync: the new ids, for the end and stop checks and the outputs.
        # (transformers' sdpa mask code also reads the padding mask on the host, at the start of
        # the next forward, when the device has nothing queued.)
        for i, token in enumerate(nxt.tolist()):
            if not running[i]:
                continue
            row = live[i]
            ids[row].append(token)
            if token in ends:
                finish[row], running[i] = "eos", False
            elif stop and may_stop[token]:  # decode only tails that may complete a stop string
                tail = tok.decode(ids[row][-window:])
                if any(s in tail for s in stop):
                    finish[row], running[i] = "stop", False
        done = running.count(False)
        if done == len(running):
            break
        # A finished row costs its share of every later step (on a GPU mostly the read of its
        # cache by attention); leaving costs a read and a write of the filled cache of every row
        # that stays. Waiting for a quarter of the batch bounds the waste at a quarter of a step,
        # repays the copy within ~6 steps (2 x 3/4 against 1/4 of the cache read per step) and
        # keeps the copies few: log base 4/3 of the batch (~19 for 256 rows instead of up to 256),
        # under 4 caches' worth in all. (On a 2-core CPU, where a row's matmuls dominate, leaving
        # at once was ~5% faster: BENCHMARKS.md.)
        if 4 * done >= len(running):
            keep = [i for i, r in enumerate(running) if r]
            keep_idx = torch.tensor(keep, device=device)
            past.batch_select_indices(keep_idx)
            live, running = [live[i] for i in keep], [True] * len(keep)
            live_idx, nxt = live_idx[keep_idx], nxt[keep_idx]
            mask, position_ids = mask[keep_idx], position_ids[keep_idx]
        input_ids = nxt[:, None]  # (b, 1): the cache holds everything before it
        position_ids = position_ids[:, -1:] + 1
    results = []
    for row_ids, why in zip(ids, finish):
        text = tok.decode(row_ids, skip_special_tokens=True)
        for s in stop:
            text = text.split(s)[0]
        results.append({"ids": row_ids, "text": text, "finish": why})
    return results


def sample_problems(model, tok, problems: list[dict], prompt_ids: dict, n: int, seed: int,
                    batch_size: int, **gen):
    """n samples of every problem, the (problem, k) rows of several problems packed into each
    generate call of batch_size rows. Sample k of problem q draws with seed_for(seed, q, k), so it
    does not depend on the batch, the ranks or a resume. Yields (problem, its n generate outputs,
    rows done, tokens generated so far) as soon as a problem's last sample is back, for its record
    to be appended at once. `gen`: temperature, top_p, max_new_tokens, stop (see generate)."""
    rows = [(p, k) for p in problems for k in range(n)]
    outs_of, tokens = {p["id"]: [] for p in problems}, 0
    for b in range(0, len(rows), batch_size):
        chunk = rows[b:b + batch_size]
        outs = generate(model, tok, [prompt_ids[p["id"]] for p, _ in chunk],
                        seeds=[seed_for(seed, p["id"], k) for p, k in chunk], **gen)
        for (p, _), o in zip(chunk, outs):
            outs_of[p["id"]].append(o)
            tokens += len(o["ids"])
        for p, k in chunk:
            if k == n - 1:
                yield p, outs_of.pop(p["id"]), b + len(chunk), tokens


def response_eos(tok, out: dict) -> int | None:
    """The EOS a full solution made of this generate output ends with: the end id the model wrote
    (finish "eos"), the tokenizer's eos where a stop string ended it (the model was starting the
    next question: the answer is whole), none where max_new_tokens cut it (it is not whole)."""
    return {"eos": out["ids"][-1] if out["ids"] else None, "stop": tok.eos_token_id,
            "length": None}[out["finish"]]


def batch_size_arg(text: str) -> int | str:
    """argparse type of the sampling stages' --batch-size: a positive integer, or 'auto'
    (auto_batch_size sizes it once the model is loaded)."""
    import argparse
    if text == "auto":
        return text
    if not text.isdigit() or int(text) <= 0:
        raise argparse.ArgumentTypeError(f"'{text}' is neither a positive integer nor 'auto'")
    return int(text)


def kv_bytes_per_token(model, shards: int = 1) -> int:
    """KV-cache bytes of one position of one sequence on this rank: 2 (keys and values) x layers x
    kv_heads x head_dim x dtype bytes, kv_heads / shards under tensor parallel (each rank holds
    its share of the heads). Sliding-window layers are counted as full ones (an upper bound)."""
    cfg = model.config.get_text_config()
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return 2 * cfg.num_hidden_layers * math.ceil(kv_heads / shards) * head_dim * \
        model.dtype.itemsize


def free_memory(device) -> int:
    """Bytes this process can still allocate on `device`: the GPU's free memory plus what torch's
    caching allocator holds unused; on CPU, MemAvailable of /proc/meminfo."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))


def auto_batch_size(model, prompt_len: int, max_new_tokens: int, device, shards: int = 1,
                    free: int | None = None, margin: float = 0.2, limit: int = 1024) -> int:
    """--batch-size auto: the most generate rows that fit in `free` bytes (default: free_memory of
    `device` now, the model already loaded) less a `margin` share kept back for fragmentation and
    what the formula leaves out. With P = prompt_len (the longest prompt), N = max_new_tokens:

        row bytes = kv_bytes_per_token(model, shards) x (P + N)   its KV cache, allocated at once
                  + P x (4 x hidden + 3 x intermediate) x dtype   one layer's prefill activations
                  + vocab x 4 x 10                                logits and top-p sampling buffers
        batch     = floor(free x (1 - margin) / row bytes), clamped to [1, limit]

    Top-p sampling holds ~7 float32 copies of the (b, vocab) logits at its peak (measured); 10
    counts the logits themselves and leaves room. On SmolLM2 (CPU, float32) the formula fits 13
    rows in the peak memory a 16-row generate took: it errs on the safe side. CPU ranks of one
    host share its free memory; `limit` keeps a CPU host's tens of GB from asking for tens of
    thousands of rows. Under tensor parallel (shards = ranks > 1) every rank must run the same
    batches: all take the smallest rank's batch. Prints the batch and its figures (rank 0)."""
    cfg = model.config.get_text_config()
    kv = kv_bytes_per_token(model, shards)
    hidden = cfg.hidden_size
    prefill = prompt_len * (4 * hidden + 3 * getattr(cfg, "intermediate_size", 4 * hidden)) * \
        model.dtype.itemsize
    row = kv * (prompt_len + max_new_tokens) + prefill + cfg.vocab_size * 4 * 10
    if free is None:
        free = free_memory(device)
        if torch.device(device).type == "cpu":  # the ranks of one host share its memory
            free //= int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    batch = max(1, min(limit, int(free * (1 - margin) // row)))
    if shards > 1:
        smallest = torch.tensor([batch], device=device)
        dist.all_reduce(smallest, op=dist.ReduceOp.MIN)
        batch = int(smallest)
    print0(f"--batch-size auto: {batch} rows | {row / 2**20:.1f} MiB a row (KV cache "
           f"{kv / 2**10:.1f} KiB/token x ({prompt_len} prompt + {max_new_tokens} new tokens), "
           f"prefill {prefill / 2**20:.1f} MiB, logits {cfg.vocab_size * 40 / 2**20:.1f} MiB) | "
           f"{free / 2**30:.1f} GiB free on {torch.device(device).type}, {margin:.0%} kept back"
           + (f" | at most {limit}" if batch == limit else ""))
    return batch


# --------------------------------------------------------------------------------------------------
# Models: Hugging Face format, safetensors only


def load_tokenizer(path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        fail(f"cannot load tokenizer from '{path}': {str(e).splitlines()[0]}")
    if tok.pad_token_id is None:  # Llama-3 has none; padding is always masked, EOS serves
        tok.pad_token = tok.eos_token
    return tok


def load_model(path, device="cpu", dtype=torch.float32, trust_remote_code: bool = False,
               tp: bool = False):
    """An HF causal LM from a local dir or hub id. Pickle checkpoints (.bin/.pt) are refused:
    loading them can execute code. trust_remote_code stays off unless a flag asks.
    tp (under torchrun): tensor parallel over all ranks with transformers' tp_plan, each rank
    holding 1/world of every layer: how a 70B model samples on 8 GPUs of 80 GB."""
    from transformers import AutoModelForCausalLM, DistributedConfig
    p = Path(path)
    if p.is_dir() and not list(p.glob("*.safetensors")):
        if list(p.glob("*.bin")) or list(p.glob("*.pt")):
            fail(f"{path}: only pickle weights (.bin/.pt) found; convert them to safetensors")
        fail(f"{path}: no model.safetensors in this directory (run the stage that writes it)")
    if not p.exists() and (str(path).startswith((".", "/", "runs")) or str(path).count("/") > 1):
        fail(f"model '{path}' not found (run the stage that writes it, or pass --model)")
    try:
        sharded = {"distributed_config": DistributedConfig(tp_plan="auto")} if (
            tp and get_world() > 1) else {}
        model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code,
            **sharded)
    except (OSError, ValueError) as e:
        fail(f"cannot load model '{path}': {str(e).splitlines()[0]}")
    if sharded:
        print0(f"{path}: tensor parallel, 1/{get_world()} of each layer per rank")
    return model.to(device)


def work_share(tp: bool) -> tuple[int, int]:
    """(share, shares): this process takes records share, share + shares, ... By default every
    rank is a worker with a full model copy. Under --tp all ranks hold one model between them and
    run the same batches, so there is one share; rank 0 alone writes it."""
    return (0, 1) if tp else (get_rank(), get_world())


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


# --------------------------------------------------------------------------------------------------
# Training machinery


def adamw(model, lr: float, weight_decay: float, betas=(0.9, 0.999)):
    """AdamW with decay on matrices only (norms, biases and LoRA-free 1-D params are not decayed).
    fused=True: one multithreaded kernel per parameter group, also for FSDP2's DTensors and for
    CPU-offloaded states (PyTorch's default for DTensors is a per-tensor Python loop)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)


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
                   help="checkpoint and exit after this many steps (a job's time slot: run again "
                        "with --resume; the result equals one uninterrupted run)")


def warmup_steps(args, total: int) -> int:
    """--warmup-steps when given, else --warmup-ratio of the total steps."""
    return args.warmup_steps or round(args.warmup_ratio * total)


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


def _train_state(model, opt):
    """(model, optimizer) state dicts of the trained parameters only: a LoRA checkpoint holds the
    adapters and their moments, not the frozen base (70B: ~1 GB instead of 141 GB per save)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    msd, osd = get_state_dict(model, opt, options=StateDictOptions(ignore_frozen_params=True))
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in msd.items() if k in trained}, osd  # a tied lm_head slips through


def save_checkpoint(ckpt_dir, model, opt, step: int, keep: int = 1):
    """Sharded torch.distributed.checkpoint of the trained parameters + optimizer, plus each
    rank's RNG state; then all but the newest `keep` checkpoints are deleted (after latest.json
    names the new one, so a kill at any point leaves one whole checkpoint). The schedule is a
    pure function of `step` and the data order a pure function of the seed, so (weights, moments,
    step, RNG) is everything --resume needs to continue exactly."""
    import torch.distributed.checkpoint as dcp
    ckpt_dir = Path(ckpt_dir)
    msd, osd = _train_state(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(ckpt_dir / f"step{step:06d}"))
    torch.save(torch.get_rng_state(), ckpt_dir / f"step{step:06d}" / f"rng{get_rank()}.pt")
    barrier()
    if get_rank() == 0:
        write_json(ckpt_dir / "latest.json", {"step": step})
        for old in sorted(ckpt_dir.glob("step*"))[:-keep]:
            shutil.rmtree(old)
    barrier()


def load_checkpoint(ckpt_dir, model, opt, resume: bool = True) -> int:
    """--resume: restore the latest checkpoint in ckpt_dir and return its step (0 when there is
    none). A fresh run (resume=False) starts clean: rank 0 deletes what an earlier run left there."""
    if not resume:
        if get_rank() == 0 and Path(ckpt_dir).exists():
            shutil.rmtree(ckpt_dir)
        return 0
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
    latest = Path(ckpt_dir) / "latest.json"
    if not latest.exists():
        return 0
    step = json.loads(latest.read_text())["step"]
    path = Path(ckpt_dir) / f"step{step:06d}"
    msd, osd = _train_state(model, opt)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=str(path))
    # dcp.load fails on any trained tensor the checkpoint lacks; the frozen ones are not in it
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=StateDictOptions(strict=False))
    torch.set_rng_state(torch.load(path / f"rng{get_rank()}.pt", weights_only=True))
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


class Progress:
    """A single updating stderr line: done/total, rate, ETA and any running figures (rank 0)."""

    def __init__(self, total: int, unit: str = "it", every: float = 0.5):
        self.total, self.unit, self.every = total, unit, every
        self.start = self.last = time.time()
        self.done = 0

    def update(self, n: int = 1, **figures):
        self.done += n
        now = time.time()
        if get_rank() != 0 or (now - self.last < self.every and self.done < self.total):
            return
        self.last = now
        rate = self.done / max(now - self.start, 1e-9)
        eta = (self.total - self.done) / max(rate, 1e-9)
        extra = "".join(f" | {k} {v:.4g}" if isinstance(v, float) else f" | {k} {v}"
                        for k, v in figures.items())
        print(f"\r{self.done}/{self.total} {self.unit} | {rate:.2f} {self.unit}/s | "
              f"eta {eta:.0f}s{extra}   ", end="", file=sys.stderr, flush=True)

    def close(self):
        if get_rank() == 0:
            print(file=sys.stderr, flush=True)
