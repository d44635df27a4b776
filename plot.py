"""Training curves of one or several runs -> one PNG.

    python plot.py runs/demo                          # writes runs/demo/curves.png
    python plot.py runs/lampo runs/grpo --out compare.png

Reads each run's metrics.jsonl (one JSON object per step, written by train.py) and draws reward, accuracy,
held-out accuracy, completion length, clip fraction, entropy and the LamPO weight diagnostics against the
step, one line per run.
"""

import argparse
import json
from pathlib import Path

PANELS = [("reward", "reward"), ("accuracy", "train accuracy"), ("eval/accuracy", "held-out accuracy"),
          ("completions/mean_length", "completion length (tokens)"), ("clip_fraction", "clip fraction"),
          ("entropy", "entropy (nats/token)"),
          # What LamPO's confidence weights did (lambdapo.lampo_diagnostics; logged for every --algo):
          # how far from 1 the weights of pairs with a reward gap are, and how often the policy ranks a pair wrongly.
          ("lampo/weight_mean", "LamPO pair weight (mean)"), ("lampo/weight_std", "LamPO pair weight (std)"),
          ("lampo/misordered_pairs", "misordered pairs (share)")]


def read_metrics(run_dir: str) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"no metrics.jsonl in {run_dir}")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_runs(run_dirs: list[str], out: str) -> str:
    import matplotlib
    matplotlib.use("Agg")                      # no display needed
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(3, 3, figsize=(13, 9.5))
    for run_dir in run_dirs:
        rows = read_metrics(run_dir)
        for axis, (key, title) in zip(axes.flat, PANELS):
            points = [(row["step"], row[key]) for row in rows if key in row]
            if points:
                steps, values = zip(*points)
                axis.plot(steps, values, marker="o" if key.startswith("eval/") else None, label=Path(run_dir).name)
            axis.set_title(title)
            axis.set_xlabel("step")
    axes.flat[0].legend()
    figure.tight_layout()
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run folders (each with a metrics.jsonl)")
    parser.add_argument("--out", default=None, help="PNG path (default: <first run>/curves.png)")
    args = parser.parse_args(argv)
    print(plot_runs(args.runs, args.out or str(Path(args.runs[0]) / "curves.png")))


if __name__ == "__main__":
    main()
