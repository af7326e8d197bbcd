"""Field checks for common.read_jsonl: what a record's field must be, as a message when it is not.

read_jsonl(path, required={"id": str, "prompt_ids": token_ids(vocab), ...}) takes a type, a tuple
of types or one of the checks below per field, and stops with one line naming file:line and the
field (common.fail, exit code 2). The checks return None for a good value, else what is wrong.
"""
import json
import math


def kind(v) -> str:
    return "null" if v is None else type(v).__name__


def value_error(value, spec) -> str | None:
    """What is wrong with a field's value: spec is a type or tuple of types (a bool is no int
    unless bool is named; type(None) allows null) or a check such as token_ids(vocab)."""
    if not isinstance(spec, (type, tuple)):
        return spec(value)
    types = spec if isinstance(spec, tuple) else (spec,)
    if isinstance(value, types) and (bool in types or not isinstance(value, bool)):
        return None
    return (f"should be {' or '.join('null' if t is type(None) else t.__name__ for t in types)}"
            f", got {kind(value)}")


def record_error(rec, required: dict | None, optional: dict | None = None) -> str | None:
    """What is wrong with one record: not an object, a required field missing, a field of the
    wrong type or value."""
    if not isinstance(rec, dict):
        return f"expected a JSON object, got {kind(rec)}"
    for field in required or {}:
        if field not in rec:
            return f"missing field '{field}'"
    for field, spec in [*(required or {}).items(), *(optional or {}).items()]:
        if field in rec and (err := value_error(rec[field], spec)):
            return f"field '{field}' {err}"
    return None


def token_id(vocab: int | None, null: bool = False):
    """One token id, an int in [0, vocab) (or null where allowed)."""
    def check(x):
        if x is None and null:
            return None
        if type(x) is not int:
            return f"should be a token id (an integer), got {json.dumps(x)[:40]}"
        if x < 0 or vocab is not None and x >= vocab:
            return (f"holds token id {x}, outside this tokenizer's vocabulary [0, {vocab}) "
                    "(written with another tokenizer? re-run the stage that writes it)")
        return None
    return check


def token_ids(vocab: int | None):
    """A list of token ids, each an int in [0, vocab)."""
    one = token_id(vocab)

    def check(v):
        if not isinstance(v, list):
            return f"should be a list of token ids, got {kind(v)}"
        return next((f"item {i} {err}" for i, x in enumerate(v) if (err := one(x))), None)
    return check


def numbers(v) -> str | None:
    """A list of finite numbers (token weights)."""
    if not isinstance(v, list):
        return f"should be a list of numbers, got {kind(v)}"
    return next((f"item {i} should be a finite number, got {json.dumps(x)[:40]}"
                 for i, x in enumerate(v) if type(x) not in (int, float) or not math.isfinite(x)),
                None)


def each(required: dict, optional: dict | None = None):
    """A list of JSON objects, each with the `required` fields and, where present, `optional`
    ones of their types (01's samples: text, pred, correct, ...)."""
    def check(v):
        if not isinstance(v, list):
            return f"should be a list, got {kind(v)}"
        return next((f"item {i}: {err}" for i, x in enumerate(v)
                     if (err := record_error(x, required, optional))), None)
    return check
