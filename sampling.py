"""Running a model over many records: batched generation and the long stages' bookkeeping.

Shared by the stages that generate or score record by record (01, 02, 04, 07, 08) and by the toy
world (00):

  generate          (from generation.py, where the sampler lives) per-row seeded sampling with
                    continuous batching, each prompt computed once; stops at every end id and
                    stop string and says why it stopped
  GradedSampling    the loop of 01 and 07: n seeded samples of each problem, all through one
                    Sampler (a full batch every step), each sample graded as soon as its
                    problem's last one is back, a progress line, the throughput summed over
                    ranks; add_sampling_args /
                    check_sampling_args: its flags and their checks
  response_eos      the end id a finished sample is trained with (03, 04)
  batch sizing      --batch-size auto: auto_batch_size from kv_bytes_per_token and free_memory
  resume            ResumableJsonl: append-only JSONL by record id (a kill loses nothing, a
                    restart duplicates nothing), guarded by a fingerprint of the inputs
                    (file_stamp); work_share: which records this process takes (data parallel
                    or --tp); resume_share: those of them no earlier run finished, and the store
  Progress          one updating stderr line: done/total, rate, ETA
"""
import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from common import (all_reduce_sum, barrier, encode_prompt, fail, get_rank, get_world,
                    jsonl_text, print0, read_json, read_jsonl, seed_for, write_json, write_text)
from generation import end_ids, generate, Sampler  # noqa: F401 (the stages' imports)
from mathtext import add_template_arg, grade, STOP_STRINGS


