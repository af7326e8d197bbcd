"""Resume and progress: the record-by-record stages (01, 02, 04, 07, 08) lose nothing to a kill.

  ResumableJsonl  append-only JSONL by record id (a kill loses nothing, a restart duplicates
                  nothing), guarded by a fingerprint of the inputs (file_stamp)
  work_share      which records this process takes (data parallel, or one share under --tp)
  resume_share    those of them no earlier run finished, and the store to append them to
  Progress        one updating stderr line: done/total, rate, ETA
"""
import json
import os
import sys
import time
from pathlib import Path

from common import (barrier, fail, get_rank, get_world, jsonl_text, read_json, read_jsonl,
                    write_json, write_text)


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
