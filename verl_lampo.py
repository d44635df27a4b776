"""LamPO inside verl (Ray, FSDP/Megatron, vLLM/SGLang): an advantage estimator, a reward function, data.

    python -m verl.trainer.main_ppo actor_rollout_ref.model.external_lib=verl_lampo algorithm.adv_estimator=lampo \\
        +algorithm.lampo_tau=1.0 reward.custom_reward_function.path=pkg://verl_lampo ...   (docs/verl.md: full command,
        run from this folder: Ray puts the driver's folder on every worker's module path)
    python verl_lampo.py prepare --dataset math --out DIR   # train.parquet (MATH train), test.parquet (MATH-500)

LamPO ("Lambda-Style Policy Optimization", arXiv 2605.21235; lambdapo.py has the equations, docs/design.md §1 the
contract) keeps the clipped, critic-free update and replaces GRPO's group baseline by the Pairwise
Decomposed Advantage

    ℓ_i  = (1/|o_i|) Σ_t log π_old(o_i,t | q, o_i,<t)        sequence score under the sampling policy
    w_ij = 2 σ(−sign(r_i − r_j) (ℓ_i − ℓ_j) / τ)
    A_i  = 1/(G−1) Σ_{j≠i} (r_i − r_j) w_ij                  τ = inf gives RLOO

Importing this module registers the estimator "lampo" in verl's registry (`register_adv_est`), so the
switch from GRPO is one config key: `algorithm.adv_estimator=lampo`. Options, added with hydra's `+`:
`+algorithm.lampo_tau=1.0` (τ; inf = RLOO), `+algorithm.lampo_seq_logp=mean|sum`,
`+algorithm.lampo_scale_by_std=false` (divide by the group reward std + 1e-6, as GRPO; off by default),
`+algorithm.lampo_relative_tau=false` (τ in units of the batch's ℓ spread, lambdapo.grouped_relative_tau).
Any other `lampo*` key is refused in one line (hydra's `+` would add a misspelt one silently), and so is
rollout-correction rejection sampling (`rollout_correction.rollout_rs` outside bypass mode: it zeroes the
response mask of rejected rows, which would leave their groups). `norm_adv_by_std_in_grpo` is GRPO's:
verl does not pass it to custom estimators, so it has no effect here.

`actor_rollout_ref.model.external_lib=verl_lampo` imports this module where verl builds its model config:
in the TaskRunner at the trainer's first init step (verl/workers/config/model.py), and in the workers. It
works on a Ray started beforehand with `ray start`, whose workers never see variables exported for the
driver (VERL_USE_EXTERNAL_MODULES), and fails at that first step when the module is not on the path.

How the estimator reaches π_old's log-probs (verl 0.9.x only; importing checks the version)
---------------------------------------------------------------------------------------------
verl 0.9.1's `verl.trainer.ppo.ray_trainer.compute_advantage(data, adv_estimator, ..., config)` calls a
custom estimator with `token_level_rewards`, `response_mask`, `index` (the uids) and `config` only,
although `data.batch["old_log_probs"]` is already there: every trainer of 0.9.x computes them (or, in
rollout-correction bypass mode, copies the sampler's) before it computes advantages, and every one of
them (the default v1 trainer through `compute_advantage_for_multi_trajectories`, the legacy
`RayPPOTrainer`, the experimental one-step-off-policy and fully-async trainers) goes through that one
function. So the estimator reads `old_log_probs` from the `data` local of its caller's frame, and
checks first that the caller *is* that function (module and name) and that the tensor has the rewards'
shape. We chose this over the alternatives because it changes nothing in verl: wrapping
`compute_advantage` would have to patch every module that bound the name at import time (ray_trainer,
ppo/v1/utils, the experimental trainers), in every Ray process, before they import it; and there is no
hook for extra estimator inputs (v1 fetches a fixed field list from TransferQueue). If `old_log_probs=`
is passed, or `batch=` (verl's open pull request 7473 passes its batch to estimators that accept it), that
is used and no frame is read. Anywhere else the estimator fails with one line naming the verl version and
what it found.

Groups are the rows that share a `uid`: not contiguous (verl balances batches across ranks), of
different sizes (DAPO-style group filtering, rejection sampling), and verl pads batches with rows whose
response mask is empty. Such rows belong to no group and get A = 0; a group is compared among its real
rows with its own G (lambdapo.grouped_pairwise_advantages); a group of one gets A = 0. The scalar reward
of a row is Σ_t token_level_rewards (verl's outcome reward, KL-in-reward included), as verl's own GRPO.
The returned advantages are A_i on every response token (× response_mask), and the same as returns.

A group member is a rollout, not a row: verl's multi-output agent loops store each output (turn) of one
rollout as its own row, keyed "{uid}_{session}_{output}", with the final output's reward copied back, and
verl collapses them for GRPO only. The estimator collapses them too (the keys are read from verl's
compute_advantage_for_multi_trajectories, one frame further up, or passed as `batch_keys=`): a rollout has
its final output's reward and ℓ over every token the model wrote in all its outputs, and its advantage goes
to each of its rows. Single-output rollouts are one row each, as before.

Diagnostics (lampo/weight_mean, weight_std, misordered_pairs, seq_logp_std, corr_rloo, tau) are added to the
`metrics` dict of the verl trainer step that called `compute_advantage` (found the same way, a few
frames up), so they are logged with verl's own metrics; where none is found they are skipped.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading

import torch

# verl loads `custom_reward_function.path=/path/to/verl_lampo.py` by file, not by import: make the
# project's modules (lambdapo, rewards, data) importable from wherever that happens.
_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.append(_HERE)

import lambdapo  # noqa: E402

VERL_RANGE = ">=0.9.0,<0.10"
ESTIMATOR = "lampo"
# Where the estimator is called from in verl 0.9.x (module, function) and the local that holds the batch.
CALLER = ("verl.trainer.ppo.ray_trainer", "compute_advantage")
# The v1 trainer's caller of compute_advantage; its `batch_keys` say which rows are outputs of one rollout.
MULTI_TRAJECTORY_CALLER = ("verl.trainer.ppo.v1.utils", "compute_advantage_for_multi_trajectories")


class LamPOVersionError(RuntimeError):
    """The installed verl is not a release whose estimator call this file was written against."""


def check_verl_version(version: str) -> None:
    from packaging.version import Version
    try:
        release = Version(Version(version).base_version)
    except Exception:
        release = None
    if release is None or not Version("0.9.0") <= release < Version("0.10.0"):
        raise LamPOVersionError(
            f"verl_lampo supports verl {VERL_RANGE} (it reads old_log_probs from the batch of "
            f"{CALLER[0]}.{CALLER[1]}), but verl {version} is installed: pip install -r requirements-verl.txt")


# ===================================================================================================
# The advantage estimator
# ===================================================================================================
# The estimator's options, under verl's `algorithm` config (`+algorithm.lampo_tau=…`). Any other `lampo*` key is
# refused: hydra's `+` adds whatever it is given, so a misspelt option would otherwise leave its default in force.
OPTIONS = {"lampo_tau": 1.0, "lampo_seq_logp": "mean", "lampo_scale_by_std": False, "lampo_relative_tau": False}


def _option(config, name: str, default):
    """An option of verl's algorithm config: a DictConfig (with `+algorithm.name=…`), an AlgoConfig, a dict."""
    if config is None:
        return default
    try:
        value = config.get(name, default)
    except Exception:
        value = getattr(config, name, default)
    return default if value is None else value


