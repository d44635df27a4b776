"""Tests of trl_lampo.py against the installed TRL (requirements-trl.txt), CPU only, offline, no mocks of TRL.

    pip install torch==2.13.0 -r requirements-trl.txt && python -m pytest -q test_trl_lampo.py

Not collected by the core `python -m pytest` (pytest.ini's testpaths); `.ci/run` runs it in its own venv.
Every test builds toy.py's tiny Qwen3 (random weights, character tokenizer) in-process, runs real
LamPOTrainer code (TRL's generation or its `rollout_func` with fixed completions, TRL's gather, TRL's
loss), and compares the advantages with an oracle: rewards from the reward functions on the decoded
completions, ℓ from an independent forward pass of the same weights, A from lambdapo.pairwise_advantages
(or by hand). This file is also the worker of the two-process run (see the bottom).
"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")      # rollout_func is "experimental" in TRL 1.16

import lambdapo                                              # noqa: E402
import toy                                                   # noqa: E402
import trl_lampo                                             # noqa: E402
from trl_lampo import LamPOConfig, LamPOTrainer, LamPOVersionError   # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
G = 4
EOS_TEXT = toy.EOS


# ---------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------
def digit_reward(completions, **kwargs):
    """A cheap reward that varies between completions of a random model: digits in the text, mod 3."""
    return [float(sum(ch.isdigit() for ch in trl_lampo.completion_text(c)) % 3) for c in completions]


def boxed_reward(completions, answer, **kwargs):
    """1 for '\\boxed{<answer>}' exactly, 0 otherwise (the fixed completions below are built for it)."""
    return [float(trl_lampo.completion_text(c).strip() == f"\\boxed{{{a}}}") for c, a in zip(completions, answer)]


def length_reward(completions, **kwargs):
    return [len(trl_lampo.completion_text(c)) / 10 for c in completions]


class Recording(LamPOTrainer):
    """LamPOTrainer that keeps what each generation batch produced, and scores the completions right there
    (before the update changes the weights) with an independent forward: the oracle's ℓ."""

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        completion_ids = output["completion_ids"]
        lengths = completion_lengths(completion_ids, self._lampo_completion_ids)
        self.records = getattr(self, "records", [])
        self.records.append({
            "mode": "train" if self.model.training else "eval",
            "advantages": output["advantages"].detach().cpu().clone(),
            "old_per_token_logps": output.get("old_per_token_logps") is not None,
            "completion_mask": output["completion_mask"].cpu().clone(),
            "texts": self.processing_class.batch_decode(
                [ids[:n] for ids, n in zip(completion_ids.tolist(), lengths.tolist())], skip_special_tokens=True),
            "answers": [x["answer"] for x in inputs],
            "prompts": [x["prompt"][-1]["content"] for x in inputs],
            "lengths": lengths,
            "seq_logps": {mode: oracle_seq_logps(self.model, output, lengths, self.temperature, mode)
                          for mode in ("mean", "sum")},
            "token_logps": oracle_token_logps(self.model, output, lengths, self.temperature),
            "rank": self.accelerator.process_index,
        })
        return output


def completion_lengths(completion_ids, lists):
    """True lengths: of the token lists TRL produced (they end at the first EOS or at the length limit)."""
    return torch.tensor([len(ids) for ids in lists])


def oracle_token_logps(model, output, lengths, temperature):
    """Per-token log π_old by a plain forward (no TRL helper, no fused head): log-softmax(logits / T) of each
    completion token, every real token attended (also in truncated completions); 0 after the completion."""
    completion_ids = output["completion_ids"].cpu()
    T = completion_ids.shape[1]
    real = torch.arange(T)[None, :] < lengths[:, None]
    input_ids = torch.cat([output["prompt_ids"].cpu(), completion_ids], dim=1)
    attention_mask = torch.cat([output["prompt_mask"].cpu(), real.long()], dim=1)
    with torch.no_grad():
        logits = model(input_ids=input_ids.to(model.device), attention_mask=attention_mask.to(model.device)).logits
    logps = (logits[:, -T - 1:-1].float().cpu() / temperature).log_softmax(-1)
    return logps.gather(-1, completion_ids[..., None]).squeeze(-1) * real


def oracle_seq_logps(model, output, lengths, temperature, mode="mean"):
    """ℓ from `oracle_token_logps` over every real token, averaged or summed."""
    real = torch.arange(output["completion_ids"].shape[1])[None, :] < lengths[:, None]
    total = oracle_token_logps(model, output, lengths, temperature).sum(1)
    return total if mode == "sum" else total / real.sum(1).clamp_min(1)


