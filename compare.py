"""A seeded grid of train.py runs -> mean ± std tables and curves: which advantage learns faster, here?

    python compare.py --runs "lampo" "lampo --tau 0.1" "grpo" "rloo" --seeds 0 1 2 --out_dir runs/compare
    python compare.py --runs "lampo" "grpo" --seeds 0 1 --out_dir runs/cmp -- --num_steps 40 --dataset toy

Each (run string, seed) is one `python train.py <run string> <common options> --seed S` in its own folder,
`<out_dir>/<run slug>/seed-<S>/`, its output in `train.log` there. Options after `--` go to every run.
Runs go one at a time by default (timings stay honest on a small machine; `--jobs N` runs N at once).
A finished run (its `compare.json` records exit 0) is skipped, and an interrupted one continues with
train.py's `--resume`, so re-running the same command resumes a study. A run string with an unknown
option, or a run that crashes, is reported in the summary and never stops the others.

Per run string, over seeds (held-out accuracy = train.py's `eval/accuracy`, greedy):
    curve[step]        mean ± std of held-out accuracy at every evaluation step
    final_accuracy     the last evaluation (after the last step)
    auc                area under the held-out curve divided by its step span: the mean accuracy over
                       training (trapezoids), which rewards learning early as well as ending high
    steps_to_threshold first evaluation step whose accuracy ≥ --threshold, per seed (None: never reached)
    wall_seconds       each run's wall time (a resumed run: the sum of its attempts)
    diagnostics        train.py's lampo/* weight diagnostics, each the mean over steps then over seeds
    completions        completions sampled over the run, and per kept group: per trained group that had a
                       reward spread (the groups that carry an advantage; --dynamic_sampling samples more
                       to keep only those), each the mean over seeds
Writes summary.json, summary.md (a table to paste into a README) and curves.png (mean ± std bands).
std is the sample standard deviation (n − 1; 0 for a single seed).
"""

import argparse
import json
import re
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent


def slug(run: str) -> str:
    """A folder name for a run string: "lampo --tau 0.1" -> "lampo_tau_0.1" ("default" if empty)."""
    name = re.sub(r"[^A-Za-z0-9.=+-]+", "_", run.replace("--", " ")).strip("_")
    return name or "default"


def run_folder(out_dir: Path, run: str, seed: int) -> Path:
    return out_dir / slug(run) / f"seed-{seed}"


def train_command(run: str, seed: int, folder: Path, common: list[str]) -> list[str]:
    """The train.py command line of one grid cell. Later options win in argparse: the seed and folder are
    ours, the run string's options override the common ones."""
    arguments = [*common, *shlex.split(normalize(run)), "--seed", str(seed), "--out_dir", str(folder)]
    if (folder / "config.json").exists():            # an interrupted run: continue from its checkpoint
        arguments.append("--resume")
    return [sys.executable, str(HERE / "train.py"), *arguments]


def execute(run: str, seed: int, out_dir: Path, common: list[str]) -> dict:
    """Run one grid cell unless it already finished; returns its status (also saved as compare.json)."""
    folder = run_folder(out_dir, run, seed)
    status_path = folder / "compare.json"
    previous = json.loads(status_path.read_text()) if status_path.exists() else {}
    if previous.get("returncode") == 0:                                       # finished: skip (its folder as
        return {**previous, "folder": str(folder)}                            # seen from here, for the summary)
    folder.mkdir(parents=True, exist_ok=True)
    command = train_command(run, seed, folder, common)
    start = time.time()
    with open(folder / "train.log", "a") as log:
        log.write(f"$ {shlex.join(command)}\n")
        log.flush()
        completed = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=str(HERE))
    lines = [line for line in (folder / "train.log").read_text().splitlines() if line.strip()]
    status = {"run": run, "seed": seed, "folder": str(folder), "returncode": completed.returncode,
              "wall_seconds": round(previous.get("wall_seconds", 0.0) + time.time() - start, 1),
              "command": shlex.join(command),
              "error": None if completed.returncode == 0 else (lines[-1] if lines else "no output")}
    status_path.write_text(json.dumps(status, indent=2) + "\n")
    return status


# ---------------------------------------------------------------------------------------------------
# Aggregation
# ---------------------------------------------------------------------------------------------------
def metrics_rows(folder: Path) -> list[dict]:
    """The rows of a run's metrics.jsonl ([] if it has none yet)."""
    path = folder / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def eval_curve(folder: Path) -> dict[int, float]:
    """{step: held-out accuracy} from a run's metrics.jsonl (the last value wins for a repeated step)."""
    return {int(row["step"]): float(row["eval/accuracy"]) for row in metrics_rows(folder) if "eval/accuracy" in row}


DIAGNOSTICS = ("lampo/weight_mean", "lampo/weight_std", "lampo/misordered_pairs", "lampo/seq_logp_std",
               "lampo/corr_rloo")