def _config_keys(config) -> list[str]:
    """The keys of verl's algorithm config, whatever its type (DictConfig, dict, AlgoConfig dataclass)."""
    if config is None:
        return []
    try:
        return [str(key) for key in config.keys()]
    except Exception:
        return [str(key) for key in vars(config)] if hasattr(config, "__dict__") else []


def _as_bool(value, name: str) -> bool:
    """A true/false option: a bool, or the strings hydra and YAML users write; anything else is refused."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise ValueError(f"verl_lampo: {name} must be true or false, got {value!r}")


def read_options(config) -> dict:
    """The lampo estimator's options from verl's algorithm config, checked; one-line ValueError otherwise.

    algorithm.norm_adv_by_std_in_grpo is GRPO's and has no effect on lampo (verl does not pass it to custom
    estimators); LamPO's own switch is lampo_scale_by_std, off by default.
    """
    unknown = sorted(key for key in _config_keys(config) if key.startswith("lampo") and key not in OPTIONS)
    if unknown:
        raise ValueError(f"verl_lampo: unknown option(s) {', '.join('algorithm.' + key for key in unknown)}; the lampo "
                         f"estimator takes {', '.join('algorithm.' + key for key in OPTIONS)}")
    try:
        tau = float(_option(config, "lampo_tau", OPTIONS["lampo_tau"]))
    except (TypeError, ValueError):
        raise ValueError(f"verl_lampo: algorithm.lampo_tau must be a number > 0 (or inf for RLOO), got "
                         f"{_option(config, 'lampo_tau', None)!r}") from None
    if not tau > 0:
        raise ValueError(f"verl_lampo: algorithm.lampo_tau must be > 0 (or inf for RLOO), got {tau}")
    seq_logp = str(_option(config, "lampo_seq_logp", OPTIONS["lampo_seq_logp"]))
    if seq_logp not in ("mean", "sum"):
        raise ValueError(f"verl_lampo: algorithm.lampo_seq_logp must be mean or sum, got {seq_logp!r}")
    # Rollout-correction rejection sampling (decoupled mode) zeroes the response mask of rejected tokens and
    # rows before the advantage: a rejected row would silently leave its group and the rest lose tokens of ℓ.
    correction = _option(config, "rollout_correction", None)
    if (correction is not None and _option(correction, "rollout_rs", None) is not None
            and not _as_bool(_option(correction, "bypass_mode", False), "algorithm.rollout_correction.bypass_mode")):
        raise ValueError("verl_lampo: the lampo estimator does not support algorithm.rollout_correction.rollout_rs "
                         "(rejection sampling zeroes response_mask, so rejected rows would leave their groups); "
                         "keep rollout_rs=null (IS weights alone are fine) or set rollout_correction.bypass_mode=true")
    flags = {name: _as_bool(_option(config, name, OPTIONS[name]), f"algorithm.{name}")
             for name in ("lampo_scale_by_std", "lampo_relative_tau")}
    return {"tau": tau, "seq_logp": seq_logp, "scale_by_std": flags["lampo_scale_by_std"],
            "relative_tau": flags["lampo_relative_tau"]}


def _caller_batch(frame):
    """(batch, where): the `data.batch` of verl's compute_advantage if `frame` is that function's frame."""
    module, function = frame.f_globals.get("__name__"), frame.f_code.co_name
    where = f"{module}.{function}"
    if (module, function) != CALLER:
        return None, where
    batch = getattr(frame.f_locals.get("data"), "batch", None)
    return batch, where


def _caller_batch_keys(frame, rows: int):
    """The v1 trainer's row keys "{uid}_{session}_{output}" if `frame` (compute_advantage's) was called by verl's
    compute_advantage_for_multi_trajectories with one key per row; else None."""
    outer = frame.f_back
    if outer is None or (outer.f_globals.get("__name__"), outer.f_code.co_name) != MULTI_TRAJECTORY_CALLER:
        return None
    keys = outer.f_locals.get("batch_keys")
    return list(keys) if keys is not None and len(keys) == rows else None


def sessions_from_keys(batch_keys, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(session (rows,), final (num_sessions,)): the rollout each row belongs to, and each rollout's final output.

    verl's multi-output agent loops store every output (turn) of one rollout as its own row, keyed
    "{uid}_{session}_{output}", with the final output's reward copied to the others. One rollout is one
    member of its group, so rows are first collapsed to rollouts, as verl does for GRPO. Without keys every
    row is its own rollout.

    >>> sessions_from_keys(["a_0_0", "a_1_0", "a_0_1", "b_0_0"], 4)
    (tensor([0, 1, 0, 2]), tensor([2, 1, 3]))
    """
    if batch_keys is None:
        return torch.arange(rows), torch.arange(rows)
    numbers: dict = {}
    session, final, last_output = [], [], []
    for row, key in enumerate(batch_keys):
        fields = str(key).rsplit("_", 2)
        if len(fields) != 3 or not fields[2].isdigit():
            raise ValueError(f"verl_lampo: row key {key!r} is not verl's '{{uid}}_{{session}}_{{output}}'")
        number = numbers.setdefault((fields[0], fields[1]), len(numbers))
        if number == len(final):
            final.append(row)
            last_output.append(-1)
        if int(fields[2]) > last_output[number]:
            final[number], last_output[number] = row, int(fields[2])
        session.append(number)
    return torch.tensor(session), torch.tensor(final)


