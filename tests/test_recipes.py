"""The shell recipes (runs/*.sh) call the stages with flags that exist: each recipe runs with a
stand-in interpreter that only records its command lines, and every recorded line is then parsed
by the real stage's argparse parser (an unknown or misspelt flag exits 2). The published recipes of
runs/multigpu.sh carry the settings of the paper notes: the numbers are read out of PAPERS.md
itself (A0-A4, B1-B3) and compared with what each recorded stage command parses to."""
import os
from pathlib import Path
import re
import shlex
import subprocess
import sys

import pytest

from conftest import ROOT, load_stage

PUBLISHED = ["llama3-8b", "deepseek-math-7b", "llama3-70b"]  # the three cDPO models (A0)
# our variants, and the settings in which they knowingly leave the published recipe
OURS = {"llama3-8b-full": {"03_contrastive_sft.py": {"lora_r", "lr"},
                           "05_train_cdpo.py": {"lora_r", "lr"}}}
RECIPES = PUBLISHED + list(OURS)


def recorded_commands(tmp_path, script, *args, env=None, answers=""):
    """Every command line `script` runs its interpreter with; `answers`: what the stand-in prints
    to a `python -c` (make study's choice of the dev sweep's best model)."""
    log = tmp_path / "calls.txt"
    shim = tmp_path / "py"
    # one write per call: the demo runs two stages at once, whose lines must not interleave
    shim.write_text(f'#!/usr/bin/env bash\nline=$(printf "%q " "$@")\necho "$line" >> {log}\n'
                    f'[ "$1" = -c ] && echo "{answers}"; true\n')
    shim.chmod(0o755)
    subprocess.run(["bash", str(ROOT / "runs" / script), *args], check=True, timeout=60,
                   env={**os.environ, **(env or {}), "PY": str(shim)}, capture_output=True)
    return [shlex.split(line) for line in log.read_text().splitlines()]


@pytest.mark.parametrize("recipe", RECIPES)
def test_multigpu_recipe_flags_parse(tmp_path, recipe):
    calls = recorded_commands(tmp_path, "multigpu.sh", recipe, env={"RUN": str(tmp_path / "r")})
    assert calls[0] == ["runs/memory_plan.py", "--check", recipe]  # before anything runs
    stages = []
    for argv in calls[1:]:
        assert argv[:2] == ["-m", "torch.distributed.run"] and "--" in argv, argv
        script, *args = argv[argv.index("--") + 1:]
        stage = load_stage(script.removesuffix(".py"))
        stage.parser.parse_args(args)  # SystemExit(2) on any flag the stage does not have
        stages.append(script)
    assert sorted(set(stages)) == ["01_sample.py", "02_localize.py", "03_contrastive_sft.py",
                                   "04_score_tokens.py", "05_train_cdpo.py",
                                   "06_train_stepdpo.py", "07_eval.py"]


def test_toy_scripts_flags_parse(tmp_path):
    for script in ("toy_cpu.sh", "toy_sweep.sh"):
        run = tmp_path / script
        (run / "00_toy" / "model").mkdir(parents=True)
        (run / "00_toy" / "model" / "model.safetensors").write_bytes(b"")  # skip building it
        for argv in recorded_commands(tmp_path, script, env={"RUN": str(run), "SEEDS": "2"}):
            if argv[0].startswith("OMP_NUM_THREADS="):  # `env OMP_NUM_THREADS=2 $PY stage ...`
                argv = argv[2:]
            if argv[:2] == ["-m", "torch.distributed.run"]:  # the sampling stages: 2 processes
                argv = argv[argv.index("--") + 1:]
            stage = load_stage(argv[0].split("/")[-1].removesuffix(".py"))
            stage.parser.parse_args(argv[1:])