def run_diagnostics(folder: Path) -> dict[str, float]:
    """{name: mean over the run's training steps} of train.py's LamPO weight diagnostics (lambdapo.py).

    A step without any pair of unequal rewards logs 0.0 for the pair statistics (there is nothing to weigh):
    such steps (weight_mean exactly 0; a real weight is > 0) are left out of every mean but seq_logp_std's.
    """
    rows = [row for row in metrics_rows(folder) if "lampo/weight_mean" in row]
    means = {}
    for name in DIAGNOSTICS:
        values = [row[name] for row in rows
                  if name in row and (name == "lampo/seq_logp_std" or row["lampo/weight_mean"] > 0)]
        if values:
            means[name] = statistics.fmean(values)
    return means


def sampling_cost(folder: Path) -> tuple[float, float | None] | None:
    """(completions sampled over the run's training steps, completions per kept group), or None without steps.

    A kept group is a trained group with a reward spread: with --dynamic_sampling the step logs how many it kept
    (dynamic_sampling/groups_kept) and what it sampled (dynamic_sampling/completions_generated); without it
    every step samples prompts_per_step · G completions and trains on all its groups, of which the share
    1 − frac_reward_zero_std had a spread. None for the ratio when no group ever had one.
    """
    config_path = folder / "config.json"
    rows = [row for row in metrics_rows(folder) if "reward" in row]
    if not rows or not config_path.exists():
        return None
    config = json.loads(config_path.read_text())
    P, G = config["prompts_per_step"], config["group_size"]
    generated = sum(row.get("dynamic_sampling/completions_generated", P * G) for row in rows)
    kept = sum(row.get("dynamic_sampling/groups_kept", P * (1 - row["frac_reward_zero_std"])) for row in rows)
    return generated, (generated / kept if kept else None)


def area_under_curve(curve: dict[int, float]) -> float | None:
    """Trapezoid area under accuracy(step) divided by the step span: the curve's mean height.

    >>> area_under_curve({0: 0.0, 10: 1.0, 20: 1.0})
    0.75
    """
    steps = sorted(curve)
    if len(steps) < 2:
        return curve[steps[0]] if steps else None
    area = sum((b - a) * (curve[a] + curve[b]) / 2 for a, b in zip(steps, steps[1:]))
    return area / (steps[-1] - steps[0])


def steps_to_threshold(curve: dict[int, float], threshold: float) -> int | None:
    """The first evaluation step with accuracy ≥ threshold, or None.

    >>> steps_to_threshold({0: 0.5, 20: 0.8, 40: 0.9}, 0.8), steps_to_threshold({0: 0.5}, 0.8)
    (20, None)
    """
    return next((step for step in sorted(curve) if curve[step] >= threshold), None)


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(statuses: list[dict], runs: list[str], seeds: list[int], threshold: float) -> dict:
    """One entry per run string: per-seed figures and their mean ± std over the seeds that finished."""
    summary = {}
    for run in runs:
        mine = [s for s in statuses if s["run"] == run]
        finished = [s for s in mine if s["returncode"] == 0]
        curves = {s["seed"]: eval_curve(Path(s["folder"])) for s in finished}
        curves = {seed: curve for seed, curve in curves.items() if curve}
        finals = [curve[max(curve)] for curve in curves.values()]
        aucs = [area_under_curve(curve) for curve in curves.values()]
        steps = sorted({step for curve in curves.values() for step in curve})
        curve_mean_std = {}
        for step in steps:
            mean, std = mean_std([curve[step] for curve in curves.values() if step in curve])
            curve_mean_std[str(step)] = {"mean": mean, "std": std}
        final_mean, final_std = mean_std(finals)
        auc_mean, auc_std = mean_std(aucs)
        wall_mean, _ = mean_std([s["wall_seconds"] for s in finished])
        per_seed = [run_diagnostics(Path(s["folder"])) for s in finished]
        diagnostics = {name: statistics.fmean(d[name] for d in per_seed if name in d)
                       for name in DIAGNOSTICS if any(name in d for d in per_seed)}
        costs = [cost for cost in (sampling_cost(Path(s["folder"])) for s in finished) if cost is not None]
        per_kept = [ratio for _, ratio in costs if ratio is not None]
        summary[run] = {
            "seeds": sorted(curves),
            "final_accuracy_mean": final_mean, "final_accuracy_std": final_std,
            "final_accuracy": {str(seed): curve[max(curve)] for seed, curve in curves.items()},
            "auc_mean": auc_mean, "auc_std": auc_std,
            "steps_to_threshold": [steps_to_threshold(curves[seed], threshold) if seed in curves else None
                                   for seed in seeds],
            "threshold": threshold,
            "curve": curve_mean_std,
            "wall_seconds_mean": wall_mean,
            "diagnostics": diagnostics,          # lampo/*: mean over steps, then over seeds
            "completions_generated_mean": mean_std([generated for generated, _ in costs])[0],
            "completions_per_kept_group_mean": mean_std(per_kept)[0],
            "failed": [{"seed": s["seed"], "error": s["error"], "log": str(Path(s["folder"]) / "train.log")}
                       for s in mine if s["returncode"] != 0],
        }
    return summary


