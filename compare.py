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
    per_seed           [{seed, final_accuracy, area, steps_to_threshold}] for every seed that finished
    completions        completions sampled over the run, and per kept group: per trained group that had a
                       reward spread (the groups that carry an advantage; --dynamic_sampling samples more
                       to keep only those), each the mean over seeds
With `--baseline RUN_STRING` every other run string also gets `vs_baseline`, paired by seed (same seed, same
data order and initial weights, so seed-to-seed noise cancels):
    area_diff          per seed, in seed order: area(run) − area(baseline); area_diff_mean their mean
    final_accuracy_diff  the same for the final accuracy
    paired_t           mean(d) / (sd(d) / √n) over the area differences (None when n < 2 or sd = 0)
    p_value_sign_flip  exact, two-sided: the share of the 2^n sign flips of d whose |mean| ≥ the observed |mean|
                       (the smallest possible value is 2/2^n: 0.25 with 3 seeds, ≈ 0.002 with 10)
    area_diff_ci95     a 95% percentile bootstrap interval of mean(d) (10,000 resamples of the seeds, seeded)
    final_accuracy_*   paired_t, p_value_sign_flip and ci95 of the final-accuracy differences
Writes summary.json, summary.md (tables to paste into a README) and curves.png (mean ± std bands).
std is the sample standard deviation (n − 1; 0 for a single seed).

`python compare.py --weights RUN_DIR [RUN_DIR ...]` recomputes the confidence weights' diagnostics from runs
trained with `--log_rollouts` (their rollouts.jsonl), for ℓ averaged and summed, τ in nats and τ relative to
the step's ℓ spread (`--relative_tau`), each over the early, middle and late thirds of training: what the
weights would have done at other settings on the same rollouts (weights.json and weights.md in --out_dir).

A study kept in the repository keeps each cell's compare.json, config.json and metrics.jsonl (a few hundred kB): re-running
compare.py with the same runs and seeds on that folder runs nothing and recomputes every figure from them.
"""

import argparse
import itertools
import json
import math
import random
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
              "command": shlex.join(["python", "train.py", *command[2:]]),   # as a user types it: no local paths
              "error": None if completed.returncode == 0 else (lines[-1] if lines else "no output")}
    status_path.write_text(json.dumps(status, indent=2) + "\n")
    return status


# ---------------------------------------------------------------------------------------------------
# Aggregation
# ---------------------------------------------------------------------------------------------------
def jsonl_rows(path: Path) -> list[dict]:
    """The rows of a JSON-lines file ([] if it does not exist yet)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def metrics_rows(folder: Path) -> list[dict]:
    """The rows of a run's metrics.jsonl ([] if it has none yet)."""
    return jsonl_rows(folder / "metrics.jsonl")


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


def rollout_steps(folder: Path) -> list[list[dict]]:
    """A run's rollouts.jsonl (train.py --log_rollouts) as one list of completion rows per step, in step order."""
    path = folder / "rollouts.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: train the run with --log_rollouts")
    steps: dict[int, list[dict]] = {}
    for row in jsonl_rows(path):
        steps.setdefault(int(row["step"]), []).append(row)
    return [steps[step] for step in sorted(steps)]


