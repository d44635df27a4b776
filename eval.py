"""Benchmark evaluation: accuracy (avg@k) and unbiased pass@k of a model on toy, MATH-500, AIME24/25, GPQA-Diamond, GSM8K.

    accuracy = (1/n) Σ_problems (1/k) Σ_samples correct          "avg@k"; greedy when k = 1 and temperature = 0
    pass@k'  = (1/n) Σ_problems [1 − C(k − c, k') / C(k, k')]       unbiased estimator (Chen et al. 2021, arXiv 2107.03374)

with c the number of correct samples among k. Generation goes through rollout.py (the same prompts, chat
template and masks as training); grading through rewards.py (only the text after the last `</think>`).

    python eval.py --model runs/demo/final --benchmark toy --out runs/demo/eval_final.json
    python eval.py --model Qwen/Qwen3-1.7B --benchmark math500 --num_samples 4 --out qwen3_math500.json

Writes the summary JSON to --out and the per-problem results (prompt, completions, extracted answers,
correct) next to it as .jsonl, one line per problem as soon as it is graded: a long evaluation (AIME avg@32
takes hours) shows a progress bar, keeps what it graded when interrupted (Ctrl-C, a crash, a lost machine),
and `--resume` continues from that file. train.py imports `evaluate` from here; models come from models.py.
"""

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import data
import rewards
from models import check_model_name, load_model, resolve_device
from engine import make_engine
from rollout import SamplingConfig, generate, thinking_kwargs


# ---------------------------------------------------------------------------------------------------
# Sampling settings
# ---------------------------------------------------------------------------------------------------
def training_run_config(model_path: str) -> dict | None:
    """The train.py config of the run a model folder belongs to, or None.

    A run of this project writes config.json (the training options) beside initial/, final/ and
    checkpoint-N/; each of those folders has its own (model) config.json inside. Evaluating such a
    folder should measure what training measured: same chat-template mode, same token budget, greedy.
    """
    run_config = Path(os.path.expanduser(model_path)).parent / "config.json"
    try:
        settings = json.loads(run_config.read_text())
    except (OSError, ValueError):
        return None
    return settings if isinstance(settings, dict) and {"algo", "group_size", "model"} <= settings.keys() else None


def default_sampling(model_name: str, enable_thinking: bool | None, num_samples: int) -> dict:
    """Documented per-family defaults: Qwen3's recommended settings, greedy otherwise for k = 1.

    Qwen3 model cards: thinking mode temperature 0.6, top_p 0.95; non-thinking 0.7, top_p 0.8 (their
    top_k = 20 is deliberately not used: we sample exactly softmax(logits / T) with nucleus top_p).
    Other models: greedy for a single sample, temperature 0.6 / top_p 0.95 for k > 1.
    """
    name = model_name.lower()
    if "qwen3" in name:
        thinking = True if enable_thinking is None else enable_thinking
        return {"temperature": 0.6, "top_p": 0.95} if thinking else {"temperature": 0.7, "top_p": 0.8}
    if num_samples == 1:
        return {"temperature": 0.0, "top_p": 1.0}
    return {"temperature": 0.6, "top_p": 0.95}


