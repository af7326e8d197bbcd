"""Reading a model dir safely: checked before it loads, safetensors only, one line on damage.

  check_model_dir   configs that parse, whole safetensors files, every shard the index names
  load_tokenizer    the tokenizer, refused when it has more tokens than the model's embeddings
  load_model        an HF causal LM (no pickle weights, no remote code unless asked; --tp: tensor
                    parallel over the ranks with transformers' tp_plan)
Training loads through common.load_for_training, which calls load_model on rank 0.
"""
import json
from pathlib import Path

import torch

from common import fail, get_world, print0, read_json

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