def weight_grid(folders: list[Path], taus=(0.3, 1.0, 3.0), phases: int = 3) -> list[dict]:
    """What the confidence weights would do at each setting, on the rollouts the runs actually sampled.

    For ℓ ∈ {mean, sum} (the rows' seq_logp_mean / seq_logp_sum), each τ in `taus` in nats and each τ relative
    to the step's ℓ spread (τ_eff = τ · spread, --relative_tau), every step's rewards and ℓ go through
    lambdapo.lampo_diagnostics, as train.py computes them. Each run's steps are cut into `phases` consecutive
    parts of (almost) equal size; a value is the mean over the steps of that part, pooled over the runs. As in
    run_diagnostics, the pair statistics leave out steps without a pair of unequal rewards.
    Returns rows {seq_logp, tau, relative, phase (1..phases), steps, tau_eff, lampo/...}.
    """
    import torch
    import lambdapo
    pooled: dict[tuple, list[dict]] = {}
    for folder in folders:
        steps = rollout_steps(Path(folder))
        for index, rows in enumerate(steps):
            phase = index * phases // len(steps) + 1
            rewards = torch.tensor([row["reward"] for row in rows], dtype=torch.float64)            # (N,)
            group_ids = torch.tensor([row["group"] for row in rows])                                 # (N,)
            for ell in ("mean", "sum"):
                seq_logps = torch.tensor([row[f"seq_logp_{ell}"] for row in rows], dtype=torch.float64)  # (N,)
                for relative in (False, True):
                    for tau in taus:
                        tau_eff = (lambdapo.grouped_relative_tau(seq_logps, group_ids, tau=tau) if relative
                                   else tau)
                        values = lambdapo.lampo_diagnostics(rewards, seq_logps, tau_eff, group_ids=group_ids)
                        values["tau_eff"] = tau_eff
                        pooled.setdefault((ell, tau, relative, phase), []).append(values)
    grid = []
    for (ell, tau, relative, phase), steps in pooled.items():
        weighed = [values for values in steps if values["lampo/weight_mean"] > 0]   # steps with a reward gap
        row = {"seq_logp": ell, "tau": tau, "relative": relative, "phase": phase, "steps": len(steps),
               "tau_eff": statistics.fmean(values["tau_eff"] for values in steps)}
        for name in DIAGNOSTICS:
            chosen = steps if name == "lampo/seq_logp_std" else weighed
            row[name] = statistics.fmean(values[name] for values in chosen) if chosen else None
        grid.append(row)
    return sorted(grid, key=lambda row: (row["seq_logp"], row["relative"], row["tau"], row["phase"]))


