"""Graded sampling and batch sizing: the sampling loop 01 and 07 share, and what sizes its batches.

  GradedSampling    n seeded samples of each problem, all through one generation.Sampler (a full
                    batch every step), each sample graded as soon as its problem's last one is
                    back, a progress line, the throughput summed over ranks (its flags:
                    flags.add_sampling_args)
  response_eos      the end id a finished sample is trained with (03, 04)
  batch sizing      --batch-size auto: auto_batch_size from kv_bytes_per_token and free_memory
"""
import math
import os
import time

import torch
import torch.distributed as dist

from common import all_reduce_sum, encode_prompt, get_world, print0, seed_for
from machinery.generation import Sampler
from machinery.mathtext import grade, STOP_STRINGS
from machinery.resume import Progress, work_share


class GradedSampling:
    """The sampling loop of 01 and 07: args.n samples of each problem (generate, with the flags
    of add_sampling_args and STOP_STRINGS), each graded against the problem's answer.

        sampling = GradedSampling(args, device)
        for i, samples, outs in sampling.run(model, tok, todo, prompts):
            ...                                  # the stage stores problem todo[i]'s record
        speed = sampling.throughput()            # every rank: a collective

    run yields as soon as a problem's last sample is back: i its place in `problems` (several
    sets may be evaluated in one run: their ids need not be distinct), outs[k] generate's output for
    sample k ({ids, text, finish}) and samples[k] its grade {text, pred, correct, truncated}
    (mathtext.grade: a sample cut by --max-new-tokens is never right). A progress line shows
    samples/s, generated tok/s and the shares of right and of truncated samples so far."""

    def __init__(self, args, device):
        self.args, self.device = args, device
        self.rows, self.tokens, self.seconds = 0, 0, 0.0  # this process, this run

    def run(self, model, tok, problems: list[dict], prompts: list[str]):
        """problems: this rank's [{id, answer, ...}] still to do; prompts: their prompt texts."""
        a = self.args
        ids = [encode_prompt(tok, text) for text in prompts]
        batch_size = a.batch_size if a.batch_size != "auto" else auto_batch_size(
            model, max(map(len, ids), default=0), a.max_new_tokens, self.device,
            get_world() if a.tp else 1)
        # One Sampler for every (problem, k) row: a full batch every step, each problem's
        # prompt computed once for its n rows. Sample k of problem q draws with
        # seed_for(seed, q, k): it does not depend on the batch, the ranks or a resume.
        sampler = Sampler(model, tok, batch_size, temperature=a.temperature, top_p=a.top_p,
                          max_new_tokens=a.max_new_tokens, stop=tuple(STOP_STRINGS))
        for i, p in enumerate(problems):
            for k in range(a.n):
                sampler.add((i, k), ids[i], seed_for(a.seed, p["id"], k))
        outs_of = {i: {} for i in range(len(problems))}
        progress = Progress(len(problems), unit="problems")
        right, cut, graded, t0 = 0, 0, 0, time.time()
        for (i, k), o in sampler.results():
            outs_of[i][k] = o
            self.rows, self.tokens = self.rows + 1, self.tokens + len(o["ids"])
            if len(outs_of[i]) < a.n:
                continue
            p, got = problems[i], outs_of.pop(i)
            p_outs = [got[k] for k in range(a.n)]
            samples = []  # its last sample is back: grade them all
            for o in p_outs:
                pred, correct = grade(o["text"], p["answer"], o["finish"] == "length")
                samples.append({"text": o["text"], "pred": pred, "correct": correct,
                                "truncated": o["finish"] == "length"})
            yield i, samples, p_outs
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