def naive_lampo(rewards, seq_logps, tau):
    """The formula of docs/design.md §1 with two Python loops, for one group (lists of floats)."""
    out = []
    for i in range(len(rewards)):
        total = 0.0
        for j in range(len(rewards)):
            if i != j:
                s = (rewards[i] > rewards[j]) - (rewards[i] < rewards[j])
                x = -s * (seq_logps[i] - seq_logps[j]) / tau
                total += (rewards[i] - rewards[j]) * 2 / (1 + math.exp(-x))
        out.append(total / (len(rewards) - 1))
    return out


def toy_dataset(n, seed=0):
    return trl_lampo.to_trl_dataset([dict(r, task="math") for r in toy.train_records(n, seed)])


def make_trainer(tmp_path, reward_funcs=(digit_reward,), trainer_class=Recording, model_seed=0, dataset=None,
                 **overrides):
    tokenizer = toy.build_tokenizer()
    model = toy.build_model(tokenizer, seed=model_seed)
    settings = dict(output_dir=str(tmp_path / "out"), use_cpu=True, per_device_train_batch_size=8,
                    num_generations=G, max_completion_length=12, max_steps=1, learning_rate=1e-3,
                    logging_steps=1, report_to="none", save_strategy="no", seed=0, temperature=1.0,
                    dataloader_num_workers=0,
                    # transformers 5 turns bf16 autocast on by default, on CPU too: float32 unless a test asks
                    bf16=False)
    settings.update(overrides)
    rollout_func = settings.pop("rollout_func", None)
    eval_dataset = settings.pop("eval_dataset", None)
    return trainer_class(model=model, reward_funcs=list(reward_funcs), args=LamPOConfig(**settings),
                         train_dataset=dataset if dataset is not None else toy_dataset(16),
                         eval_dataset=eval_dataset, processing_class=tokenizer, rollout_func=rollout_func)


def fixed_rollout(completions_by_row, logprobs_by_row=None, env_tokens_by_row=None):
    """A TRL `rollout_func` whose completions are fixed: row k of each group (global position, so that one
    and two processes see the same completions) gets completions_by_row[k] (a text, EOS appended unless it
    ends with '…', which marks a truncated completion) and, if given, the per-token sampler log-prob
    logprobs_by_row[k]. With env_tokens_by_row, the first env_tokens_by_row[k] completion tokens of row k are
    an environment's (TRL's `env_mask` 0: in the context, not written by the model)."""

    def rollout(prompts, trainer):
        tokenizer = trainer.processing_class
        first_row = trainer.accelerator.process_index * len(prompts)
        prompt_ids, completion_ids, logprobs = [], [], []
        for i, prompt in enumerate(prompts):
            text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
            prompt_ids.append(tokenizer(text, add_special_tokens=False)["input_ids"])
            k = (first_row + i) % len(completions_by_row)
            completion = completions_by_row[k]
            truncated = completion.endswith("…")
            ids = tokenizer(completion.rstrip("…"), add_special_tokens=False)["input_ids"]
            ids = ids + ([] if truncated else [tokenizer.eos_token_id])
            completion_ids.append(ids)
            if logprobs_by_row is not None:
                logprobs.append([logprobs_by_row[k]] * len(ids))       # one float per completion token
        result = {"prompt_ids": prompt_ids, "completion_ids": completion_ids,
                  "logprobs": logprobs if logprobs_by_row is not None else None}
        if env_tokens_by_row is not None:
            first = [env_tokens_by_row[(first_row + i) % len(completions_by_row)] for i in range(len(prompts))]
            result["env_mask"] = [[0] * n + [1] * (len(ids) - n) for n, ids in zip(first, completion_ids)]
        return result

    return rollout


def first_train_record(trainer):
    return next(r for r in trainer.records if r["mode"] == "train")


# ---------------------------------------------------------------------------------------------------
# version gate and configuration errors
# ---------------------------------------------------------------------------------------------------
def test_trl_version_gate():
    import trl
    assert trl.__version__.startswith("1.16."), "requirements-trl.txt pins TRL 1.16.x"
    for ok in ("1.16.0", "1.16.3", "1.16.1.dev0", "1.16.0rc1"):
        trl_lampo.check_trl_version(ok)
    for bad in ("1.15.2", "1.17.0", "2.0.0", "0.27.0", "unknown"):
        with pytest.raises(LamPOVersionError) as error:
            trl_lampo.check_trl_version(bad)
        message = str(error.value)
        assert "\n" not in message and ">=1.16.0,<1.17" in message and bad in message