# ---------------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------------
def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 − C(n − c, k) / C(n, k).

    >>> pass_at_k(4, 1, 1), pass_at_k(4, 1, 4), round(pass_at_k(4, 1, 2), 4)
    (0.25, 1.0, 0.5)
    """
    if num_samples - num_correct < k:
        return 1.0
    return 1.0 - math.comb(num_samples - num_correct, k) / math.comb(num_samples, k)


def grade(completion: str, record: dict) -> tuple[float, str | None]:
    """(correct, extracted answer) for one completion of one record. The extracted answer is the one the grader
    graded (several boxes of one final statement joined, a late "final answer is" sentence), not just the last box."""
    if record.get("task") == "multiple_choice":
        correct = rewards.multiple_choice_reward(completion, record["answer"])
    else:
        correct = rewards.accuracy_reward(completion, record["answer"])
    return correct, rewards.final_answer(completion)


def summarize(results: list[dict], num_samples: int) -> dict:
    """avg@k accuracy, pass@1, 2, 4 …, truncation and length over per-problem results (from one run or resumed)."""
    n = len(results)
    completions = [(tokens, cut) for r in results for tokens, cut in zip(r["completion_tokens"], r["truncated"])]
    summary = {
        "accuracy": sum(sum(r["correct"]) / num_samples for r in results) / max(n, 1),
        "n": n, "k": num_samples,
        "truncated_ratio": sum(cut for _, cut in completions) / len(completions) if completions else 0.0,
        "mean_completion_tokens": sum(tokens for tokens, _ in completions) / len(completions) if completions else 0.0,
    }
    k = 1
    while k <= num_samples:          # pass@1, 2, 4, ... from the same samples
        summary[f"pass@{k}"] = sum(pass_at_k(num_samples, int(sum(r["correct"])), k) for r in results) / max(n, 1)
        k *= 2
    return summary


def evaluate(model, tokenizer, records: list[dict], num_samples: int = 1, sampling: SamplingConfig | None = None,
             chat_template_kwargs: dict | None = None, autocast_dtype: torch.dtype | None = None,
             generate_fn=generate, engine=None, done: list[dict] = (), on_graded=None, seed: int | None = None,
             progress: bool = False) -> tuple[dict, list[dict]]:
    """Generate `num_samples` completions per record and grade them. Returns (summary, per-problem results).

    Works one generation batch at a time (`sampling.batch_size` sequences, whole problems): each batch is
    graded and handed to `on_graded(rows)` (eval.py appends them to its .jsonl) before the next starts, so an
    interruption loses at most one batch. `done` are the already graded results of the first len(done)
    records (a resumed run): they count in the summary and are not generated again.

    With `seed`, each batch samples from its own seed (seed, index of its first problem) instead of
    continuing one random stream: a resumed evaluation then draws exactly the samples the uninterrupted one
    would have (same --batch_size), and its summary is the same. train.py passes no seed: its sampling must
    not reseed the training run's RNG.
    """
    sampling = sampling or SamplingConfig(do_sample=False)
    start = time.time()
    results = list(done)
    problems_per_batch = max(1, sampling.batch_size // num_samples)
    bar = tqdm(total=len(records), initial=len(results), unit="problem", disable=not progress, dynamic_ncols=True,
               file=sys.stderr, desc="eval")
    try:
        for first in range(len(results), len(records), problems_per_batch):
            batch = records[first:first + problems_per_batch]
            if seed is not None:
                torch.manual_seed(seed * 1_000_003 + first)
            rollout = generate_fn(model, tokenizer, [r["prompt"] for r in batch], num_samples, sampling,
                                  chat_template_kwargs=chat_template_kwargs, autocast_dtype=autocast_dtype, engine=engine)
            graded_rows = []
            for index, record in enumerate(batch):
                rows = range(index * num_samples, (index + 1) * num_samples)
                graded = [grade(rollout.completions[row], record) for row in rows]
                graded_rows.append({
                    "id": record.get("id", first + index), "prompt": record["prompt"], "answer": record["answer"],
                    "completions": [rollout.completions[row] for row in rows],
                    "extracted": [answer for _, answer in graded],
                    "correct": [correct for correct, _ in graded],
                    "truncated": [bool(rollout.truncated[row]) for row in rows],
                    "completion_tokens": [int(rollout.completion_lengths[row]) for row in rows]})
            if on_graded is not None:
                on_graded(graded_rows)
            results.extend(graded_rows)
            bar.update(len(batch))
            bar.set_postfix(accuracy=f"{summarize(results, num_samples)['accuracy']:.3f}")
    finally:
        bar.close()
    summary = summarize(results, num_samples)
    summary["seconds"] = round(time.time() - start, 2)
    return summary, results


# ---------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------
class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a bad option prints one line (not the whole usage block) and exits with 2."""
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def toy_budget(benchmark: str) -> int:
    """The default completion budget: the built-in task's (its longest worked solution fits), else 4096."""
    if benchmark in data.TOY_TASKS:
        import toy  # lazy, as in data.py
        return toy.TASKS[benchmark].max_new_tokens
    return 4096


