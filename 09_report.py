"""
Stage 09: the results table and pictures of a run (and of its extra seeds), from the files the
stages wrote. Nothing here is typed in by hand: every number comes from a results.json or a
metrics.jsonl, so the README's Results section is what this script printed.

Reads  <run-dir>[-s1, -s2, ...]/07_eval/<label>/results.json   accuracy, 95% Wilson interval
       <run-dir>[-sK]/{05_train_dpo,05_train_cdpo,06_train_stepdpo,03_contrastive_sft}/...
                                                               metrics.jsonl (training cost)
       <run-dir>/08_critical_tokens/study.json, 02_localize/summary.json (when present)
       <run-dir>/sweep/07_eval_{dev,test}/<label>/results.json  runs/toy_sweep.sh's grid
Writes <run-dir>/results.md             the table (mean and spread over seeds), the studies
       <run-dir>/training_curves.png    loss, reward margin, reward accuracy, chosen reward

  python 09_report.py --run-dir runs/toy --seeds 3
"""
import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

from common import fail, read_jsonl, write_text

parser = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
g = parser.add_argument_group("run")
g.add_argument("--run-dir", default="runs/toy", help="run directory (seed 0)")
g.add_argument("--seeds", type=int, default=1,
               help="seeds to gather: seed k > 0 lives in <run-dir>-s<k>")
g.add_argument("--out", default=None, help="markdown output (default: <run-dir>/results.md)")
g.add_argument("--readme", default=None, help="also put the results between the '<!-- results "
               "-->' markers of this markdown file, pictures copied into docs/ beside it")

# label in 07_eval -> (row name, training output dir, metrics file in it)
METHODS = [
    ("base", "base (toy model)", None, None),
    ("sft", "SFT (positive model of 03)", "03_contrastive_sft", "metrics_pos.jsonl"),
    ("dpo", "DPO (05 --uniform)", "05_train_dpo", "metrics.jsonl"),
    ("cdpo", "cDPO (05)", "05_train_cdpo", "metrics.jsonl"),
    ("stepdpo", "Step-DPO (06)", "06_train_stepdpo", "metrics.jsonl"),
]


def run_dirs(run_dir: Path, seeds: int) -> list[Path]:
    return [run_dir] + [run_dir.with_name(f"{run_dir.name}-s{k}") for k in range(1, seeds)]


def training_cost(path: Path) -> tuple[int, float] | None:
    """(optimizer steps, seconds) from a metrics.jsonl: one record per step with its dt."""
    if not path.exists():
        return None
    recs = read_jsonl(path)
    return len(recs), sum(r.get("dt", 0.0) for r in recs)


def mean_spread(xs: list[float], shared: bool) -> str:
    """'mean ± sample sd (each seed)'; a row the seeds share (the base model) is shown once."""
    if len(xs) == 1 or shared:
        return f"{100 * xs[0]:.1f}" + (" (shared)" if len(xs) > 1 else "")
    return (f"{100 * statistics.mean(xs):.1f} ± {100 * statistics.stdev(xs):.1f} "
            f"({' / '.join(f'{100 * x:.1f}' for x in xs)})")


def table(dirs: list[Path]) -> list[str]:
    lines = [f"| method | accuracy % (seed 0) [95% CI] | accuracy % over {len(dirs)} seed(s): "
             "mean ± sd (each seed) | n | unparsed | train steps | train s |",
             "|---|---|---|---|---|---|---|"]
    for label, name, train_dir, metrics in METHODS:
        res = [d / "07_eval" / label / "results.json" for d in dirs]
        res = [json.loads(p.read_text()) for p in res if p.exists()]
        if not res:
            continue
        if label == "base" and "00_toy" not in str(res[0]["config"].get("model", "00_toy")):
            name = f"base ({res[0]['config']['model']})"
        lo, hi = res[0]["ci95"]
        costs = [training_cost(d / train_dir / metrics) for d in dirs] if train_dir else []
        costs = [c for c in costs if c]
        steps = f"{costs[0][0]}" if costs else "-"
        secs = f"{statistics.mean(c[1] for c in costs):.0f}" if costs else "-"
        lines.append(f"| {name} | {100 * res[0]['accuracy']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}] "
                     f"| {mean_spread([r['accuracy'] for r in res], train_dir is None)} "
                     f"| {res[0]['n']} "
                     f"| {res[0]['n_unparsed']} | {steps} | {secs} |")
    return lines


