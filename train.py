"""Train a policy with LamPO (or GRPO, Dr. GRPO, RLOO) on one device: the whole loop in one file.

    python train.py                              # offline demo: tiny model, toy task, CPU, a few minutes
    python train.py --model Qwen/Qwen3-1.7B      # the real run: one GPU, MATH train, MATH-500 evaluation

Each step, for `prompts_per_step` prompts q and G completions each (lambdapo.py has the equations):

    1. ROLLOUT    o_1..o_G ~ π_old(· | q)                                    rollout.generate
    2. REWARD     r_i = accuracy(o_i) + α · ROUGE-L-F(o_i, reference)        rewards.reward
    3. ADVANTAGE  log π_old per token → ℓ_i → A_i = 1/(G−1) Σ_j (r_i − r_j) w_ij (LamPO)
    4. UPDATE     `epochs` × `mini_batches` AdamW steps on the clipped surrogate, π_old fixed, so the ratio
                  moves away from 1 after the first step and the clip really acts
    5. LOG        metrics.jsonl, samples.jsonl, tqdm; evaluation and checkpoints every N steps

Float32 master weights (bf16 autocast on CUDA): pure-bf16 AdamW silently drops updates as small as lr = 1e-6.
With --lora_rank R the policy is a peft model (models.py): a frozen base, bf16 on CUDA, and float32 rank-R
adapters that are all the optimizer sees; π_ref is the base with the adapters off; final/ is merged.
"""

import argparse
import copy
import dataclasses
import importlib.util
import json
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
import uuid
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

import data
import lambdapo
import rewards
from eval import OneLineErrorParser, evaluate, parse_bool, summarize
from engine import make_engine, make_lora_engine
from models import (ModelLoadError, adapters_disabled, add_lora, check_model_name, load_model,
                    parameter_counts, parse_target_modules, resolve_device, save_model)
from rollout import SamplingConfig, generate, keep_groups, prompt_token_counts, thinking_kwargs, token_logprobs


