"""LamPO inside TRL's GRPOTrainer: the same update, past one GPU (accelerate, DeepSpeed, FSDP, vLLM, peft).

    accelerate launch trl_lampo.py --model_name_or_path Qwen/Qwen3-1.7B --dataset math --output_dir runs/trl
    python trl_lampo.py --help                      # every option: ours, GRPOConfig's and ModelConfig's
    python trl_lampo.py bench --shape qwen3-1.7b --tokenizer PATH/TO/qwen3-tokenizer   # one timed step (GPU)

LamPO ("Lambda-Style Policy Optimization", arXiv 2605.21235; lambdapo.py has the equations, docs/design.md §1 the
contract) keeps GRPO's clipped, critic-free update and replaces the group baseline by the Pairwise Decomposed
Advantage:

    ℓ_i  = (1/|o_i|) Σ_t log π_old(o_i,t | q, o_i,<t)        sequence score under the sampling policy
    w_ij = 2 σ(−sign(r_i − r_j) (ℓ_i − ℓ_j) / τ)
    A_i  = 1/(G−1) Σ_{j≠i} (r_i − r_j) w_ij                  τ = inf gives RLOO

So switching a TRL script from GRPO to LamPO is a class name: `GRPOConfig` → `LamPOConfig`,
`GRPOTrainer` → `LamPOTrainer`. Everything else (generation with transformers or vLLM, the clipped loss
and its `loss_type`, β, LoRA through peft, DeepSpeed/FSDP, logging) is TRL's own code, unchanged.

Where we hook TRL (version 1.16.x only; the constructor checks and names the range)
-------------------------------------------------------------------------------------
TRL has no advantage hook. We wrap three private GRPOTrainer methods, without copying them:
- `_generate(prompts)` returns TRL 1.16's 8-tuple (prompt_ids, completion_ids, tool_mask, completions,
  logprobs, extra_fields, images, tool_images). We check its length and keep `tool_mask` (1 = a token
  the model wrote) before `mask_truncated_completions` zeroes a truncated row's.
- `_calculate_rewards(inputs, prompts, completions, completion_ids_list)` returns the (N, K) rewards of
  the K reward functions, already gathered from every process (None → NaN). We keep them, and this
  process's completion token lists (their true lengths).
- `_generate_and_score_completions(inputs)` generates, scores and returns this process's rows with
  TRL's GRPO advantages. We replace `output["advantages"]` with LamPO's, computed as below.
We also rely on: that output's keys `prompt_ids`, `prompt_mask`, `completion_ids`, `completion_mask`
(right-padded), `old_per_token_logps` (present only when TRL computed it) and the vision-language keys
of MULTIMODAL_KEYS; the helper `_get_per_token_logps_and_entropies(model, input_ids, attention_mask,
logits_to_keep, batch_size=…, **multimodal)` and `trl.models.utils.disable_gradient_checkpointing`; the
attributes `num_generations`, `num_generations_eval`, `reward_weights` and `accelerator`; and the logging
buffers `_metrics[mode][name]` (a list per metric, averaged by TRL's `log`) and `_logs["advantages"]` (the
completions table), into which we write LamPO's values.

ℓ_i is π_old's score in every configuration, π_old being the policy TRL's loss divides by (TRL 1.16
rules, read from its source):
1. TRL computes `old_per_token_logps` exactly when
       gradient_accumulation_steps % (steps_per_generation · num_iterations) != 0
   (a generation batch outlives an optimizer step, so later micro-steps see updated weights), or when
   `use_vllm` and `vllm_importance_sampling_correction` (its default). They are the policy that sampled,
   scored by the trainer right after generation. We use them.
2. Otherwise TRL's π_old is the trainer's own forward (its loss uses the detached current log-probs):
   one extra no-grad forward through TRL's own helper `_get_per_token_logps_and_entropies`, exactly as
   TRL computes old log-probs (temperature, chunking, gradient checkpointing off). The weights have not
   changed since generation, so this is π_old. A sampler's log-probs (vLLM without the importance-sampling
   correction, a `rollout_func`) are *not* used: they come from another engine, and vLLM's are those of
   the top-p/top-k-renormalised distribution, not of π_old. With groups of one (G = 1: A = 0) no ℓ is
   needed and this forward is skipped.
With `mask_truncated_completions`, TRL zeroes a truncated completion's mask *before* its forward, so its
old log-probs in case 1 did not attend to the completion; those rows are recomputed with their real
mask. Every process runs the same number of forward chunks, as DeepSpeed ZeRO-3 and FSDP require: the
row count is the largest over processes, and if any process holds a vision-language batch (which is
recomputed whole) every process recomputes all its rows.
ℓ counts the tokens the model wrote: tool results (and a `rollout_func`'s `env_mask` 0 tokens) are in the
context, not in ℓ, in every row (the tool mask is kept from `_generate`, before TRL zeroes a truncated
row's).

Groups straddle processes. TRL's sampler puts the G completions of a prompt in consecutive rows of the
*global* batch (process 0's rows, then process 1's, …), which is why it gathers rewards. We gather ℓ
the same way (`accelerator.gather`), compute the advantages on complete groups, and slice this
process's rows back, so the result does not depend on the number of processes (tested with 2).

Defined behaviour of the corner cases (never a NaN):
- Several reward functions: r_i = Σ_k weight_k · r_ik (`reward_weights`, NaN-skipping sum), as TRL's
  default `multi_objective_aggregation="sum_then_normalize"`; "normalize_then_sum" is refused.
- A reward function returning None for a completion: that function is skipped for it (the sum above).
  If *every* function returns None, the completion is unscorable: it is left out of its group (the
  others are compared among themselves, with their own G − 1) and gets A = 0, as TRL does for GRPO.
- `mask_truncated_completions`: truncated completions keep their reward and their place in the group
  (they are still evidence that other completions did better or worse, as for TRL's GRPO and
  train.py's `--mask_truncated`); ℓ is computed over their real tokens; TRL masks them out of the loss.
- Evaluation with `num_generations_eval` (G may be 1): groups of that size; a group of one gets A = 0.
- `scale_rewards`: "none" (or false) by default (LamPO's advantage is not divided by a std, docs/design.md
  §1); "group" (or true) divides each group's advantages by its reward std + 1e-6
  (`pairwise_advantages(scale_by_std=True)`); "batch" is refused, in Python and on the command line alike.
- `lampo_relative_tau`: τ_eff = lampo_tau · the mean within-group std of ℓ over the generation batch's
  complete groups (lambdapo.grouped_relative_tau), as train.py's --relative_tau.
Logged each generation batch: lampo/weight_mean, lampo/weight_std, lampo/misordered_pairs,
lampo/seq_logp_std, lampo/corr_rloo (lambdapo.lampo_diagnostics) and lampo/tau (τ_eff), next to TRL's own
metrics.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field

import torch
from packaging.version import Version

import lambdapo

# The TRL releases whose private methods we wrap (see the module docstring). requirements-trl.txt pins one.
TRL_SUPPORTED = (Version("1.16.0"), Version("1.17.0"))          # [low, high)
TRL_RANGE = ">=1.16.0,<1.17"


class LamPOVersionError(RuntimeError):
    """The installed TRL is not a release whose private API this file was written against."""


def check_trl_version(version: str) -> None:
    """One-line error unless `version` is in TRL_RANGE (dev and rc builds of 1.16 count as 1.16)."""
    try:
        release = Version(Version(version).base_version)
    except Exception:
        release = None
    if release is None or not TRL_SUPPORTED[0] <= release < TRL_SUPPORTED[1]:
        raise LamPOVersionError(
            f"trl_lampo supports TRL {TRL_RANGE} (it wraps GRPOTrainer's private _generate, _calculate_rewards and "
            f"_generate_and_score_completions), but trl {version} is installed: pip install -r requirements-trl.txt")


try:
    import trl
    from trl import GRPOConfig, GRPOTrainer
    from trl.models.utils import disable_gradient_checkpointing
except ImportError as error:                                    # no TRL, or one without these names
    installed = sys.modules.get("trl")
    raise LamPOVersionError(
        f"trl_lampo needs TRL {TRL_RANGE} ({type(error).__name__}: {error}; installed: "
        f"{getattr(installed, '__version__', 'none')}): pip install -r requirements-trl.txt") from error

# GRPOTrainer._generate's result in TRL 1.16, by position (hook 0 reads "tool_mask" and checks the length).
TRL_GENERATE_FIELDS = ("prompt_ids", "completion_ids", "tool_mask", "completions", "logprobs", "extra_fields",
                       "images", "tool_images")

# Keys of a GRPO output batch that carry vision-language inputs (passed through to TRL's forward helper).
MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes",
                   "num_tiles", "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")


# ===================================================================================================
# Config: GRPOConfig + LamPO's two options; LamPO's default for scale_rewards
# ===================================================================================================
@dataclass
class LamPOConfig(GRPOConfig):
    """`GRPOConfig` plus LamPO's options. Every GRPOConfig option keeps its meaning; `scale_rewards`
    defaults to "none" here because LamPO's advantage is not divided by a std (docs/design.md §1)."""

    lampo_tau: float = field(default=1.0, metadata={
        "help": "LamPO temperature τ of the confidence weights w_ij = 2σ(−sign(r_i − r_j)(ℓ_i − ℓ_j)/τ). Small τ: "
                "pairs the policy already orders right are nearly ignored and wrongly ordered ones count up to 2×; "
                "large τ: every pair counts 1. 'inf' gives RLOO exactly. Default 1.0, as train.py."})
    lampo_seq_logp: str = field(default="mean", metadata={
        "help": "LamPO sequence score ℓ_i of a completion under the sampling policy: 'mean' (length-normalised "
                "log-probability, so a long completion is not 'unlikely' just for being long) or 'sum'.",
        "choices": ["mean", "sum"]})
    lampo_relative_tau: bool = field(default=False, metadata={
        "help": "LamPO: measure τ in units of the generation batch's ℓ spread (τ_eff = lampo_tau · the mean "
                "within-group std of ℓ, logged as lampo/seq_logp_std; lampo/tau logs τ_eff), as train.py's "
                "--relative_tau. This project's extension, not the paper's; off by default."})
    # The command line and Python accept the same values: GRPOConfig takes True/False for group/none, so the
    # parser takes "true"/"false" too ("batch", GRPO's batch-level std, is refused in both).
    scale_rewards: str = field(default="none", metadata={
        "help": "LamPO: 'none' or 'false' (default; the pairwise advantage as is), 'group' or 'true' (divide each "
                "group's advantages by its reward std + 1e-6).",
        "choices": ["none", "group", "true", "false"]})

    def __post_init__(self):
        if self.scale_rewards in ("true", "false"):              # the command line's spelling of True/False
            self.scale_rewards = self.scale_rewards == "true"
        super().__post_init__()                                  # maps scale_rewards True/False to group/none
        if isinstance(self.lampo_tau, str):
            self.lampo_tau = float(self.lampo_tau)
        if not self.lampo_tau > 0:
            raise ValueError(f"lampo_tau must be > 0 (or inf for RLOO), got {self.lampo_tau}")
        if self.lampo_seq_logp not in ("mean", "sum"):
            raise ValueError(f"lampo_seq_logp must be 'mean' or 'sum', got {self.lampo_seq_logp!r}")
        if self.scale_rewards not in ("none", "group"):
            raise ValueError(f"LamPO supports scale_rewards 'none'/false or 'group'/true (per group), got "
                             f"{self.scale_rewards!r}")
        if not isinstance(self.lampo_relative_tau, bool):
            raise ValueError(f"lampo_relative_tau must be True or False, got {self.lampo_relative_tau!r}")
        if self.multi_objective_aggregation != "sum_then_normalize":
            raise ValueError("LamPO compares completions by their weighted reward sum: multi_objective_aggregation must "
                             f"be 'sum_then_normalize', got {self.multi_objective_aggregation!r}")