def parse_args(argv=None):
    parser = OneLineErrorParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="toy", help="'toy' or 'toy_hard' (the tiny model warm-started on that "
                                                       "built-in task), a local save_pretrained folder, or a Hub name")
    parser.add_argument("--benchmark", default="toy", choices=list(data.BENCHMARKS), help="which benchmark")
    parser.add_argument("--data_file", default=None, help="read the benchmark from this local .jsonl/.json/.parquet "
                        "file (same fields as the Hub copy) instead of the Hub")
    parser.add_argument("--num_samples", "-k", type=int, default=1, help="completions per problem (avg@k, pass@k)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N problems")
    parser.add_argument("--temperature", type=float, default=None,
                        help="sampling temperature (0 = greedy); default: per model family, see default_sampling")
    parser.add_argument("--top_p", type=float, default=None, help="nucleus sampling; default: per model family")
    parser.add_argument("--max_new_tokens", type=int, default=None,
                        help="completion budget; default: the training run's eval budget for a run folder "
                             "(runs/X/final), else 48 for toy, 64 for toy_hard and 4096 otherwise (raise it for thinking mode)")
    parser.add_argument("--enable_thinking", type=parse_bool, default=None,
                        help="Qwen3 chat template switch (true/false); default: the training run's setting for a "
                             "run folder, else the template's own default (thinking on for Qwen3)")
    parser.add_argument("--batch_size", type=int, default=64, help="sequences generated at once")
    parser.add_argument("--engine", default="auto", choices=["auto", "fast", "plain"],
                        help="fast: own static-cache decode loop (compiled on CUDA); plain: model.generate; "
                             "auto: fast on CUDA, plain on CPU")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (and GPQA option shuffle seed)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--trust_remote_code", action="store_true", help="run Python code shipped with the model")
    parser.add_argument("--out", default=None, help="summary JSON path; per-problem results go next to it (.jsonl), "
                        "appended as they are graded")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted evaluation: keep the problems "
                        "already in the --out .jsonl and grade only the rest (same options as the first run)")
    return parser.parse_args(argv)


def parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def check_args(args) -> None:
    """One line for each nonsensical value, before anything loads: an evaluation can take hours to reach the
    line that would have failed."""
    rules = {"num_samples": (lambda v: v >= 1, ">= 1"), "limit": (lambda v: v is None or v >= 1, ">= 1"),
             "temperature": (lambda v: v is None or (0 <= v and math.isfinite(v)), "a finite number >= 0 (0 = greedy)"),
             "top_p": (lambda v: v is None or 0 < v <= 1, "in (0, 1]"),
             "max_new_tokens": (lambda v: v is None or v >= 1, ">= 1"), "batch_size": (lambda v: v >= 1, ">= 1"),
             "seed": (lambda v: 0 <= v < 2 ** 63, "an integer >= 0")}
    for name, (valid, rule) in rules.items():
        if not valid(getattr(args, name)):
            raise ValueError(f"--{name} must be {rule}, got {getattr(args, name)}")
    if args.data_file and args.benchmark in data.TOY_TASKS:     # a built-in set reads no file: it would be ignored
        others = ",".join(b for b in data.BENCHMARKS if b not in data.TOY_TASKS)
        raise ValueError(f"--data_file {args.data_file} would be ignored: --benchmark {args.benchmark} is built in; "
                         f"name the file's benchmark with --benchmark {{{others}}}")
    if args.out and (Path(args.out).is_dir() or Path(args.out).suffix == ".jsonl"):
        raise ValueError(f"--out {args.out}: give a file name such as results.json (the per-problem .jsonl goes next to it)")
    if args.resume and not args.out:
        raise ValueError("--resume needs --out: it continues from the per-problem .jsonl next to the --out file")