# ===================================================================================================
# CONFIG: one dataclass; every field is a command-line option and its `help` is the documentation.
# `None` means "the preset's value": the toy demo and a real LLM need very different numbers.
# ===================================================================================================
def option(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    # what to train
    model: str = option("toy", "'toy' (tiny offline model, warm-started once and cached; 'toy_hard' the same "
                               "model warm-started on the harder task), a local save_pretrained folder, or a Hub "
                               "name such as Qwen/Qwen3-1.7B")
    dataset: str = option(None, "training set: toy | toy_hard | math | gsm8k | a Hub id | a local .jsonl/.parquet "
                                "(preset: the toy model's own task, math otherwise; toy_hard alone selects "
                                "--model toy_hard)")
    data_file: str = option(None, "read the training set from this local file (same fields as the Hub copy)")
    problem_field: str = option(None, "dataset field with the problem text (default: guessed)")
    answer_field: str = option(None, "dataset field with the final answer (default: guessed)")
    solution_field: str = option(None, "dataset field with a worked solution for ROUGE-L (default: guessed)")
    out_dir: str = option("runs/demo", "where config.json, metrics.jsonl, samples.jsonl, initial/, final/ "
                                       "and checkpoints go")
    # the algorithm (lambdapo.py)
    algo: str = option("lampo", "advantage: lampo (pairwise, confidence-weighted) | grpo | dr_grpo | rloo")
    tau: float = option(1.0, "LamPO temperature τ of the confidence weights; inf gives RLOO")
    relative_tau: bool = option(False, "measure τ in units of the step's ℓ spread (lampo/seq_logp_std, the mean "
                                       "within-group std of ℓ): τ_eff = τ · spread, scale-free across tasks, "
                                       "models, mean/sum and training time (lambdapo.relative_tau)")
    seq_logp: str = option("mean", "LamPO sequence score ℓ_i: mean (length-normalised) or sum of token log-probs")
    scale_by_std: str = option("auto", "divide advantages by the group reward std: auto (grpo yes, others no) | true | false")
    clip_low: float = option(None, "ε_low: the ratio is clipped below at 1 − ε_low (preset: 0.2; 3e-4 with "
                                   "--importance_level sequence, GSPO's)")
    clip_high: float = option(None, "ε_high: the ratio is clipped above at 1 + ε_high (preset: 0.2; 4e-4 with "
                                    "--importance_level sequence, GSPO's; DAPO's clip-higher is 0.28)")
    importance_level: str = option("token", "the ratio in the clipped surrogate: token (PPO/GRPO: π_θ / π_old per "
                                            "token) | sequence (GSPO: one ratio per completion, the geometric mean "
                                            "of its token ratios; its clip range is ~1000× narrower)")
    beta: float = option(0.0, "k3 KL penalty weight to the initial policy; > 0 loads a frozen reference copy")
    aggregation: str = option("token-mean", "loss aggregation: token-mean (DAPO) | seq-mean (GRPO) | fixed-length (Dr. GRPO)")
    rouge_weight: float = option(0.1, "α in r = accuracy + α·ROUGE-L-F(completion, reference solution); 0 disables")
    reward_workers: int = option(None, "processes that grade a step's completions (rewards.score_completions; "
                                       "preset: 1 toy, whose completions grade in microseconds; 0 LLM = every core)")
    mask_truncated: bool = option(False, "drop completions cut off by max_new_tokens from the loss (DAPO's overlong filter)")
    tis_cap: float = option(0.0, "truncated importance sampling: weight each token's policy-gradient term by "
                                 "min(π_old / π_sampler, C) with C = this cap, for the gap between the fast engine's "
                                 "bf16 sampler and the float32 π_old (as TRL/verl do for vLLM); 0 = off")
    # sampling
    group_size: int = option(8, "G, completions per prompt (≥ 2)")
    dynamic_sampling: bool = option(False, "DAPO's dynamic sampling: train only on groups whose rewards differ "
                                           "(an all-equal group has no advantage); sample further prompts, "
                                           "prompts_per_step at a time, until prompts_per_step such groups are "
                                           "kept or max_generation_rounds rounds are spent")
    max_generation_rounds: int = option(3, "with --dynamic_sampling: rounds of sampling per step at most")
    prompts_per_step: int = option(None, "prompts per step (preset: 16 toy, 32 LLM)")
    max_new_tokens: int = option(None, "completion budget in tokens (preset: 48 toy, 64 toy_hard, 1024 LLM)")
    max_prompt_tokens: int = option(None, "training prompts longer than this many tokens (chat template included) "
                                          "are dropped when the data loads, and counted (truncating a problem "
                                          "would make it unsolvable); evaluation grades every problem, the longer "
                                          "ones in smaller batches; the fast engine's prompt buckets stop here "
                                          "(preset: 64 toy, whose prompts are ≤ 12; 512 LLM, as TRL)")
    temperature: float = option(1.0, "sampling temperature; log-probs use the same temperature")
    top_p: float = option(1.0, "nucleus sampling; 1.0 samples the full distribution. Below 1 the policy trained is "
                               "the renormalised nucleus that samples: π_old, π_θ, π_ref and the sampler's "
                               "log-probs are all taken under it, so the PPO ratio and TIS compare what sampled")
    enable_thinking: bool = option(False, "Qwen3 chat template's thinking mode (graded after </think>)")
    generation_batch_size: int = option(None, "sequences generated at once; the KV cache of one batch stays allocated "
                                              "(memory only; preset: 256 toy, 128 LLM: 21 GiB for Qwen3-1.7B at "
                                              "1,024+512 tokens; 64 for a real model with LoRA, to fit a 24 GB GPU)")
    rollout_engine: str = option("auto", "fast (own static-cache decode loop; on CUDA a bf16 copy of the policy) | "
                                         "plain (model.generate) | auto (fast on CUDA, plain on CPU)")
    compile_rollout: bool = option(True, "torch.compile + CUDA graphs for the fast engine's decode step (CUDA only)")
    # optimisation
    num_steps: int = option(None, "RL steps, one rollout batch each (preset: 80 toy, 200 toy_hard, 500 LLM)")
    lr: float = option(None, "peak AdamW learning rate (preset: 5e-5 toy, 1e-6 LLM; with LoRA 5e-4 toy, 1e-5 LLM)")
    warmup_steps: int = option(None, "linear learning-rate warm-up in RL steps (preset: 10); a fresh AdamW "
                                     "on a warm-started model needs it")
    weight_decay: float = option(0.0, "AdamW weight decay")
    max_grad_norm: float = option(1.0, "gradient clipping by global norm")
    epochs: int = option(1, "passes over each rollout batch")
    mini_batches: int = option(None, "optimizer steps per pass (preset: 4 toy, 2 LLM); > 1 lets the clip act")
    micro_batch_size: int = option(None, "sequences per forward/backward (gradient accumulation; preset: all toy, 8 LLM)")
    gradient_checkpointing: bool = option(None, "recompute activations in backward to save memory (preset: off toy, on LLM)")
    # LoRA (peft): low-rank adapters on a frozen base instead of every weight (models.py)
    lora_rank: int = option(0, "LoRA rank r: train rank-r adapters through peft on a frozen base (bf16 on CUDA), "
                               "the optimizer sees only the adapters; 0 = full fine-tuning")
    lora_alpha: float = option(None, "LoRA α: the adapters' update is scaled by α / r (preset: 2 × lora_rank)")
    lora_dropout: float = option(0.0, "dropout on the adapters' input during the update (0 keeps the update "
                                      "deterministic, as the ratio π_θ / π_old assumes)")
    lora_target_modules: str = option("all-linear", "layers that get adapters: all-linear (every linear projection "
                                                    "of attention and MLP, not the LM head) or names, e.g. q_proj,v_proj")
    # evaluation, logging, checkpoints
    eval_every: int = option(None, "evaluate every N steps, 0 = only before and after training (preset: 20 toy, 50 LLM)")
    eval_benchmark: str = option(None, "benchmark for evaluation during training, or none (preset: toy | math500)")
    eval_data_file: str = option(None, "read the evaluation benchmark from this local file instead of the Hub")
    eval_limit: int = option(None, "problems per evaluation (preset: 200 toy, 100 LLM)")
    eval_max_new_tokens: int = option(None, "completion budget for evaluation (preset: max_new_tokens)")
    save_every: int = option(None, "checkpoint every N steps (preset: 20 toy, 50 LLM)")
    keep_checkpoints: int = option(2, "how many recent checkpoint-* folders to keep")
    log_samples: int = option(4, "completions per step written to samples.jsonl")
    log_rollouts: bool = option(False, "also write every completion's step, group, reward, accuracy, length, "
                                       "truncation and ℓ (the mean and the sum of its log-probs under π_old) to "
                                       "rollouts.jsonl: the confidence weights' diagnostics at any τ can then be "
                                       "recomputed from the run (compare.py --weights)")
    report_to: str = option("none", "also log metrics.jsonl's rows to a tracker: none | wandb (WANDB_PROJECT, "
                                    "default lambdapo; WANDB_MODE=offline works without a network) | tensorboard "
                                    "(out_dir/tensorboard); each needs its package installed")
    seed: int = option(0, "seed for the data order, sampling and the update's shuffling")
    device: str = option(None, "cuda | cpu (default: cuda when available)")
    resume: bool = option(False, "continue from the newest checkpoint in out_dir")
    overwrite: bool = option(False, "delete an existing run in out_dir and start afresh")
    trust_remote_code: bool = option(False, "run Python code shipped with a Hub model (off unless you ask)")
    plot: bool = option(True, "write curves.png at the end (needs matplotlib)")


TOY_PRESET = dict(dataset="toy", prompts_per_step=16, max_new_tokens=48, num_steps=80, lr=5e-5, warmup_steps=10,
                  max_prompt_tokens=64, mini_batches=4, micro_batch_size=None, gradient_checkpointing=False,
                  eval_every=20, eval_benchmark="toy", eval_limit=200, save_every=20, generation_batch_size=256,
                  reward_workers=1)
PRESETS = {
    "toy": TOY_PRESET,
    # toy_hard (toy.py): every carry can be lost, 2–4 digits (longer solutions); learning takes ~10× the toy's
    # steps (docs/study.md). Everything else is the toy's.
    "toy_hard": {**TOY_PRESET, "dataset": "toy_hard", "eval_benchmark": "toy_hard", "max_new_tokens": 64,
                 "num_steps": 200},
    "llm": dict(dataset="math", prompts_per_step=32, max_new_tokens=1024, num_steps=500, lr=1e-6, warmup_steps=10,
                max_prompt_tokens=512, mini_batches=2, micro_batch_size=8, gradient_checkpointing=True, eval_every=50,
                eval_benchmark="math500", eval_limit=100, save_every=50, generation_batch_size=128,
                reward_workers=0),
}
# What changes with --lora_rank > 0. The learning rate: a rank-r update moves far fewer directions than full
# fine-tuning, and the usual LoRA rate is about 10× the full one (tuned on the toy task: docs/lora.md).
# On a real model LoRA is the one-consumer-GPU path, so the generation batch shrinks too: the KV cache of
# 128 sequences × (1024 + 512) tokens is 21 GiB on Qwen3-1.7B, of 64 sequences 10.5 GiB.
LORA_PRESETS = {
    "toy": dict(lr=5e-4),
    "llm": dict(lr=1e-5, generation_batch_size=64),
}
# (ε_low, ε_high) per --importance_level: PPO/GRPO's symmetric 0.2, and GSPO's (arXiv 2507.18071, §5.1)
CLIP_PRESETS = {"token": (0.2, 0.2), "sequence": (3e-4, 4e-4)}


def parse_config(argv=None) -> Config:
    parser = OneLineErrorParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    choices = {"algo": ["lampo", "grpo", "dr_grpo", "rloo"], "aggregation": list(lambdapo.AGGREGATIONS),
               "importance_level": list(lambdapo.IMPORTANCE_LEVELS),
               "seq_logp": ["mean", "sum"], "rollout_engine": ["auto", "fast", "plain"], "scale_by_std": ["auto", "true", "false"],
               "report_to": list(TRACKERS) + ["none"],
               "eval_benchmark": list(data.BENCHMARKS) + ["none"]}
    for item in dataclasses.fields(Config):
        is_flag = item.type is bool                     # --resume, --resume true, --resume false
        parser.add_argument(f"--{item.name}", type=parse_bool if is_flag else item.type, default=item.default,
                            choices=choices.get(item.name), metavar=item.type.__name__.upper(),
                            nargs="?" if is_flag else None, const=True if is_flag else None,
                            help=item.metadata["help"] + ("" if item.default is None else f" (default: {item.default})"))
    config = Config(**vars(parser.parse_args(argv)))
    # The harder built-in task has its own warm start (the same tiny model, a different flawed teacher):
    # `--dataset toy_hard` alone selects it, as `--model toy_hard` does.
    if config.model == "toy" and config.dataset == "toy_hard":
        config.model = "toy_hard"
    kind = config.model if config.model in PRESETS else "llm"
    preset = {**PRESETS[kind], **(LORA_PRESETS["llm" if kind == "llm" else "toy"] if config.lora_rank else {})}
    for name, value in preset.items():
        if getattr(config, name) is None:
            setattr(config, name, value)
    if config.lora_alpha is None:
        config.lora_alpha = 2.0 * config.lora_rank
    # The clip range follows the ratio: PPO's ±0.2 for a token's ratio, GSPO's 3e-4 / 4e-4 for a sequence's
    # (a mean of hundreds of log ratios moves far less than one of them). An explicit value always wins.
    clip_low, clip_high = CLIP_PRESETS[config.importance_level]
    config.clip_low = clip_low if config.clip_low is None else config.clip_low
    config.clip_high = clip_high if config.clip_high is None else config.clip_high
    if config.eval_max_new_tokens is None:
        config.eval_max_new_tokens = config.max_new_tokens
    return config


class ConfigError(ValueError):
    """A bad option value or out_dir state; reported in one line."""


# The valid range of every number, checked before anything loads, so `--lr -1` is one line, not an optimizer
# traceback ten seconds later. NaN fails every comparison, so it is refused too.
finite = math.isfinite
RANGES = {
    "tau": (lambda v: v > 0, "> 0 (inf gives RLOO)"),
    "clip_low": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "clip_high": (lambda v: 0 <= v and finite(v), "a finite number >= 0"),
    "beta": (lambda v: 0 <= v and finite(v), "a finite number >= 0"),
    "rouge_weight": (lambda v: 0 <= v and finite(v), "a finite number >= 0 (0 disables ROUGE-L)"),
    "tis_cap": (lambda v: v >= 0, ">= 0 (0 = off)"),
    "group_size": (lambda v: v >= 2, "at least 2 (group-relative advantages compare completions)"),
    "temperature": (lambda v: 0 < v and finite(v), "a finite number > 0 for training (RL needs sampled completions)"),
    "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "lr": (lambda v: 0 < v and finite(v), "a finite number > 0"),
    "warmup_steps": (lambda v: v >= 0, ">= 0"),
    "weight_decay": (lambda v: 0 <= v and finite(v), "a finite number >= 0"),
    "max_grad_norm": (lambda v: v > 0, "> 0 (inf: no clipping)"),
    "micro_batch_size": (lambda v: v is None or v >= 1, "at least 1"),
    "max_generation_rounds": (lambda v: v >= 1, "at least 1"),
    "eval_every": (lambda v: v >= 0, ">= 0 (0: only before and after training)"),
    "save_every": (lambda v: v >= 0, ">= 0 (0: only at the end)"),
    "keep_checkpoints": (lambda v: v >= 1, "at least 1"),
    "log_samples": (lambda v: v >= 0, ">= 0"),
    "reward_workers": (lambda v: v >= 0, ">= 0 (0: every core, 1: grade in the training process)"),
    "seed": (lambda v: 0 <= v < 2 ** 63, "an integer >= 0"),
    "lora_rank": (lambda v: v >= 0, ">= 0 (0 = full fine-tuning)"),
    "lora_alpha": (lambda v: 0 <= v and finite(v), "a finite number > 0"),     # (0 is the preset without LoRA)
    "lora_dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    **{name: (lambda v: v >= 1, "at least 1") for name in ("prompts_per_step", "num_steps", "max_new_tokens",
                                                           "max_prompt_tokens", "generation_batch_size", "epochs",
                                                           "mini_batches", "eval_limit", "eval_max_new_tokens")},
}