# ===================================================================================================
# Trainer: GRPOTrainer whose advantages are LamPO's
# ===================================================================================================
class LamPOTrainer(GRPOTrainer):
    """`GRPOTrainer` with LamPO's pairwise, confidence-weighted advantage (module docstring for the rules).

    Takes exactly GRPOTrainer's arguments; `args` must be a `LamPOConfig` (or None for its defaults).
    """

    def __init__(self, model, reward_funcs=None, args: LamPOConfig | None = None, *rest, **kwargs):
        check_trl_version(trl.__version__)
        if args is None:
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "") or "model"
            args = LamPOConfig(f"{name.rstrip('/').split('/')[-1]}-LamPO")
        if not isinstance(args, LamPOConfig):
            raise TypeError(f"LamPOTrainer needs args=LamPOConfig(...) (GRPOConfig plus lampo_tau, lampo_relative_tau "
                            f"and lampo_seq_logp; "
                            f"its scale_rewards defaults to 'none'), got {type(args).__name__}")
        self._lampo_rewards_per_func = None      # (N, K) gathered rewards of the batch being scored
        self._lampo_completion_ids = None        # this process's completion token lists
        self._lampo_tool_mask = None             # their tool masks (1 = written by the model), or None
        super().__init__(model, reward_funcs, args, *rest, **kwargs)

    # --- hook 0: keep the tool mask before mask_truncated_completions zeroes a truncated row's -------------
    def _generate(self, prompts):
        result = super()._generate(prompts)
        # Read by position, so check the layout first: a TRL that changed the tuple fails here, in one line,
        # not later with a wrong mask.
        if not isinstance(result, tuple) or len(result) != len(TRL_GENERATE_FIELDS):
            size = len(result) if isinstance(result, (tuple, list)) else "?"
            raise LamPOVersionError(
                f"TRL {trl.__version__}: GRPOTrainer._generate returned a {type(result).__name__} of {size} items, "
                f"not TRL 1.16's {len(TRL_GENERATE_FIELDS)} ({', '.join(TRL_GENERATE_FIELDS)}); trl_lampo supports "
                f"TRL {TRL_RANGE}")
        tool_mask = result[TRL_GENERATE_FIELDS.index("tool_mask")]
        self._lampo_tool_mask = None if tool_mask is None else [list(mask) for mask in tool_mask]
        return result

    # --- hook 1: keep the gathered rewards (and the completions' true lengths) ---------------------------
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._lampo_rewards_per_func = rewards_per_func              # (N_global, K), NaN where a function gave None
        self._lampo_completion_ids = [list(ids) for ids in completion_ids_list]     # local rows, unpadded
        return rewards_per_func

    # --- hook 2: replace TRL's group advantage with LamPO's ---------------------------------------------
    def _generate_and_score_completions(self, inputs):
        self._lampo_rewards_per_func = None
        self._lampo_tool_mask = None
        output = super()._generate_and_score_completions(inputs)
        if self._lampo_rewards_per_func is None:
            raise LamPOVersionError(f"TRL {trl.__version__} scored completions without calling _calculate_rewards; "
                                    f"trl_lampo supports TRL {TRL_RANGE}")
        mode = "train" if self.model.training else "eval"
        G = self.num_generations if mode == "train" else self.num_generations_eval
        rewards_per_func = self._lampo_rewards_per_func                               # (N, K)
        device = rewards_per_func.device

        # r_i = Σ_k weight_k r_ik, skipping the functions that returned None; all None ⇒ unscorable.
        rewards = (rewards_per_func * self.reward_weights.to(device)[None, :]).nansum(dim=1)     # (N,)
        scorable = ~torch.isnan(rewards_per_func).all(dim=1)                                     # (N,)

        # ℓ of this process's rows, then of every row of the global batch (groups straddle processes).
        # A group of one (evaluation with num_generations_eval=1) has nobody to compare with: A = 0 whatever ℓ
        # is, so its forward is skipped (G is the same on every process, so all of them skip it).
        n = output["completion_ids"].size(0)
        if G > 1:
            local_scores = self._lampo_sequence_scores(output, mode)                             # (n,)
        else:
            local_scores = torch.zeros(n, device=device)
        seq_logps = self.accelerator.gather(local_scores.to(device))                             # (N,)
        if seq_logps.numel() != rewards.numel():
            raise RuntimeError(f"LamPO: {seq_logps.numel()} sequence scores for {rewards.numel()} rewards after gather")

        # Complete groups: rows [g·G, (g+1)·G) of the global batch.
        group_ids = torch.arange(rewards.numel(), device=device) // G
        tau = self.args.lampo_tau
        if self.args.lampo_relative_tau:                      # τ in units of this batch's ℓ spread (every process
            tau = lambdapo.grouped_relative_tau(seq_logps, group_ids, scorable, tau)   # sees the same N rows)
        advantages = lambdapo.grouped_pairwise_advantages(rewards, seq_logps, group_ids, scorable, tau,
                                                          scale_by_std=self.args.scale_rewards == "group")   # (N,)
        start = self.accelerator.process_index * n
        output["advantages"] = advantages[start:start + n].to(output["advantages"].device)

        # Logging: the diagnostics and τ (τ_eff under lampo_relative_tau, as train.py's lampo/tau), and the
        # completions table shows LamPO's advantages, not GRPO's.
        diagnostics = lambdapo.lampo_diagnostics(rewards, seq_logps, tau, advantages, group_ids, scorable)
        for name, value in {**diagnostics, "lampo/tau": float(tau)}.items():
            self._metrics[mode][name].append(value)
        logged = self._logs["advantages"]
        replace = min(len(logged), advantages.numel())
        for _ in range(replace):
            logged.pop()
        logged.extend(advantages[advantages.numel() - replace:].tolist())
        return output

    # --- ℓ: π_old's sequence score of this process's completions ----------------------------------------
    def _lampo_sequence_scores(self, output: dict, mode: str) -> torch.Tensor:
        completion_ids = output["completion_ids"]                                   # (n, T), right-padded
        n, T = completion_ids.shape
        device = completion_ids.device
        lengths = torch.tensor([len(ids) for ids in self._lampo_completion_ids], device=device)   # (n,)
        if lengths.numel() != n:
            raise RuntimeError(f"LamPO: {lengths.numel()} completion lengths for {n} rows")
        real = torch.arange(T, device=device)[None, :] < lengths[:, None]          # (n, T) every sampled token
        # Rows whose mask TRL cut (mask_truncated_completions): their TRL forward did not see the completion.
        cut = (output["completion_mask"].bool() != real).any(dim=1)                 # (n,)
        score_mask = real.clone()
        if self._lampo_tool_mask is not None:                                       # only model-written tokens,
            if len(self._lampo_tool_mask) != n:                                     # also in truncated rows
                raise RuntimeError(f"LamPO: {len(self._lampo_tool_mask)} tool masks for {n} rows")
            written = torch.ones(n, T, dtype=torch.bool, device=device)            # padded with 1, as TRL's
            for row, mask in enumerate(self._lampo_tool_mask):
                written[row, :min(len(mask), T)] = torch.tensor(mask[:T], dtype=torch.bool, device=device)
            score_mask &= written

        if output.get("old_per_token_logps") is not None:                           # rule 1
            logps, recompute = output["old_per_token_logps"].detach().float(), cut
        else:                                                                       # rule 2
            logps, recompute = None, torch.ones_like(cut)
        logps = self._lampo_recompute(output, logps, recompute, real, mode)         # (n, T)
        return lambdapo.sequence_scores(torch.where(score_mask, logps, 0.0), score_mask, self.args.lampo_seq_logp)

    def _lampo_recompute(self, output: dict, logps: torch.Tensor | None, rows: torch.Tensor, real: torch.Tensor,
                         mode: str) -> torch.Tensor:
        """Per-token log-probs of `rows` under the current (= sampling) weights, through TRL's own helper, with
        the completions' real attention mask. Collective: every process runs the same number of forward chunks
        (ZeRO-3 and FSDP gather parameters inside each forward), padding its row list with copies of row 0."""
        device = output["completion_ids"].device
        n = rows.numel()
        multimodal = {key: output[key] for key in MULTIMODAL_KEYS if key in output}
        # Decided collectively: how many rows the busiest process recomputes, and whether any process holds
        # images. A process with images recomputes all its rows (images cannot be sliced per row here); if it
        # did so alone while a text-only process recomputed only its cut rows, the two would run different
        # numbers of forward chunks, and ZeRO-3/FSDP (which gather parameters inside each forward) would hang.
        plan = torch.tensor([int(rows.sum()), int(bool(multimodal))], device=device)
        wanted, any_multimodal = (int(v) for v in self.accelerator.gather(plan.reshape(1, 2)).max(dim=0).values)
        if wanted == 0:
            return logps
        if logps is None or any_multimodal:                   # all rows, on every process
            index = torch.arange(n, device=device)
            keep = torch.ones(n, dtype=torch.bool, device=device)
        else:
            index = rows.nonzero().squeeze(1)
            keep = torch.arange(wanted, device=device) < index.numel()
            index = torch.cat([index, index.new_zeros(wanted - index.numel())])   # same count on every process
        input_ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)[index]
        attention_mask = torch.cat([output["prompt_mask"], real.to(output["prompt_mask"].dtype)], dim=1)[index]
        batch_size = self.args.per_device_train_batch_size if mode == "train" else self.args.per_device_eval_batch_size
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            fresh, _, _ = self._get_per_token_logps_and_entropies(
                self.model, input_ids, attention_mask, output["completion_ids"].size(1), batch_size=batch_size,
                **multimodal)
        fresh = fresh.detach().float()
        if logps is None or any_multimodal:
            return fresh
        logps = logps.clone()
        logps[index[keep]] = fresh[keep]
        return logps