def test_config_errors_are_one_line(tmp_path):
    from trl import GRPOConfig
    base = dict(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    for bad, match in [(dict(lampo_tau=0.0), "lampo_tau"), (dict(lampo_seq_logp="max"), "lampo_seq_logp"),
                       (dict(scale_rewards="batch"), "scale_rewards"),
                       (dict(multi_objective_aggregation="normalize_then_sum"), "sum_then_normalize")]:
        with pytest.raises(ValueError, match=match):
            LamPOConfig(**base, **bad)
    assert LamPOConfig(**base).scale_rewards == "none" and LamPOConfig(**base).lampo_tau == 1.0
    assert LamPOConfig(**base, lampo_tau="inf").lampo_tau == math.inf
    tokenizer = toy.build_tokenizer()
    with pytest.raises(TypeError, match="LamPOConfig"):
        LamPOTrainer(model=toy.build_model(tokenizer), reward_funcs=[digit_reward], args=GRPOConfig(**base),
                     train_dataset=toy_dataset(8), processing_class=tokenizer)


def test_scale_rewards_and_relative_tau_agree_between_python_and_the_command_line(tmp_path):
    # GRPOConfig takes scale_rewards True/False for "group"/"none"; the launcher takes "true"/"false" too, and
    # both refuse "batch".
    base = dict(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    parser = trl_lampo.make_parser()
    for value, expected in [("true", "group"), ("false", "none"), ("group", "group"), ("none", "none")]:
        assert LamPOConfig(**base, scale_rewards=value).scale_rewards == expected
        _, args, _ = parser.parse_args_and_config(args=["--output_dir", str(tmp_path), "--use_cpu",
                                                        "--scale_rewards", value])
        assert args.scale_rewards == expected
    for value, expected in [(True, "group"), (False, "none")]:              # Python only (and YAML configs)
        assert LamPOConfig(**base, scale_rewards=value).scale_rewards == expected
    for value in ("batch", "True"):                                          # refused by both
        with pytest.raises(ValueError, match="scale_rewards"):
            LamPOConfig(**base, scale_rewards=value)
        result = subprocess.run([sys.executable, os.path.join(HERE, "trl_lampo.py"), "--output_dir", str(tmp_path),
                                 "--use_cpu", "--scale_rewards", value], capture_output=True, text=True, timeout=300,
                                env=dict(os.environ, HF_HUB_OFFLINE="1"))
        assert result.returncode == 2 and "scale_rewards" in result.stderr.splitlines()[-1]
    for flags, expected in [([], False), (["--lampo_relative_tau"], True), (["--lampo_relative_tau", "false"], False)]:
        _, args, _ = parser.parse_args_and_config(args=["--output_dir", str(tmp_path), "--use_cpu", *flags])
        assert args.lampo_relative_tau is expected
    with pytest.raises(ValueError, match="lampo_relative_tau"):
        LamPOConfig(**base, lampo_relative_tau="yes")


def documented_launch_command():
    """docs/trl.md's 8-GPU command: (install line, accelerate config file, trl_lampo.py's arguments)."""
    import re
    import shlex
    text = open(os.path.join(HERE, "docs", "trl.md"), encoding="utf-8").read()
    block = re.search(r"```bash\n(pip install [^\n]*)\n(accelerate launch .*?)\n```", text, re.DOTALL)
    install, launch = block.group(1), block.group(2).replace("\\\n", " ")
    config = re.search(r"accelerate_configs/(\w+\.yaml)", launch).group(1)
    return install, config, shlex.split(launch.split("trl_lampo.py", 1)[1])


def test_documented_launch_command_parses_and_its_install_line_names_what_it_uses():
    import trl
    install, config, args = documented_launch_command()
    # The accelerate config it names is DeepSpeed's, so the install line must install deepspeed (trl's extra).
    config_text = open(os.path.join(os.path.dirname(trl.__file__), "accelerate_configs", config)).read()
    assert "distributed_type: DEEPSPEED" in config_text
    extras = install.split('"trl[', 1)[1].split("]", 1)[0].split(",")
    assert "deepspeed" in extras and "vllm" in extras
    assert "-r requirements-trl.txt" in install
    # --report_to tensorboard: tensorboard on the same line.
    assert args[args.index("--report_to") + 1] == "tensorboard" and " tensorboard" in install.split("]", 1)[1]
    # The launcher's own parser takes every argument as written (plus --use_cpu: these tests run without a GPU, for
    # bf16); a flag that wants a value, such as --bf16, would stop it here.
    script_args, training_args, model_args = trl_lampo.make_parser().parse_args_and_config(args=args + ["--use_cpu"])
    assert training_args.lampo_tau == 1.0 and training_args.lampo_seq_logp == "mean" and training_args.use_vllm
    assert training_args.bf16 is True and training_args.report_to == ["tensorboard"]
    assert script_args.dataset == "math" and model_args.model_name_or_path == "Qwen/Qwen3-1.7B"
    # The rule the page states: TRL computes old log-probs here only for vLLM's importance-sampling correction.
    generate_every = training_args.steps_per_generation * training_args.num_iterations
    assert training_args.gradient_accumulation_steps % generate_every == 0
    assert training_args.vllm_importance_sampling_correction


# ---------------------------------------------------------------------------------------------------
# pinned values: fixed completions; the rollout's own log-probs are not π_old's and are not used
# ---------------------------------------------------------------------------------------------------
def test_pinned_advantages_from_fixed_completions_ignore_the_rollouts_logprobs(tmp_path):
    # Each prompt's 4 completions: right, wrong, wrong, right. The rollout also returns made-up per-token
    # log-probs (a sampler's). Without vLLM's importance-sampling correction TRL's π_old is the trainer's
    # own forward (`old_per_token_logps` absent: the loss uses its detached log-probs), and vLLM's
    # processed log-probs are those of the top-p/top-k-renormalised distribution anyway: ℓ must be
    # π_old's, i.e. the oracle's forward, not the rollout's numbers.
    records = [dict(r, task="math") for r in toy.train_records(2, seed=3)]
    answers = {r["answer"] for r in records}
    assert len(answers) == 2
    dataset = trl_lampo.to_trl_dataset([records[0]] * 2)           # one problem twice: one answer to box
    answer = records[0]["answer"]
    completions = [f"\\boxed{{{answer}}}", "\\boxed{0}", "no idea", f"\\boxed{{{answer}}}"]
    fake_logprobs = [-2.0, -1.0, -0.5, -0.1]
    trainer = make_trainer(tmp_path, [boxed_reward], dataset=dataset,
                           rollout_func=fixed_rollout(completions, fake_logprobs), lampo_tau=0.5)
    trainer.train()
    record = first_train_record(trainer)
    assert not record["old_per_token_logps"]
    rewards = [1.0, 0.0, 0.0, 1.0]
    # the formula by hand, for row 0 with ℓ = (−2, −1, −0.5, −0.1): pairs (0,1), (0,2) are misordered
    # (ℓ_0 lower): 2σ(2) and 2σ(3); (0,3) is a tie
    by_hand = (2 / (1 + math.exp(-1.0 / 0.5)) + 2 / (1 + math.exp(-1.5 / 0.5))) / 3
    assert naive_lampo(rewards, fake_logprobs, tau=0.5)[0] == pytest.approx(by_hand)
    seq_logps = record["seq_logps"]["mean"].view(-1, G)
    expected = torch.tensor([naive_lampo(rewards, row.tolist(), tau=0.5) for row in seq_logps]).reshape(-1)
    assert torch.allclose(record["advantages"], expected, atol=1e-5), (record["advantages"], expected)
    assert not torch.allclose(record["advantages"], torch.tensor(naive_lampo(rewards, fake_logprobs, 0.5) * 2),
                              atol=1e-3)
    logged = trainer.state.log_history[0]
    diagnostics = lambdapo.lampo_diagnostics(torch.tensor([rewards, rewards]), seq_logps, 0.5)
    assert logged["lampo/misordered_pairs"] == pytest.approx(diagnostics["lampo/misordered_pairs"])
    assert logged["lampo/seq_logp_std"] == pytest.approx(diagnostics["lampo/seq_logp_std"], abs=1e-5)
    assert math.isfinite(logged["loss"])


def test_a_changed_generate_tuple_fails_in_one_line(tmp_path):
    # hook 0 reads _generate's result by position: a TRL whose tuple has another length is refused there.
    from trl import GRPOTrainer

    class ShorterTuple(GRPOTrainer):                  # stands for a TRL release whose _generate changed
        def _generate(self, prompts):
            return super()._generate(prompts)[:7]

    class OnChangedTRL(LamPOTrainer, ShorterTuple):
        pass

    trainer = make_trainer(tmp_path, trainer_class=OnChangedTRL)
    with pytest.raises(LamPOVersionError) as error:
        trainer.train()
    message = str(error.value)
    assert "\n" not in message and "_generate" in message and "7 items" in message and "tool_mask" in message


# ---------------------------------------------------------------------------------------------------
# ℓ in each of TRL's configurations equals π_old's, and A equals lambdapo's on the same r and ℓ
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, trl_has_old_logps", [
    (dict(), False),                                        # rule 3: our own no-grad forward
    (dict(bf16=True), False),                               # the same under TrainingArguments' default bf16
    (dict(num_iterations=2), True),                         # rule 1: TRL computed old_per_token_logps
    (dict(per_device_train_batch_size=4, gradient_accumulation_steps=2, steps_per_generation=4,
          max_steps=2), True),                              # generation every 4 micro-steps, GA 2: rule 1
])
def test_real_generation_advantages_equal_lambdapo_on_oracle_rewards_and_seq_logps(tmp_path, overrides,
                                                                                  trl_has_old_logps):
    trainer = make_trainer(tmp_path, [digit_reward, length_reward], reward_weights=[1.0, 0.5], lampo_tau=0.3,
                           **overrides)
    params_before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    record = first_train_record(trainer)
    assert record["old_per_token_logps"] == trl_has_old_logps
    rewards = torch.tensor(digit_reward(record["texts"])) + 0.5 * torch.tensor(length_reward(record["texts"]))
    seq_logps = record["seq_logps"]["mean"]
    expected = lambdapo.pairwise_advantages(rewards.view(-1, G), seq_logps.view(-1, G), tau=0.3).reshape(-1)
    assert torch.allclose(record["advantages"], expected, atol=1e-5), (record["advantages"], expected)
    assert expected.abs().sum() > 0, "rewards should differ within some group"
    for group in range(len(rewards) // G):
        naive = naive_lampo(rewards[group * G:(group + 1) * G].tolist(), seq_logps[group * G:(group + 1) * G].tolist(),
                            0.3)
        assert torch.allclose(record["advantages"][group * G:(group + 1) * G], torch.tensor(naive), atol=1e-5)
    assert all(math.isfinite(h.get("loss", 0.0)) for h in trainer.state.log_history)
    assert any(not torch.equal(a, b) for a, b in zip(params_before, trainer.model.parameters())), "no update"
    logged = trainer.state.log_history[0]
    for key in ("lampo/weight_mean", "lampo/weight_std", "lampo/misordered_pairs", "lampo/seq_logp_std",
                "lampo/corr_rloo"):
        assert math.isfinite(logged[key])


def test_seq_logp_sum_tau_inf_and_group_scaling(tmp_path):
    trainer = make_trainer(tmp_path, [digit_reward], lampo_seq_logp="sum", lampo_tau=0.2, scale_rewards="group")
    trainer.train()
    record = first_train_record(trainer)
    rewards = torch.tensor(digit_reward(record["texts"])).view(-1, G)
    expected = lambdapo.pairwise_advantages(rewards, record["seq_logps"]["sum"].view(-1, G), 0.2, scale_by_std=True)
    assert torch.allclose(record["advantages"], expected.reshape(-1), atol=1e-5)

    trainer = make_trainer(tmp_path, [digit_reward], lampo_tau="inf")
    trainer.train()
    record = first_train_record(trainer)
    rewards = torch.tensor(digit_reward(record["texts"])).view(-1, G)
    rloo = rewards - (rewards.sum(1, keepdim=True) - rewards) / (G - 1)                  # r_i − mean_{j≠i} r_j
    assert torch.allclose(record["advantages"], rloo.reshape(-1), atol=1e-6)


def test_relative_tau_is_tau_times_the_batch_spread(tmp_path):
    trainer = make_trainer(tmp_path, [digit_reward], lampo_tau=0.5, lampo_relative_tau=True)
    trainer.train()
    record = first_train_record(trainer)
    rewards = torch.tensor(digit_reward(record["texts"])).view(-1, G)
    seq_logps = record["seq_logps"]["mean"].view(-1, G)
    spread = sum(float(row.std()) for row in seq_logps) / seq_logps.shape[0]      # mean within-group std
    tau_eff = 0.5 * spread
    assert lambdapo.relative_tau(seq_logps, 0.5) == pytest.approx(tau_eff, rel=1e-6)
    expected = lambdapo.pairwise_advantages(rewards, seq_logps, tau_eff).reshape(-1)
    assert torch.allclose(record["advantages"], expected, atol=1e-5), (record["advantages"], expected)
    assert not torch.allclose(expected, lambdapo.pairwise_advantages(rewards, seq_logps, 0.5).reshape(-1), atol=1e-4)
    assert trainer.state.log_history[0]["lampo/tau"] == pytest.approx(tau_eff, rel=1e-4)


# ---------------------------------------------------------------------------------------------------
# corner cases: truncated completions, unscorable ones, evaluation with G = 1
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_iterations", [1, 2])
def test_mask_truncated_completions_keep_their_place_and_real_seq_logp(tmp_path, num_iterations):
    # Rows 1 and 2 are cut off ("…": no EOS): TRL masks them out of the loss, and (with num_iterations 2)
    # computes their old log-probs without attending to them; LamPO recomputes those rows.
    completions = ["\\boxed{12}", "12+12+12+12…", "\\boxed{3}…", "99"]
    trainer = make_trainer(tmp_path, [length_reward], mask_truncated_completions=True, num_iterations=num_iterations,
                           rollout_func=fixed_rollout(completions))
    trainer.train()
    record = first_train_record(trainer)
    assert record["old_per_token_logps"] == (num_iterations == 2)
    mask = record["completion_mask"]
    assert mask[1].sum() == 0 and mask[2].sum() == 0 and mask[0].sum() > 0          # TRL cut the truncated rows
    rewards = torch.tensor(length_reward(record["texts"])).view(-1, G)
    expected = lambdapo.pairwise_advantages(rewards, record["seq_logps"]["mean"].view(-1, G), 1.0).reshape(-1)
    assert torch.allclose(record["advantages"], expected, atol=1e-5)
    assert torch.isfinite(record["advantages"]).all()


@pytest.mark.parametrize("num_iterations", [1, 2])
def test_environment_tokens_stay_out_of_seq_logp_also_in_truncated_completions(tmp_path, num_iterations):
    # A rollout with an environment mask (TRL's env_mask → tool_mask): the first tokens of rows 1 and 2 are
    # the environment's. ℓ is π_old's score of the tokens the model wrote, in every row; with
    # mask_truncated_completions TRL zeroes a truncated row's whole tool mask, which must not put the
    # environment's tokens back into that row's ℓ (row 2 is truncated, row 1 is not).
    completions = ["\\boxed{12}", "12+12+12=36", "7+7+7+7=28…", "99"]
    env_tokens = [0, 3, 4, 0]
    trainer = make_trainer(tmp_path, [length_reward], mask_truncated_completions=True, num_iterations=num_iterations,
                           rollout_func=fixed_rollout(completions, env_tokens_by_row=env_tokens), lampo_tau=0.5)
    trainer.train()
    record = first_train_record(trainer)
    assert record["completion_mask"][2].sum() == 0                         # TRL cut the truncated row
    T = record["token_logps"].shape[1]
    positions = torch.arange(T)[None, :]
    env = torch.tensor([env_tokens[k % G] for k in range(len(record["lengths"]))])
    model_written = (positions < record["lengths"][:, None]) & (positions >= env[:, None])
    seq_logps = (record["token_logps"] * model_written).sum(1) / model_written.sum(1)
    rewards = torch.tensor(length_reward(record["texts"])).view(-1, G)
    expected = lambdapo.pairwise_advantages(rewards, seq_logps.view(-1, G), 0.5).reshape(-1)
    assert torch.allclose(record["advantages"], expected, atol=1e-5), (record["advantages"], expected)


def test_unscorable_completions_leave_their_group_and_get_zero(tmp_path):
    # Two reward functions: `maybe_a` returns None on rows 1 and 2; `maybe_b` on rows 2 and 3. Row 2 is then
    # unscorable (every function None): A = 0, and its group is the other three. Row 1 counts maybe_b only.
    def maybe_a(completions, **kwargs):
        return [None if i % G in (1, 2) else 1.0 + (i % G) for i in range(len(completions))]

    def maybe_b(completions, **kwargs):
        return [None if i % G in (2, 3) else 0.5 * (i % G) for i in range(len(completions))]

    trainer = make_trainer(tmp_path, [maybe_a, maybe_b], reward_weights=[1.0, 2.0], lampo_tau=0.7)
    trainer.train()
    record = first_train_record(trainer)
    seq_logps = record["seq_logps"]["mean"].view(-1, G)
    rewards = [1.0 + 0.0, 0.0 + 2.0 * 0.5, None, 4.0]                    # rows 0..3 of every group
    for group in range(seq_logps.shape[0]):
        got = record["advantages"][group * G:(group + 1) * G]
        scored = [0, 1, 3]
        expected = naive_lampo([rewards[k] for k in scored], [seq_logps[group, k].item() for k in scored], 0.7)
        assert torch.allclose(got[scored], torch.tensor(expected), atol=1e-5)
        assert got[2] == 0.0
    assert all(math.isfinite(v) for h in trainer.state.log_history for k, v in h.items()
               if isinstance(v, float) and (k.startswith("lampo/") or k == "loss"))


class CountingForwards(Recording):
    """Recording that counts, per generation batch, the forward chunks of TRL's log-prob helper run while the
    batch is generated and scored (TRL's own old log-probs, if any, and LamPO's ℓ forward)."""

    def _generate_and_score_completions(self, inputs):
        self.chunks = getattr(self, "chunks", [])
        self.chunks.append(0)
        self._counting = True
        try:
            return super()._generate_and_score_completions(inputs)
        finally:
            self._counting = False

    def _get_per_token_logps_and_entropies(self, model, input_ids, *args, batch_size=None, **kwargs):
        if getattr(self, "_counting", False):
            self.chunks[-1] += math.ceil(input_ids.size(0) / (batch_size or input_ids.size(0)))
        return super()._get_per_token_logps_and_entropies(model, input_ids, *args, batch_size=batch_size, **kwargs)


@pytest.mark.parametrize("num_generations_eval", [1, 2])
def test_evaluation_with_few_generations_has_no_nan(tmp_path, num_generations_eval):
    trainer = make_trainer(tmp_path, [digit_reward], eval_dataset=toy_dataset(4, seed=9), eval_strategy="steps",
                           eval_steps=1, per_device_eval_batch_size=4, num_generations_eval=num_generations_eval,
                           trainer_class=CountingForwards)
    metrics = trainer.evaluate()
    assert all(math.isfinite(v) for v in metrics.values() if isinstance(v, float)), metrics
    evals = [r for r in trainer.records if r["mode"] == "eval"]
    assert evals
    # TRL computes no old log-probs here, so the only forward while scoring is LamPO's ℓ: none for G = 1.
    assert trainer.chunks == [0 if num_generations_eval == 1 else 1] * len(evals)
    for record in evals:
        if num_generations_eval == 1:
            assert (record["advantages"] == 0).all()                       # nobody to compare with
        else:
            rewards = torch.tensor(digit_reward(record["texts"])).view(-1, 2)
            expected = lambdapo.pairwise_advantages(rewards, record["seq_logps"]["mean"].view(-1, 2), 1.0)
            assert torch.allclose(record["advantages"], expected.reshape(-1), atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# the project's rewards and the command line (TRL's parser, data.py records, LoRA through peft)
# ---------------------------------------------------------------------------------------------------
def test_project_reward_functions():
    completions = [[{"role": "assistant", "content": "<think>7?</think>so \\boxed{12}"}], "\\boxed{13}"]
    assert trl_lampo.accuracy(completions, answer=["12", "12"], task=["math", "math"]) == [1.0, 0.0]
    rouge = trl_lampo.rouge_l(completions, solution=["so \\boxed{12}", ""])
    assert rouge[0] == 1.0 and rouge[1] == 0.0                            # no reference: 0 (accuracy only)


def test_command_line_one_step_with_lora(tmp_path):
    tokenizer = toy.build_tokenizer()
    toy.build_model(tokenizer).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    command = [sys.executable, os.path.join(HERE, "trl_lampo.py"), "--model_name_or_path", str(tmp_path / "model"),
               "--dataset", "toy", "--limit", "8", "--output_dir", str(tmp_path / "run"), "--max_steps", "1",
               "--num_generations", "4", "--per_device_train_batch_size", "8", "--max_completion_length", "16",
               "--use_cpu", "--report_to", "none", "--save_strategy", "no", "--logging_steps", "1",
               "--lampo_tau", "0.5", "--use_peft", "--lora_r", "4", "--lora_target_modules", "q_proj", "v_proj"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=HERE,
                            env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "lampo/weight_mean" in result.stdout + result.stderr
    assert (tmp_path / "run" / "adapter_config.json").exists()            # LoRA adapters were trained and saved


def test_help_works_offline_and_explains_lampo_options():
    result = subprocess.run([sys.executable, os.path.join(HERE, "trl_lampo.py"), "--help"], capture_output=True,
                            text=True, timeout=300, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert result.returncode == 0, result.stderr[-2000:]
    for text in ("--lampo_tau", "RLOO", "--lampo_seq_logp", "--rouge_weight", "--use_peft", "--use_vllm",
                 "--dataset"):
        assert text in result.stdout


def test_bench_runs_on_cpu():
    result = trl_lampo.bench(["--shape", "tiny", "--prompts", "2", "--num_generations", "2",
                              "--max_completion_length", "8", "--steps", "2"])
    assert result["step_seconds"] > 0 and result["peak_memory_gib"] > 0 and "lampo/corr_rloo" in result["lampo"]


# ---------------------------------------------------------------------------------------------------
# two processes (gloo, CPU): groups straddle processes; advantages equal the single-process ones
# ---------------------------------------------------------------------------------------------------
TWO_PROCESS_COMPLETIONS = ["\\boxed{1}", "12+3=15", "\\boxed{22}", "7"]


def equal_length_dataset(n):
    """Toy prompts of one length. Each process left-pads its rows to its own longest prompt, so with unequal
    lengths the one- and two-process forwards see differently padded tensors (equal in exact arithmetic, not
    always to the last bit); with equal lengths nobody pads and the comparison can be tight."""
    records = [dict(r, task="math") for r in toy.train_records(400, seed=5)]
    length = max(set(len(r["prompt"]) for r in records), key=[len(r["prompt"]) for r in records].count)
    return trl_lampo.to_trl_dataset([r for r in records if len(r["prompt"]) == length][:n])


def run_fixed(tmp_path, per_device):
    """One step with fixed completions on 12 rows = 3 groups; returns this process's record."""
    trainer = make_trainer(tmp_path, [digit_reward, length_reward], reward_weights=[1.0, 0.3],
                           per_device_train_batch_size=per_device, lampo_tau=0.4,
                           rollout_func=fixed_rollout(TWO_PROCESS_COMPLETIONS), dataset=equal_length_dataset(24))
    trainer.train()
    return first_train_record(trainer)


def test_two_processes_give_the_single_process_advantages(tmp_path):
    single = run_fixed(tmp_path / "single", per_device=12)
    out = tmp_path / "two"
    out.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         os.path.join(HERE, "test_trl_lampo.py"), str(out)],
        capture_output=True, text=True, timeout=600, cwd=HERE, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-4000:])
    parts = [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [p["world_size"] for p in parts] == [2, 2]
    assert len(parts[0]["advantages"]) == len(parts[1]["advantages"]) == 6     # group 1 = rows 4..7 straddles
    two = torch.tensor(parts[0]["advantages"] + parts[1]["advantages"])
    texts = parts[0]["texts"] + parts[1]["texts"]
    assert texts == single["texts"] and parts[0]["prompts"] + parts[1]["prompts"] == single["prompts"]
    assert torch.allclose(two, single["advantages"], atol=1e-5), (two, single["advantages"])
    # Both equal lambdapo on the oracle's rewards and ℓ (the two-process ℓ: each process's own forward).
    rewards = torch.tensor(digit_reward(texts)) + 0.3 * torch.tensor(length_reward(texts))
    seq_logps = torch.tensor(parts[0]["seq_logps"] + parts[1]["seq_logps"])
    expected = lambdapo.pairwise_advantages(rewards.view(-1, G), seq_logps.view(-1, G), 0.4)
    assert torch.allclose(two, expected.reshape(-1), atol=1e-5)
    assert expected[1].abs().sum() > 0                    # the straddling group has a signal, and it is not RLOO's
    assert not torch.allclose(expected[1], lambdapo.rloo_advantages(rewards.view(-1, G))[1])


class ImagesOnRankZero(CountingForwards):
    """Rank 0's batches carry a vision-language key (`num_images`, None: the helper's default, so the text model
    runs unchanged); rank 1's are text only. As with a VLM whose batches have images on some processes only."""

    def _lampo_sequence_scores(self, output, mode):
        if self.accelerator.process_index == 0:
            output = dict(output, num_images=None)
        return super()._lampo_sequence_scores(output, mode)


# 12 rows = 3 groups; row 7 (on rank 1) is truncated, so with TRL's old log-probs only that row is recomputed
MIXED_COMPLETIONS = ["\\boxed{1}", "12+3=15", "\\boxed{22}", "7", "5", "6+6", "\\boxed{8}", "99+99+99…",
                     "\\boxed{3}", "41", "0", "2+2=4"]


def test_two_processes_run_the_same_forward_chunks_with_images_on_one(tmp_path):
    # mask_truncated_completions + TRL's old log-probs (GA 3 % (3 generations × 2 iterations) != 0): rank 1 has a
    # cut row to recompute; rank 0 has "images", whose rows are recomputed whole. Both must then run the same
    # number of forward chunks, or ZeRO-3/FSDP (parameters gathered inside each forward) would hang.
    out = tmp_path / "two"
    out.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         os.path.join(HERE, "test_trl_lampo.py"), str(out), "mixed"],
        capture_output=True, text=True, timeout=600, cwd=HERE, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-4000:])
    parts = [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert parts[0]["chunks"] == parts[1]["chunks"], parts
    assert parts[0]["chunks"][0] == 3 + 3          # TRL's old log-probs (6 rows / 2) + all 6 rows again
    assert all(math.isfinite(a) for p in parts for a in p["advantages"])


def _two_process_worker(out_dir, mode="fixed"):
    """torchrun worker: 2 processes × 6 rows, gloo on CPU (accelerate picks it up from torchrun's env)."""
    from pathlib import Path
    work = Path(out_dir) / f"work{os.environ['RANK']}"
    if mode == "mixed":
        trainer = make_trainer(work, [length_reward], trainer_class=ImagesOnRankZero, per_device_train_batch_size=2,
                               gradient_accumulation_steps=3, num_iterations=2, mask_truncated_completions=True,
                               rollout_func=fixed_rollout(MIXED_COMPLETIONS), dataset=equal_length_dataset(24))
        trainer.train()
        record = first_train_record(trainer)
        extra = {"chunks": trainer.chunks}
    else:
        record, extra = run_fixed(work, per_device=6), {}
    Path(out_dir, f"rank{record['rank']}.json").write_text(json.dumps({
        "world_size": int(os.environ["WORLD_SIZE"]), "advantages": record["advantages"].tolist(),
        "texts": record["texts"], "prompts": record["prompts"], "seq_logps": record["seq_logps"]["mean"].tolist(),
        **extra}))


if __name__ == "__main__":
    _two_process_worker(*sys.argv[1:])