def test_study_script_flags_parse(tmp_path):
    """make study with two seeds: every stage line parses, each method is trained where 09 reads
    it, the seed-1 trainings take the dev sweep's learning rate, the test split is evaluated by the
    final models only (the sweep's models see dev), and the real subsets by the base model and
    seed 0's final models."""
    run = tmp_path / "study"
    calls = recorded_commands(tmp_path, "study.sh", env={"RUN": str(run), "SEEDS": "2"},
                              answers="sweep-x-lr7e-5-b0.5")
    stages, evals = [], []
    for argv in calls:
        if argv[0].startswith("OMP_NUM_THREADS="):
            argv = argv[2:]
        if argv[:2] == ["-m", "torch.distributed.run"]:
            argv = argv[argv.index("--") + 1:]
        if not re.fullmatch(r"\d\d_\w+\.py", argv[0]):  # runs/*.py, bench/*.py, python -c
            continue
        args = load_stage(argv[0].removesuffix(".py")).parser.parse_args(argv[1:])
        stages.append(argv[0])
        if argv[0] == "07_eval.py":  # one entry per set: its data, its output dir, the labels
            outs = args.out or [str(Path(args.run_dir) / "07_eval")]
            assert len(outs) == len(args.data) and len(args.limit or [0]) in (1, len(outs))
            evals += [(data, Path(out).name, args.label) for data, out in zip(args.data, outs)]
        if argv[0] in ("05_train_cdpo.py", "06_train_stepdpo.py") and "-s1" in args.run_dir:
            assert args.lr == 7e-5, argv  # the sweep's choice, as best-<method>.txt names it
    assert set(stages) == {f"{name}.py" for name in STAGES[1:]}  # 01-09, every one
    test = [labels for data, out, labels in evals if data.endswith("test.jsonl")]
    final = ["sft", "dpo", "cdpo", "stepdpo", "stepdpo-sft"]
    assert test == [["base"], final, final]  # the base model, then each seed's final models
    assert {out for data, out, _ in evals if data.endswith("test.jsonl")} == {"07_eval"}
    dev = [labels for data, out, labels in evals if data.endswith("dev.jsonl")]
    assert dev[0] == ["base"] and all(lab.startswith("sweep-") for lab in dev[1])
    real = [(out, labels) for data, out, labels in evals if "gsm8k" in data or "math500" in data]
    assert real == [("07_eval_gsm8k", ["base"]), ("07_eval_math500", ["base"]),
                    ("07_eval_gsm8k", final), ("07_eval_math500", final)]  # seed 0's models


STAGES = ["00_toy", "01_sample", "02_localize", "03_contrastive_sft", "04_score_tokens",
          "05_train_cdpo", "06_train_stepdpo", "07_eval", "08_critical_tokens", "09_report"]


@pytest.mark.parametrize("name", STAGES)
def test_every_stage_has_help_and_the_shared_flags(name):
    """--help explains the stage (its docstring) and the flag vocabulary is one: every stage takes
    --run-dir; those that read a previous stage's file take --data; those that write, --out."""
    stage = load_stage(name)
    text = stage.parser.format_help()
    assert stage.__doc__.strip().splitlines()[0] in text
    flags = {a for action in stage.parser._actions for a in action.option_strings}
    assert "--run-dir" in flags
    if name not in ("00_toy", "09_report"):
        assert {"--data", "--out", "--model"} & flags == {"--data", "--out", "--model"} or \
            name == "04_score_tokens" and {"--data", "--out", "--pos-model"} <= flags, flags


@pytest.mark.parametrize("name", STAGES)
def test_every_example_in_a_stages_docstring_parses(name):
    """The command lines a stage's docstring shows (python / torchrun ... NN_stage.py ..., with
    their continuation lines) parse with the stage's own parser: an example with a flag the stage
    does not take, a value it refuses or a placeholder with a space in it fails here."""
    stage = load_stage(name)
    text = re.sub(r"\\\n\s*", " ", stage.__doc__)  # continuation lines joined
    commands = [line.split("#")[0] for line in text.splitlines()
                if re.match(r"\s*(python|torchrun)\b.*\b" + name + r"\.py\b", line)]
    assert commands or name == "00_toy", "show at least one command line"
    for line in commands:
        argv = shlex.split(line)
        args = argv[next(i for i, a in enumerate(argv) if a.endswith(name + ".py")) + 1:]
        stage.parser.parse_args(args)


# --------------------------------------------------------------------------------------------------
# The published settings, read out of the paper notes

PAPERS = (ROOT / "PAPERS.md").read_text()


def section(label: str) -> str:
    """The text of '### <label>.' up to the next heading."""
    m = re.search(rf"^### {label}\.(.*?)(?=^#)", PAPERS, re.S | re.M)
    assert m, f"PAPERS.md has no section {label}"
    return m.group(1)