# ===================================================================================================
# Rewards for the command line: accuracy + α · ROUGE-L against the reference solution (rewards.py)
# ===================================================================================================
def completion_text(completion) -> str:
    """TRL hands conversational completions as [{"role": "assistant", "content": ...}]; plain ones as str."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content") or "")
    return str(completion)


def accuracy(completions, answer, task=None, **kwargs) -> list[float]:
    """1.0 for a mathematically equivalent final answer (multiple choice: the right letter), else 0.0."""
    import rewards
    tasks = task or ["math"] * len(completions)
    return [rewards.reward(completion_text(c), a, None, 0.0, t or "math")["accuracy"]
            for c, a, t in zip(completions, answer, tasks)]


def rouge_l(completions, solution=None, **kwargs) -> list[float]:
    """ROUGE-L F-measure against the reference solution; 0.0 where there is none (weighted by α in TRL)."""
    import rewards
    solutions = solution or [None] * len(completions)
    return [rewards.rouge_l_reward(completion_text(c), s) if s else 0.0 for c, s in zip(completions, solutions)]


def to_trl_dataset(records: list[dict]):
    """data.py records → a `datasets.Dataset` TRL reads: a conversational prompt (TRL applies the model's chat
    template) and the columns the reward functions take as keyword arguments."""
    from datasets import Dataset
    return Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"],
                               "solution": r.get("solution") or "", "task": r.get("task", "math")} for r in records])


# ===================================================================================================
# Command line (TRL's own argument parser): our script options + LamPOConfig + TRL's ModelConfig
# ===================================================================================================
@dataclass
class LamPOScriptArguments:
    """Data and reward options of `trl_lampo.py` (training options are LamPOConfig's, model ones ModelConfig's)."""

    dataset: str = field(default="math", metadata={
        "help": "training set, as train.py: math (MATH train, 7,500 problems with worked solutions) | gsm8k | toy | "
                "a Hub id | a local .jsonl/.json/.parquet file"})
    data_file: str | None = field(default=None, metadata={"help": "read the training set from this local file"})
    limit: int | None = field(default=None, metadata={"help": "use only the first N training records"})
    rouge_weight: float = field(default=0.1, metadata={
        "help": "α in r = accuracy + α·ROUGE-L-F(completion, reference solution); 0 disables. Implemented as two "
                "TRL reward functions, `accuracy` and `rouge_l`, with reward_weights [1, α]"})
    eval_benchmark: str = field(default="math500", metadata={
        "help": "evaluation set when --eval_strategy is not 'no': math500 | gsm8k | aime24 | aime25 | toy | none"})
    eval_data_file: str | None = field(default=None, metadata={"help": "read the evaluation set from this local file"})
    eval_limit: int | None = field(default=None, metadata={"help": "use only the first N evaluation problems"})
    enable_thinking: bool = field(default=False, metadata={
        "help": "Qwen3's chat-template thinking mode (only the text after </think> is graded)"})


def make_parser():
    from trl import ModelConfig, TrlParser
    return TrlParser((LamPOScriptArguments, LamPOConfig, ModelConfig),
                     description=__doc__.split("\n\n")[0] + " LamPO's own options: --lampo_tau, --lampo_relative_tau, "
                     "--lampo_seq_logp, --scale_rewards, and the data options --dataset, --rouge_weight.")


def main(argv=None) -> None:
    parser = make_parser()
    script_args, training_args, model_args = parser.parse_args_and_config(args=argv)
    import data
    from trl import get_peft_config

    records = data.load_train_dataset(script_args.dataset, data_file=script_args.data_file, limit=script_args.limit,
                                      seed=training_args.seed)
    eval_dataset = None
    if training_args.eval_strategy != "no" and script_args.eval_benchmark != "none":
        eval_dataset = to_trl_dataset(data.load_benchmark(script_args.eval_benchmark, script_args.eval_data_file,
                                                          script_args.eval_limit, training_args.seed))
    reward_funcs = [accuracy] + ([rouge_l] if script_args.rouge_weight > 0 else [])
    if training_args.reward_weights is None:
        training_args.reward_weights = [1.0, script_args.rouge_weight][:len(reward_funcs)]
    if training_args.chat_template_kwargs is None:
        training_args.chat_template_kwargs = {"enable_thinking": script_args.enable_thinking}
    model_init_kwargs = {"revision": model_args.model_revision, "attn_implementation": model_args.attn_implementation,
                         "dtype": model_args.dtype, **(training_args.model_init_kwargs or {})}
    training_args.model_init_kwargs = {k: v for k, v in model_init_kwargs.items() if v is not None}
    trainer = LamPOTrainer(model=model_args.model_name_or_path, reward_funcs=reward_funcs, args=training_args,
                           train_dataset=to_trl_dataset(records), eval_dataset=eval_dataset,
                           peft_config=get_peft_config(model_args))
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"Saved the trained model to {training_args.output_dir}")


# ===================================================================================================
# `bench`: one timed LamPOTrainer step of a random-weight model with a real tokenizer
# ===================================================================================================
def bench(argv=None) -> dict:
    """Time LamPOTrainer steps and print one JSON line: step time (the last step; the first one pays for
    warm-up), tokens generated, peak memory. Random weights, so completions run to the length limit."""
    import argparse
    import json
    import os
    import resource
    import tempfile

    parser = argparse.ArgumentParser(prog="trl_lampo.py bench", description=bench.__doc__)
    parser.add_argument("--shape", default="tiny", choices=["tiny", "qwen3-1.7b"],
                        help="tiny (toy.py's model, CPU seconds) or Qwen3-1.7B's exact config (bench.QWEN3_1_7B)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (e.g. a local copy of the Qwen3 tokenizer); "
                        "default: toy.py's character tokenizer")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per step")
    parser.add_argument("--num_generations", type=int, default=8, help="G")
    parser.add_argument("--max_completion_length", type=int, default=256)
    parser.add_argument("--per_device_train_batch_size", type=int, default=None, help="default: all completions")
    parser.add_argument("--steps", type=int, default=2, help="steps; the last one is timed")
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--num_iterations", type=int, default=1, help="TRL's μ; > 1 makes TRL compute old log-probs")
    options = parser.parse_args(argv)

    import data
    import toy
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM, TrainerCallback

    cuda = torch.cuda.is_available()
    tokenizer = AutoTokenizer.from_pretrained(options.tokenizer) if options.tokenizer else toy.build_tokenizer()
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(0)
    if options.shape == "tiny":
        model = toy.build_model(tokenizer)
    else:
        from bench import QWEN3_1_7B
        shape = dict(QWEN3_1_7B, vocab_size=max(QWEN3_1_7B["vocab_size"], len(tokenizer)),
                     eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        with torch.device("cuda" if cuda else "cpu"):
            model = Qwen3ForCausalLM(Qwen3Config(**shape))              # float32 master weights
    here = os.path.dirname(os.path.abspath(__file__))
    records = data.load_train_dataset("math", data_file=os.path.join(here, "fixtures", "math_train.jsonl"))
    records = (records * options.prompts)[:options.prompts * options.steps]
    completions = options.prompts * options.num_generations

    times = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            times[-1] = time.perf_counter() - times[-1]

    with tempfile.TemporaryDirectory() as out_dir:
        args = LamPOConfig(
            output_dir=out_dir, per_device_train_batch_size=options.per_device_train_batch_size or completions,
            gradient_accumulation_steps=completions // (options.per_device_train_batch_size or completions),
            num_generations=options.num_generations, max_completion_length=options.max_completion_length,
            max_steps=options.steps, learning_rate=1e-6, bf16=cuda, use_cpu=not cuda,
            gradient_checkpointing=options.gradient_checkpointing, num_iterations=options.num_iterations,
            logging_steps=1, report_to="none", save_strategy="no", seed=0, reward_weights=[1.0, 0.1])
        trainer = LamPOTrainer(model=model, reward_funcs=[accuracy, rouge_l], args=args,
                               train_dataset=to_trl_dataset(records), processing_class=tokenizer,
                               callbacks=[StepTimer()])
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
        history = [h for h in trainer.state.log_history if "lampo/weight_mean" in h]
    result = {
        "device": torch.cuda.get_device_name() if cuda else "cpu", "shape": options.shape,
        "tokenizer": options.tokenizer or "toy", "trl": trl.__version__, "torch": torch.__version__,
        "completions_per_step": completions, "max_completion_length": options.max_completion_length,
        "step_seconds": round(times[-1], 3), "first_step_seconds": round(times[0], 3),
        "completion_tokens_per_step": history[-1].get("completions/mean_length", math.nan) * completions if history
        else None,
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30 if cuda
                                 else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 3),
        "peak_memory_kind": "torch.cuda.max_memory_allocated" if cuda else "process peak RSS",
        "lampo": {k: v for k, v in (history[-1] if history else {}).items() if k.startswith("lampo/")},
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "bench":
        bench(sys.argv[2:])
    else:
        main()