def _step_metrics(frame, depth: int = 6):
    """The `metrics` dict of the verl trainer step above compute_advantage (v1: _compute_advantage two
    frames up; legacy RayPPOTrainer.fit: one frame up), or None."""
    for _ in range(depth):
        frame = frame.f_back
        if frame is None:
            return None
        metrics = frame.f_locals.get("metrics")
        if isinstance(metrics, dict) and str(frame.f_globals.get("__name__", "")).startswith("verl."):
            return metrics
    return None


def compute_lampo_outcome_advantage(token_level_rewards: torch.Tensor, response_mask: torch.Tensor, index=None,
                                    config=None, old_log_probs: torch.Tensor | None = None, batch=None,
                                    batch_keys=None, **kwargs):
    """verl estimator "lampo": (advantages, returns), both (bs, response_length) = A_i · response_mask.

    token_level_rewards, response_mask, old_log_probs (bs, response_length); index (bs,) the uids (numpy
    object array); config: verl's algorithm config with the optional lampo_tau, lampo_seq_logp,
    lampo_scale_by_std, lampo_relative_tau (any other lampo* key is refused). π_old's log-probs, in this
    order: `old_log_probs=`, then `batch["old_log_probs"]` (a later verl passes its batch to estimators that
    accept it), then the batch of verl's compute_advantage (module docstring). `batch_keys` (bs,), verl's
    "{uid}_{session}_{output}" row keys, collapse a multi-output rollout to one group member; in verl's v1
    trainer they are read from its caller when not passed.
    """
    caller = sys._getframe(1)
    options = read_options(config)
    if old_log_probs is None and batch is not None and "old_log_probs" in batch.keys():
        old_log_probs = batch["old_log_probs"]
    if old_log_probs is None:
        import verl
        frame_batch, where = _caller_batch(caller)
        if frame_batch is None or "old_log_probs" not in frame_batch.keys():
            found = "its batch has no old_log_probs" if frame_batch is not None else f"it was called from {where}"
            raise LamPOVersionError(
                f"verl_lampo: the lampo estimator needs π_old's per-token log-probs; verl {verl.__version__} passes "
                f"custom estimators only token_level_rewards, response_mask, index and config, so verl_lampo reads "
                f"old_log_probs from the batch of {CALLER[0]}.{CALLER[1]} (verl {VERL_RANGE}), but {found}; "
                f"call it with old_log_probs= (or batch=)")
        old_log_probs = frame_batch["old_log_probs"]
    if index is None:
        raise ValueError("verl_lampo: the lampo estimator needs the uid of each row (index=), the rows of one prompt")
    if old_log_probs.shape != token_level_rewards.shape or response_mask.shape != token_level_rewards.shape:
        raise ValueError(f"verl_lampo: shapes differ: token_level_rewards {tuple(token_level_rewards.shape)}, "
                         f"response_mask {tuple(response_mask.shape)}, old_log_probs {tuple(old_log_probs.shape)}")
    rows = token_level_rewards.shape[0]
    if batch_keys is None and _caller_batch(caller)[0] is not None:
        batch_keys = _caller_batch_keys(caller, rows)
    session, final = sessions_from_keys(batch_keys, rows)                     # (bs,), (num_sessions,)
    tau = options["tau"]

    with torch.no_grad():
        mask = response_mask.float()                                              # (bs, T)
        row_rewards = token_level_rewards.float().sum(dim=-1)                     # (bs,)
        # Per rollout (= per row unless an agent loop wrote several outputs): its final output's reward, as
        # verl's GRPO; ℓ over every token the model wrote in it; the uid of its prompt.
        num_sessions = final.numel()
        row_logps = (old_log_probs.detach().float() * mask).sum(-1).cpu()          # Σ_t log π_old per row (bs,)
        logp_total = torch.zeros(num_sessions).index_add_(0, session, row_logps)  # per rollout (num_sessions,)
        tokens = torch.zeros(num_sessions).index_add_(0, session, mask.sum(-1).cpu())          # (num_sessions,)
        seq_logps = logp_total if options["seq_logp"] == "sum" else logp_total / tokens.clamp_min(1)   # ℓ
        scores = row_rewards.cpu()[final]                                         # r (num_sessions,)
        uids: dict = {}
        uid_of_row = [uids.setdefault(uid, len(uids)) for uid in list(index)]
        group_ids = torch.tensor([uid_of_row[row] for row in final.tolist()], dtype=torch.long)
        real = tokens > 0                                                         # padding rows: no tokens
        if options["relative_tau"]:
            tau = lambdapo.grouped_relative_tau(seq_logps, group_ids, real, tau)
        advantages = lambdapo.grouped_pairwise_advantages(scores, seq_logps, group_ids, real, tau,
                                                          options["scale_by_std"])     # (num_sessions,)
        metrics = _step_metrics(caller)
        if metrics is not None:
            metrics.update(lambdapo.lampo_diagnostics(scores, seq_logps, tau, advantages, group_ids, real))
            metrics["lampo/tau"] = float(tau)
        advantages = advantages[session].to(token_level_rewards.device, token_level_rewards.dtype)   # (bs,)
        advantages = advantages[:, None] * response_mask                           # (bs, response_length)
    return advantages, advantages


