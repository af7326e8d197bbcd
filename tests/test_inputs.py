"""Every input of every stage against every kind of damage real files have (the bad-input matrix).

A case is (stage, input, damage): a small valid input set (the toy world's model and problems,
and hand-made samples, pairs, scored pairs, step pairs, run files) is copied into the case's own
directory, one input is damaged the way real files are (missing, empty, a torn last or middle
line, bytes that are not UTF-8, a JSON value that is not an object, a missing field, a field of
the wrong type, token ids that are no token ids, lists that should be parallel and are not, a torn
or empty weights file, a config that does not parse, a tokenizer that does not match the model's
vocabulary, a damaged resume directory) and the stage is run in-process, as `main(parser.parse_
args(argv))`. Each must stop with exit code 2 and one line on stderr that names the file (and its
line and field where there is one), write nothing, and leave every file as it was. Two cases run
as a real process too, to show that no traceback reaches the terminal.
"""
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from common import encode_prompt, encode_response
from machinery.models import load_tokenizer
from conftest import load_stage, ROOT
from machinery.mathtext import format_prompt, split_steps

pytestmark = pytest.mark.usefixtures("one_thread")

STAGES = {}


def stage(name: str):
    """The numbered stage whose name starts with `name` ('05' -> 05_train_cdpo), loaded once."""
    if name not in STAGES:
        script = next(p.stem for p in ROOT.glob(f"{name}_*.py"))
        STAGES[name] = load_stage(script)
    return STAGES[name]


# Valid inputs, small: every case damages a copy of one of them

@pytest.fixture(scope="module")
def valid(toy_world, tmp_path_factory) -> Path:
    """<dir>/model (the toy world's), problems.jsonl (3 toy problems), samples.jsonl (01's
    records: a right and a wrong sample each), pairs.jsonl (03's), scored.jsonl (04's),
    steps.jsonl (02's), judge.txt, and run/ (what 09 reads: two results.json, a metrics.jsonl)."""
    d = tmp_path_factory.mktemp("valid")
    shutil.copytree(toy_world / "00_toy" / "model", d / "model")
    tok = load_tokenizer(d / "model")
    raw = (toy_world / "00_toy" / "test.jsonl").read_text(encoding="utf-8").splitlines()[:3]
    (d / "problems.jsonl").write_text("\n".join(raw) + "\n", encoding="utf-8")
    samples, pairs, scored, steps = [], [], [], []
    for p in map(json.loads, raw):
        worked, gold = p["answer"].split("\n#### ")
        prompt = format_prompt(p["question"], "plain")
        right = f" {worked}\nThe answer is {gold}."
        wrong = f" {worked}\nThe answer is {int(gold) + 1}."
        samples.append({"id": p["id"], "question": p["question"], "answer": gold, "prompt": prompt,
                        "samples": [{"text": right, "pred": gold, "correct": True,
                                     "truncated": False, "eos_id": tok.eos_token_id},
                                    {"text": wrong, "pred": str(int(gold) + 1), "correct": False,
                                     "truncated": False, "eos_id": tok.eos_token_id}],
                        "step_values": p["step_values"]})
        pairs.append({"id": p["id"], "prompt": prompt, "chosen": right, "rejected": wrong,
                      "chosen_eos_id": tok.eos_token_id, "rejected_eos_id": tok.eos_token_id,
                      "answer": gold})
        c, r = encode_response(tok, right, eos=True), encode_response(tok, wrong, eos=True)
        scored.append({"id": p["id"], "prompt_ids": encode_prompt(tok, prompt), "chosen_ids": c,
                       "rejected_ids": r, "chosen_weights": [0.5] * len(c),
                       "rejected_weights": [0.5] * len(r), "prompt": prompt, "chosen": right,
                       "rejected": wrong, "answer": gold})
        s_right, s_wrong = split_steps(right), split_steps(wrong)
        steps.append({"id": f"{p['id']}-s1-c0", "problem_id": p["id"], "prompt": prompt,
                      "prefix": "".join(s_right[:-1]), "chosen": s_right[-1],
                      "rejected": s_wrong[-1], "step_idx": len(s_right),
                      "rollouts": {"0": 1}, "answer": gold})
    for name, recs in (("samples", samples), ("pairs", pairs), ("scored", scored),
                       ("steps", steps)):
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs),
                                         encoding="utf-8")
    shutil.copy(ROOT / "prompts" / "judge_steps.txt", d / "judge.txt")
    for label in ("base", "cdpo"):
        res = {"label": label, "accuracy": 0.5, "ci95": [0.1, 0.9], "n": 2, "n_correct": 1,
               "n_unparsed": 0, "n_truncated": 0,
               "config": {"model": str(d / "model"), "data": str(d / "problems.jsonl")}}
        (d / "run" / "07_eval" / label).mkdir(parents=True)
        (d / "run" / "07_eval" / label / "results.json").write_text(json.dumps(res, indent=2))
    (d / "run" / "05_train_cdpo").mkdir()
    (d / "run" / "05_train_cdpo" / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "loss": 0.69 - 0.01 * s, "margin": 0.01 * s, "reward_acc": 0.5,
                    "chosen_reward": 0.0, "dt": 0.1}) + "\n" for s in range(3)))
    return d


