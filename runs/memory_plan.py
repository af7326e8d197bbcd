"""Memory of the training stages of runs/multigpu.sh, per GPU and on the host, from each model's
shape: the arithmetic behind README's table, the check a recipe runs before it starts, and the
prediction bench/gpu_check.py measures against.

    python runs/memory_plan.py                      # README's table (markdown)
    python runs/memory_plan.py --check llama3-70b   # exit 2, with the arithmetic, if this node
                                                    # lacks the GPU or host memory a stage needs

Bytes per parameter P (N ranks, FSDP2, --bf16):
  trained parameters   float32 master 4 + float32 gradient 4 + AdamW moments 8 = 16 P / N
                       (gradients are reduce-scattered every micro-batch: optimization.sync_gradients)
  LoRA frozen base     bf16 2 P / N (load_for_training); adapters as trained parameters
  gathered layers      bf16 copies of the layer being computed and the one prefetched, plus the
                       root's embeddings and LM head, which FSDP2 keeps gathered for the step
  --cpu-offload        the 16 P / N move to pinned host memory; only the gathered layers remain
Activations of one micro-batch of s sequences x T tokens, with activation checkpointing: each
layer's bf16 input (s T h 2 bytes x layers), one layer recomputed with its backward
(~2 x s T (6 h + 4 i) x 2 bytes), and the logits: bf16 logits and their gradient plus
token_logps' float32 chunk of at most 1/8 of the positions (s T V x (2 + 2 + 0.5) bytes).
Host: rank 0 reads the checkpoint in its bf16 (2 P), and at the end gathers the trained model
(float32 4 P for full tuning; the bf16 base for LoRA, merged one tensor at a time).
Nothing here has been checked against a GPU yet: bench/gpu_check.py prints measured against
predicted.
"""
import argparse
import sys

GB = 1e9
SHAPES = {  # the models' published config.json values
    "llama3-8b": dict(hidden=4096, inter=14336, layers=32, heads=32, kv_heads=8, vocab=128256),
    "deepseek-math-7b": dict(hidden=4096, inter=11008, layers=30, heads=32, kv_heads=32,
                             vocab=102400),
    "llama3-70b": dict(hidden=8192, inter=28672, layers=80, heads=64, kv_heads=8, vocab=128256),
}
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
# The training stages of each recipe in runs/multigpu.sh (tests/test_recipes.py checks that they
# agree): stage -> (ranks, LoRA rank, LoRA targets, micro-batch records, sequences per record,
# --cpu-offload)
RECIPES = {}
for name in ("llama3-8b", "deepseek-math-7b", "llama3-70b", "llama3-8b-full"):
    lora = name != "llama3-8b-full"
    RECIPES[name] = {
        "03_contrastive_sft": (6, 8 if lora else 0, MLP, 1, 1, False),
        "05_train_cdpo": (8, 16 if lora else 0, ATTN + MLP, 1, 2, False),
        "06_train_stepdpo": (8, 0, [], 2 if name == "llama3-70b" else 4, 2,
                             name == "llama3-70b"),
    }
MAX_LENGTH = 1024


def linear_shapes(s: dict) -> dict:
    """(in, out) of each projection of one decoder layer."""
    h, i, hd = s["hidden"], s["inter"], s["hidden"] // s["heads"]
    kv = s["kv_heads"] * hd
    return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def n_params(s: dict) -> tuple[int, int, int]:
    """(all parameters, one decoder layer's, the root's: embeddings + final norm + LM head)."""
    layer = sum(a * b for a, b in linear_shapes(s).values()) + 2 * s["hidden"]  # + 2 norms
    root = 2 * s["vocab"] * s["hidden"] + s["hidden"]  # untied embeddings and LM head
    return s["layers"] * layer + root, layer, root


def n_lora(s: dict, r: int, targets: list[str]) -> int:
    """LoRA parameters: r (in + out) per targeted projection per layer."""
    return s["layers"] * sum(r * (a + b) for t, (a, b) in linear_shapes(s).items()
                             if t in targets)


