"""Benchmark evaluation: accuracy (avg@k) and unbiased pass@k of a model on toy, MATH-500, AIME24/25, GPQA-Diamond, GSM8K.

    accuracy = (1/n) Σ_problems (1/k) Σ_samples correct          "avg@k"; greedy when k = 1 and temperature = 0
    pass@k'  = (1/n) Σ_problems [1 − C(k − c, k') / C(k, k')]       unbiased estimator (Chen et al. 2021, arXiv 2107.03374)

with c the number of correct samples among k. Generation goes through rollout.py (the same prompts, chat
template and masks as training); grading through rewards.py (only the text after the last `</think>`).

    python eval.py --model runs/demo/final --benchmark toy --out runs/demo/eval_final.json
    python eval.py --model Qwen/Qwen3-1.7B --benchmark math500 --num_samples 4 --out qwen3_math500.json

Writes the summary JSON to --out and the per-problem results (prompt, completions, extracted answers,
correct) next to it as .jsonl. train.py imports `load_model` and `evaluate` from here.
"""

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

import data
import rewards
from rollout import SamplingConfig, generate, make_engine


class ModelLoadError(RuntimeError):
    """A model name or folder that cannot be loaded; the message says why in one line."""


# ---------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------
def is_local_path(name: str) -> bool:
    """A Hub name is "owner/model" (or a bare legacy name); anything else is meant as a local folder."""
    name = os.path.expanduser(name)
    return os.path.exists(name) or name.startswith((".", "/")) or name.count("/") > 1


def check_model_name(name: str) -> None:
    """Fail at once (before any data or weights load) on a local model folder that does not exist."""
    if name != "toy" and is_local_path(name) and not os.path.isdir(os.path.expanduser(name)):
        raise ModelLoadError(f"model folder not found: {name}")