# The damage, done to a copy

def lines_of(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def edit(path: Path, k: int, change):
    """Apply change(record) to the record on line k + 1 of a JSONL file."""
    lines = lines_of(path)
    rec = json.loads(lines[k])
    change(rec)
    lines[k] = json.dumps(rec).encode() + b"\n"
    path.write_bytes(b"".join(lines))


def set_item(field, i, value):
    def change(rec):
        rec[field][i] = value
    return change


def torn(path: Path, k: int):
    """Line k + 1 cut in the middle: the last line of an interrupted write, or (k inside the
    file) a block lost in a copy."""
    lines = lines_of(path)
    cut = lines[k][:len(lines[k]) // 2]
    lines[k] = cut if k == len(lines) - 1 else cut + b"\n"
    path.write_bytes(b"".join(lines))


def not_utf8(path: Path, k: int):
    """Line k + 1 re-saved by a spreadsheet in cp1252: an accented letter is one byte, no UTF-8."""
    lines = lines_of(path)
    rec = json.loads(lines[k])
    rec["note"] = "café, résumé"
    lines[k] = json.dumps(rec, ensure_ascii=False).encode("cp1252") + b"\n"
    path.write_bytes(b"".join(lines))


def jsonl_damage(path: Path, damage: str, field: str, wrong):
    """Damage a 3-record JSONL file; returns (line number named, field named) of the error."""
    if damage == "missing":
        path.unlink()
        return None, None
    if damage == "empty":
        path.write_bytes(b"")
        return None, None
    if damage == "torn-last-line":
        torn(path, 2)
        return 3, None
    if damage == "torn-middle-line":
        torn(path, 1)
        return 2, None
    if damage == "not-utf8":
        not_utf8(path, 1)
        return 2, None
    if damage == "not-an-object":
        lines = lines_of(path)
        lines[1] = b'["a", "list", "not", "a", "record"]\n'
        path.write_bytes(b"".join(lines))
        return 2, None
    if damage == "missing-field":
        edit(path, 1, lambda rec: rec.pop(field))
        return 2, field
    if damage == "wrong-type":
        edit(path, 1, lambda rec: rec.update({wrong[0]: wrong[1]}))
        return 2, wrong[0]
    raise ValueError(damage)


def model_damage(model: Path, damage: str) -> Path:
    """Damage a copy of the toy model dir; returns the path the error must name."""
    if damage == "missing":
        shutil.rmtree(model)
        return model
    if damage in ("weights-torn", "weights-empty"):
        f = model / "model.safetensors"
        f.write_bytes(f.read_bytes()[:f.stat().st_size // 2] if damage == "weights-torn" else b"")
        return f
    name = {"config-torn": "config.json", "generation-config-torn": "generation_config.json",
            "tokenizer-torn": "tokenizer.json"}.get(damage)
    if name:  # an interrupted copy: the first half of the file
        f = model / name
        f.write_bytes(f.read_bytes()[:f.stat().st_size // 2])
        return f
    if damage == "tokenizer-vocab":  # another model's tokenizer: more tokens than embeddings
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(str(model))
        tok.add_tokens([f"extra{i}" for i in range(40)])
        tok.save_pretrained(str(model))
        return model
    raise ValueError(damage)


# The matrix: (stage, input, damage) -> how the case is set up

JSONL_DAMAGES = ["missing", "empty", "torn-last-line", "torn-middle-line", "not-utf8",
                 "not-an-object", "missing-field", "wrong-type"]
MODEL_DAMAGES = ["missing", "weights-torn", "weights-empty", "config-torn",
                 "generation-config-torn", "tokenizer-torn", "tokenizer-vocab"]

# Flags that keep a stage small when it does not stop (on the code before a fix)
SMALL = {"01": ["--limit", 1, "--n", 1, "--max-new-tokens", 4],
         "02": ["--rollouts", 1, "--max-new-tokens", 4, "--per-problem", 1],
         "03": ["--max-steps", 1, "--batch-size", 2, "--micro-batch-size", 2],
         "04": [], "05": ["--max-steps", 1, "--batch-size", 2, "--micro-batch-size", 2],
         "06": ["--max-steps", 1, "--batch-size", 2, "--micro-batch-size", 2],
         "07": ["--limit", 1, "--max-new-tokens", 4, "--label", "m"],
         "08": ["--limit", 1, "--rollouts", 1, "--max-new-tokens", 4], "09": []}


def argv_of(name: str, c: Path, **over) -> list:
    """A stage's command line on the valid inputs copied into the case dir c; `over` replaces
    a flag's path (data=..., model=...)."""
    data = {"01": "problems", "07": "problems", "02": "samples", "03": "samples", "04": "pairs",
            "05": "scored", "08": "scored", "06": "steps"}
    if name == "09":
        return ["--run-dir", over.get("run", c / "run"), "--out", c / "out" / "results.md"]
    argv = ["--run-dir", c / "run", "--out", over.get("out", c / "out"),
            "--data", over.get("data", c / f"{data[name]}.jsonl")]
    if name == "04":
        argv += ["--pos-model", over.get("pos", c / "model"),
                 "--neg-model", over.get("neg", c / "model")]
    else:
        argv += ["--model", over.get("model", c / "model")]
    return argv + SMALL[name] + over.get("extra", [])


# (stage, input name, file, field that missing-field drops, (field, wrong value))
DATA_INPUTS = [
    ("01", "problems", "problems", "question", ("question", 42)),
    ("07", "problems", "problems", "answer", ("answer", ["2"])),
    ("02", "samples", "samples", "samples", ("prompt", ["Question"])),
    ("03", "samples", "samples", "prompt", ("samples", {"text": "x"})),
    ("04", "pairs", "pairs", "rejected", ("chosen", 5)),
    ("05", "scored pairs", "scored", "rejected_ids", ("id", 7)),
    ("06", "step pairs", "steps", "chosen", ("prefix", None)),
    ("08", "scored pairs", "scored", "prompt_ids", ("answer", 3.5)),
]
# Damages only some inputs have: (stage, input, file, damage, change of record 2, field named)
RECORD_DAMAGES = [
    ("01", "problems", "problems", "id-not-a-string", lambda r: r.update(id=[1, 2]), "id"),
    ("07", "problems", "problems", "id-not-a-string", lambda r: r.update(id={"n": 1}), "id"),
    ("02", "samples", "samples", "sample-not-an-object", set_item("samples", 0, "Step 1"),
     "samples"),
    ("02", "samples", "samples", "sample-missing-field", lambda r: r["samples"][1].pop("correct"),
     "correct"),
    ("03", "samples", "samples", "sample-not-an-object", set_item("samples", 0, "Step 1"),
     "samples"),
    ("03", "samples", "samples", "sample-missing-field", lambda r: r["samples"][1].pop("pred"),
     "pred"),
    ("03", "samples", "samples", "eos-id-a-string",
     lambda r: r["samples"][0].update(eos_id="</s>"), "eos_id"),
    ("03", "samples", "samples", "eos-id-negative", lambda r: r["samples"][1].update(eos_id=-1),
     "eos_id"),
    ("03", "samples", "samples", "eos-id-beyond-vocabulary",
     lambda r: r["samples"][1].update(eos_id=10 ** 6), "eos_id"),
    ("04", "pairs", "pairs", "eos-id-a-string", lambda r: r.update(chosen_eos_id="</s>"),
     "chosen_eos_id"),
    ("04", "pairs", "pairs", "eos-id-negative", lambda r: r.update(rejected_eos_id=-2),
     "rejected_eos_id"),
    ("04", "pairs", "pairs", "eos-id-beyond-vocabulary",
     lambda r: r.update(rejected_eos_id=10 ** 6), "rejected_eos_id"),
]
for _s in ("05", "08"):
    RECORD_DAMAGES += [
        (_s, "scored pairs", "scored", "ids-a-string", lambda r: r.update(prompt_ids="1 2 3"),
         "prompt_ids"),
        (_s, "scored pairs", "scored", "ids-float", set_item("rejected_ids", 1, 3.5),
         "rejected_ids"),
        (_s, "scored pairs", "scored", "ids-negative", set_item("rejected_ids", 0, -1),
         "rejected_ids"),
        (_s, "scored pairs", "scored", "ids-beyond-vocabulary",
         set_item("rejected_ids", 2, 10 ** 6), "rejected_ids"),
        (_s, "scored pairs", "scored", "weights-not-parallel",
         lambda r: r.update(rejected_weights=r["rejected_weights"][1:]), "rejected_weights"),
        (_s, "scored pairs", "scored", "weight-a-string", set_item("rejected_weights", 0, "0.5"),
         "rejected_weights"),
    ]
RECORD_DAMAGES += [
    ("05", "scored pairs", "scored", "chosen-ids-beyond-vocabulary",
     set_item("chosen_ids", 0, 10 ** 6), "chosen_ids"),
    ("05", "scored pairs", "scored", "prompt-ids-float", set_item("prompt_ids", 0, 1.0),
     "prompt_ids"),
]
# (stage, input, flag of argv_of)
MODEL_INPUTS = [("01", "model", "model"), ("02", "model", "model"), ("03", "model", "model"),
                ("04", "pos model", "pos"), ("04", "neg model", "neg"), ("05", "model", "model"),
                ("06", "model", "model"), ("07", "model", "model"), ("08", "model", "model")]
# The record-by-record stages' resume directories: (stage, the output file in --out)
RESUME_INPUTS = [("01", "samples.jsonl"), ("02", "records.jsonl"), ("04", "pairs.jsonl"),
                 ("07", "m/generations.jsonl"), ("08", "answers.jsonl")]
RESUME_DAMAGES = ["part-torn-middle-line", "part-not-utf8", "part-not-an-object", "part-no-id",
                  "fingerprint-torn", "finished-file-not-utf8"]
# The training stages' resume state: (stage, checkpoint dir in --out)
CHECKPOINT_INPUTS = [("05", "checkpoints"), ("06", "checkpoints")]  # 03: the same reader
CHECKPOINT_DAMAGES = ["latest-torn", "latest-names-no-checkpoint"]

# Cases whose fix is pending elsewhere: expected to fail, strictly (empty: every case is handled)
ELSEWHERE = {}


def case_ids():
    cases = []
    for s, inp, f, drop, wrong in DATA_INPUTS:
        cases += [(s, inp, d, ("jsonl", f, drop, wrong)) for d in JSONL_DAMAGES]
    cases += [(s, inp, d, ("record", f, change, field))
              for s, inp, f, d, change, field in RECORD_DAMAGES]
    cases += [(s, inp, d, ("model", flag)) for s, inp, flag in MODEL_INPUTS for d in MODEL_DAMAGES]
    cases += [("02", "judge prompt", d, ("judge",)) for d in ("missing", "empty", "not-utf8")]
    cases += [(s, "resume dir", d, ("resume", f)) for s, f in RESUME_INPUTS
              for d in RESUME_DAMAGES]
    cases += [(s, "checkpoints", d, ("checkpoint", f)) for s, f in CHECKPOINT_INPUTS
              for d in CHECKPOINT_DAMAGES]
    cases += [("03", "resume dir", "trained-model-record-torn", ("trained",))]
    for d in ("torn", "not-utf8", "not-an-object", "missing-field"):
        cases.append(("09", "results.json", d, ("results",)))
    for d in ("torn-middle-line", "not-utf8", "missing-field"):
        cases.append(("09", "metrics.jsonl", d, ("metrics",)))
    params = []
    for s, inp, d, how in cases:
        cid = f"{s}-{inp.replace(' ', '_')}-{d}"
        marks = [pytest.mark.xfail(strict=True, reason=ELSEWHERE[cid])] if cid in ELSEWHERE else []
        params.append(pytest.param(s, inp, d, how, id=cid, marks=marks))
    return params


def snapshot(root: Path) -> dict:
    """Every file and directory under root, with each file's sha256."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs:
            out[os.path.relpath(os.path.join(dirpath, name), root)] = None
        for name in files:
            p = os.path.join(dirpath, name)
            out[os.path.relpath(p, root)] = hashlib.sha256(Path(p).read_bytes()).hexdigest()
    return out


def set_up(s: str, inp: str, damage: str, how: tuple, c: Path) -> tuple[list, list[str]]:
    """Damage the case dir's copy of one input; returns (argv, what the error line must name)."""
    kind = how[0]
    if kind in ("jsonl", "record"):
        path = c / f"{how[1]}.jsonl"
        if kind == "jsonl":
            line, field = jsonl_damage(path, damage, how[2], how[3])
        else:
            edit(path, 1, how[2])
            line, field = 2, how[3]
        expect = [f"{path}:{line}" if line else str(path)] + ([f"'{field}'"] if field else [])
        return argv_of(s, c), expect
    if kind == "model":
        model = c / "model_damaged"
        shutil.copytree(c / "model", model)
        return argv_of(s, c, **{how[1]: model}), [str(model_damage(model, damage))]
    if kind == "judge":
        prompt = c / "judge.txt"
        if damage == "missing":
            prompt.unlink()
        elif damage == "empty":
            prompt.write_bytes(b"")
        else:
            prompt.write_bytes("Problem: {problem} – naïve\n".encode("cp1252")
                               + prompt.read_bytes())
        extra = ["--judge-url", "http://127.0.0.1:9/v1", "--judge-prompt", prompt]
        return argv_of(s, c, extra=extra), [str(prompt)]
    if kind == "resume":
        final = c / "out" / how[1]
        final.parent.mkdir(parents=True)
        part = final.with_name(final.name + ".part0")
        recs = [json.dumps({"id": f"done-{k}", "x": k}).encode() + b"\n" for k in range(3)]
        part.write_bytes(b"".join(recs))
        if damage == "fingerprint-torn":
            stamp = final.with_name(final.name + ".fingerprint.json")
            stamp.write_bytes(b'{"model": [["config.json", 712, 17')
            return argv_of(s, c), [str(stamp)]
        if damage == "finished-file-not-utf8":
            part.unlink()
            final.write_bytes(b"".join(recs))
            not_utf8(final, 1)
            return argv_of(s, c), [f"{final}:2"]
        if damage == "part-torn-middle-line":
            torn(part, 1)
        elif damage == "part-not-utf8":
            not_utf8(part, 1)
        elif damage == "part-not-an-object":
            part.write_bytes(recs[0] + b"[1, 2]\n" + recs[2])
        else:
            part.write_bytes(recs[0] + b'{"x": 1}\n' + recs[2])
        return argv_of(s, c), [f"{part}:2"] + (["'id'"] if damage == "part-no-id" else [])
    if kind == "checkpoint":
        ckpt = c / "out" / how[1]
        ckpt.mkdir(parents=True)
        latest = ckpt / "latest.json"
        latest.write_bytes(b'{"st' if damage == "latest-torn" else b'{"step": 3}\n')
        expect = [str(latest)] if damage == "latest-torn" else [str(ckpt / "step000003")]
        return argv_of(s, c, extra=["--resume"]), expect
    if kind == "trained":
        done = c / "out" / "pos" / "train.json"
        done.parent.mkdir(parents=True)
        done.write_bytes(b'{"examples": 3, "ste')
        return argv_of(s, c, extra=["--resume", "--which", "pos"]), [str(done)]
    if kind == "results":
        res = c / "run" / "07_eval" / "base" / "results.json"
        if damage == "torn":
            res.write_bytes(res.read_bytes()[:40])
        elif damage == "not-utf8":
            res.write_bytes(res.read_bytes().replace(b'"base"', "\"basé\"".encode("cp1252")))
        elif damage == "not-an-object":
            res.write_bytes(b"[0.5]\n")
        else:
            rec = json.loads(res.read_bytes())
            del rec["ci95"]
            res.write_text(json.dumps(rec))
        return argv_of(s, c), [str(res)] + (["'ci95'"] if damage == "missing-field" else [])
    if kind == "metrics":
        path = c / "run" / "05_train_cdpo" / "metrics.jsonl"
        if damage == "torn-middle-line":
            torn(path, 1)
        elif damage == "not-utf8":
            not_utf8(path, 1)
        else:
            edit(path, 1, lambda rec: rec.pop("step"))
        return argv_of(s, c), [f"{path}:2"] + (["'step'"] if damage == "missing-field" else [])
    raise ValueError(kind)


@pytest.mark.parametrize("s, inp, damage, how", case_ids())
def test_bad_input_stops_with_one_line(valid, tmp_path, capsys, s, inp, damage, how):
    """One (stage, input, damage) case: exit code 2, one line naming the file (line, field), and
    no file written, changed or removed."""
    c = tmp_path / "case"
    shutil.copytree(valid, c)
    argv, expect = set_up(s, inp, damage, how, c)
    before = snapshot(c)
    args = stage(s).parser.parse_args([str(a) for a in argv])
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        stage(s).main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for part in expect:
        assert part in err, f"{part!r} not named in: {err}"
    assert snapshot(c) == before, "the stage wrote, changed or removed a file before it stopped"


def test_the_readme_quotes_the_matrix():
    """The README's reliability list says how many cases there are and how many are handled; the
    matrix spans stages 01-09."""
    params = case_ids()
    assert {p.values[0] for p in params} == {f"{k:02d}" for k in range(1, 10)}
    text = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())
    m = re.search(r"(\d+) \(stage, input, damage\) cases, (\d+|all) handled", text)
    assert m and int(m[1]) == len(params), "README: the count of cases"
    assert m[2] == (str(len(params) - len(ELSEWHERE)) if ELSEWHERE else "all"), \
        "README: how many cases are handled"


# The real process: exit code 2 and the one line, no traceback (the two damages that ended in a
# traceback before the matrix: a problems file that is not UTF-8, a torn weights file)

@pytest.mark.parametrize("s, inp, damage, how", [
    pytest.param("07", "problems", "not-utf8", ("jsonl", "problems", "answer", None),
                 id="07-problems-not-utf8"),
    pytest.param("01", "model", "weights-torn", ("model", "model"), id="01-model-weights-torn"),
])
def test_bad_input_on_the_command_line(valid, tmp_path, s, inp, damage, how):
    c = tmp_path / "case"
    shutil.copytree(valid, c)
    argv, expect = set_up(s, inp, damage, how, c)
    before = snapshot(c)
    script = next(ROOT.glob(f"{s}_*.py"))
    r = subprocess.run([sys.executable, str(script)] + [str(a) for a in argv], capture_output=True,
                       text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 2, r.stderr[-3000:]
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr[-3000:]
    assert all(part in r.stderr for part in expect), r.stderr
    assert snapshot(c) == before


def test_a_utf8_file_with_a_byte_order_mark_is_read(valid, tmp_path):
    """Spreadsheets save "UTF-8" with a byte order mark: that is UTF-8, and reads as such."""
    from machinery.mathtext import load_problems
    path = tmp_path / "problems.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + (valid / "problems.jsonl").read_bytes())
    assert [p["id"] for p in load_problems(str(path))] == \
        [p["id"] for p in load_problems(str(valid / "problems.jsonl"))]