def weights_markdown(grid: list[dict]) -> str:
    """weight_grid as one table: a row per setting, each cell the phases' values, early → late."""
    names = ("lampo/seq_logp_std", "lampo/weight_std", "lampo/misordered_pairs", "lampo/corr_rloo")
    lines = ["| ℓ | τ | τ_eff (nats) | ℓ spread | weight std | misordered pairs | corr. with RLOO |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    settings: dict[tuple, list[dict]] = {}
    for row in grid:
        settings.setdefault((row["seq_logp"], row["relative"], row["tau"]), []).append(row)
    for (ell, relative, tau), rows in settings.items():
        def phases(name, digits=3):
            return " → ".join("—" if row[name] is None else f"{row[name]:.{digits}f}" for row in rows)
        label = f"{tau:g} × spread" if relative else f"{tau:g}"
        lines.append(f"| {ell} | {label} | {phases('tau_eff')} | " + " | ".join(phases(name) for name in names) + " |")
    return "\n".join(lines) + "\n"


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


# ---------------------------------------------------------------------------------------------------
# Paired statistics: run vs baseline, seed by seed
# ---------------------------------------------------------------------------------------------------
def paired_t(diffs: list[float]) -> float | None:
    """The paired t statistic mean(d) / (sd(d) / √n), sd with n − 1; None when it is undefined.

    >>> round(paired_t([0.1, 0.2, 0.3]), 6)      # mean 0.2, sd 0.1, n 3: 0.2 / (0.1 / √3)
    3.464102
    """
    if len(diffs) < 2 or statistics.stdev(diffs) == 0:
        return None
    return statistics.fmean(diffs) / (statistics.stdev(diffs) / math.sqrt(len(diffs)))


def sign_flip_p_value(diffs: list[float]) -> float | None:
    """Exact two-sided sign-flip (permutation) test of mean(d) = 0 for paired differences.

    Under the null each seed's difference is as likely to have either sign, so each of the 2^n sign patterns
    is equally likely; the p-value is the share of them whose |sum| is at least the observed |sum| (the
    observed pattern and its mirror always count, so p ≥ 2/2^n). Exact for any n (2^n sums; n ≤ 20 here).

    >>> sign_flip_p_value([0.1, 0.2, 0.3])      # only (+,+,+) and (−,−,−) reach |0.6|: 2/8
    0.25
    >>> sign_flip_p_value([0.3, -0.1, 0.1])     # |±0.3 ± 0.1 ± 0.1| ≥ 0.3 for 6 of 8 patterns
    0.75
    """
    if not diffs:
        return None
    if len(diffs) > 20:
        raise ValueError(f"sign_flip_p_value: {len(diffs)} seeds means 2^{len(diffs)} patterns; at most 20")
    observed = abs(sum(diffs))
    tolerance = 1e-12 * max(1.0, sum(abs(d) for d in diffs))   # the observed pattern, summed in another order
    hits = sum(abs(sum(s * d for s, d in zip(signs, diffs))) >= observed - tolerance
               for signs in itertools.product((1, -1), repeat=len(diffs)))
    return hits / 2 ** len(diffs)


def bootstrap_ci95(diffs: list[float], resamples: int = 10_000, seed: int = 0) -> list[float] | None:
    """A 95% percentile bootstrap interval of mean(d): resample the n seeds with replacement `resamples`
    times (a fixed RNG seed: the same numbers every time), take the 2.5th and 97.5th percentiles of the means.

    >>> bootstrap_ci95([0.5, 0.5, 0.5])
    [0.5, 0.5]
    """
    if not diffs:
        return None
    rng = random.Random(seed)
    means = sorted(statistics.fmean(rng.choices(diffs, k=len(diffs))) for _ in range(resamples))
    return [means[round(0.025 * (resamples - 1))], means[round(0.975 * (resamples - 1))]]


def versus_baseline(entry: dict, baseline: dict) -> dict:
    """Paired differences entry − baseline over the seeds both finished (their per_seed lists)."""
    mine = {row["seed"]: row for row in entry["per_seed"]}
    theirs = {row["seed"]: row for row in baseline["per_seed"]}
    seeds = sorted(set(mine) & set(theirs))
    area = [mine[s]["area"] - theirs[s]["area"] for s in seeds]
    final = [mine[s]["final_accuracy"] - theirs[s]["final_accuracy"] for s in seeds]
    return {
        "seeds": seeds,
        "area_diff": area, "area_diff_mean": statistics.fmean(area) if area else None,
        "paired_t": paired_t(area), "p_value_sign_flip": sign_flip_p_value(area),
        "area_diff_ci95": bootstrap_ci95(area),
        "final_accuracy_diff": final, "final_accuracy_diff_mean": statistics.fmean(final) if final else None,
        "final_accuracy_paired_t": paired_t(final), "final_accuracy_p_value_sign_flip": sign_flip_p_value(final),
        "final_accuracy_diff_ci95": bootstrap_ci95(final),
    }


def summarize(statuses: list[dict], runs: list[str], seeds: list[int], threshold: float,
              baseline: str | None = None) -> dict:
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
            "per_seed": [{"seed": seed, "final_accuracy": curves[seed][max(curves[seed])],
                          "area": area_under_curve(curves[seed]),
                          "steps_to_threshold": steps_to_threshold(curves[seed], threshold)}
                         for seed in sorted(curves)],
            "completions_generated_mean": mean_std([generated for generated, _ in costs])[0],
            "completions_per_kept_group_mean": mean_std(per_kept)[0],
            "failed": [{"seed": s["seed"], "error": s["error"], "log": str(Path(s["folder"]) / "train.log")}
                       for s in mine if s["returncode"] != 0],
        }
    if baseline is not None:
        for run in runs:
            if run != baseline:
                summary[run]["vs_baseline"] = {"baseline": baseline,
                                               **versus_baseline(summary[run], summary[baseline])}
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
    lines += ["", "Per seed (final held-out accuracy / area under curve):", "",
              "| run | " + " | ".join(f"seed {row['seed']}" for row in _widest(summary)) + " |",
              "| --- |" + " --- |" * len(_widest(summary))]
    for run, entry in summary.items():
        rows = {row["seed"]: row for row in entry["per_seed"]}
        cells = [f"{rows[r['seed']]['final_accuracy']:.3f} / {rows[r['seed']]['area']:.3f}" if r["seed"] in rows else "—"
                 for r in _widest(summary)]
        lines.append(f"| `{run}` | " + " | ".join(cells) + " |")
    compared = {run: entry["vs_baseline"] for run, entry in summary.items() if "vs_baseline" in entry}
    if compared:
        def number(x, digits=3):
            return "—" if x is None else f"{x:+.{digits}f}"

        baseline = next(iter(compared.values()))["baseline"]
        lines += ["", f"Paired by seed against `{baseline}` (difference = run − baseline; p: exact sign-flip test, "
                      "two-sided; interval: 95% bootstrap over seeds):", "",
                  "| run | seeds | area diff (mean) | 95% interval | paired t | p | final accuracy diff | p |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for run, v in compared.items():
            interval = "—" if v["area_diff_ci95"] is None else f"[{v['area_diff_ci95'][0]:+.3f}, {v['area_diff_ci95'][1]:+.3f}]"
            p = "—" if v["p_value_sign_flip"] is None else f"{v['p_value_sign_flip']:.3f}"
            p_final = "—" if v["final_accuracy_p_value_sign_flip"] is None else f"{v['final_accuracy_p_value_sign_flip']:.3f}"
            lines.append(f"| `{run}` | {len(v['seeds'])} | {number(v['area_diff_mean'])} | {interval} "
                         f"| {number(v['paired_t'], 2)} | {p} | {number(v['final_accuracy_diff_mean'])} | {p_final} |")

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


def _widest(summary: dict) -> list[dict]:
    """The per_seed rows of the run string with the most seeds (the per-seed table's columns)."""
    seeds = sorted({row["seed"] for entry in summary.values() for row in entry["per_seed"]})
    return [{"seed": seed} for seed in seeds]


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
    parser.add_argument("--runs", nargs="+",
                        help='run strings, each a set of train.py options, e.g. "lampo" is read as "--algo lampo" '
                             'when it does not start with "--"')
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds of every run string")
    parser.add_argument("--out_dir", default="runs/compare", help="one folder per run string and seed go here")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (1 keeps wall times comparable)")
    parser.add_argument("--threshold", type=float, default=0.8, help="held-out accuracy for steps_to_threshold")
    parser.add_argument("--baseline", default=None, metavar="RUN_STRING",
                        help="compare every other run string with this one, paired by seed (vs_baseline in "
                             "summary.json); it is run too if --runs does not name it")
    parser.add_argument("--weights", nargs="+", default=None, metavar="RUN_DIR",
                        help="instead of running a grid: recompute the weight diagnostics of these runs (trained "
                             "with --log_rollouts) at every --weight_taus, ℓ mean and sum, absolute and relative")
    parser.add_argument("--weight_taus", nargs="+", type=float, default=[0.3, 1.0, 3.0], help="τ values of --weights")
    parser.add_argument("--phases", type=int, default=3, help="--weights: parts of training reported (early → late)")
    args = parser.parse_args(argv)
    if args.weights is not None:
        if args.phases < 1 or any(tau <= 0 for tau in args.weight_taus):
            parser.error("--phases must be at least 1 and every --weight_taus positive")
        try:
            grid = weight_grid([Path(folder) for folder in args.weights], tuple(args.weight_taus), args.phases)
        except FileNotFoundError as error:
            parser.exit(2, f"compare.py: error: {error}\n")
        out_dir = Path(args.out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "weights.json").write_text(json.dumps({"runs": args.weights, "grid": grid}, indent=2) + "\n")
        table = weights_markdown(grid)
        (out_dir / "weights.md").write_text(table)
        print(table)
        return grid
    if not args.runs:
        parser.error("--runs is required (or --weights RUN_DIR ...)")
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    if len(set(args.seeds)) != len(args.seeds):
        parser.error("--seeds: each seed once (paired statistics pair runs by seed)")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = list(dict.fromkeys(args.runs))                  # summary keys are the run strings as given
    if args.baseline is not None and args.baseline not in runs:
        runs.insert(0, args.baseline)
    cells = [(run, seed) for run in runs for seed in args.seeds]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(execute, run, seed, out_dir, common) for run, seed in cells]
        statuses = []
        for (run, seed), future in zip(cells, futures):
            status = future.result()
            statuses.append(status)
            outcome = "ok" if status["returncode"] == 0 else f"FAILED: {status['error']}"
            print(f"compare.py: {run!r} seed {seed}: {outcome} ({status['wall_seconds']} s)", file=sys.stderr)
    summary = summarize(statuses, runs, args.seeds, args.threshold, args.baseline)
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