def markdown(summary: dict) -> str:
    def pm(mean, std):
        return "—" if mean is None else f"{mean:.3f} ± {std:.3f}"

    lines = ["| run | seeds | final held-out accuracy | area under curve | steps to threshold | wall time |",
             "| --- | --- | --- | --- | --- | --- |"]
    for run, entry in summary.items():
        reached = ", ".join("never" if s is None else str(s) for s in entry["steps_to_threshold"])
        wall = "—" if entry["wall_seconds_mean"] is None else f"{entry['wall_seconds_mean']:.0f} s"
        failed = f" ({len(entry['failed'])} failed)" if entry["failed"] else ""
        lines.append(f"| `{run}` | {len(entry['seeds'])}{failed} | {pm(entry['final_accuracy_mean'], entry['final_accuracy_std'])} "
                     f"| {pm(entry['auc_mean'], entry['auc_std'])} | {reached} (≥ {entry['threshold']}) | {wall} |")
    lines += ["", "LamPO weight diagnostics (mean over steps and seeds; for the baselines, what LamPO would have weighted):",
              "", "| run | weight mean | weight std | misordered pairs | ℓ spread | corr. with RLOO |",
              "| --- | --- | --- | --- | --- | --- |"]
    for run, entry in summary.items():
        d = entry["diagnostics"]
        cells = ["—" if name not in d else f"{d[name]:.3f}" for name in DIAGNOSTICS]
        lines.append(f"| `{run}` | " + " | ".join(cells) + " |")
    lines += ["", "Sampling cost (mean over seeds; a kept group is a trained group with a reward spread):", "",
              "| run | completions sampled | completions per kept group |", "| --- | --- | --- |"]
    for run, entry in summary.items():
        cells = ["—" if entry[key] is None else f"{entry[key]:.{digits}f}"
                 for key, digits in (("completions_generated_mean", 0), ("completions_per_kept_group_mean", 2))]
        lines.append(f"| `{run}` | " + " | ".join(cells) + " |")
    for run, entry in summary.items():
        for failure in entry["failed"]:
            lines.append(f"\n`{run}` seed {failure['seed']} failed: {failure['error']} (see {failure['log']})")
    return "\n".join(lines) + "\n"


def plot(summary: dict, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for run, entry in summary.items():
        if not entry["curve"]:
            continue
        steps = [int(step) for step in entry["curve"]]
        mean = [entry["curve"][str(step)]["mean"] for step in steps]
        std = [entry["curve"][str(step)]["std"] for step in steps]
        axis.plot(steps, mean, marker="o", label=f"{run} (n={len(entry['seeds'])})")
        axis.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.2)
    axis.set_xlabel("step")
    axis.set_ylabel("held-out accuracy (greedy)")
    axis.set_title("mean ± std over seeds")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out, dpi=100)
    plt.close(figure)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    common = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                     epilog="Options after `--` are passed to every train.py run.")
    parser.add_argument("--runs", nargs="+", required=True,
                        help='run strings, each a set of train.py options, e.g. "lampo" is read as "--algo lampo" '
                             'when it does not start with "--"')
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds of every run string")
    parser.add_argument("--out_dir", default="runs/compare", help="one folder per run string and seed go here")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (1 keeps wall times comparable)")
    parser.add_argument("--threshold", type=float, default=0.8, help="held-out accuracy for steps_to_threshold")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = list(dict.fromkeys(args.runs))                  # summary keys are the run strings as given
    cells = [(run, seed) for run in runs for seed in args.seeds]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(execute, run, seed, out_dir, common) for run, seed in cells]
        statuses = []
        for (run, seed), future in zip(cells, futures):
            status = future.result()
            statuses.append(status)
            outcome = "ok" if status["returncode"] == 0 else f"FAILED: {status['error']}"
            print(f"compare.py: {run!r} seed {seed}: {outcome} ({status['wall_seconds']} s)", file=sys.stderr)
    summary = summarize(statuses, runs, args.seeds, args.threshold)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    table = markdown(summary)
    (out_dir / "summary.md").write_text(table)
    try:
        plot(summary, out_dir / "curves.png")
    except ImportError:
        print("compare.py: matplotlib is not installed: no curves.png", file=sys.stderr)
    print(table)
    return summary


def normalize(run: str) -> str:
    """ "lampo --tau 0.1" -> "--algo lampo --tau 0.1": a leading bare word names the algorithm."""
    words = shlex.split(run)
    if words and not words[0].startswith("-"):
        words = ["--algo", *words]
    return shlex.join(words)


if __name__ == "__main__":
    main()
