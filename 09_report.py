"""Stage 09: the results table and pictures of a run (and of its extra seeds), from the files the
stages wrote. Nothing here is typed in by hand: every number comes from a results.json or a
metrics.jsonl, so the README's Results section is what this script printed.

Reads  <run-dir>[-s1, -s2, ...]/07_eval/<label>/results.json   accuracy, 95% Wilson interval
       <run-dir>/07_eval_<set>/<label>/results.json            other evaluation sets (make real:
                                                               the GSM8K and MATH500 subsets)
       <run-dir>[-sK]/{05_train_dpo,05_train_cdpo,06_train_stepdpo,03_contrastive_sft}/...
                                                               metrics.jsonl (training cost)
       <run-dir>/08_critical_tokens/study.json, 02_localize/summary.json (when present)
       <run-dir>/{01_sample/samples.jsonl, 03_contrastive_sft/pairs.jsonl,
                  04_score_tokens/pairs.jsonl}                 what the stages made (real runs)
       <run-dir>/sweep/07_eval_{dev,test}/<label>/results.json  runs/toy_sweep.sh's grid
Writes <run-dir>/results.md             the table (mean and spread over seeds), the studies
       <run-dir>/training_curves.png    loss, reward margin, reward accuracy, chosen reward

  python 09_report.py --run-dir runs/toy --seeds 3 --readme README.md        # make demo
  python 09_report.py --run-dir runs/smollm2 --readme README.md \\
      --readme-block real-results                                            # make real
"""
import argparse
import math
import shutil
import statistics
import sys
from pathlib import Path

import numpy as np

from common import fail, read_json, read_jsonl, write_text

parser = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
g = parser.add_argument_group("run")
g.add_argument("--run-dir", default="runs/toy", help="run directory (seed 0)")
g.add_argument("--seeds", type=int, default=1,
               help="seeds to gather: seed k > 0 lives in <run-dir>-s<k>")
g.add_argument("--out", default=None, help="markdown output (default: <run-dir>/results.md)")
g.add_argument("--readme", default=None, help="also put the results between the '<!-- "
               "BLOCK:begin -->' and '<!-- BLOCK:end -->' markers of this markdown file, "
               "pictures copied into docs/ beside it")
g.add_argument("--readme-block", default="results",
               help="BLOCK, the markers' name (%(default)s: the toy demo's; make real: "
                    "real-results); pictures of another block get its name as a prefix")

# the fields this report reads, checked as the files are read (a damaged file: one line)
NUMBER = (int, float)
RESULTS = {"accuracy": NUMBER, "ci95": list, "n": int, "n_unparsed": int, "config": dict}
CURVES = {"step": int, "loss": NUMBER, "margin": NUMBER, "reward_acc": NUMBER,
          "chosen_reward": NUMBER}