def read_graded(path: Path, records: list[dict], num_samples: int) -> list[dict]:
    """The problems an interrupted evaluation already graded (its .jsonl), checked against this evaluation.

    Rows were appended in problem order, so row i must be records[i]. A torn last line (the process was
    killed in the middle of writing it) is dropped, and the file is rewritten without it; a bad line anywhere
    else means the file is not what we wrote, and is an error naming its line.
    """
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").split("\n")
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    rows = []
    for i, line in enumerate(lines[:last + 1]):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            if i == last:
                print(f"eval.py: {path}, line {i + 1}: dropped an incomplete last line (the run was killed while "
                      f"writing it); that problem is graded again", file=sys.stderr)
                break
            raise ValueError(f"{path}, line {i + 1}: not valid JSON ({error.msg}); not a file eval.py wrote, or "
                             f"damaged: start afresh without --resume") from None
        where = f"{path}, line {i + 1}"
        if len(rows) >= len(records):
            raise ValueError(f"{where}: more graded problems than the {len(records)} of this evaluation "
                             f"(a smaller --limit than the first run?)")
        record = records[len(rows)]
        if not isinstance(row, dict) or row.get("prompt") != record["prompt"]:
            raise ValueError(f"{where}: not problem {len(rows) + 1} of this evaluation ({record.get('id')}): another "
                             f"--benchmark, --data_file or --limit? Start afresh without --resume")
        if len(row.get("correct", ())) != num_samples:
            raise ValueError(f"{where}: graded with {len(row.get('correct', ()))} samples, not --num_samples {num_samples}")
        rows.append(row)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return rows