def table(text: str) -> list[list[str]]:
    """The rows (cells) of the first markdown table in `text`, separator row left out."""
    rows = []
    for line in text.splitlines():
        if line.startswith("|"):
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif rows:
            break
    return [r for r in rows if not all(re.fullmatch(r"-*", c) for c in r)]


def row(rows: list[list[str]], label: str) -> list[str]:
    """The cells after the label of the row whose label starts with `label`."""
    found = [r[1:] for r in rows if r[0].startswith(label)]
    assert len(found) == 1, f"{len(found)} rows '{label}' in {rows}"
    return found[0]


def grab(pattern: str, text: str, cast=float):
    m = re.search(pattern, text)
    assert m, f"'{pattern}' not found in: {text}"
    return cast(m.group(1))


def schedule(cell: str) -> str:
    return grab(r"\b(cosine|linear|constant)\b", cell, str)


def global_batch(cell: str, model: str) -> int:
    """A4's '6/device, accum 1 (70B: 2 × accum 3)' -> 6; per device = global (A4: device_map)."""
    assert '"per device" = global' in section("A4")
    m = re.search(r"70B: (\d+) × accum (\d+)", cell) if "70B" in model else None
    m = m or re.search(r"(\d+)/device\s*[,×]\s*accum (\d+)", cell)
    assert m, cell
    return int(m.group(1)) * int(m.group(2))


def lora_targets(cell: str) -> set[str]:
    """'gate_proj, up_proj' or the short 'q,k,v,o,gate,up,down_proj' -> module names."""
    names = [n.strip() for n in cell.split(",")]
    return {n if n.endswith("_proj") else n + "_proj" for n in names}


def published(model: str) -> dict:
    """{stage script: {argparse dest: value}} that PAPERS.md gives for this model."""
    a0, a1, a2, a4 = section("A0"), section("A1"), section("A2"), section("A4")
    b2, b3 = section("B2"), section("B3")
    # A1: the GSM8K temperature of the model's column
    temps = table(a1)
    columns = [i for i, name in enumerate(temps[0]) if name and name.lower() in model.lower()]
    assert len(columns) == 1, (model, temps[0])
    temperature = float(row(temps, "GSM8K")[columns[0] - 1])
    # A4: SFT and cDPO columns
    hp = table(a4)
    (r_sft, alpha_sft, drop_sft), (r_dpo, alpha_dpo, drop_dpo) = (
        [float(x) for x in cell.split("/")] for cell in row(hp, "LoRA r"))
    assert alpha_sft == 2 * r_sft and alpha_dpo == 2 * r_dpo  # common.lora_config: alpha 2r
    lr_sft, lr_dpo = row(hp, "LR")
    ep_sft, ep_dpo = row(hp, "Epochs")
    bs_sft, bs_dpo = row(hp, "Batch")
    len_sft, len_dpo = row(hp, "Max length")
    other_sft, other_dpo = row(hp, "Other")
    # B3: the 7B column, or the 72B one for models above 30B (B3: ">30B models use 4 epochs")
    steps = table(b3)
    col = 1 if grab(r"(\d+)[bB]\b", model, int) > 30 else 0
    n_gpus, per_gpu, accum, total = map(int, re.findall(r"\d+", row(steps, "Global batch")[col]))
    assert n_gpus * per_gpu * accum == total
    common = b3[b3.index("Common"):]
    return {
        "01_sample.py": {
            "data": "gsm8k", "split": "train",
            "template": "fewshot" if "(few-shot prompt)" in a0 else None,
            "n": grab(r"`n=(\d+)`", a1, int), "top_p": grab(r"`top_p=([\d.]+)`", a1),
            "max_new_tokens": grab(r"`max_tokens=(\d+)`", a1, int), "temperature": temperature},
        "02_localize.py": {
            "temperature": grab(r"Released script: temperature ([\d.]+)", b2),
            "top_p": grab(r"Released script: temperature [\d.]+, top_p ([\d.]+)", b2),
            "per_problem": grab(r"Caps: ≤(\d+) wrong answers per question", b2, int)},
        "03_contrastive_sft.py": {
            "lora_r": int(r_sft), "lr": grab(r"^([\d.e-]+)", lr_sft), "schedule": schedule(lr_sft),
            "warmup_steps": grab(r"(\d+) warmup steps", lr_sft, int), "epochs": int(ep_sft),
            "batch_size": global_batch(bs_sft, model), "max_length": grab(r"^(\d+)", len_sft, int),
            "bf16": "bf16" in other_sft,
            "save_every": grab(r"save every (\d+) steps", other_sft, int),
            "_lora_dropout": drop_sft, "_lora_targets": lora_targets(row(hp, "LoRA targets")[0])},
        "04_score_tokens.py": {
            "ce_beta": grab(r"β hard-coded to (\d+)", a2), "bf16": "bf16" in a2},
        "05_train_cdpo.py": {
            "lora_r": int(r_dpo), "lr": grab(r"^([\d.e-]+)", lr_dpo), "schedule": schedule(lr_dpo),
            "warmup_ratio": grab(r"warmup ratio ([\d.]+)", lr_dpo), "warmup_steps": 0,
            "epochs": int(ep_dpo), "batch_size": global_batch(bs_dpo, model),
            "max_length": grab(r"prompt\+response <(\d+)", len_dpo, int),
            "weight_decay": grab(r"weight_decay ([\d.]+)", other_dpo),
            "beta": grab(r"β ([\d.]+)", other_dpo),
            "seed": grab(r"shuffle seed (\d+)", other_dpo, int),
            "weight_chosen": "**Default `only_neg=True`**" not in section("A3"),
            "_lora_dropout": drop_dpo, "_lora_targets": lora_targets(row(hp, "LoRA targets")[1])},
        "06_train_stepdpo.py": {
            "lora_r": 0 if "full fine-tuning" in section("B1") else None,
            "epochs": int(row(steps, "Epochs")[col]),
            "beta": float(row(steps, "β (scripts)")[col].strip("*")),
            "batch_size": total, "micro_batch_size": per_gpu, "_nproc": n_gpus,
            "lr": grab(r"LR ([\d.e-]+)", common), "schedule": schedule(common),
            "warmup_ratio": grab(r"warmup ratio ([\d.]+)", common), "warmup_steps": 0,
            "max_length": grab(r"max_length (\d+)", common, int),
            "seed": grab(r"seed (\d+)", common, int), "bf16": "bf16" in common,
            "activation_checkpointing": "gradient checkpointing" in common,
            "cpu_offload": col == 1 and "CPU offload for 72B" in common},
        "07_eval.py": {
            "template": "fewshot" if "few-shot greedy decoding" in a0 else None,
            "temperature": 0.0 if "greedy" in a0 else None},
    }