compute_lampo_outcome_advantage._lampo_estimator = True      # marks this file's estimator (see register())


def register() -> None:
    """Put "lampo" in verl's estimator registry (idempotent: verl may load this file twice, once by import
    and once by file path as the custom reward function)."""
    try:
        import verl
    except ImportError as error:
        raise LamPOVersionError(f"verl_lampo needs verl {VERL_RANGE} ({error}): pip install -r requirements-verl.txt") \
            from error
    check_verl_version(verl.__version__)
    from verl.trainer.ppo import core_algos
    existing = core_algos.ADV_ESTIMATOR_REGISTRY.get(ESTIMATOR)
    if existing is not None and getattr(existing, "_lampo_estimator", False):
        return
    core_algos.register_adv_est(ESTIMATOR)(compute_lampo_outcome_advantage)


register()


# ===================================================================================================
# The reward: accuracy + α · ROUGE-L against the reference solution carried in the data (rewards.py)
# ===================================================================================================
# How long one answer's equivalence check may take outside the main thread, where math-verify's own (SIGALRM)
# timeouts are off. A check takes milliseconds; math-verify's timeouts, which are on inside the grading
# process, stop a slow one after a few seconds (rewards.GRADE_BUDGET_S); this bounds anything else.
SCORE_TIMEOUT_S = 30.0
GRADER_START_TIMEOUT_S = 300.0     # starting a grading process: Python, sympy and math-verify imports

