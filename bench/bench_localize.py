"""Step localization cost: binary search vs linear scan over the prefixes of wrong toy answers.

    python bench/bench_localize.py           # runs/toy if it has a model, else a tiny one
    python bench/bench_localize.py --run-dir runs/toy --limit 150 --rollouts 8

Runs 02_localize.py twice on the same wrong samples (same seeds, so the same prefix is probed with
the same rollouts in both) and reports the continuations sampled per sample, wall time, how often
the two scans locate the same step, and agreement with the toy world's exact first wrong step.
Samples come from <run-dir>/01_sample/samples.jsonl; without it 01_sample.py writes them into a
scratch dir first. Prints a markdown table for BENCHMARKS.md.
"""
import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
parser.add_argument("--run-dir", default=str(ROOT / "runs" / "toy"), help="toy run directory")
parser.add_argument("--limit", type=int, default=60, help="problems (each gives up to "
                    "--per-problem wrong samples)")
parser.add_argument("--per-problem", type=int, default=2, help="wrong samples per problem")
parser.add_argument("--rollouts", type=int, default=8, help="continuations per prefix")
parser.add_argument("--batch-size", type=int, default=64, help="continuations per generate call")
parser.add_argument("--seed", type=int, default=0, help="sampling seed")


def run(cmd: list[str]):
    res = subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True)
    if res.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{res.stderr[-2000:]}")


def main(args):
    scratch = Path(tempfile.mkdtemp(prefix="bench_localize_"))
    run_dir = Path(args.run_dir)
    model = run_dir / "00_toy" / "model"
    if not (model / "model.safetensors").is_file():
        print(f"{model} does not exist (run `python 00_toy.py` for the real toy model); "
              f"building the tiny untrained one used by the tests instead")
        run_dir = scratch / "tiny"
        run(["00_toy.py", "--run-dir", str(run_dir), "--n-train", "300", "--n-test", "20",
             "--n-dev", "20", "--max-steps", "20", "--min-steps", "20", "--hidden", "32",
             "--layers", "2", "--heads", "2"])
        model = run_dir / "00_toy" / "model"
    samples = run_dir / "01_sample" / "samples.jsonl"
    if not samples.is_file():
        print(f"{samples} does not exist: sampling {args.limit} problems with 01_sample.py")
        samples = scratch / "01_sample" / "samples.jsonl"
        run(["01_sample.py", "--run-dir", str(run_dir), "--out", str(samples.parent),
             "--limit", str(args.limit), "--seed", str(args.seed)])
    rows, located = {}, {}
    for scan in ("binary", "linear"):
        out = scratch / scan
        t0 = time.time()
        run(["02_localize.py", "--run-dir", str(run_dir), "--model", str(model),
             "--data", str(samples), "--out", str(out), "--scan", scan,
             "--limit", str(args.limit), "--per-problem", str(args.per_problem),
             "--rollouts", str(args.rollouts), "--batch-size", str(args.batch_size),
             "--seed", str(args.seed)])
        rows[scan] = {**json.loads((out / "summary.json").read_text()), "wall": time.time() - t0}
        located[scan] = {r["id"]: r["step_idx"] for r in map(json.loads, (out / "records.jsonl")
                                                              .open()) if r["step_idx"]}
    both = located["binary"].keys() & located["linear"].keys()
    same = sum(located["binary"][i] == located["linear"][i] for i in both)
    from machine import describe
    print(f"\nmachine: {describe()}\ncommand: python {shlex.join(sys.argv)}")
    print(f"model {model} | {rows['binary']['samples']} wrong samples from {args.limit} "
          f"problems | {args.rollouts} rollouts per prefix | batch {args.batch_size}\n")
    print("| scan | continuations / sample (mean) | max | wall s | located | pairs "
          "| oracle agreement |")
    print("|---|---|---|---|---|---|---|")
    for scan, s in rows.items():
        agree = s.get("oracle_agreement")
        print(f"| {scan} | {s['rollouts_per_sample']:.1f} | {s['max_rollouts_per_sample']} | "
              f"{s['wall']:.1f} | {s['located']} | {s['pairs']} | "
              f"{'n/a' if agree is None else f'{agree:.3f}'} |")
    print(f"\nbinary and linear locate the same step in {same} of {len(both)} samples located by "
          f"both ({same / max(1, len(both)):.3f}); wall time includes loading (~seconds)")


if __name__ == "__main__":
    main(parser.parse_args())
