"""The shell recipes (runs/*.sh) call the stages with flags that exist: each recipe runs with a
stand-in interpreter that only records its command lines, and every recorded line is then parsed
by the real stage's argparse parser (an unknown or misspelt flag exits 2)."""
import os
import shlex
import subprocess

import pytest

from conftest import ROOT, load_stage

RECIPES = ["llama3-8b", "llama3-70b-lora", "llama3-70b-full", "deepseek-math-7b"]


def recorded_commands(tmp_path, script, *args, env=None):
    log = tmp_path / "calls.txt"
    shim = tmp_path / "py"
    # one write per call: the demo runs two stages at once, whose lines must not interleave
    shim.write_text(f'#!/usr/bin/env bash\nline=$(printf "%q " "$@")\necho "$line" >> {log}\n')
    shim.chmod(0o755)
    subprocess.run(["bash", str(ROOT / "runs" / script), *args], check=True, timeout=60,
                   env={**os.environ, **(env or {}), "PY": str(shim)}, capture_output=True)
    return [shlex.split(line) for line in log.read_text().splitlines()]


@pytest.mark.parametrize("recipe", RECIPES)
def test_multigpu_recipe_flags_parse(tmp_path, recipe):
    calls = recorded_commands(tmp_path, "multigpu.sh", recipe, env={"RUN": str(tmp_path / "r")})
    stages = []
    for argv in calls:
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