# The grading process: one JSON line [completion, answer] in, one line with the accuracy out. It grades in its
# main thread, so math-verify's signal timeouts are on there.
_GRADER_CODE = """
import json, sys
sys.path.insert(0, sys.argv[1])
import rewards
print(json.dumps("ready"), flush=True)
for line in sys.stdin:
    completion, answer = json.loads(line)
    print(json.dumps(rewards.accuracy_reward(completion, answer)), flush=True)
"""


class _Grader:
    """A grading process that can be killed: the only way to stop a Python computation in another thread."""

    def __init__(self):
        import subprocess
        self.process = subprocess.Popen([sys.executable, "-c", _GRADER_CODE, _HERE], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, bufsize=1)
        if self._read(GRADER_START_TIMEOUT_S) != "ready":
            raise RuntimeError("verl_lampo: the grading process did not start")

    def _read(self, timeout: float):
        import json
        import select
        readable, _, _ = select.select([self.process.stdout], [], [], timeout)
        if not readable:
            raise TimeoutError
        line = self.process.stdout.readline()
        if not line:
            raise EOFError("the grading process exited")
        return json.loads(line)

    def accuracy(self, completion: str, answer: str, timeout: float) -> float:
        import json
        self.process.stdin.write(json.dumps([completion, answer]) + "\n")
        self.process.stdin.flush()
        return float(self._read(timeout))

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()