def plan(s: dict, world: int, lora_r: int, targets: list[str], micro: int, seqs: int,
         offload: bool, T: int = MAX_LENGTH) -> dict:
    """GB per GPU and on the host for one training stage (see the module docstring)."""
    P, layer, root = n_params(s)
    L = n_lora(s, lora_r, targets) if lora_r else 0
    trained = L if lora_r else P
    states = 16 * trained / world  # float32 master + gradient + AdamW moments
    frozen = 2 * P / world if lora_r else 0.0
    gathered = 2 * (2 * layer + root)  # bf16
    tokens = micro * seqs * T
    h, i, V = s["hidden"], s["inter"], s["vocab"]
    activations = tokens * h * 2 * s["layers"] + 2 * tokens * (6 * h + 4 * i) * 2
    logits = tokens * V * 4.5
    gpu = {"weights + grads + AdamW": 0.0 if offload else states, "frozen base": frozen,
           "gathered layers": gathered, "activations": activations, "logits": logits}
    host_offload = 16 * trained if offload else 0.0  # all ranks of the node, pinned
    host = {"offloaded states (node)": host_offload, "rank 0 load": 2 * P,
            "rank 0 save": 2 * P if lora_r else 4 * P}
    return {"params": P, "trained": trained,
            "gpu": {k: v / GB for k, v in gpu.items()}, "gpu_total": sum(gpu.values()) / GB,
            "host": {k: v / GB for k, v in host.items()},
            "host_total": (host_offload + max(host["rank 0 load"], host["rank 0 save"])) / GB}


def recipe_plans(recipe: str) -> dict:
    shape = SHAPES[recipe.removesuffix("-full")]
    return {stage: plan(shape, world, r, targets, micro, seqs, offload)
            for stage, (world, r, targets, micro, seqs, offload) in RECIPES[recipe].items()}


def markdown() -> str:
    rows = ["| recipe | stage | parameters (trained) | states | frozen | gathered | "
            "activations + logits | **per GPU** | host (node) |",
            "|---|---|---|---|---|---|---|---|---|"]
    for recipe in RECIPES:
        for stage, p in recipe_plans(recipe).items():
            world, r, _, micro, seqs, offload = RECIPES[recipe][stage]
            g = p["gpu"]
            how = (f"LoRA r{r}" if r else "full") + (", offload" if offload else "")
            rows.append(
                f"| {recipe} | {stage[:2]} {how}, {world} GPUs, {micro}x{seqs}x{MAX_LENGTH} | "
                f"{p['params'] / 1e9:.1f}B ({p['trained'] / 1e9:.2f}B) | "
                f"{g['weights + grads + AdamW']:.1f} | {g['frozen base']:.1f} | "
                f"{g['gathered layers']:.1f} | {g['activations'] + g['logits']:.1f} | "
                f"**{p['gpu_total']:.1f}** | {p['host_total']:.0f} |")
    return "\n".join(rows)


def host_gb() -> float:
    with open("/proc/meminfo") as f:
        return next(int(x.split()[1]) for x in f if x.startswith("MemTotal:")) * 1024 / GB


def check(recipe: str, gpu_gb: float, host: float) -> list[str]:
    """One line per stage that does not fit, with its arithmetic (empty: the recipe fits)."""
    problems = []
    for stage, p in recipe_plans(recipe).items():
        parts = ", ".join(f"{k} {v:.1f}" for k, v in p["gpu"].items())
        if p["gpu_total"] > 0.95 * gpu_gb:
            problems.append(f"{recipe} {stage}: {p['gpu_total']:.0f} GB per GPU ({parts}) > "
                            f"{gpu_gb:.0f} GB")
        if p["host_total"] > 0.9 * host:
            hparts = ", ".join(f"{k} {v:.0f}" for k, v in p["host"].items())
            way = ("more nodes without --cpu-offload (16 bytes a parameter spread over all "
                   "GPUs) or a node" if RECIPES[recipe][stage][5] else "a node")
            problems.append(f"{recipe} {stage}: {p['host_total']:.0f} GB of host memory "
                            f"({hparts}) > 90% of this node's {host:.0f} GB; needs {way} with "
                            "more memory")
    return problems


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", choices=sorted(RECIPES), help="check this node for a recipe")
    parser.add_argument("--gpu-gb", type=float, default=0,
                        help="memory of one GPU (default: this node's GPU 0, else 80)")
    args = parser.parse_args()
    if not args.check:
        print(markdown())
        return
    gpu = args.gpu_gb
    if not gpu:
        import torch
        gpu = torch.cuda.get_device_properties(0).total_memory / GB if \
            torch.cuda.is_available() else 80.0
    problems = check(args.check, gpu, host_gb())
    for line in problems:
        print(f"error: {line}", file=sys.stderr)
    if problems:
        raise SystemExit(2)
    print(f"{args.check}: every training stage fits {gpu:.0f} GB GPUs and this host")


if __name__ == "__main__":
    main()