@pytest.mark.parametrize("recipe", RECIPES)
def test_multigpu_recipe_settings_are_the_papers(tmp_path, recipe):
    """Every setting PAPERS.md gives for a stage is what the recipe's command for that stage
    parses to (flags or defaults); an `OURS` variant may differ only where it says it does."""
    calls = recorded_commands(tmp_path, "multigpu.sh", recipe, env={"RUN": str(tmp_path / "r")})
    script_text = (ROOT / "runs" / "multigpu.sh").read_text()
    if recipe in OURS:
        assert re.search(rf"{recipe}\s+OURS", script_text), "label the variant OURS in its usage"
    parsed = {}
    for argv in calls[1:]:  # calls[0]: the memory check
        nproc = int(next(a for a in argv if a.startswith("--nproc_per_node=")).split("=")[1])
        script, *args = argv[argv.index("--") + 1:]
        stage = load_stage(script.removesuffix(".py"))
        parsed.setdefault(script, []).append((vars(stage.parser.parse_args(args)), nproc, stage))
    models = {ns["model"] for ns, _, _ in parsed["01_sample.py"]}
    assert len(models) == 1
    model = models.pop()
    wrong = []
    for script, expected in published(model).items():
        assert script in parsed, f"{recipe} runs no {script}"
        skip = OURS.get(recipe, {}).get(script, set())
        for ns, nproc, stage in parsed[script]:
            for key, want in expected.items():
                if key in skip:
                    if ns[key] == want:
                        wrong.append(f"{script} {key}: {recipe} is said to differ, but does not")
                    continue
                if key == "_nproc":
                    got = nproc
                elif key == "_lora_targets":
                    got = set(stage.LORA_TARGETS)
                elif key == "_lora_dropout":
                    found = re.findall(r"lora_dropout=([\d.]+)", (ROOT / script).read_text())
                    got = float(found[0]) if len(found) == 1 else found
                else:
                    got = ns[key]
                if want is None or got != want:
                    wrong.append(f"{script} {key}: recipe {got!r}, PAPERS.md {want!r}")
            if isinstance(ns.get("batch_size"), int) and ns["batch_size"] % nproc:
                wrong.append(f"{script}: global batch {ns['batch_size']} over {nproc} ranks")
    assert not wrong, f"{recipe} ({model}):\n" + "\n".join(wrong)