_idle_graders: list = []
_graders_lock = threading.Lock()
# At most this many grading processes per Python process (about 100 MB each; verl's executor may run dozens of
# threads): a thread beyond them waits for a free one, and that wait is not part of its timeout.
GRADER_PROCESSES = max(1, min(8, os.cpu_count() or 1))
_grader_slots = threading.BoundedSemaphore(GRADER_PROCESSES)
grade_timeouts = 0                 # how many answers this process gave up on (scored 0), for tests and logs


def bounded_accuracy(completion: str, answer: str, timeout: float = SCORE_TIMEOUT_S) -> tuple[float, bool]:
    """(accuracy, timed_out): rewards.accuracy_reward in a grading process, given up after `timeout` seconds.

    Each calling thread borrows an idle grading process (a new one when none is idle, up to
    GRADER_PROCESSES), so concurrent threads grade in parallel. One that overruns is killed and the answer
    scores 0.0; the next call starts a fresh process.
    """
    global grade_timeouts
    with _grader_slots:
        with _graders_lock:
            grader = _idle_graders.pop() if _idle_graders else None
        if grader is None:
            grader = _Grader()
        try:
            accuracy = grader.accuracy(completion, answer, timeout)
        except (TimeoutError, EOFError, OSError, ValueError):
            grader.kill()
            with _graders_lock:
                grade_timeouts += 1
            return 0.0, True
        with _graders_lock:
            _idle_graders.append(grader)
        return accuracy, False


def compute_score(data_source=None, solution_str="", ground_truth="", extra_info=None, rouge_weight: float = 0.1,
                  timeout_s: float = SCORE_TIMEOUT_S, **kwargs) -> dict:
    """verl `custom_reward_function` (name `compute_score`):
    {"score": r, "acc": accuracy, "rouge": ROUGE-L-F, "grade_timeout": 1.0 if the check was given up}.

    r = accuracy(solution_str, ground_truth) + α · ROUGE-L-F(solution_str, extra_info["solution"]) with
    α = `rouge_weight` (set it with `+reward.custom_reward_function.reward_kwargs.rouge_weight=…`); no
    reference solution ⇒ accuracy only. extra_info["task"] = "multiple_choice" grades a letter A-D.
    Only the text after the last </think> is graded. Never raises on model output.

    verl calls this in executor threads, where math-verify's signal timeouts are off. There the equivalence
    check runs in a grading process and is bounded by `timeout_s` (`reward_kwargs.timeout_s`); an answer
    given up on scores accuracy 0 and grade_timeout 1 (logged by verl with the other keys). In the main
    thread it runs in place, under math-verify's own timeouts. ROUGE-L (bounded by rewards.ROUGE_MAX_TOKENS)
    and multiple choice (a pattern match) always run in place.
    """
    import rewards
    extra_info = extra_info or {}
    completion, answer = solution_str or "", str(ground_truth)
    reference, task = extra_info.get("solution") or None, extra_info.get("task") or "math"
    timed_out = False
    if task == "math" and threading.current_thread() is not threading.main_thread():
        accuracy, timed_out = bounded_accuracy(completion, answer, float(timeout_s))
        rouge = rewards.rouge_l_reward(completion, reference) if reference and float(rouge_weight) > 0 else 0.0
        parts = {"reward": accuracy + float(rouge_weight) * rouge, "accuracy": accuracy, "rouge": rouge}
    else:
        parts = rewards.reward(completion, answer, reference, float(rouge_weight), task)
    return {"score": parts["reward"], "acc": parts["accuracy"], "rouge": parts["rouge"],
            "grade_timeout": float(timed_out)}


