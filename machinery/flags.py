"""The flags: one vocabulary for every stage, each building its parser from these.

  add_run_args       --run-dir, --model, --data, --out, --limit, --seed
  add_model_args     --bf16, --tp, --trust-remote-code of the stages that run models untrained
  add_training_args  optimization, batch layout, scale and checkpoint flags of 03, 05 and 06
  add_sampling_args  --template, --n, --temperature, --top-p, --max-new-tokens, --batch-size
                     of 01 and 07 (machinery.sampling.GradedSampling reads them), and
                     check_sampling_args
"""
import argparse

from common import fail
from machinery.mathtext import add_template_arg


def count(text: str) -> int:
    """argparse type of --limit: an integer >= 0."""
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"'{text}' is not an integer >= 0")
    return int(text)


def add_run_args(parser, *, data: str, out: str, limit: str, model: str | None = None,
                 seed: str | None = None, limit_default: int = 0, sets: bool = False):
    """The "run" group a stage starts with: --run-dir, --model,
    --data, --out, --limit and, where the stage draws anything, --seed. The keywords are the
    stage's help texts (`out`: the output's default path in the run dir; `limit`: what --limit
    counts). sets: --data, --out and --limit repeat, a data set each (07: several sets in one
    run; the stage reads lists, None where a flag is not given). Returns the group, for a
    stage's own run flags (--split, --label, --pos-model)."""
    g = parser.add_argument_group("run")
    g.add_argument("--run-dir", default="runs/toy",
                   help="run directory shared by all stages (%(default)s)")
    if model:
        g.add_argument("--model", default=None, help=model)
    each = dict(action="append", default=None) if sets else {}
    g.add_argument("--data", **{"default": None, **each}, help=data + (
        "; repeat for several sets, one --out each" if sets else ""))
    g.add_argument("--out", **{"default": None, **each}, help=f"output dir (default: "
                   f"<run-dir>/{out})" + ("; one per --data" if sets else ""))
    g.add_argument("--limit", type=count, **{"default": limit_default, **each},
                   help=f"use the first K {limit} (0: all; default {limit_default})" + (
                       "; one for every set or one per --data" if sets else ""))
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