def run(args, model, tokenizer, records: list[dict], sampling: SamplingConfig, chat_template_kwargs: dict, engine,
        device, done: list[dict], settings: dict) -> dict:
    """Evaluate, appending graded problems to the .jsonl and keeping the --out summary current; return the summary."""
    header = dict(model=args.model, benchmark=args.benchmark, data_file=args.data_file, device=str(device),
                  settings=settings)
    out = Path(args.out) if args.out else None
    rows_path = out.with_suffix(".jsonl") if out else None
    seconds_before = 0.0
    if out and args.resume and out.exists():
        # The first run's summary (written as it went) says how it sampled: resuming with other settings
        # would mix two evaluations in one number. (--limit may grow: the rest is graded.)
        try:
            previous = json.loads(out.read_text())
        except json.JSONDecodeError:
            previous = {}
        for key in ("model", "benchmark", "data_file"):
            if key in previous and previous[key] != header[key]:
                sys.exit(f"eval.py: error: {out} was evaluated with --{key} {previous[key]}, not {header[key]}: "
                         f"resume with the same options, or start afresh without --resume")
        for key, value in previous.get("settings", {}).items():
            if key != "limit" and value != header["settings"][key]:
                sys.exit(f"eval.py: error: {out} was evaluated with {key} {value}, not {header['settings'][key]}: "
                         f"resume with the same options, or start afresh without --resume")
        seconds_before = previous.get("seconds", 0.0)
    if done:
        print(f"eval.py: resuming: {len(done)} of {len(records)} problems already graded in {rows_path}", file=sys.stderr)
    graded = list(done)
    start = time.time()

    def write_summary(summary: dict, complete: bool) -> dict:
        summary = {**summary, "seconds": round(seconds_before + time.time() - start, 2), **header, "complete": complete}
        if out:
            out.write_text(json.dumps(summary, indent=2) + "\n")
        return summary

    rows_file = None
    if out:
        rows_file = open(rows_path, "a" if args.resume else "w", encoding="utf-8")
        write_summary(summarize(graded, args.num_samples), complete=False)

    def on_graded(rows: list[dict]) -> None:      # each batch on disk before the next is generated
        graded.extend(rows)
        if rows_file:
            rows_file.write("".join(json.dumps(row) + "\n" for row in rows))
            rows_file.flush()
            write_summary(summarize(graded, args.num_samples), complete=False)

    try:
        summary, _ = evaluate(model, tokenizer, records, args.num_samples, sampling, chat_template_kwargs,
                              engine=engine, done=done, on_graded=on_graded, seed=args.seed, progress=True)
    except KeyboardInterrupt:
        where = f" are in {rows_path}; continue with the same command and --resume" if out else \
            " (nothing kept: pass --out to keep graded problems and resume)"
        print(f"eval.py: interrupted: {len(graded)} of {len(records)} graded problems{where}", file=sys.stderr)
        raise SystemExit(130)
    finally:
        if rows_file:
            rows_file.close()
    summary = write_summary(summary, complete=True)
    if summary["truncated_ratio"] > 0.05:
        print(f"eval.py: warning: {summary['truncated_ratio']:.0%} of completions hit max_new_tokens="
              f"{sampling.max_new_tokens} and were graded unfinished; raise --max_new_tokens", file=sys.stderr)
    print(json.dumps(summary))
    return summary


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    try:
        check_args(args)
        device = resolve_device(args.device)
        check_model_name(args.model)
        records = data.load_benchmark(args.benchmark, data_file=args.data_file, limit=args.limit, seed=args.seed)
        if args.out:                                   # now, not after hours of generation
            try:
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise ValueError(f"--out {args.out}: cannot create its folder ({error.strerror or error})") from None
        done = read_graded(Path(args.out).with_suffix(".jsonl"), records, args.num_samples) if args.resume else []
        model, tokenizer = load_model(args.model, device, torch.float32 if device.type == "cpu" else torch.bfloat16,
                                      args.trust_remote_code, log=lambda message: print(message, file=sys.stderr))
    except (ValueError, RuntimeError, OSError) as error:
        sys.exit(f"eval.py: error: {error}")
    # Defaults: a folder of one of our training runs is evaluated as training evaluated it (template mode,
    # budget, greedy for k = 1); anything else gets its model family's documented defaults.
    run_config = training_run_config(args.model)
    enable_thinking, family, budget = args.enable_thinking, args.model, None
    if run_config is not None:
        family = run_config["model"]                        # "Qwen/Qwen3-1.7B" names the family, "runs/x/final" does not
        enable_thinking = run_config.get("enable_thinking", False) if enable_thinking is None else enable_thinking
        budget = run_config.get("eval_max_new_tokens") or run_config.get("max_new_tokens")
    defaults = default_sampling(family, enable_thinking, args.num_samples)
    if run_config is not None and args.num_samples == 1:
        defaults = {"temperature": 0.0, "top_p": 1.0}       # train.py's evaluations are greedy
    temperature = defaults["temperature"] if args.temperature is None else args.temperature
    sampling = SamplingConfig(temperature=temperature, top_p=defaults["top_p"] if args.top_p is None else args.top_p,
                              max_new_tokens=args.max_new_tokens or budget or toy_budget(args.benchmark),
                              do_sample=temperature > 0, batch_size=args.batch_size)
    try:                                                    # Qwen3's switch; an error for a template without one
        chat_template_kwargs = thinking_kwargs(tokenizer, enable_thinking, args.model)
    except ValueError as error:
        sys.exit(f"eval.py: error: {error}")
    settings = {"temperature": sampling.temperature, "top_p": sampling.top_p,
                "max_new_tokens": sampling.max_new_tokens, "greedy": sampling.greedy,
                "enable_thinking": enable_thinking, "seed": args.seed, "limit": args.limit,
                "defaults_from": "training run" if run_config is not None else "model family"}
    print(f"eval.py: settings {json.dumps(settings)}", file=sys.stderr)
    engine = make_engine(args.engine, model)
    return run(args, model, tokenizer, records, sampling, chat_template_kwargs, engine, device, done, settings)


if __name__ == "__main__":
    main()