def check_config(config: Config) -> None:
    for name, (valid, rule) in RANGES.items():
        if not valid(getattr(config, name)):
            raise ConfigError(f"--{name} must be {rule}, got {getattr(config, name)}")
    if config.lora_rank and not config.lora_alpha > 0:
        raise ConfigError(f"--lora_alpha must be a finite number > 0, got {config.lora_alpha}")
    if not config.lora_rank and (config.lora_alpha or config.lora_dropout or config.lora_target_modules != "all-linear"):
        raise ConfigError("--lora_alpha, --lora_dropout and --lora_target_modules need --lora_rank R > 0 "
                          "(without it the run is full fine-tuning)")
    parse_target_modules(config.lora_target_modules)
    if config.prompts_per_step * config.group_size < config.mini_batches:
        raise ConfigError("--mini_batches is larger than the number of completions per step")
    resolve_device(config.device)
    # A file that is given must be read: the toy task and the built-in toy benchmark read no file, so a
    # --data_file next to them would be silently ignored and the run would train on the toy data.
    if config.data_file and config.dataset in data.TOY_TASKS:
        why = f" (the preset of --model {config.model})" if config.model in data.TOY_TASKS else ""
        raise ConfigError(f"--data_file {config.data_file} would be ignored: the training set is the built-in {config.dataset} task"
                          f"{why}; name the file's layout with --dataset math|gsm8k, or pass --dataset {config.data_file}")
    if config.eval_data_file and config.eval_benchmark in (*data.TOY_TASKS, "none"):
        raise ConfigError(f"--eval_data_file {config.eval_data_file} would be ignored: --eval_benchmark is "
                          f"{config.eval_benchmark}; name the file's benchmark, e.g. --eval_benchmark math500")
    # A training set is a built-in name, a local file or an "owner/name" Hub id (legacy bare Hub names are
    # gone); anything else is a typo or a missing file, better said now than after 30 s of Hub retries.
    if config.dataset not in (*data.TOY_TASKS, "math", "gsm8k") and not os.path.exists(config.dataset):
        if config.dataset.endswith((".jsonl", ".json", ".parquet")) or config.dataset.startswith((".", "/", "~")):
            raise ConfigError(f"--dataset {config.dataset}: no such file")
        if config.dataset.partition(":")[0].count("/") != 1:
            raise ConfigError(f"--dataset {config.dataset}: not toy, toy_hard, math, gsm8k, a local .jsonl/.json/.parquet "
                              "file or an owner/name Hub dataset id")
    check_model_name(config.model)
    if config.report_to in TRACKERS and importlib.util.find_spec(config.report_to) is None:   # before a model loads
        raise ConfigError(f"--report_to {config.report_to} needs the {config.report_to} package: "
                          f"pip install {config.report_to}")
    for name in ("data_file", "eval_data_file"):
        if getattr(config, name) and not os.path.isfile(getattr(config, name)):
            raise ConfigError(f"--{name} {getattr(config, name)}: no such file")
    out_dir = Path(config.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out_dir {out_dir} is a file, not a folder")
    has_run = (out_dir / "config.json").exists() or any(out_dir.glob("checkpoint-*"))
    if has_run and not (config.resume or config.overwrite):
        raise ConfigError(f"{out_dir} holds another run: pass --resume to continue it, --overwrite to replace it, "
                          "or choose another --out_dir")
    if config.resume and config.overwrite:
        raise ConfigError("--resume and --overwrite exclude each other")


# ===================================================================================================
# Checkpoints: Hugging Face folders (save_pretrained) plus the optimizer and RNG state to resume.
# With LoRA the policy is a peft model and save_pretrained writes the adapter only (a few MB), and the
# optimizer state is that of the adapters: a checkpoint is small. initial/ and final/ are always full,
# merged model folders (models.save_model).
# ===================================================================================================
def save_checkpoint(out_dir: Path, step: int, policy, tokenizer, optimizer, scheduler, generator, keep: int,
                    prompt_position: int | None = None) -> Path:
    path = out_dir / f"checkpoint-{step}"
    tmp = out_dir / f".tmp-checkpoint-{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    policy.save_pretrained(tmp)
    (tmp / "README.md").unlink(missing_ok=True)        # peft's empty model-card template, not ours
    tokenizer.save_pretrained(tmp)
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "torch_rng": torch.get_rng_state(), "python_rng": random.getstate(), "update_rng": generator.get_state(),
                "prompt_position": prompt_position,          # prompts read so far (dynamic sampling reads more)
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
               tmp / "trainer_state.pt")
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)                          # a checkpoint is either complete or absent
    for old in sorted(out_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def latest_checkpoint(out_dir: Path) -> Path | None:
    found = sorted(out_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    return found[-1] if found else None


def enable_checkpointing(model) -> None:
    """Activation (gradient) checkpointing, under the name this transformers version uses."""
    if hasattr(model, "activation_checkpointing_enable"):        # transformers >= 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def restore_trainer_state(checkpoint: Path, optimizer, scheduler, generator) -> tuple[int, int | None]:
    """Load optimizer, scheduler and every RNG from a checkpoint; return its step and prompt position (None in
    a checkpoint that predates it: then every step read exactly prompts_per_step prompts)."""
    state = torch.load(checkpoint / "trainer_state.pt", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    random.setstate(state["python_rng"])
    generator.set_state(state["update_rng"])
    if state["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return state["step"], state.get("prompt_position")


LOGS = ("metrics.jsonl", "samples.jsonl", "rollouts.jsonl")    # rows with a "step", appended as the run goes


def forget_logs_after(out_dir: Path, step: int) -> None:
    """On resume, drop what the old run logged after its checkpoint (and the evaluation that closed it)."""
    for name in LOGS:
        path = out_dir / name
        if path.exists():
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            kept = [r for r in rows if r["step"] < step or (r["step"] == step and "reward" in r)]
            path.write_text("".join(json.dumps(r) + "\n" for r in kept))


# ===================================================================================================
# Small pieces of the loop
# ===================================================================================================
def prompt_batch(records: list[dict], step: int, prompts_per_step: int, seed: int) -> list[dict]:
    """The records of one step: a seeded shuffle of the dataset per epoch, read in order (stateless,
    so that --resume continues with exactly the prompts the interrupted run would have seen)."""
    return records_at(records, step * prompts_per_step, prompts_per_step, seed)


def records_at(records: list[dict], start: int, count: int, seed: int) -> list[dict]:
    """`count` records from position `start` in the seeded order (one shuffle per epoch). The loop keeps the position:
    step k reads from k · prompts_per_step, unless --dynamic_sampling read further prompts in earlier steps;
    either way every run reads one fixed sequence of prompts, and a checkpoint stores where it stands."""
    batch = []
    for position in range(start, start + count):
        epoch, index = divmod(position, len(records))
        order = list(range(len(records)))
        random.Random(seed * 100_003 + epoch).shuffle(order)
        batch.append(records[order[index]])
    return batch


def drop_overlong_prompts(records: list[dict], counts: list[int], max_prompt_tokens: int, what: str,
                          log=tqdm.write) -> list[dict]:
    """The training records whose prompt has at most `max_prompt_tokens` tokens (`counts[i]`: record i's), saying
    how many were dropped, as verl's `filter_overlong_prompts` does. Truncating a math problem would make it
    unsolvable; keeping it would widen its whole generation batch (one 1,666-token MATH prompt and the KV cache
    of 128 rows grows from 1,536 to 2,690+ slots)."""
    kept = [record for record, count in zip(records, counts) if count <= max_prompt_tokens]
    if len(kept) < len(records):
        log(f"--max_prompt_tokens {max_prompt_tokens}: dropped {len(records) - len(kept)} of {len(records)} {what} "
            f"prompts longer than that (longest {max(counts)} tokens)")
    if not kept:
        raise ConfigError(f"every {what} prompt is longer than --max_prompt_tokens {max_prompt_tokens} (the shortest "
                          f"has {min(counts)} tokens): raise it")
    return kept


def long_prompt_batch_size(batch_size: int, max_prompt_tokens: int, longest: int, max_new_tokens: int) -> int:
    """Generation batch for prompts over the cap: the same number of KV-cache slots as a batch at the cap,
    batch · (cap + T) ≥ rows · (longest + T), so evaluating every problem cannot run out of memory where
    training fits."""
    return max(1, batch_size * (max_prompt_tokens + max_new_tokens) // (longest + max_new_tokens))


def learning_rate_factor(step: int, warmup_steps: int) -> float:
    """Linear warm-up over `warmup_steps` RL steps, then constant."""
    return min(1.0, (step + 1) / max(warmup_steps, 1))


def memory_estimate_gib(policy, config: Config, has_reference: bool, on_gpu: bool, has_generation_copy: bool,
                        prompt_tokens: int = 512) -> dict:
    """The memory budget printed at start, part by part, so a run that cannot fit says so before the first
    rollout. N parameters (n trainable with LoRA); GiB. Counted from the tensors the run allocates:

    - full fine-tuning: float32 master `weights` (4 B/param), `gradients` (4: they live from one optimizer step
      until the next mini-batch's zero_grad, so through the rollout) and `adamw_moments` (8);
    - LoRA: the `frozen_base` (2 B/param on GPU, 4 on CPU) and the adapters' weights, gradients and moments (16);
    - `adamw_step_temporary` (4 B per trainable param): torch's multi-tensor AdamW computes sqrt(v) for every
      parameter at once inside optimizer.step;
    - `autocast_weight_copies` (GPU, 2 B per trainable param): bf16 autocast caches a bf16 copy of every float32
      weight it casts until the forward's autocast region ends; the backward keeps them (saved for the matmul
      gradients). A bf16 LoRA base is used as is (no copy);
    - `generation_copy` (GPU, 2 B/param): the fast engine's bf16 copy (LoRA: the merged copy);
    - `reference` (β > 0, full fine-tuning): a float32 copy (make_reference); with LoRA it costs nothing;
    - `kv_cache`: the static cache the engine allocates and keeps through the update: the generation batch
      (a power of two when compiled) × (the prompt bucket for `prompt_tokens` + the longest completion budget)
      slots × layers × 2 × key/value heads × head_dim, in bf16 on GPU;
    - `cuda_graph_pool` (GPU, compiled): one decode step's logits and hidden states per attended-length bucket;
    - `activations` (an estimate from the shapes, not a count of tensors): one micro-batch's checkpointed layer
      inputs, one layer recomputed with its gradients, and one logit chunk of token_logprobs.

    `peak_gib` is the larger of the two peaks of an update: in forward/backward (everything persistent +
    autocast copies + activations) and at optimizer.step (persistent + the AdamW temporary).
    """
    from engine import KV_BLOCK, cache_shape        # the engine's own bucketing rules
    from rollout import LOGIT_CHUNK_TOKENS
    params, trainable = parameter_counts(policy)
    gib = 2 ** 30
    c = policy.config
    layers, hidden, vocab = c.num_hidden_layers, c.hidden_size, c.vocab_size
    head_dim = getattr(c, "head_dim", None) or hidden // c.num_attention_heads
    heads, kv_heads = c.num_attention_heads, getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    intermediate = getattr(c, "intermediate_size", 4 * hidden)
    estimate = {"parameters_billion": round(params / 1e9, 3)}
    if config.lora_rank:
        estimate["trainable_share"] = round(trainable / params, 4)
        estimate["frozen_base"] = (params - trainable) * (2 if on_gpu else 4) / gib
        estimate["adapters_grads_adam"] = trainable * 16 / gib
    else:
        estimate["weights"] = params * 4 / gib
        estimate["gradients"] = params * 4 / gib
        estimate["adamw_moments"] = params * 8 / gib
    estimate["adamw_step_temporary"] = trainable * 4 / gib
    if on_gpu:
        estimate["autocast_weight_copies"] = trainable * 2 / gib
    if has_generation_copy and on_gpu:
        estimate["generation_copy"] = (params - trainable if config.lora_rank else params) * 2 / gib
    if has_reference and not config.lora_rank:
        estimate["reference"] = params * 4 / gib
    # The KV cache, at the width the engine allocates (train.py's engine compiles on GPU only).
    compiled = has_generation_copy and on_gpu and config.compile_rollout
    rows = min(config.generation_batch_size, config.prompts_per_step * config.group_size)
    new_tokens = max(config.max_new_tokens, config.eval_max_new_tokens or 0)
    batch, slots = cache_shape(rows, prompt_tokens, new_tokens) if compiled else (rows, prompt_tokens + new_tokens)
    kv_bytes = 2 if on_gpu else 4
    estimate["kv_cache"] = batch * slots * layers * 2 * kv_heads * head_dim * kv_bytes / gib
    if compiled:
        buckets = -(-slots // KV_BLOCK)                                    # attended-length buckets (ceil)
        estimate["cuda_graph_pool"] = buckets * batch * (vocab + 4 * hidden) * 2 / gib
    # Activations of one micro-batch of the update (an estimate). The residual stream is float32 when the
    # weights are (autocast leaves the additions in float32), bf16 with a bf16 LoRA base.
    tokens = (config.micro_batch_size or config.prompts_per_step * config.group_size) * (prompt_tokens + config.max_new_tokens)
    stream = 2 if config.lora_rank and on_gpu else 4
    matmul = 2 if on_gpu else 4
    layer = tokens * (matmul * (2 * heads * head_dim + 2 * kv_heads * head_dim + 4 * intermediate) + 4 * stream * hidden)
    logit_chunk = min(LOGIT_CHUNK_TOKENS, tokens) * vocab * 16    # bf16 logits, float32 copy, log-softmax, grads
    kept = layers * tokens * hidden * stream + 2 * layer if config.gradient_checkpointing else layers * layer
    estimate["activations"] = (kept + logit_chunk) / gib
    estimate = {key: round(value, 2) if isinstance(value, float) and key != "trainable_share" else value
                for key, value in estimate.items()}
    transient = ("adamw_step_temporary", "autocast_weight_copies", "activations")
    persistent = sum(value for key, value in estimate.items()
                     if key not in ("parameters_billion", "trainable_share", *transient))
    estimate["peak_in_backward"] = round(persistent + estimate.get("autocast_weight_copies", 0)
                                         + estimate["activations"], 1)
    estimate["peak_at_optimizer_step"] = round(persistent + estimate["adamw_step_temporary"], 1)
    estimate["peak_gib"] = max(estimate["peak_in_backward"], estimate["peak_at_optimizer_step"])
    return estimate


_number = lambdapo._number          # a 0-d tensor as a float for logging (NaN on shape-only `meta` tensors)


def make_reference(policy):
    """A frozen copy of the starting policy for the KL penalty.

    It stays in float32 and runs under the same autocast as the policy: the KL must be exactly 0 while
    the weights are equal. (A pure-bf16 copy computes norms and softmaxes in bf16 and gives a KL > 0 at
    step 0, a penalty on nothing but rounding.)
    """
    return copy.deepcopy(policy).requires_grad_(False).eval()


def reward_tensors(scored: list[dict], group_size: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The verifier's Python floats as tensors on the policy's device, once per step:
    (rewards (num_prompts, G), accuracy (B,), rouge (B,))."""
    values = torch.tensor([[s["reward"], s["accuracy"], s["rouge"]] for s in scored], dtype=torch.float32)
    values = values.to(device)                                                      # (B, 3)
    return values[:, 0].view(-1, group_size), values[:, 1], values[:, 2]


def sampler_gap(old_logps: torch.Tensor, sampling_logps: torch.Tensor | None, mask: torch.Tensor,
                tis_cap: float) -> tuple[dict, torch.Tensor | None]:
    """How far the sampler's log-probs are from π_old's on real tokens, and the TIS weights (or None).

    The fast engine samples from a bf16 copy while π_old is the float32 policy under autocast: the samples
    are very slightly off-policy for the ratio. `sampling/logp_gap_*` shows by how much; with tis_cap > 0
    each token's policy-gradient term is weighted by min(exp(log π_old − log π_sampler), tis_cap).
    """
    if sampling_logps is None:                             # the plain engine samples from the policy itself
        return {}, None
    mask = mask.to(old_logps.dtype)
    tokens = mask.sum().clamp_min(1.0)
    gap = (old_logps - sampling_logps).abs() * mask                                 # (B, T), 0 off the mask
    stats = {"sampling/logp_gap_mean": _number(gap.sum() / tokens), "sampling/logp_gap_max": _number(gap.max())}
    if not tis_cap:
        return stats, None
    weights = torch.exp(old_logps - sampling_logps).clamp(max=tis_cap) * mask       # (B, T)
    stats["sampling/tis_weight_mean"] = _number(weights.sum() / tokens)
    return stats, weights


def next_prompts(s: "Setup", config: Config) -> list[dict]:
    """The next prompts_per_step records of the run's seeded order; advances the position a checkpoint stores."""
    batch = records_at(s.records, s.prompt_position, config.prompts_per_step, config.seed)
    s.prompt_position += len(batch)
    return batch


def sample(s: "Setup", batch: list[dict], group_size: int):
    """G completions for each record's prompt from the current policy (π_old). -> rollout.Rollout"""
    return generate(s.policy, s.tokenizer, [r["prompt"] for r in batch], group_size, s.sampling,
                    chat_template_kwargs=s.template_kwargs, autocast_dtype=s.autocast_dtype, engine=s.engine)


def grade(config: Config, batch: list[dict], completions: list[str]) -> list[dict]:
    """rewards.reward of every completion against its own record (row b belongs to record b // G), graded
    across --reward_workers processes (rewards.score_completions)."""
    of_row = [batch[row // config.group_size] for row in range(len(completions))]
    return rewards.score_completions(completions, [r["answer"] for r in of_row], [r.get("solution") for r in of_row],
                                     config.rouge_weight, [r.get("task", "math") for r in of_row], config.reward_workers)


def dynamic_sampling(s: "Setup", config: Config, batch: list[dict], rollout, scored: list[dict],
                     timings: dict) -> tuple[list[dict], object, list[dict], dict]:
    """DAPO's dynamic sampling (Yu et al. 2025, arXiv 2503.14476, §3.2): train only on groups with a reward spread.

    A group whose G rewards are all equal has A = 0 under every advantage here (GRPO, Dr. GRPO, RLOO, LamPO),
    so it adds nothing to the gradient but dilutes the token-mean. The rule:
      - round 1 is the step's ordinary batch; its groups with max r > min r are kept, in data order;
      - while fewer than prompts_per_step are kept and fewer than max_generation_rounds rounds were sampled,
        the next prompts_per_step prompts of the run's order are sampled and graded (a round is one ordinary
        step's rollout, so memory never exceeds a step without dynamic sampling);
      - the step trains on the first prompts_per_step kept groups; the rest of the last round is dropped
        (its prompts count as read: every run reads one fixed sequence of prompts);
      - if no round had a group with a spread, the step trains on the last round as it is (all A = 0: only
        β's KL and AdamW's momentum move the weights, exactly as without dynamic sampling).
    Returns (batch, rollout, scored) of the kept groups and the dynamic_sampling/* metrics; adds the rounds'
    time to timings["time/rollout"] and ["time/reward"].
    """
    G, P = config.group_size, config.prompts_per_step
    rounds = [(batch, rollout, scored)]
    kept, with_spread = [], 0                            # kept: (round, group) pairs, in data order
    while True:
        batch, rollout, scored = rounds[-1]
        for group in range(len(batch)):
            r = [scored[group * G + k]["reward"] for k in range(G)]
            if max(r) > min(r):                          # a spread: the group carries an advantage
                with_spread += 1
                if len(kept) < P:
                    kept.append((len(rounds) - 1, group))
        if len(kept) >= P or len(rounds) >= config.max_generation_rounds:
            break
        tick = time.time()
        batch = next_prompts(s, config)
        rollout = sample(s, batch, G)
        timings["time/rollout"] += time.time() - tick
        tick = time.time()
        rounds.append((batch, rollout, grade(config, batch, rollout.completions)))
        timings["time/reward"] += time.time() - tick
    generated = sum(len(b) for b, _, _ in rounds)                            # groups sampled this step
    stats = {"dynamic_sampling/rounds": len(rounds), "dynamic_sampling/groups_kept": len(kept),
             "dynamic_sampling/kept_share": with_spread / generated,         # groups with a spread / sampled
             "dynamic_sampling/completions_generated": generated * G,       # this step's sampling cost
             "dynamic_sampling/completions_total": s.prompt_position * G,   # the run's, up to this step
             "dynamic_sampling/accuracy_generated":                         # as a run without the filter sees it
                 sum(row["accuracy"] for _, _, sc in rounds for row in sc) / (generated * G)}
    if not kept:
        return (*rounds[-1], stats)
    pad_id = s.tokenizer.pad_token_id if s.tokenizer.pad_token_id is not None else 0
    rollout = keep_groups([(r, [g for i, g in kept if i == index]) for index, (_, r, _) in enumerate(rounds)], pad_id)
    batch = [rounds[i][0][g] for i, g in kept]
    scored = [rounds[i][2][g * G + k] for i, g in kept for k in range(G)]
    return batch, rollout, scored, stats


def micro_batch_loss(config: "Config", logps, old_logps, advantages, loss_mask, full_mask, ref_logps=None,
                     is_weights=None) -> tuple[torch.Tensor, float, dict]:
    """The clipped loss of one micro-batch, scaled to its share of the mini-batch (global denominator).
    Returns (scaled loss to backpropagate, scale, stats)."""
    loss, stats = lambdapo.clipped_policy_loss(logps, old_logps, advantages, loss_mask, config.clip_low,
                                               config.clip_high, ref_logps, config.beta, config.aggregation,
                                               is_weights=is_weights, importance_level=config.importance_level)
    scale = lambdapo.micro_batch_scale(loss_mask, full_mask, config.aggregation)
    stats["loss"] = _number(loss)
    return loss * scale, scale, stats


def accumulate(totals: dict, stats: dict, scale: float, tokens: float) -> None:
    """Add one micro-batch to the step's totals: the loss at its share of the mini-batch, the per-token stats
    weighted by its real tokens (so a step's clip_fraction is a share of all its tokens)."""
    totals["tokens"] += tokens
    totals["loss"] += stats["loss"] * scale
    for name in ("clip_fraction", "policy_kl", "kl"):
        totals[name] += stats.get(name, 0.0) * tokens


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "a") as file:
        for row in rows:
            file.write(json.dumps(row) + "\n")


TRACKERS = ("wandb", "tensorboard")      # --report_to: optional packages, imported only when named


class Tracker:
    """metrics.jsonl, and every row's numbers to the tracker --report_to names, at the row's step.

    Optional packages, imported here only. wandb: one run per out_dir (its id is kept in out_dir/wandb_id, so
    --resume continues the same run; wandb ignores steps below its last one, so what an interrupted run logged
    after its checkpoint stays there once). tensorboard: out_dir/tensorboard; on --resume the events after the
    checkpoint are purged, as forget_logs_after does for metrics.jsonl."""

    def __init__(self, config: Config, out_dir: Path, start_step: int):
        self.path, self.run, self.writer = out_dir / "metrics.jsonl", None, None
        if config.report_to == "wandb":
            import wandb
            id_file = out_dir / "wandb_id"
            run_id = id_file.read_text().strip() if start_step and id_file.exists() else uuid.uuid4().hex[:12]
            id_file.write_text(run_id + "\n")
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "lambdapo"), name=out_dir.name, id=run_id,
                                  resume="allow", dir=str(out_dir), config=dataclasses.asdict(config))
        elif config.report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)

    def log(self, row: dict) -> None:
        write_jsonl(self.path, [row])
        numbers = {name: value for name, value in row.items()
                   if name != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)}
        if self.run is not None:
            self.run.log(numbers, step=row["step"])
        if self.writer is not None:
            for name, value in numbers.items():
                self.writer.add_scalar(name, value, row["step"])
            self.writer.flush()             # a crashed run keeps what it logged

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
        if self.writer is not None:
            self.writer.close()
        self.run = self.writer = None


# ===================================================================================================
# SETUP: everything the loop needs, built once (restored from the newest checkpoint with --resume)
# ===================================================================================================
@dataclass
class Setup:
    out_dir: Path
    device: torch.device
    autocast_dtype: torch.dtype | None        # bf16 on CUDA (float32 master weights), None on CPU
    records: list[dict]                       # the training set
    eval_records: list[dict]                  # the held-out benchmark ([] for none)
    policy: torch.nn.Module
    tokenizer: object
    reference: torch.nn.Module | None         # π_ref for β > 0 (with LoRA: the policy itself, adapters off)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    generator: torch.Generator                # shuffles rows into mini-batches
    engine: object                            # the fast rollout engine (engine.py), or None: model.generate
    sampling: SamplingConfig
    eval_sampling: SamplingConfig
    template_kwargs: dict                     # chat-template options (Qwen3's enable_thinking)
    start_step: int
    tracker: Tracker                          # metrics.jsonl (+ --report_to)
    prompt_position: int = 0                  # prompts read so far in the seeded order (records_at)
    run_peak_gib: float = 0.0                 # the highest per-step GPU memory peak so far
    eval_prompt_tokens: list[int] = field(default_factory=list)   # tokens of each eval record's prompt

    def autocast(self):
        return torch.autocast("cuda", dtype=self.autocast_dtype) if self.autocast_dtype else nullcontext()


def setup(config: Config, log=tqdm.write) -> Setup:
    """Check the options, prepare out_dir, load data, policy (LoRA), reference, optimizer and schedule, and the
    rollout engine; on --resume restore the newest checkpoint's weights, optimizer, schedule and RNGs."""
    check_config(config)
    out_dir = Path(config.out_dir)
    try:
        if config.overwrite and out_dir.exists():
            shutil.rmtree(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"--out_dir {out_dir}: {error.strerror or error}") from None
    device = resolve_device(config.device)
    # Float32 master weights everywhere; on CUDA the matmuls run in bf16 under autocast. With LoRA the frozen
    # base is bf16 on CUDA (it is never updated, so float32 would buy nothing) and the adapters are float32.
    lora = config.lora_rank > 0
    autocast_dtype = torch.bfloat16 if device.type == "cuda" else None

    records = data.load_train_dataset(config.dataset, data_file=config.data_file, problem_field=config.problem_field,
                                      answer_field=config.answer_field, solution_field=config.solution_field,
                                      seed=config.seed)
    if not records:
        raise ConfigError(f"the training set '{config.dataset}' has no usable records")
    eval_records = [] if config.eval_benchmark == "none" else data.load_benchmark(
        config.eval_benchmark, data_file=config.eval_data_file, limit=config.eval_limit, seed=config.seed)
    checkpoint = latest_checkpoint(out_dir) if config.resume else None
    if config.resume and checkpoint is None:
        log(f"--resume: no checkpoint in {out_dir}, starting from the beginning")
    if checkpoint and (checkpoint / "adapter_config.json").exists() != lora:
        raise ConfigError(f"{checkpoint} holds " + (f"LoRA adapters: resume with --lora_rank "
                          f"{json.loads((checkpoint / 'adapter_config.json').read_text())['r']} as the run started"
                          if not lora else "a fully fine-tuned model: resume without --lora_rank"))
    if lora:    # the base (on resume: initial/, the base the run started from), then the adapters (or the saved ones)
        initial = out_dir / "initial"
        base = str(initial) if checkpoint and (initial / "config.json").exists() else config.model
        policy, tokenizer = load_model(base, device, autocast_dtype or torch.float32, config.trust_remote_code, log=log)
        policy = add_lora(policy, config.lora_rank, config.lora_alpha, config.lora_dropout,
                          parse_target_modules(config.lora_target_modules), config.seed, adapter_dir=checkpoint)
    else:
        policy, tokenizer = load_model(str(checkpoint) if checkpoint else config.model, device, torch.float32,
                                       config.trust_remote_code, log=log)
    # the template's thinking switch (Qwen3's enable_thinking), checked before initial/ is written
    try:
        template_kwargs = thinking_kwargs(tokenizer, config.enable_thinking, config.model)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if config.gradient_checkpointing:
        enable_checkpointing(policy)
    reference = None
    if config.beta > 0 and lora:    # π_ref = the frozen base: the policy with its adapters off (models.adapters_disabled)
        reference = policy
    elif config.beta > 0:   # a frozen copy of the *starting* policy (on resume: initial/, not the checkpoint)
        reference = make_reference(load_model(str(out_dir / "initial"), device, torch.float32,
                                              config.trust_remote_code, log=log)[0] if checkpoint else policy)
    # Seed only now: whatever setup did (a warm start on a cold cache, weight initialisation before loading)
    # must not change the samples, so a run is the same whether or not its model was cached.
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    trainable = [p for p in policy.parameters() if p.requires_grad]     # everything, or only the LoRA adapters
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: learning_rate_factor(s, config.warmup_steps))
    generator = torch.Generator().manual_seed(config.seed)
    start_step = prompt_position = 0
    if checkpoint:
        start_step, prompt_position = restore_trainer_state(checkpoint, optimizer, scheduler, generator)
        if prompt_position is None:
            prompt_position = start_step * config.prompts_per_step
        forget_logs_after(out_dir, start_step)
        log(f"Resuming from {checkpoint} at step {start_step}")
    else:
        (out_dir / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")
        for name in LOGS:
            (out_dir / name).unlink(missing_ok=True)
        save_model(out_dir / "initial", policy, tokenizer)

    # None: model.generate (with LoRA through peft, adapter-aware); LoRA's fast engine samples from a merged copy
    engine = (make_lora_engine if lora else make_engine)(config.rollout_engine, policy, compile=config.compile_rollout,
                                                         max_prompt_tokens=config.max_prompt_tokens)
    params, trainable_params = parameter_counts(policy)
    estimate = memory_estimate_gib(policy, config, reference is not None, device.type == "cuda", engine is not None,
                                   prompt_tokens=config.max_prompt_tokens)   # the widest prompt bucket
    log(f"Policy: {config.model} on {device}" + (f", LoRA rank {config.lora_rank}: {trainable_params:,} of {params:,} "
        f"parameters trainable ({100 * trainable_params / params:.2f}%)" if lora else "") + "; memory estimate (GiB): "
        f"{estimate}")
    if device.type == "cuda" and estimate["peak_gib"] > torch.cuda.get_device_properties(device).total_memory / 2 ** 30:
        log(f"Warning: the estimated peak, {estimate['peak_gib']} GiB, exceeds this GPU's "
            f"{torch.cuda.get_device_properties(device).total_memory / 2 ** 30:.1f} GiB; lower it with --lora_rank, "
            "--generation_batch_size or --micro_batch_size (docs/real-run.md, Memory)")
    # Prompt lengths as the model reads them (chat template included). Over-long training prompts go now;
    # every evaluation problem is kept (a benchmark's accuracy is over all of it), the long ones generated in
    # smaller batches (held_out_eval).
    records = drop_overlong_prompts(records, prompt_token_counts(tokenizer, [r["prompt"] for r in records],
                                    chat_template_kwargs=template_kwargs), config.max_prompt_tokens, "training", log)
    eval_prompt_tokens = prompt_token_counts(tokenizer, [r["prompt"] for r in eval_records],
                                             chat_template_kwargs=template_kwargs) if eval_records else []
    over = [count for count in eval_prompt_tokens if count > config.max_prompt_tokens]
    if over:
        log(f"--max_prompt_tokens {config.max_prompt_tokens}: {len(over)} of {len(eval_records)} "
            f"{config.eval_benchmark} prompts are longer (longest {max(over)} tokens); all are graded, those in "
            f"generation batches of {long_prompt_batch_size(config.generation_batch_size, config.max_prompt_tokens, max(over), config.eval_max_new_tokens)}")
    return Setup(out_dir=out_dir, device=device, autocast_dtype=autocast_dtype, records=records,
                 eval_records=eval_records, policy=policy, tokenizer=tokenizer, reference=reference,
                 optimizer=optimizer, scheduler=scheduler, generator=generator, engine=engine,
                 sampling=SamplingConfig(temperature=config.temperature, top_p=config.top_p,
                                         max_new_tokens=config.max_new_tokens, batch_size=config.generation_batch_size),
                 eval_sampling=SamplingConfig(do_sample=False, max_new_tokens=config.eval_max_new_tokens,
                                              batch_size=config.generation_batch_size),
                 template_kwargs=template_kwargs, start_step=start_step, prompt_position=prompt_position,
                 eval_prompt_tokens=eval_prompt_tokens, tracker=Tracker(config, out_dir, start_step))


def held_out_eval(s: Setup, config: Config, step: int, log=tqdm.write) -> dict:
    """Greedy accuracy on the held-out benchmark, as eval/* metrics ({} without a benchmark)."""
    if not s.eval_records:
        return {}
    cap = config.max_prompt_tokens
    within = [r for r, count in zip(s.eval_records, s.eval_prompt_tokens) if count <= cap]
    over = [r for r, count in zip(s.eval_records, s.eval_prompt_tokens) if count > cap]
    results = []
    for records in (within, over):              # prompts over the cap in batches of as many KV-cache slots
        if records:
            sampling = s.eval_sampling if records is within else dataclasses.replace(
                s.eval_sampling, batch_size=long_prompt_batch_size(s.eval_sampling.batch_size, cap,
                                                                   max(s.eval_prompt_tokens), s.eval_sampling.max_new_tokens))
            results += evaluate(s.policy, s.tokenizer, records, 1, sampling, s.template_kwargs, s.autocast_dtype,
                                engine=s.engine)[1]
    summary = summarize(results, 1)
    log(f"step {step}: {config.eval_benchmark} held-out accuracy {summary['accuracy']:.3f} (n={summary['n']}, greedy)")
    return {"eval/accuracy": summary["accuracy"], "eval/n": summary["n"],
            "eval/mean_completion_tokens": summary["mean_completion_tokens"]}


class StopOnCtrlC:
    """Ctrl-C finishes the current step (half an update is not a state worth saving); the loop then saves a
    checkpoint and exits. A second Ctrl-C aborts at once. (Signal handlers can only be set in the main thread.)"""

    def __init__(self, log=tqdm.write):
        self.requested, self.log = False, log

    def __enter__(self):
        self.in_main_thread = threading.current_thread() is threading.main_thread()
        if self.in_main_thread:
            self.previous = signal.signal(signal.SIGINT, self.handle)
        return self

    def handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.log("Ctrl-C: finishing this step, then saving a checkpoint (press Ctrl-C again to abort without saving)")

    def __exit__(self, *exception):
        if self.in_main_thread:
            signal.signal(signal.SIGINT, self.previous)


def step_metrics(step: int, rollout, reward_values, accuracy, rouge, advantages, seq_logps, tau: float, entropy,
                 totals: dict, grad_norms: list[float], learning_rate: float, s: Setup, extra: dict) -> dict:
    """One metrics.jsonl row (TRL-style names where TRL has one)."""
    lengths = rollout.completion_lengths.float()
    group_std = reward_values.std(dim=1)
    mask = rollout.completion_mask
    tokens = max(totals["tokens"], 1.0)
    num_updates = len(grad_norms)                              # optimizer steps actually taken
    return {
        "step": step,
        "reward": reward_values.mean().item(), "reward_std": group_std.mean().item(),
        "frac_reward_zero_std": (group_std == 0).float().mean().item(),
        "accuracy": accuracy.mean().item(), "rouge": rouge.mean().item(),
        "advantages/abs_mean": advantages.abs().mean().item(),
        "completions/mean_length": lengths.mean().item(), "completions/min_length": lengths.min().item(),
        "completions/max_length": lengths.max().item(),
        "completions/clipped_ratio": rollout.truncated.float().mean().item(),
        "loss": totals["loss"] / num_updates, "clip_fraction": totals["clip_fraction"] / tokens,
        "policy_kl": totals["policy_kl"] / tokens,
        "entropy": ((entropy * mask).sum() / mask.sum().clamp_min(1)).item(),
        "grad_norm": sum(grad_norms) / num_updates, "lr": learning_rate, "optimizer_steps": num_updates,
        **({"kl": totals["kl"] / tokens} if s.reference is not None else {}),
        **({"sampling/eager_fallbacks": s.engine.eager_fallbacks,
            "sampling/compiled_shapes": len(s.engine.compiled_shapes)} if s.engine is not None else {}),
        **lambdapo.lampo_diagnostics(reward_values, seq_logps, tau, advantages),   # lampo/*
        "lampo/tau": tau,
        **extra,
    }


def log_step(s: Setup, config: Config, metrics: dict, timings: dict, rollout, batch, scored, advantages,
             progress) -> None:
    """Timings and GPU memory into the row; metrics.jsonl, samples.jsonl and the progress bar."""
    timings["time/step"] = sum(timings.values())
    metrics.update({name: round(value, 3) for name, value in timings.items()})
    metrics["tokens_per_second"] = rollout.completion_lengths.sum().item() / timings["time/step"]
    if s.device.type == "cuda":                     # the step's high-water mark, then a fresh one
        metrics["memory/peak_gib"] = round(torch.cuda.max_memory_allocated(s.device) / 2 ** 30, 2)
        s.run_peak_gib = max(s.run_peak_gib, metrics["memory/peak_gib"])
        torch.cuda.reset_peak_memory_stats(s.device)
    s.tracker.log(metrics)
    G = config.group_size
    write_jsonl(s.out_dir / "samples.jsonl", [
        {"step": metrics["step"], "prompt": batch[row // G]["prompt"], "completion": rollout.completions[row],
         "answer": batch[row // G]["answer"], "reward": scored[row]["reward"],
         "accuracy": scored[row]["accuracy"], "advantage": advantages[row].item()}
        for row in range(0, min(config.log_samples * G, len(rollout.completions)), G)])
    progress.set_postfix(reward=f"{metrics['reward']:.3f}", acc=f"{metrics['accuracy']:.3f}",
                         clip=f"{metrics['clip_fraction']:.3f}", len=f"{metrics['completions/mean_length']:.0f}")


def rollout_rows(step: int, G: int, rollout, scored, advantages, old_logps, completion_mask) -> list[dict]:
    """--log_rollouts: one row per completion, enough to recompute the step's weight diagnostics at any τ and
    either ℓ (compare.py --weights). ℓ is under π_old at the sampling temperature, as the advantage used it."""
    ell_mean = lambdapo.sequence_scores(old_logps, completion_mask, "mean")    # (B,)
    ell_sum = lambdapo.sequence_scores(old_logps, completion_mask, "sum")      # (B,)
    return [{"step": step, "group": row // G, "reward": scored[row]["reward"], "accuracy": scored[row]["accuracy"],
             "length": int(rollout.completion_lengths[row]), "truncated": bool(rollout.truncated[row]),
             "seq_logp_mean": ell_mean[row].item(), "seq_logp_sum": ell_sum[row].item(),
             "advantage": advantages[row].item()}
            for row in range(len(rollout.completions))]


def finish(s: Setup, config: Config, step: int, last_saved: int, initial_eval: dict, log=tqdm.write) -> dict:
    """The end: the last checkpoint, final/, the final evaluation, curves.png and the run's summary."""
    if step > last_saved:
        save_checkpoint(s.out_dir, step, s.policy, s.tokenizer, s.optimizer, s.scheduler, s.generator,
                        config.keep_checkpoints, s.prompt_position)
    save_model(s.out_dir / "final", s.policy, s.tokenizer)
    final_eval = held_out_eval(s, config, config.num_steps, log)
    if final_eval:
        s.tracker.log({"step": config.num_steps, **final_eval})
    if config.plot:
        try:
            import plot
            plot.plot_runs([str(s.out_dir)], str(s.out_dir / "curves.png"))
        except ImportError:
            log("matplotlib is not installed: no curves.png (pip install matplotlib)")
    params, trainable_params = parameter_counts(s.policy)
    summary = {"out_dir": str(s.out_dir), "steps": config.num_steps,
               "initial_eval_accuracy": initial_eval.get("eval/accuracy"),
               "final_eval_accuracy": final_eval.get("eval/accuracy"),
               "trainable_parameters": trainable_params, "parameters": params}
    if s.device.type == "cuda":     # the whole run's worst moment: every step's peak, and what came after the last
        summary["peak_gpu_memory_gib"] = round(max(s.run_peak_gib, torch.cuda.max_memory_allocated(s.device) / 2 ** 30), 2)
    s.tracker.close()
    log(f"Done: {json.dumps(summary)}")
    return summary


# ===================================================================================================
# THE TRAINING LOOP
# ===================================================================================================
def train(config: Config) -> dict:
    s = setup(config)
    policy, optimizer, G = s.policy, s.optimizer, config.group_size
    scale_by_std = None if config.scale_by_std == "auto" else config.scale_by_std == "true"
    initial_eval = held_out_eval(s, config, 0) if s.start_step == 0 else {}
    if initial_eval:
        s.tracker.log({"step": 0, **initial_eval})
    step = last_saved = s.start_step
    progress = tqdm(range(s.start_step, config.num_steps), initial=s.start_step, total=config.num_steps,
                    desc=config.algo, dynamic_ncols=True)
    try:
        with StopOnCtrlC() as ctrl_c:
            for step_index in progress:
                step = step_index + 1                         # steps count from 1: checkpoint-N has N updates
                timings = {}
                # ==================================================================================
                # 1. ROLLOUT: G completions per prompt from the current policy (π_old for this step)
                # ==================================================================================
                tick = time.time()
                batch = next_prompts(s, config)                    # the next prompts_per_step of the seeded order
                rollout = sample(s, batch, G)                      # rollout.generate
                timings["time/rollout"] = time.time() - tick

                # ==================================================================================
                # 2. REWARD: r = accuracy + α · ROUGE-L(completion, reference solution)
                # ==================================================================================
                tick = time.time()
                grader_errors = rewards.grader_errors()
                scored = grade(config, batch, rollout.completions)  # rewards.reward, one dict per completion
                timings["time/reward"] = time.time() - tick
                # DAPO's dynamic sampling (--dynamic_sampling): keep only groups whose rewards differ, and
                # sample further prompts until prompts_per_step are kept or max_generation_rounds are spent
                sampling_stats = {}
                if config.dynamic_sampling:
                    batch, rollout, scored, sampling_stats = dynamic_sampling(s, config, batch, rollout, scored, timings)
                reward_values, accuracy, rouge = reward_tensors(scored, G, s.device)    # (num_prompts, G), (B,), (B,)
                grader_errors = rewards.grader_errors() - grader_errors                # completions it crashed on

                # ==================================================================================
                # 3. ADVANTAGE: old log-probs (fixed for the whole update), sequence scores ℓ, A_i.
                #    This block is where LamPO differs from GRPO: GRPO's A_i = (r_i − mean r) / std r needs
                #    no ℓ; LamPO weighs each pair's reward gap by 2σ(−s_ij (ℓ_i − ℓ_j) / τ). The rest of
                #    the loop is GRPO's.
                # ==================================================================================
                tick = time.time()
                input_ids, attention_mask = rollout.input_ids, rollout.attention_mask     # (B, P + T)
                completion_mask = rollout.completion_mask                                 # (B, T)
                with torch.no_grad(), s.autocast():
                    old_logps, entropy = token_logprobs(policy, input_ids, attention_mask, completion_mask,
                                                        config.temperature, config.micro_batch_size, return_entropy=True,
                                                        top_p=config.top_p)
                    with adapters_disabled(s.reference):              # LoRA: π_ref is the base, adapters off
                        ref_logps = None if s.reference is None else token_logprobs(
                            s.reference, input_ids, attention_mask, completion_mask, config.temperature,
                            config.micro_batch_size, top_p=config.top_p)
                seq_logps = lambdapo.sequence_scores(old_logps, completion_mask, config.seq_logp).view(-1, G)  # ℓ (num_prompts, G)
                tau = lambdapo.relative_tau(seq_logps, config.tau) if config.relative_tau else config.tau
                advantages = lambdapo.compute_advantages(config.algo, reward_values, seq_logps, tau,
                                                         scale_by_std)                                    # (B,)
                loss_mask = completion_mask.clone()                                       # (B, T)
                if config.mask_truncated:
                    loss_mask[rollout.truncated] = 0
                gap_stats, is_weights = sampler_gap(old_logps, rollout.sampling_logps, completion_mask, config.tis_cap)
                timings["time/advantage"] = time.time() - tick

                # ==================================================================================
                # 4. UPDATE: clipped surrogate, mini-batches × epochs, micro-batches normalised globally
                # ==================================================================================
                tick = time.time()
                policy.train()
                totals = {"clip_fraction": 0.0, "policy_kl": 0.0, "kl": 0.0, "loss": 0.0, "tokens": 0.0}
                grad_norms = []
                learning_rate = optimizer.param_groups[0]["lr"]            # the rate this step's updates use
                B = input_ids.shape[0]
                for _ in range(config.epochs):
                    order = torch.randperm(B, generator=s.generator).to(s.device)   # mix groups across mini-batches
                    # tensor_split gives exactly `mini_batches` pieces (chunk may give fewer: 6 rows in 4 is 3);
                    # never an empty one (dynamic sampling may keep fewer rows than there are mini-batches)
                    for mini_batch in order.tensor_split(min(config.mini_batches, B)):
                        optimizer.zero_grad(set_to_none=True)
                        full_mask = loss_mask[mini_batch]
                        # Rows of similar length share micro-batches, so less padding is computed (the
                        # gradient is a sum over rows: their order does not change it).
                        mini_batch = mini_batch[completion_mask[mini_batch].sum(1).argsort()]
                        for micro in mini_batch.split(config.micro_batch_size or B):
                            with s.autocast():
                                logps = token_logprobs(policy, input_ids[micro], attention_mask[micro],
                                                       completion_mask[micro], config.temperature, top_p=config.top_p)
                            scaled_loss, scale, stats = micro_batch_loss(
                                config, logps, old_logps[micro], advantages[micro], loss_mask[micro], full_mask,
                                ref_logps[micro] if ref_logps is not None else None,
                                is_weights[micro] if is_weights is not None else None)
                            if not torch.isfinite(scaled_loss):
                                raise FloatingPointError(f"non-finite loss ({stats['loss']}) at step {step}")
                            scaled_loss.backward()
                            accumulate(totals, stats, scale, float(loss_mask[micro].sum()))
                        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), config.max_grad_norm)
                        if not torch.isfinite(grad_norm):
                            raise FloatingPointError(f"non-finite gradient norm at step {step}")
                        grad_norms.append(grad_norm.item())
                        optimizer.step()
                s.scheduler.step()
                policy.eval()
                if s.engine is not None:
                    s.engine.sync()                            # the next rollout samples from the new weights
                timings["time/update"] = time.time() - tick

                # ==================================================================================
                # 5. LOG: metrics.jsonl, samples.jsonl, progress bar; evaluation and checkpoint every N
                # ==================================================================================
                metrics = step_metrics(step, rollout, reward_values, accuracy, rouge, advantages, seq_logps, tau,
                                       entropy, totals, grad_norms, learning_rate, s,
                                       {"reward/grader_errors": grader_errors, **gap_stats, **sampling_stats})
                if config.eval_every and step % config.eval_every == 0 and step != config.num_steps:
                    metrics.update(held_out_eval(s, config, step))
                log_step(s, config, metrics, timings, rollout, batch, scored, advantages, progress)
                if config.log_rollouts:
                    write_jsonl(s.out_dir / "rollouts.jsonl",
                                rollout_rows(step, G, rollout, scored, advantages, old_logps, completion_mask))
                if config.save_every and step % config.save_every == 0:
                    save_checkpoint(s.out_dir, step, policy, s.tokenizer, optimizer, s.scheduler, s.generator,
                                    config.keep_checkpoints, s.prompt_position)
                    last_saved = step
                if ctrl_c.requested:
                    break
    except FloatingPointError as error:      # no optimizer step ever applies a non-finite gradient
        raise FloatingPointError(f"{error}. The weights were not updated with it; the last checkpoint is "
                                 f"{latest_checkpoint(s.out_dir)} (continue with --resume, perhaps with a lower --lr)")
    finally:
        progress.close()
    if ctrl_c.requested:
        if step > last_saved:
            save_checkpoint(s.out_dir, step, policy, s.tokenizer, optimizer, s.scheduler, s.generator,
                            config.keep_checkpoints, s.prompt_position)
        s.tracker.close()
        print(f"Interrupted after step {step}: saved {latest_checkpoint(s.out_dir)}; continue with "
              f"python train.py --resume --out_dir {s.out_dir} (and the same options)", file=sys.stderr)
        raise SystemExit(130)
    return finish(s, config, step, last_saved, initial_eval)


def main(argv=None):
    config = parse_config(argv)
    try:
        return train(config)
    except (ConfigError, ModelLoadError, data.DatasetFieldError, data.DatasetLoadError, FloatingPointError) as error:
        sys.exit(f"train.py: error: {error}")
    except KeyboardInterrupt:
        sys.exit("train.py: aborted (no checkpoint written for the unfinished step)")


if __name__ == "__main__":
    main()