# label in 07_eval -> (row name, training output dir, metrics file in it)
METHODS = [
    ("base", "base (toy model)", None, None),
    ("sft", "SFT (positive model of 03)", "03_contrastive_sft", "metrics_pos.jsonl"),
    ("dpo", "DPO (05 --uniform)", "05_train_dpo", "metrics.jsonl"),
    ("cdpo", "cDPO (05)", "05_train_cdpo", "metrics.jsonl"),
    ("stepdpo", "Step-DPO (06)", "06_train_stepdpo", "metrics.jsonl"),
    # Step-DPO as its release runs it: from an SFT model (here 03's positive model), on the pairs
    # 02 made with the base model (make study)
    ("stepdpo-sft", "Step-DPO from SFT (06 --model sft)", "06_train_stepdpo_sft",
     "metrics.jsonl"),
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


def row_name(label: str, name: str, res: dict) -> str:
    """METHODS' row name; the base row of a real-model run names its model."""
    if label == "base" and "00_toy" not in str(res["config"].get("model", "00_toy")):
        return f"base ({res['config']['model']})"
    return name


def table(dirs: list[Path]) -> list[str]:
    lines = [f"| method | accuracy % (seed 0) [95% CI] | accuracy % over {len(dirs)} seed(s): "
             "mean ± sd (each seed) | n | unparsed | train steps | train s |",
             "|---|---|---|---|---|---|---|"]
    for label, name, train_dir, metrics in METHODS:
        res = [d / "07_eval" / label / "results.json" for d in dirs]
        res = [read_json(p, RESULTS) for p in res if p.exists()]
        if not res:
            continue
        name = row_name(label, name, res[0])
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


def mcnemar_p(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value. Of the b + c problems on which two models disagree, b
    favour the first; under "neither is better" each disagreement is a fair coin, so
    p = min(1, 2 P[Binomial(b + c, 1/2) <= min(b, c)])."""
    n = b + c
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2 ** n) if n else 1.0


def paired_interval(diffs: np.ndarray, reps: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """95% paired-bootstrap interval of mean(diffs), diffs (n_problems,) = one model's per-problem
    score minus the other's on the same problems: resample problems (both models together, which
    is what makes it paired), take the 2.5th and 97.5th percentiles of the resampled means."""
    rng = np.random.default_rng(seed)
    means = diffs[rng.integers(0, len(diffs), size=(reps, len(diffs)))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def per_problem(path: Path) -> dict[str, bool] | None:
    """{problem id: graded right} of one 07 evaluation (its generations.jsonl), or None."""
    if not path.exists():
        return None
    return {r["id"]: bool(r["correct"]) for r in read_jsonl(path, {"id": str, "correct": bool})}


def paired(dirs: list[Path], ref: str, eval_dir: str = "07_eval") -> list[str]:
    """Each method minus `ref` on the same problems, in points: per seed the difference with its
    paired-bootstrap 95% interval and exact McNemar p; pooled, each problem's difference averaged
    over the seeds, then bootstrapped over problems (problems are the unit; seeds are repeats)."""
    runs = {label: [per_problem(d / eval_dir / label / "generations.jsonl") for d in dirs]
            for label, *_ in METHODS}
    refs = runs[ref]
    if not any(refs):
        return []
    head = " | ".join(f"seed {k}: Δ [95% CI], p" for k in range(len(dirs)))
    lines = ["", f"Paired against {ref} ({eval_dir}): difference in points on the same problems, "
             "95% paired-bootstrap interval, exact McNemar p; pooled = per-problem difference "
             "averaged over seeds.", "",
             f"| method - {ref} | {head} | pooled Δ [95% CI] |", "|---" * (len(dirs) + 2) + "|"]
    for label, name, *_ in METHODS:
        if label in (ref, "base") or not any(runs[label]):  # base - DPO is DPO - base negated
            continue
        cells, pooled = [], []
        for k, (mine, theirs) in enumerate(zip(runs[label], refs)):
            theirs = theirs or refs[0]  # the base model is evaluated once, shared by the seeds
            if not mine or not theirs or set(mine) != set(theirs):
                cells.append("-")
                continue
            ids = sorted(mine)
            d = np.array([int(mine[i]) - int(theirs[i]) for i in ids], dtype=np.float64)
            lo, hi = paired_interval(d, seed=k)
            p = mcnemar_p(int((d > 0).sum()), int((d < 0).sum()))
            cells.append(f"{100 * d.mean():+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}], p={p:.3g}")
            pooled.append(d)
        if len(pooled) > 1 and len({len(d) for d in pooled}) == 1:
            d = np.mean(pooled, axis=0)
            lo, hi = paired_interval(d)
            pool = f"{100 * d.mean():+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"
        else:
            pool = "-"
        lines.append(f"| {name} | " + " | ".join(cells) +
                     f" | {pool} |")
    return lines


def other_sets(run_dir: Path) -> list[str]:
    """The same models on the run's other evaluation sets (07_eval_<set>/, make real's GSM8K and
    MATH500 subsets): right of n, and how many answers --max-new-tokens cut (graded wrong)."""
    sets = sorted(d for d in run_dir.glob("07_eval_*") if any(d.glob("*/results.json")))
    if not sets:
        return []
    heads, cells, names = [], {}, {}
    for d in sets:
        res = {p.parent.name: read_json(p, RESULTS) for p in d.glob("*/results.json")}
        any_res = next(iter(res.values()))
        cfg = any_res["config"]
        cut = f", {cfg['max_new_tokens']} new tokens" if "max_new_tokens" in cfg else ""
        heads.append(f"{Path(cfg['data']).name} ({d.name}, n={any_res['n']}{cut})")
        for label, r in res.items():
            names.setdefault(label, r)
            right = round(r["accuracy"] * r["n"])
            cells.setdefault(label, {})[d.name] = (
                f"{right}/{r['n']}, {r.get('n_truncated', 0)} cut")
    lines = ["", "The same models on the other evaluation sets: right of n, and how many "
             "answers the token limit cut (graded wrong).", "",
             "| method | " + " | ".join(heads) + " |", "|---" * (len(heads) + 1) + "|"]
    for label, name, *_ in METHODS:
        if label in cells:
            row = [cells[label].get(d.name, "-") for d in sets]
            lines.append(f"| {row_name(label, name, names[label])} | " + " | ".join(row) + " |")
    return lines


def pipeline(run_dir: Path) -> list[str]:
    """What the stages of a run made, counted from their files: 01's samples (right,
    cut by the token limit, problems with both right and wrong), 03's pairs, 04's scored tokens,
    and each preference training's step-0 loss (ln 2 = 0.6931: policy = reference), last reward
    margin and late chosen reward (beta log pi/pi_ref of the chosen answer: below 0, the policy
    made the right answer less likely while widening the margin)."""
    out = []
    samples = run_dir / "01_sample" / "samples.jsonl"
    if samples.exists():
        recs = read_jsonl(samples)
        flat = [s for r in recs for s in r["samples"]]
        right = sum(s["correct"] for s in flat)
        cut = sum(s.get("truncated", False) for s in flat)
        mixed = sum(0 < sum(s["correct"] for s in r["samples"]) < len(r["samples"])
                    for r in recs)
        out.append(f"01 wrote {len(flat)} samples of {len(recs)} problems: {right} right "
                   f"({100 * right / max(1, len(flat)):.0f}%), {cut} cut by the token limit "
                   f"({100 * cut / max(1, len(flat)):.0f}%: never graded right, never trained "
                   f"on); {mixed} problems have both right and wrong samples.")
    pairs = run_dir / "03_contrastive_sft" / "pairs.jsonl"
    if pairs.exists():
        out.append(f"03 made {len(read_jsonl(pairs))} pairs.")
    scored = run_dir / "04_score_tokens" / "pairs.jsonl"
    if scored.exists():
        recs = read_jsonl(scored)
        out.append(f"04 scored {sum(len(r['rejected_ids']) for r in recs):,} rejected tokens of "
                   f"{len(recs)} pairs.")
    for _, name, train_dir, metrics in METHODS[2:]:
        f = run_dir / train_dir / metrics
        if f.exists():
            m = read_jsonl(f)
            tail = m[-10:]  # the chosen reward's fall is likelihood displacement, if any
            out.append(f"{name}: {len(m)} steps, loss {m[0]['loss']:.4f} at step 0 -> "
                       f"{m[-1]['loss']:.4f}, reward margin {m[-1]['margin']:.4f} at the last, "
                       f"chosen reward {statistics.mean(r['chosen_reward'] for r in tail):+.4f} "
                       f"(mean of the last {len(tail)} steps).")
    return ["", "### What the stages made", "", " ".join(out)] if out else []


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
        recs = read_jsonl(f, CURVES)
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
        s = read_json(loc)
        lines += ["", "### Step-DPO localization (02)", "",
                  f"{s['samples']} wrong samples, a first wrong step located in {s['located']}, "
                  f"{s['pairs']} step pairs; {s['rollouts_per_sample']:.1f} rollouts per sample."]
        check = run_dir / "02_localize" / "step_check.json"
        if check.exists():  # real text, read against the generated problems' values
            c = read_json(check)
            lines[-1] += (f" Read against the problems' known values (runs/check_steps.py): "
                          f"{c['located_is_first_wrong']} of {c['located']} located steps are "
                          f"the first wrong one, {c['chosen_right']} of {c['pairs']} chosen "
                          f"steps read right; {100 * c['first_step_share']:.0f}% of located "
                          "steps are the answer's first.")
        if "oracle_agreement" in s:  # the toy world knows every step's true value
            lines[-1] += (f" Against the exact first wrong step: {100 * s['oracle_agreement']:.0f}%"
                          f" of located steps agree; {100 * s['pair_precision']:.0f}% of chosen "
                          "steps are right.")
    audit = run_dir / "grader_audit.json"
    if audit.exists():
        a = read_json(audit)
        lines += ["", "### The grader on the real model's answers (runs/audit_grader.py)", "",
                  f"mathtext.grade and a second grader written separately "
                  f"(runs/second_grader.py) give the same verdict on {a['same_verdict']} of "
                  f"{a['answers']} answers ({100 * a['same_share']:.1f}%; answers not cut, "
                  f"numeric gold). Of the {a['disagreements']} disagreements, "
                  f"{a['read_by_hand']} were read by hand: mathtext.grade right on "
                  f"{a['project_right']}, the second grader on {a['second_right']}."]
    study = run_dir / "08_critical_tokens" / "study.json"
    if study.exists() and "pass_at_k_kept" not in read_json(study):
        lines += ["", f"{study} predates the fresh-rollout measurement: rerun "
                  "08_critical_tokens.py (after removing its answers.jsonl)."]
    elif study.exists():
        s = read_json(study)
        ks, n = s["k"], s["config"]["rollouts"]
        lines += ["", "### Critical tokens (08): pass@k when the critical token is kept or "
                  "replaced", "",
                  f"Critical token found in {s['with_critical']} of {s['answers']} wrong answers: "
                  f"{s['found_primary']} by the released rule itself (an all-wrong prefix no "
                  f"later prefix cancelled), {s['found_fallback']} by its fallback (the last "
                  "cancelled candidate). A wrong answer nearly always has an all-wrong prefix "
                  "somewhere, so the count says little; the pass@k below does. It is measured "
                  f"on fresh rollouts ({n} per answer and case, seeds independent of the "
                  "search rollouts, on which the kept token fails every time by definition).",
                  "", "| k | " + " | ".join(map(str, ks)) + " |", "|---" * (len(ks) + 1) + "|",
                  "| replaced | " + " | ".join(f"{100 * v:.1f}" for v in s["pass_at_k_replaced"])
                  + " |",
                  "| kept | " + " | ".join(f"{100 * v:.1f}" for v in s["pass_at_k_kept"]) + " |",
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
    acc = lambda split, label: read_json(  # noqa: E731
        root / f"07_eval_{split}" / label / "results.json", {"accuracy": NUMBER})["accuracy"]
    rows, n_dev = [], set()
    for res in sorted((root / "07_eval_dev").glob("*/results.json")):
        label = res.parent.name
        cfg = root / label / "model" / "training_config.json"
        if not cfg.exists():
            continue
        cfg = read_json(cfg)
        test = (acc("test", label) if (root / "07_eval_test" / label / "results.json").exists()
                else None)  # make study's sweep stays off the test split
        rows.append((cfg["method"], cfg["lr"], cfg["beta"], acc("dev", label), test))
        n_dev.add(read_json(res).get("n"))
    if not rows:
        return []
    n_dev = sorted(n for n in n_dev if n is not None)  # what the dev results say they hold
    n_dev = (f"{n_dev[0]} problems, " if len(n_dev) == 1 else
             f"{' / '.join(map(str, n_dev))} problems, " if n_dev else "")
    order = {label: k for k, (label, *_) in enumerate(METHODS)}
    rows.sort(key=lambda r: (order.get(r[0], 99), r[1], r[2]))
    best = {m: max(r[3] for r in rows if r[0] == m) for m, *_ in rows}
    names = {label: name for label, name, *_ in METHODS}
    toy = all(r[4] is not None for r in rows)
    lines = ["", f"### Learning rate and beta ({'runs/toy_sweep.sh' if toy else 'on dev'})", "",
             f"Same pairs and seed as the table above; dev = the {'toy ' if toy else ''}dev split "
             f"({n_dev}to choose by), test = the {'toy ' if toy else ''}test split"
             f"{'' if toy else ' (- : not evaluated, the test split is for final settings)'}. "
             "Bold: each method's best on dev.", "",
             "| method | lr | beta | dev accuracy % | test accuracy % |", "|---|---|---|---|---|"]
    for method, lr, beta, dev, test in rows:
        mark = "**" if dev == best[method] else ""
        lines.append(f"| {names.get(method, method)} | {lr:g} | {beta:g} | {mark}{100 * dev:.1f}"
                     f"{mark} | {'-' if test is None else f'{100 * test:.1f}'} |")
    return lines


def main(args):
    # Init
    run_dir = Path(args.run_dir)
    dirs = [d for d in run_dirs(run_dir, args.seeds) if d.exists()]
    if not (run_dir / "07_eval").exists():
        fail(f"{run_dir}/07_eval: no evaluations yet; run 07_eval.py first")
    # Load: what the base row was evaluated on names the run (the toy world, or a real model's)
    base = run_dir / "07_eval" / "base" / "results.json"
    cfg = read_json(base, RESULTS)["config"] if base.exists() else {}
    toy = "00_toy" in str(cfg.get("model", "00_toy"))
    data = "the toy test split" if toy else str(cfg.get("data", "?"))
    lines = [f"# Results: {'toy world' if toy else run_dir.name}", "",
             f"Greedy accuracy on {data}; {len(dirs)} seed(s): "
             f"{', '.join(str(d) for d in dirs)}.",
             "Training cost = optimizer steps and seconds of the training stage (mean over seeds).",
             ""]
    # Loop: each section of the report from the files the stages wrote
    lines += table(dirs) + other_sets(run_dir) + paired(dirs, "base") + paired(dirs, "dpo")
    if plot_curves(run_dir, run_dir / "training_curves.png"):
        lines += ["", "![training curves](training_curves.png)"]
    lines += pipeline(run_dir)
    lines += studies(run_dir)
    lines += sweep(run_dir)
    lines += ["", "Critical-token heatmap: [04_score_tokens/critical_tokens.html]"
              "(04_score_tokens/critical_tokens.html)"]
    if (run_dir / "critical_tokens.png").exists():  # make study's screenshot of it
        lines += ["", "![critical-token heatmap](critical_tokens.png)"]
    # Write
    out = Path(args.out or run_dir / "results.md")
    write_text(out, "\n".join(lines) + "\n")
    print("\n".join(lines))
    if args.readme:
        to_readme(Path(args.readme), run_dir, lines[2:], args.readme_block)


def to_readme(readme: Path, run_dir: Path, lines: list[str], block: str = "results"):
    """Replace the block between the '<!-- {block}:begin -->' and '<!-- {block}:end -->'
    markers: the README shows what this run produced, never numbers typed by hand. Pictures go to
    docs/ (tracked; named '{block}-<name>' for any block but the toy demo's 'results', so two
    blocks never share a file); the HTML link points at the run."""
    begin, end = f"<!-- {block}:begin -->", f"<!-- {block}:end -->"
    text = readme.read_text(encoding="utf-8")
    if begin not in text or end not in text:
        fail(f"{readme}: no '{begin}' ... '{end}' block to fill")
    docs = readme.parent / "docs"
    docs.mkdir(exist_ok=True)
    prefix = "" if block == "results" else f"{block}-"
    body = []
    for line in lines:
        for png in ("training_curves.png", "08_critical_tokens/pass_at_k.png",
                    "critical_tokens.png"):
            if f"({png})" in line and (run_dir / png).exists():
                name = prefix + Path(png).name
                shutil.copyfile(run_dir / png, docs / name)
                line = line.replace(f"({png})", f"(docs/{name})")
        body.append(line.replace("(04_score_tokens/", f"({run_dir}/04_score_tokens/"))
    head, rest = text.split(begin, 1)
    write_text(readme, head + begin + "\n" + "\n".join(body) + "\n" + end + rest.split(end, 1)[1])
    print(f"results written into {readme}", file=sys.stderr)


if __name__ == "__main__":
    main(parser.parse_args())