def smooth(xs: list[float], window: int = 10) -> list[float]:
    """Trailing moving mean: per-step DPO figures of a 16-pair batch are noisy."""
    return [sum(xs[max(0, i - window + 1):i + 1]) / (i + 1 - max(0, i - window + 1))
            for i in range(len(xs))]


def plot_curves(run_dir: Path, path: Path) -> bool:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.6))
    drawn = False
    for _, name, train_dir, metrics in METHODS[2:]:
        f = run_dir / train_dir / metrics
        if not f.exists():
            continue
        recs = read_jsonl(f)
        steps = [r["step"] for r in recs]
        for ax, key in zip(axes, ("loss", "margin", "reward_acc", "chosen_reward")):
            raw = [r[key] for r in recs]
            line, = ax.plot(steps, raw, alpha=0.25, lw=0.8)  # every step, faint
            ax.plot(steps, smooth(raw), color=line.get_color(), lw=1.8, label=name)
            ax.set(title=key + " (per step; bold: moving mean of 10)", xlabel="optimizer step")
        drawn = True
    if drawn:
        axes[0].axhline(0.6931, color="grey", lw=0.8, ls=":")  # ln 2, the step-0 loss
        for ax in axes:
            ax.title.set_fontsize(9)
        axes[0].legend()
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    return drawn


def studies(run_dir: Path) -> list[str]:
    lines = []
    loc = run_dir / "02_localize" / "summary.json"
    if loc.exists():
        s = json.loads(loc.read_text())
        lines += ["", "### Step-DPO localization (02)", "",
                  f"{s['samples']} wrong samples, a first wrong step located in {s['located']}, "
                  f"{s['pairs']} step pairs; {s['rollouts_per_sample']:.1f} rollouts per sample."]
        if "oracle_agreement" in s:  # the toy world knows every step's true value
            lines[-1] += (f" Against the exact first wrong step: {100 * s['oracle_agreement']:.0f}%"
                          f" of located steps agree; {100 * s['pair_precision']:.0f}% of chosen "
                          "steps are right.")
    study = run_dir / "08_critical_tokens" / "study.json"
    if study.exists():
        s = json.loads(study.read_text())
        ks = s["k"]
        lines += ["", "### Critical tokens (08): pass@k when the critical token is kept or "
                  "replaced", "",
                  f"Critical token found in {s['with_critical']} of {s['answers']} wrong answers.",
                  "", "| k | " + " | ".join(map(str, ks)) + " |", "|---" * (len(ks) + 1) + "|",
                  "| replaced | " + " | ".join(f"{100 * v:.1f}" for v in s["pass_at_k_without"])
                  + " |",
                  "| kept | " + " | ".join(f"{100 * v:.1f}" for v in s["pass_at_k_with"]) + " |",
                  "", "Contrastive-estimation weights (04) vs the rollout critical token: mean "
                  f"rank {s['weight_rank_mean']:.1f}; precision@1/3/5 " +
                  " / ".join(f"{s['precision_at_k'][k]:.2f}" for k in ("1", "3", "5")) +
                  " (chance " + " / ".join(f"{s['chance_at_k'][k]:.2f}" for k in ("1", "3", "5"))
                  + ").", "", "![pass@k](08_critical_tokens/pass_at_k.png)"]
    return lines