def load_model(name: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               trust_remote_code: bool = False, log=print):
    """(model, tokenizer) from "toy" (the cached warm-started tiny model), a local folder, or a Hub name.

    Weights load in `dtype` (float32 for training: float32 master weights; bf16 autocast does the math).
    `trust_remote_code` stays off unless the user asks: it runs Python shipped with the checkpoint.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name == "toy":
        import toy
        name = str(toy.warm_started_model_dir(log=log))
    name = os.path.expanduser(name)
    check_model_name(name)
    looks_local = is_local_path(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype,
                                                     trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        where = "local folder" if looks_local else "Hub model (no network? wrong name? gated?)"
        raise ModelLoadError(f"could not load {where} '{name}': {str(error).splitlines()[0]}") from error
    if tokenizer.pad_token_id is None:              # many base models ship without a pad token
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device), tokenizer


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


def evaluate(model, tokenizer, records: list[dict], num_samples: int = 1, sampling: SamplingConfig | None = None,
             chat_template_kwargs: dict | None = None, autocast_dtype: torch.dtype | None = None,
             generate_fn=generate, engine=None) -> tuple[dict, list[dict]]:
    """Generate `num_samples` completions per record and grade them. Returns (summary, per-problem results)."""
    sampling = sampling or SamplingConfig(do_sample=False)
    start = time.time()
    rollout = generate_fn(model, tokenizer, [r["prompt"] for r in records], num_samples, sampling,
                          chat_template_kwargs=chat_template_kwargs, autocast_dtype=autocast_dtype, engine=engine)
    results = []
    for index, record in enumerate(records):
        rows = range(index * num_samples, (index + 1) * num_samples)
        graded = [grade(rollout.completions[row], record) for row in rows]
        results.append({"id": record.get("id", index), "prompt": record["prompt"], "answer": record["answer"],
                        "completions": [rollout.completions[row] for row in rows],
                        "extracted": [answer for _, answer in graded],
                        "correct": [correct for correct, _ in graded],
                        "truncated": [bool(rollout.truncated[row]) for row in rows]})
    n = len(results)
    summary = {
        "accuracy": sum(sum(r["correct"]) / num_samples for r in results) / max(n, 1),
        "n": n, "k": num_samples,
        "truncated_ratio": float(rollout.truncated.float().mean()) if n else 0.0,
        "mean_completion_tokens": float(rollout.completion_lengths.float().mean()) if n else 0.0,
        "seconds": round(time.time() - start, 2),
    }
    k = 1
    while k <= num_samples:          # pass@1, 2, 4, ... from the same samples
        summary[f"pass@{k}"] = sum(pass_at_k(num_samples, int(sum(r["correct"])), k) for r in results) / max(n, 1)
        k *= 2
    return summary, results


# ---------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------
class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a bad option prints one line (not the whole usage block) and exits with 2."""
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse_args(argv=None):
    parser = OneLineErrorParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="toy", help="'toy', a local save_pretrained folder, or a Hub name")
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
                             "(runs/X/final), else 48 for toy and 4096 otherwise (raise it for thinking mode)")
    parser.add_argument("--enable_thinking", type=lambda s: s.lower() in ("1", "true", "yes"), default=None,
                        help="Qwen3 chat template switch (true/false); default: the training run's setting for a "
                             "run folder, else the template's own default (thinking on for Qwen3)")
    parser.add_argument("--batch_size", type=int, default=64, help="sequences generated at once")
    parser.add_argument("--engine", default="auto", choices=["auto", "fast", "plain"],
                        help="fast: own static-cache decode loop (compiled on CUDA); plain: model.generate; "
                             "auto: fast on CUDA, plain on CPU")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (and GPQA option shuffle seed)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--trust_remote_code", action="store_true", help="run Python code shipped with the model")
    parser.add_argument("--out", default=None, help="summary JSON path (per-problem results go next to it, .jsonl)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.num_samples < 1:
        sys.exit("eval.py: error: --num_samples must be >= 1")
    torch.manual_seed(args.seed)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        check_model_name(args.model)
        records = data.load_benchmark(args.benchmark, data_file=args.data_file, limit=args.limit, seed=args.seed)
        model, tokenizer = load_model(args.model, device, torch.float32 if device.type == "cpu" else torch.bfloat16,
                                      args.trust_remote_code, log=lambda message: print(message, file=sys.stderr))
    except (ValueError, RuntimeError, FileNotFoundError) as error:
        sys.exit(f"eval.py: error: {error}")
    # Defaults: a folder of one of our training runs is evaluated as training evaluated it (template mode,
    # budget, greedy for k = 1); anything else gets its model family's documented defaults.
    run = training_run_config(args.model)
    enable_thinking, family, budget = args.enable_thinking, args.model, None
    if run is not None:
        family = run["model"]                               # "Qwen/Qwen3-1.7B" names the family, "runs/x/final" does not
        enable_thinking = run.get("enable_thinking", False) if enable_thinking is None else enable_thinking
        budget = run.get("eval_max_new_tokens") or run.get("max_new_tokens")
    defaults = default_sampling(family, enable_thinking, args.num_samples)
    if run is not None and args.num_samples == 1:
        defaults = {"temperature": 0.0, "top_p": 1.0}       # train.py's evaluations are greedy
    temperature = defaults["temperature"] if args.temperature is None else args.temperature
    sampling = SamplingConfig(temperature=temperature, top_p=defaults["top_p"] if args.top_p is None else args.top_p,
                              max_new_tokens=args.max_new_tokens or budget or (48 if args.benchmark == "toy" else 4096),
                              do_sample=temperature > 0, batch_size=args.batch_size)
    chat_template_kwargs = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    settings = {"temperature": sampling.temperature, "top_p": sampling.top_p,
                "max_new_tokens": sampling.max_new_tokens, "greedy": sampling.greedy,
                "enable_thinking": enable_thinking, "seed": args.seed, "limit": args.limit,
                "defaults_from": "training run" if run is not None else "model family"}
    print(f"eval.py: settings {json.dumps(settings)}", file=sys.stderr)
    engine = make_engine(args.engine, model)
    summary, results = evaluate(model, tokenizer, records, args.num_samples, sampling, chat_template_kwargs,
                                engine=engine)
    if summary["truncated_ratio"] > 0.05:
        print(f"eval.py: warning: {summary['truncated_ratio']:.0%} of completions hit max_new_tokens="
              f"{sampling.max_new_tokens} and were graded unfinished; raise --max_new_tokens", file=sys.stderr)
    summary.update(model=args.model, benchmark=args.benchmark, data_file=args.data_file, device=str(device),
                   settings=settings)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
        with open(Path(args.out).with_suffix(".jsonl"), "w") as file:
            for result in results:
                file.write(json.dumps(result) + "\n")
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