def test_every_papers_citation_names_a_section_of_the_notes():
    """`PAPERS.md A4`, `(PAPERS.md B1, B3)`, `PAPERS.md A3 and D1`, ...: each label a file cites
    is a heading of PAPERS.md (### A4. / ## E.) or an item of its list D (D1 = item 1)."""
    labels = set(re.findall(r"^#{2,3} ([A-E]\d*)\.", PAPERS, re.M))
    d = PAPERS[PAPERS.index("\n## D."):PAPERS.index("\n## E.")]
    labels |= {f"D{n}" for n in re.findall(r"^(\d+)\. ", d, re.M)}
    cited = {}
    for path in [*ROOT.glob("*.py"), *ROOT.glob("*.md"), *ROOT.glob("runs/*.sh"),
                 *ROOT.glob("runs/*.py"), *ROOT.glob("tests/*.py")]:
        if path.name == "PAPERS.md":
            continue
        for m in re.finditer(r"PAPERS\.md,? ([^);:\n]*)", path.read_text()):
            for label in re.findall(r"\b[A-Z]\d*\b", m.group(1)):
                cited.setdefault(label, set()).add(path.name)
    assert cited, "no citations found: the pattern is broken"
    missing = {label: files for label, files in cited.items() if label not in labels}
    assert not missing, f"cited but not in PAPERS.md: {missing}"


@pytest.mark.parametrize("recipe", RECIPES)
def test_memory_plan_describes_the_recipes_training_stages(tmp_path, recipe):
    """runs/memory_plan.py (README's memory table, the recipes' --check) computes each training
    stage with the ranks, LoRA rank and targets, micro-batch and offload its command really has."""
    sys.path.insert(0, str(ROOT / "runs"))
    import memory_plan
    calls = recorded_commands(tmp_path, "multigpu.sh", recipe, env={"RUN": str(tmp_path / "r")})
    seen = {}
    for argv in calls[1:]:
        script, *args = argv[argv.index("--") + 1:]
        name = script.removesuffix(".py")
        if name in memory_plan.RECIPES[recipe]:
            stage = load_stage(name)
            ns = stage.parser.parse_args(args)
            nproc = int(next(a for a in argv if a.startswith("--nproc_per_node=")).split("=")[1])
            seqs = 1 if name == "03_contrastive_sft" else 2  # SFT: one sequence a record
            seen[name] = (nproc, ns.lora_r, stage.LORA_TARGETS if ns.lora_r else [],
                          ns.micro_batch_size, seqs, ns.cpu_offload)
            assert ns.max_length == memory_plan.MAX_LENGTH
    planned = {k: (w, r, t if r else [], m, s, o)
               for k, (w, r, t, m, s, o) in memory_plan.RECIPES[recipe].items()}
    assert seen == planned


def test_memory_plan_counts_parameters_as_transformers_does():
    """The parameter and LoRA counts behind the table equal those of the real model classes
    (built on the meta device: no memory, no download)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM
    sys.path.insert(0, str(ROOT / "runs"))
    import memory_plan
    for name, s in memory_plan.SHAPES.items():
        cfg = LlamaConfig(hidden_size=s["hidden"], intermediate_size=s["inter"],
                          num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                          num_key_value_heads=s["kv_heads"], vocab_size=s["vocab"],
                          tie_word_embeddings=False)
        with torch.device("meta"):
            model = LlamaForCausalLM(cfg)
        assert memory_plan.n_params(s)[0] == sum(p.numel() for p in model.parameters()), name
        with torch.device("meta"):
            lora = get_peft_model(model, LoraConfig(r=16, target_modules=memory_plan.ATTN))
        n = sum(p.numel() for n, p in lora.named_parameters() if "lora_" in n)
        assert memory_plan.n_lora(s, 16, memory_plan.ATTN) == n, name


def test_readme_memory_table_is_the_plans():
    """README's per-GPU memory table is runs/memory_plan.py's output, not typed by hand."""
    sys.path.insert(0, str(ROOT / "runs"))
    import memory_plan
    assert memory_plan.markdown() in (ROOT / "README.md").read_text()