# ===================================================================================================
# Data: data.py records → verl's parquet layout (the layout of verl's examples/data_preprocess)
# ===================================================================================================
def verl_rows(records: list[dict], data_source: str, split: str) -> list[dict]:
    """One verl row per record: chat prompt, rule-based reward with the gold answer, and the reference solution
    (for ROUGE-L) in extra_info, where verl hands it to `compute_score`."""
    return [{
        "data_source": data_source,
        "prompt": [{"role": "user", "content": r["prompt"]}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": r["answer"]},
        "extra_info": {"split": split, "index": i, "id": str(r.get("id", i)), "task": r.get("task", "math"),
                       "solution": r.get("solution") or ""},
    } for i, r in enumerate(records)]


def write_parquet(rows: list[dict], path: str) -> None:
    from datasets import Dataset                   # Arrow nested columns, as verl's own preprocessing scripts
    Dataset.from_list(rows).to_parquet(path)


def prepare(argv=None) -> dict:
    """`python verl_lampo.py prepare`: train and validation parquet files for verl (MATH train, MATH-500)."""
    import data
    parser = argparse.ArgumentParser(prog="verl_lampo.py prepare", description=prepare.__doc__)
    parser.add_argument("--dataset", default="math", help="training set as in train.py: math | gsm8k | toy | a Hub "
                        "id | a local file (default: math, the 7,500 MATH train problems with worked solutions)")
    parser.add_argument("--data_file", default=None, help="read the training set from this local .jsonl/.parquet")
    parser.add_argument("--val_benchmark", default="math500", choices=[b for b in data.BENCHMARKS],
                        help="validation set (default: math500)")
    parser.add_argument("--val_data_file", default=None, help="read the validation set from this local file")
    parser.add_argument("--limit", type=int, default=None, help="keep only the first N training records")
    parser.add_argument("--val_limit", type=int, default=None, help="keep only the first N validation records")
    parser.add_argument("--out", required=True, help="output folder: train.parquet and test.parquet")
    options = parser.parse_args(argv)
    train = data.load_train_dataset(options.dataset, data_file=options.data_file, limit=options.limit)
    val = data.load_benchmark(options.val_benchmark, data_file=options.val_data_file, limit=options.val_limit)
    os.makedirs(options.out, exist_ok=True)
    paths = {"train": os.path.join(options.out, "train.parquet"), "test": os.path.join(options.out, "test.parquet")}
    source = options.dataset                       # a local file: its name without the extension
    if os.path.sep in source:
        source = os.path.splitext(os.path.basename(source))[0]
    write_parquet(verl_rows(train, source, "train"), paths["train"])
    write_parquet(verl_rows(val, options.val_benchmark, "test"), paths["test"])
    print(f"wrote {len(train)} training rows to {paths['train']} and {len(val)} validation rows to {paths['test']}")
    return {"train": len(train), "test": len(val), **paths}


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "prepare":
        prepare(sys.argv[2:])
    else:
        print(__doc__.split("\n\n")[0] + "\n\nUsage: python verl_lampo.py prepare --dataset math --out DIR "
              "[--data_file F] [--val_benchmark math500] [--val_data_file F]\n(the estimator is registered by "
              "importing this module: see docs/verl.md)", file=sys.stderr)
        sys.exit(0 if len(sys.argv) > 1 and sys.argv[1] in ("-h", "--help") else 2)