def sweep(run_dir: Path) -> list[str]:
    """runs/toy_sweep.sh's grid: every (method, lr, beta) on the dev split, to choose by, and on
    the test split, to report; the best dev accuracy of each method in bold."""
    root = run_dir / "sweep"
    acc = lambda split, label: json.loads(  # noqa: E731
        (root / f"07_eval_{split}" / label / "results.json").read_text())["accuracy"]
    rows = []
    for res in sorted((root / "07_eval_dev").glob("*/results.json")):
        label = res.parent.name
        cfg = root / label / "model" / "training_config.json"
        if not cfg.exists() or not (root / "07_eval_test" / label / "results.json").exists():
            continue
        cfg = json.loads(cfg.read_text())
        rows.append((cfg["method"], cfg["lr"], cfg["beta"], acc("dev", label), acc("test", label)))
    if not rows:
        return []
    order = {label: k for k, (label, *_) in enumerate(METHODS)}
    rows.sort(key=lambda r: (order.get(r[0], 99), r[1], r[2]))
    best = {m: max(r[3] for r in rows if r[0] == m) for m, *_ in rows}
    names = {label: name for label, name, *_ in METHODS}
    lines = ["", "### Learning rate and beta (runs/toy_sweep.sh)", "",
             "Same pairs and seed as the table above; dev = the toy dev split (150 problems, "
             "to choose by), test = the toy test split. Bold: each method's best on dev.", "",
             "| method | lr | beta | dev accuracy % | test accuracy % |", "|---|---|---|---|---|"]
    for method, lr, beta, dev, test in rows:
        mark = "**" if dev == best[method] else ""
        lines.append(f"| {names.get(method, method)} | {lr:g} | {beta:g} | {mark}{100 * dev:.1f}"
                     f"{mark} | {100 * test:.1f} |")
    return lines


def main(args):
    run_dir = Path(args.run_dir)
    dirs = [d for d in run_dirs(run_dir, args.seeds) if d.exists()]
    if not (run_dir / "07_eval").exists():
        fail(f"{run_dir}/07_eval: no evaluations yet; run 07_eval.py first")
    # what the base row was evaluated on names the run: the toy world, or a real model's run
    base = run_dir / "07_eval" / "base" / "results.json"
    cfg = json.loads(base.read_text())["config"] if base.exists() else {}
    toy = "00_toy" in str(cfg.get("model", "00_toy"))
    data = "the toy test split" if toy else Path(cfg.get("data", "?")).name
    lines = [f"# Results: {'toy world' if toy else run_dir.name}", "",
             f"Greedy accuracy on {data}; {len(dirs)} seed(s): "
             f"{', '.join(str(d) for d in dirs)}.",
             "Training cost = optimizer steps and seconds of the training stage (mean over seeds).",
             ""] + table(dirs)
    if plot_curves(run_dir, run_dir / "training_curves.png"):
        lines += ["", "![training curves](training_curves.png)"]
    lines += studies(run_dir)
    lines += sweep(run_dir)
    lines += ["", "Critical-token heatmap: [04_score_tokens/critical_tokens.html]"
              "(04_score_tokens/critical_tokens.html)"]
    out = Path(args.out or run_dir / "results.md")
    write_text(out, "\n".join(lines) + "\n")
    print("\n".join(lines))
    if args.readme:
        to_readme(Path(args.readme), run_dir, lines[2:])


def to_readme(readme: Path, run_dir: Path, lines: list[str]):
    """Replace the block between the results markers: the README shows what this run produced,
    never numbers typed by hand. Pictures go to docs/ (tracked); the HTML link points at the run."""
    begin, end = "<!-- results:begin -->", "<!-- results:end -->"
    text = readme.read_text(encoding="utf-8")
    if begin not in text or end not in text:
        fail(f"{readme}: no '{begin}' ... '{end}' block to fill")
    docs = readme.parent / "docs"
    docs.mkdir(exist_ok=True)
    body = []
    for line in lines:
        for png in ("training_curves.png", "08_critical_tokens/pass_at_k.png"):
            if f"({png})" in line and (run_dir / png).exists():
                shutil.copyfile(run_dir / png, docs / Path(png).name)
                line = line.replace(f"({png})", f"(docs/{Path(png).name})")
        body.append(line.replace("(04_score_tokens/", f"({run_dir}/04_score_tokens/"))
    head, rest = text.split(begin, 1)
    write_text(readme, head + begin + "\n" + "\n".join(body) + "\n" + end + rest.split(end, 1)[1])
    print(f"results written into {readme}", file=sys.stderr)


if __name__ == "__main__":
    main(parser.parse_args())