class GradedSampling:
    """The sampling loop of 01 and 07: args.n samples of each problem (generate, with the flags
    of add_sampling_args and STOP_STRINGS), each graded against the problem's answer.

        sampling = GradedSampling(args, device)
        for problem, samples, outs in sampling.run(model, tok, todo, prompts):
            ...                                  # the stage stores the problem's record
        speed = sampling.throughput()            # every rank: a collective

    run yields as soon as a problem's last sample is back: outs[k] is generate's output for
    sample k ({ids, text, finish}) and samples[k] its grade {text, pred, correct, truncated}
    (mathtext.grade: a sample cut by --max-new-tokens is never right). A progress line shows
    samples/s, generated tok/s and the shares of right and of truncated samples so far."""

    def __init__(self, args, device):
        self.args, self.device = args, device
        self.rows, self.tokens, self.seconds = 0, 0, 0.0  # this process, this run

    def run(self, model, tok, problems: list[dict], prompts: dict):
        """problems: this rank's [{id, answer, ...}] still to do; prompts: id -> prompt text."""
        a = self.args
        ids = {p["id"]: encode_prompt(tok, prompts[p["id"]]) for p in problems}
        batch_size = a.batch_size if a.batch_size != "auto" else auto_batch_size(
            model, max(map(len, ids.values()), default=0), a.max_new_tokens, self.device,
            get_world() if a.tp else 1)
        # One Sampler for every (problem, k) row: a full batch every step, each problem's
        # prompt computed once for its n rows. Sample k of problem q draws with
        # seed_for(seed, q, k): it does not depend on the batch, the ranks or a resume.
        sampler = Sampler(model, tok, batch_size, temperature=a.temperature, top_p=a.top_p,
                          max_new_tokens=a.max_new_tokens, stop=tuple(STOP_STRINGS))
        for p in problems:
            for k in range(a.n):
                sampler.add((p["id"], k), ids[p["id"]], seed_for(a.seed, p["id"], k))
        problem_of = {p["id"]: p for p in problems}
        outs_of = {p["id"]: {} for p in problems}
        progress = Progress(len(problems), unit="problems")
        right, cut, graded, t0 = 0, 0, 0, time.time()
        for (pid, k), o in sampler.results():
            outs_of[pid][k] = o
            self.rows, self.tokens = self.rows + 1, self.tokens + len(o["ids"])
            if len(outs_of[pid]) < a.n:
                continue
            p, got = problem_of[pid], outs_of.pop(pid)
            p_outs = [got[k] for k in range(a.n)]
            samples = []  # its last sample is back: grade them all
            for o in p_outs:
                pred, correct = grade(o["text"], p["answer"], o["finish"] == "length")
                samples.append({"text": o["text"], "pred": pred, "correct": correct,
                                "truncated": o["finish"] == "length"})
            yield p, samples, p_outs
            right += sum(s["correct"] for s in samples)
            cut += sum(s["truncated"] for s in samples)
            graded += len(samples)
            dt = time.time() - t0
            progress.update(1, samples_s=self.rows / dt, tok_s=self.tokens / dt,
                            acc=right / graded, truncated=cut / graded)
        progress.close()
        self.seconds = time.time() - t0

    def throughput(self) -> dict:
        """Samples and generated tokens of this run (resumed work excluded), summed over ranks,
        and their rates. Under --tp every rank ran the same rows: counted once (x shares / world,
        in integers: a float32 count would round past 2^24 tokens)."""
        _, shares = work_share(self.args.tp)
        rows_tokens = torch.tensor([self.rows, self.tokens], device=self.device)  # (2,) int64
        samples, tokens = (all_reduce_sum(rows_tokens) * shares // get_world()).tolist()
        seconds = max(self.seconds, 1e-9)
        return {"samples": int(samples), "generated_tokens": int(tokens),
                "seconds": round(self.seconds, 2), "samples_per_s": samples / seconds,
                "tokens_per_s": tokens / seconds, "ranks": get_world()}


def response_eos(tok, out: dict) -> int | None:
    """The EOS a full solution made of this generate output ends with: the end id the model wrote
    (finish "eos"), the tokenizer's eos where a stop string ended it (the model was starting the
    next question: the answer is whole), none where max_new_tokens cut it (it is not whole)."""
    return {"eos": out["ids"][-1] if out["ids"] else None, "stop": tok.eos_token_id,
            "length": None}[out["finish"]]


def batch_size_arg(text: str) -> int | str:
    """argparse type of the sampling stages' --batch-size: a positive integer, or 'auto'
    (auto_batch_size sizes it once the model is loaded)."""
    if text == "auto":
        return text
    if not text.isdigit() or int(text) <= 0:
        raise argparse.ArgumentTypeError(f"'{text}' is neither a positive integer nor 'auto'")
    return int(text)


def add_sampling_args(parser, *, n: int, temperature: float):
    """The sampling flags of 01 and 07 (GradedSampling reads them), in a group "sampling"; the
    stage passes its defaults (01: 8 samples at temperature 1; 07: one greedy answer)."""
    g = parser.add_argument_group("sampling")
    add_template_arg(g)
    g.add_argument("--n", type=int, default=n, help="samples per problem (%(default)s)")
    g.add_argument("--temperature", type=float, default=temperature,
                   help="sampling temperature; 0 = greedy (%(default)s)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus mass (%(default)s)")
    g.add_argument("--max-new-tokens", type=int, default=128,
                   help="tokens per sample, at most (%(default)s); a sample cut there is "
                        "truncated and never right")
    g.add_argument("--batch-size", type=batch_size_arg, default=64,
                   help="sequences per forward (%(default)s), or auto: as many as the free "
                        "device memory holds, sized per model (the KV cache of the longest "
                        "prompt + --max-new-tokens, sampling.auto_batch_size)")
    return g


def check_sampling_args(args):
    """Stop on sampling flags that make no sense, before anything is written."""
    if args.n <= 0 or args.max_new_tokens <= 0:
        fail("--n and --max-new-tokens must be positive")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        fail("--temperature must be >= 0 and --top-p in (0, 1]")
    if args.temperature == 0 and args.n > 1:
        fail("--n > 1 at --temperature 0 draws the same greedy answer n times; set a temperature")


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


def work_share(tp: bool) -> tuple[int, int]:
    """(share, shares): this process takes records share, share + shares, ... By default every
    rank is a worker with a full model copy. Under --tp all ranks hold one model between them and
    run the same batches, so there is one share; rank 0 alone writes it."""
    return (0, 1) if tp else (get_rank(), get_world())


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
        self.done = {}
        stamp = self.path.with_name(f"{self.path.name}.fingerprint.json")
        if fingerprint is not None:  # resume only what the same inputs and settings produced
            fingerprint = json.loads(json.dumps(fingerprint))  # tuples -> lists, as stored
            prev = read_json(stamp, hint="delete it, or pass another --out") \
                if stamp.exists() else None
            parts = self.path.parent.glob(f"{self.path.name}.part*")
            if prev not in (None, fingerprint) and (self.path.exists() or any(parts)):
                changed = sorted(k for k in {*prev, *fingerprint}
                                 if prev.get(k) != fingerprint.get(k))
                fail(f"{self.path} holds records of another run ({', '.join(changed)} changed: a "
                     "retrained model or rewritten input counts); pass another --out or delete it")
        # every record read (a damaged one stops here, one line) before anything is written
        for part in sorted(self.path.parent.glob(f"{self.path.name}.part*")):
            self._load(part)
        if self.path.exists():  # a finished earlier run: everything in it is done
            for rec in read_jsonl(self.path, {"id": str}):
                self.done[rec["id"]] = rec
        if fingerprint is not None:
            barrier()  # every rank has compared before rank 0 rewrites the stamp
            if rank == 0 and writer:
                write_json(stamp, fingerprint)
        self.part.parent.mkdir(parents=True, exist_ok=True)
        if writer and self.part.exists():  # drop a torn last line: a write killed midway
            os.truncate(self.part, self.part.read_bytes().rfind(b"\n") + 1)
        self._f = open(self.part, "a", encoding="utf-8") if writer else None

    def _load(self, part: Path):
        for rec in read_jsonl(part, {"id": str}, partial=True):
            self.done[rec["id"]] = rec

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
            self._load(part)
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


def resume_share(path, records: list[dict], tp: bool, fingerprint: dict):
    """(store, todo): this process's ResumableJsonl at `path` (under --tp only rank 0
    writes) and its share of `records` (work_share) that no earlier run with the same
    fingerprint finished. Rank 0 merges the shares in the end: store.merge(ids)."""
    share, shares = work_share(tp)
    store = ResumableJsonl(path, share, fingerprint=fingerprint, writer=get_rank() == 0 or not tp)
    return store, [r for r in records[share::shares] if r["id"] not in store.done]


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
