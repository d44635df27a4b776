"""Tests of verl_lampo.py against the installed verl (requirements-verl.txt), CPU only, offline, no mocks of verl.

    pip install torch==2.13.0 -r requirements-verl.txt && python -m pytest -q test_verl_lampo.py

Not collected by the core `python -m pytest` (pytest.ini's testpaths); `.ci/run` runs it in its own venv.
The estimator is exercised through verl's real `compute_advantage(data, "lampo", config=…)` on a real
DataProto (shuffled, ragged groups, padding rows) and compared with a two-loop oracle of docs/design.md §1;
the parquet files are read back by verl's own RLHFDataset with a tokenizer.
"""

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import verl_lampo  # noqa: F401  (registers "lampo")
from verl import DataProto
from verl.trainer.ppo import core_algos
from verl.trainer.ppo.ray_trainer import compute_advantage
from omegaconf import OmegaConf

import lambdapo
import toy

HERE = os.path.dirname(os.path.abspath(__file__))


# ---------------------------------------------------------------------------------------------------
# an independent oracle: docs/design.md §1 with Python loops over uid groups
# ---------------------------------------------------------------------------------------------------
def oracle(rewards, seq_logps, uids, real, tau, scale_by_std=False):
    out = [0.0] * len(rewards)
    for uid in set(uids):
        members = [k for k in range(len(rewards)) if uids[k] == uid and real[k]]
        if len(members) < 2:
            continue
        for i in members:
            total = 0.0
            for j in members:
                if i != j:
                    s = (rewards[i] > rewards[j]) - (rewards[i] < rewards[j])
                    w = 1.0 if tau == math.inf else 2 / (1 + math.exp(s * (seq_logps[i] - seq_logps[j]) / tau))
                    total += (rewards[i] - rewards[j]) * w
            out[i] = total / (len(members) - 1)
        if scale_by_std:
            values = [rewards[k] for k in members]
            mean = sum(values) / len(values)
            std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
            for i in members:
                out[i] /= std + 1e-6
    return out


def make_batch(seed=0, sizes=(4, 3, 1, 5, 2), padding_rows=3, T=7):
    """Rows of several prompts, shuffled; groups of different sizes; `padding_rows` rows with an empty response
    mask (verl's padding) that reuse an existing uid; outcome reward on each row's last real token."""
    g = torch.Generator().manual_seed(seed)
    uids, lengths = [], []
    for group, size in enumerate(sizes):
        uids += [f"uid-{group}-{seed}"] * size
        lengths += torch.randint(1, T + 1, (size,), generator=g).tolist()
    uids += [uids[0]] * padding_rows
    lengths += [0] * padding_rows
    order = torch.randperm(len(uids), generator=g)
    uids = [uids[k] for k in order]
    lengths = torch.tensor(lengths)[order]
    n = len(uids)
    response_mask = (torch.arange(T)[None, :] < lengths[:, None]).float()               # (n, T)
    scores = torch.randint(0, 3, (n,), generator=g).float() / 2                          # r ∈ {0, .5, 1}
    token_level_rewards = torch.zeros(n, T)
    last = (lengths - 1).clamp_min(0)
    token_level_rewards[torch.arange(n), last] = scores * (lengths > 0)
    old_log_probs = -torch.rand(n, T, generator=g) * 3 * response_mask                  # only masked tokens count
    data = DataProto.from_dict(tensors={"token_level_rewards": token_level_rewards, "response_mask": response_mask,
                                        "old_log_probs": old_log_probs},
                               non_tensors={"uid": np.array(uids, dtype=object)})
    return data, uids, lengths


def expected_advantages(data, uids, lengths, tau, seq_logp="mean", scale_by_std=False):
    batch = data.batch
    rewards = batch["token_level_rewards"].sum(-1).tolist()
    mask = batch["response_mask"]
    total = (batch["old_log_probs"] * mask).sum(-1)
    seq_logps = (total if seq_logp == "sum" else total / mask.sum(-1).clamp_min(1)).tolist()
    return torch.tensor(oracle(rewards, seq_logps, uids, (lengths > 0).tolist(), tau, scale_by_std))


# ---------------------------------------------------------------------------------------------------
# the estimator through verl's real compute_advantage
# ---------------------------------------------------------------------------------------------------
def test_importing_registers_lampo():
    assert core_algos.get_adv_estimator_fn("lampo") is verl_lampo.compute_lampo_outcome_advantage
    verl_lampo.register()                                    # idempotent (verl may load the file twice)


@pytest.mark.parametrize("options", [
    dict(),                                                  # defaults: τ = 1, mean, no std scaling
    dict(lampo_tau=0.25),
    dict(lampo_tau=3.0, lampo_seq_logp="sum"),
    dict(lampo_tau=0.5, lampo_scale_by_std=True),
])
@pytest.mark.parametrize("seed", [0, 1])
def test_compute_advantage_on_shuffled_ragged_groups_with_padding(options, seed):
    data, uids, lengths = make_batch(seed)
    config = OmegaConf.create({"adv_estimator": "lampo", "gamma": 1.0, "lam": 1.0, **options})
    out = compute_advantage(data, adv_estimator="lampo", config=config)
    advantages = out.batch["advantages"]                                                  # (n, T)
    expected = expected_advantages(data, uids, lengths, options.get("lampo_tau", 1.0),
                                   options.get("lampo_seq_logp", "mean"), options.get("lampo_scale_by_std", False))
    mask = data.batch["response_mask"]
    assert torch.allclose(advantages, expected[:, None] * mask, atol=1e-5), (advantages[:, 0], expected)
    assert torch.equal(out.batch["returns"], advantages)
    assert torch.isfinite(advantages).all()
    assert (advantages[lengths == 0] == 0).all()                                          # padding rows
    singleton = [k for k, u in enumerate(uids) if uids.count(u) == 1]
    assert (advantages[singleton] == 0).all()                                             # a group of one
    # per token: A_i on every real response token, 0 after the response
    for row in range(len(uids)):
        n = int(lengths[row])
        assert torch.allclose(advantages[row, :n], advantages[row, :1].expand(n)) and (advantages[row, n:] == 0).all()
    assert expected.abs().sum() > 0


def test_lampo_with_tau_inf_is_verls_own_rloo():
    # verl's RLOO counts a padding row as a group member and returns a lone row's reward, so compare on
    # groups of ≥ 2 real rows only.
    data, uids, lengths = make_batch(3, sizes=(4, 3, 5, 2), padding_rows=0)
    lampo = compute_advantage(data, adv_estimator="lampo", config=OmegaConf.create({"lampo_tau": "inf"}))
    data, _, _ = make_batch(3, sizes=(4, 3, 5, 2), padding_rows=0)
    rloo = compute_advantage(data, adv_estimator="rloo", config=OmegaConf.create({}))
    assert torch.allclose(lampo.batch["advantages"], rloo.batch["advantages"], atol=1e-5)


def test_algo_config_dataclass_and_verl_grpo_sign():
    # verl's own AlgoConfig (no lampo_* fields: the defaults apply) works as config too.
    from verl.trainer.config import AlgoConfig
    data, uids, lengths = make_batch(4)
    out = compute_advantage(data, adv_estimator="lampo", config=AlgoConfig(adv_estimator="lampo"))
    expected = expected_advantages(data, uids, lengths, 1.0)
    assert torch.allclose(out.batch["advantages"][:, 0] * (lengths > 0), expected * (lengths > 0), atol=1e-5)


def test_multi_trajectory_path_of_the_v1_trainer():
    # verl's default (v1) trainer reaches compute_advantage through compute_advantage_for_multi_trajectories.
    from verl.trainer.ppo.v1.utils import compute_advantage_for_multi_trajectories
    data, uids, lengths = make_batch(5, padding_rows=0)
    keys = [f"{u}_{k}_0" for k, u in enumerate(uids)]            # "{uid}_{session}_{output}": one output each
    out = compute_advantage_for_multi_trajectories(data, batch_keys=keys, adv_estimator="lampo",
                                                   config=OmegaConf.create({"lampo_tau": 0.7}))
    expected = expected_advantages(data, uids, lengths, 0.7)
    assert torch.allclose(out.batch["advantages"][:, 0], expected, atol=1e-5)


def test_relative_tau_is_tau_times_the_mean_within_group_spread():
    # τ_eff = τ · mean over groups of ≥ 2 real rows of stdev(ℓ), computed here with the statistics module.
    import statistics
    data, uids, lengths = make_batch(8)
    mask = data.batch["response_mask"]
    seq_logps = ((data.batch["old_log_probs"] * mask).sum(-1) / mask.sum(-1).clamp_min(1)).tolist()
    stds = []
    for uid in dict.fromkeys(uids):
        members = [seq_logps[k] for k in range(len(uids)) if uids[k] == uid and lengths[k] > 0]
        if len(members) >= 2:
            stds.append(statistics.stdev(members))
    tau_eff = 0.5 * sum(stds) / len(stds)
    step_globals = {"__name__": "verl.trainer.ppo.fake_step", "compute_advantage": compute_advantage,
                    "OmegaConf": OmegaConf}
    exec("def step(data, options):\n    metrics = {}\n"
         "    out = compute_advantage(data, adv_estimator='lampo', config=OmegaConf.create(options))\n"
         "    return out, metrics\n", step_globals)
    out, metrics = step_globals["step"](data, {"lampo_tau": 0.5, "lampo_relative_tau": True})
    expected = expected_advantages(data, uids, lengths, tau_eff)
    assert torch.allclose(out.batch["advantages"][:, 0] * (lengths > 0), expected * (lengths > 0), atol=1e-5)
    assert metrics["lampo/tau"] == pytest.approx(tau_eff, rel=1e-5)
    assert not torch.allclose(expected, expected_advantages(data, uids, lengths, 0.5), atol=1e-3)   # τ matters


def test_unknown_lampo_keys_and_bad_values_are_refused_in_one_line():
    # `+algorithm.lampo_taus=0.5` (a typo) composed by verl's own hydra config: refused, not swallowed.
    from hydra import compose, initialize_config_module
    with initialize_config_module(config_module="verl.trainer.config", version_base=None):
        config = compose(config_name="ppo_trainer", overrides=["algorithm.adv_estimator=lampo",
                                                                 "+algorithm.lampo_taus=0.5"])
    with pytest.raises(ValueError) as error:
        compute_advantage(make_batch(9)[0], adv_estimator="lampo", config=config.algorithm)
    message = str(error.value)
    assert "\n" not in message and "algorithm.lampo_taus" in message and "algorithm.lampo_tau," in message
    fn = core_algos.get_adv_estimator_fn("lampo")
    batch = make_batch(9)[0].batch
    call = dict(token_level_rewards=batch["token_level_rewards"], response_mask=batch["response_mask"],
                index=make_batch(9)[0].non_tensor_batch["uid"], old_log_probs=batch["old_log_probs"])
    for bad, match in [({"lampo": {"tau": 0.5}}, "algorithm.lampo;"), ({"lampo_seq_logp": "max"}, "lampo_seq_logp"),
                       ({"lampo_scale_by_std": "flase"}, "lampo_scale_by_std"), ({"lampo_tau": "abc"}, "lampo_tau"),
                       ({"lampo_relative_tau": 2}, "lampo_relative_tau"),
                       ({"rollout_correction": {"rollout_rs": "token_k1", "bypass_mode": False}}, "rollout_rs")]:
        with pytest.raises(ValueError, match=match) as error:
            fn(**call, config=OmegaConf.create(bad))                             # from outside compute_advantage
        assert "\n" not in str(error.value)
    # Rollout correction with IS weights only, or in bypass mode, leaves the response mask alone: accepted.
    for fine in ({"rollout_correction": {"rollout_is": "token", "rollout_rs": None}},
                 {"rollout_correction": {"rollout_rs": "token_k1", "bypass_mode": True}},
                 {"lampo_scale_by_std": "true", "lampo_relative_tau": "false", "norm_adv_by_std_in_grpo": False}):
        fn(**call, config=OmegaConf.create(fine))
    # verl's own default algorithm config (norm_adv_by_std_in_grpo true and rollout_correction present) is fine.
    with initialize_config_module(config_module="verl.trainer.config", version_base=None):
        config = compose(config_name="ppo_trainer", overrides=["algorithm.adv_estimator=lampo"])
    compute_advantage(make_batch(9)[0], adv_estimator="lampo", config=config.algorithm)


def test_old_log_probs_from_the_batch_keyword_outside_compute_advantage():
    # A later verl passes `batch=data.batch` to estimators that accept it: used, with no frame to read.
    data, uids, lengths = make_batch(10)
    fn = core_algos.get_adv_estimator_fn("lampo")
    advantages, returns = fn(token_level_rewards=data.batch["token_level_rewards"],
                             response_mask=data.batch["response_mask"], index=data.non_tensor_batch["uid"],
                             config=OmegaConf.create({"lampo_tau": 0.4}), batch=data.batch,
                             non_tensor_batch=data.non_tensor_batch)
    expected = expected_advantages(data, uids, lengths, 0.4)
    assert torch.allclose(advantages[:, 0] * (lengths > 0), expected * (lengths > 0), atol=1e-5)
    # old_log_probs= wins over the batch's (the batch here holds other log-probs).
    other = -torch.rand(data.batch["old_log_probs"].shape, generator=torch.Generator().manual_seed(1)) * 3
    given, _ = fn(token_level_rewards=data.batch["token_level_rewards"], response_mask=data.batch["response_mask"],
                  index=data.non_tensor_batch["uid"], config=None, old_log_probs=data.batch["old_log_probs"],
                  batch={"old_log_probs": other})
    assert torch.allclose(given[:, 0] * (lengths > 0), expected_advantages(data, uids, lengths, 1.0) * (lengths > 0),
                          atol=1e-5)


def multi_output_batch(seed=12, T=6):
    """Two prompts × 3 rollouts; some rollouts of a multi-turn agent loop wrote 2 or 3 outputs (rows), each
    keyed "{uid}_{session}_{output}", the final output's reward copied to the others, rows shuffled."""
    g = torch.Generator().manual_seed(seed)
    outputs = {("p0", 0): 1, ("p0", 1): 3, ("p0", 2): 1, ("p1", 0): 2, ("p1", 1): 1, ("p1", 2): 2}
    final_reward = {key: float(k % 3) / 2 for k, key in enumerate(outputs)}       # 0, .5, 1, 0, .5, 1
    rows = [(uid, session, out) for (uid, session), count in outputs.items() for out in range(count)]
    rows = [rows[k] for k in torch.randperm(len(rows), generator=g)]
    lengths = torch.randint(1, T + 1, (len(rows),), generator=g)
    response_mask = (torch.arange(T)[None, :] < lengths[:, None]).float()
    token_level_rewards = torch.zeros(len(rows), T)
    token_level_rewards[torch.arange(len(rows)), lengths - 1] = torch.tensor([final_reward[r[:2]] for r in rows])
    old_log_probs = -torch.rand(len(rows), T, generator=g) * 3 * response_mask
    data = DataProto.from_dict(tensors={"token_level_rewards": token_level_rewards, "response_mask": response_mask,
                                        "old_log_probs": old_log_probs},
                               non_tensors={"uid": np.array([r[0] for r in rows], dtype=object)})
    keys = [f"{uid}_{session}_{out}" for uid, session, out in rows]
    # the oracle, per rollout: final output's reward; ℓ = all its tokens' log-probs / its token count
    sessions = list(outputs)
    logp = {key: sum((old_log_probs[k] * response_mask[k]).sum().item() for k, r in enumerate(rows) if r[:2] == key)
            for key in sessions}
    count = {key: sum(response_mask[k].sum().item() for k, r in enumerate(rows) if r[:2] == key) for key in sessions}
    return data, rows, keys, sessions, final_reward, {key: logp[key] / count[key] for key in sessions}


def test_multi_output_rollouts_count_once_in_their_group():
    data, rows, keys, sessions, reward, seq_logp = multi_output_batch()
    from verl.trainer.ppo.v1.utils import compute_advantage_for_multi_trajectories
    out = compute_advantage_for_multi_trajectories(data, batch_keys=keys, adv_estimator="lampo",
                                                   config=OmegaConf.create({"lampo_tau": 0.6}))
    uids = [key[0] for key in sessions]
    per_session = oracle([reward[key] for key in sessions], [seq_logp[key] for key in sessions], uids,
                         [True] * len(sessions), 0.6)
    expected = torch.tensor([per_session[sessions.index(r[:2])] for r in rows])
    mask = data.batch["response_mask"]
    assert torch.allclose(out.batch["advantages"], expected[:, None] * mask, atol=1e-5)
    # each group has 3 rollouts (G = 3), not 5 or 4 rows: the row-level answer differs
    row_level = expected_advantages(multi_output_batch()[0], [r[0] for r in rows],
                                    mask.sum(-1).long(), 0.6)
    assert not torch.allclose(expected, row_level, atol=1e-3)
    # the same, called directly with batch_keys= (an estimator call outside verl's trainer)
    fn = core_algos.get_adv_estimator_fn("lampo")
    direct, _ = fn(token_level_rewards=data.batch["token_level_rewards"], response_mask=mask,
                   index=data.non_tensor_batch["uid"], config=OmegaConf.create({"lampo_tau": 0.6}),
                   old_log_probs=data.batch["old_log_probs"], batch_keys=keys)
    assert torch.allclose(direct, expected[:, None] * mask, atol=1e-5)
    with pytest.raises(ValueError, match="session"):
        verl_lampo.sessions_from_keys(["p0-0-0"], 1)


def test_diagnostics_reach_the_calling_steps_metrics():
    # A verl trainer step holds a local `metrics` dict a few frames above compute_advantage; the estimator
    # adds lampo/* to it. Here the step is a function compiled in a module named like verl's.
    data, uids, lengths = make_batch(6)
    step_globals = {"__name__": "verl.trainer.ppo.fake_step", "compute_advantage": compute_advantage,
                    "OmegaConf": OmegaConf}
    exec("def step(data):\n    metrics = {}\n"
         "    compute_advantage(data, adv_estimator='lampo', config=OmegaConf.create({'lampo_tau': 0.5}))\n"
         "    return metrics\n", step_globals)
    metrics = step_globals["step"](data)
    assert set(metrics) == {"lampo/weight_mean", "lampo/weight_std", "lampo/misordered_pairs", "lampo/seq_logp_std",
                            "lampo/corr_rloo", "lampo/tau"}
    assert metrics["lampo/tau"] == 0.5
    assert all(isinstance(v, float) and math.isfinite(v) for v in metrics.values())


def test_clear_errors_outside_verls_compute_advantage_and_version_gate():
    data, uids, lengths = make_batch(7)
    batch = data.batch
    fn = core_algos.get_adv_estimator_fn("lampo")
    with pytest.raises(verl_lampo.LamPOVersionError) as error:
        fn(token_level_rewards=batch["token_level_rewards"], response_mask=batch["response_mask"],
           index=data.non_tensor_batch["uid"], config=None)
    message = str(error.value)
    assert "\n" not in message and "0.9.1" in message and "old_log_probs" in message and "test_verl_lampo" in message
    # The batch lacks old_log_probs: the same one-line error, saying so.
    del data.batch["old_log_probs"]
    with pytest.raises(verl_lampo.LamPOVersionError, match="no old_log_probs"):
        compute_advantage(data, adv_estimator="lampo", config=OmegaConf.create({}))
    # Passing them explicitly works anywhere (and is what a later verl that passes them would do).
    advantages, _ = fn(token_level_rewards=batch["token_level_rewards"], response_mask=batch["response_mask"],
                       index=data.non_tensor_batch["uid"], config=None,
                       old_log_probs=make_batch(7)[0].batch["old_log_probs"])
    assert torch.allclose(advantages[:, 0] * (lengths > 0), expected_advantages(make_batch(7)[0], uids, lengths, 1.0)
                          * (lengths > 0), atol=1e-5)
    with pytest.raises(ValueError, match="lampo_tau"):
        compute_advantage(make_batch(7)[0], adv_estimator="lampo", config=OmegaConf.create({"lampo_tau": 0}))
    for bad in ("0.8.0", "0.10.0", "1.0.0"):
        with pytest.raises(verl_lampo.LamPOVersionError, match=r">=0.9.0,<0.10"):
            verl_lampo.check_verl_version(bad)
    verl_lampo.check_verl_version("0.9.1")


def test_external_modules_import_registers_in_a_fresh_process():
    # What a Ray worker does: `import verl` with VERL_USE_EXTERNAL_MODULES=verl_lampo imports this module.
    code = ("from verl.trainer.ppo import core_algos; import verl; "
            "print(core_algos.get_adv_estimator_fn('lampo').__module__)")
    result = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, VERL_USE_EXTERNAL_MODULES="verl_lampo", PYTHONPATH=HERE), cwd="/")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("verl_lampo")


# What the trainer's actor does with the documented command on a Ray started beforehand (`ray start`): build
# verl's model config (the trainer's first init step, where verl imports actor_rollout_ref.model.external_lib),
# then run verl's compute_advantage with "lampo" and the command's algorithm config.
PRE_STARTED_RAY_DRIVER = """
import json, sys
import numpy as np, ray, torch
from hydra import compose, initialize_config_module
address, overrides = sys.argv[1], json.loads(sys.argv[2])
with initialize_config_module(config_module="verl.trainer.config", version_base=None):
    config = compose(config_name="ppo_trainer", overrides=overrides)
ray.init(address=address)

@ray.remote(num_cpus=0)
class TrainerLike:
    def run(self, config):
        import os
        from verl import DataProto
        from verl.trainer.ppo import core_algos
        from verl.trainer.ppo.ray_trainer import compute_advantage
        from verl.utils.config import omega_conf_to_dataclass
        try:
            omega_conf_to_dataclass(config.actor_rollout_ref.model)
            data = DataProto.from_dict(tensors={"token_level_rewards": torch.tensor([[1.0], [0.0]]),
                                                "response_mask": torch.ones(2, 1),
                                                "old_log_probs": torch.tensor([[-2.0], [-1.0]])},
                                       non_tensors={"uid": np.array(["a", "a"], dtype=object)})
            out = compute_advantage(data, adv_estimator=config.algorithm.adv_estimator, config=config.algorithm)
            return {"advantages": out.batch["advantages"][:, 0].tolist(),
                    "env": os.environ.get("VERL_USE_EXTERNAL_MODULES")}
        except Exception as error:
            return {"error": f"{type(error).__name__}: {error}"}

print("RESULT " + json.dumps(ray.get(TrainerLike.remote().run.remote(config))))
"""


def test_documented_command_registers_lampo_on_a_pre_started_ray(tmp_path):
    # `ray start` first (multi-node, or a cluster someone else started): its workers inherit the environment of
    # `ray start`, not the driver's, so variables exported for the driver never reach them. The documented
    # command names verl_lampo in actor_rollout_ref.model.external_lib, which verl imports where the trainer runs,
    # at its first init step; Ray puts the driver's working folder on every worker's path.
    import json
    import signal
    import socket
    import tempfile
    import time
    model = tmp_path / "model"
    tokenizer = toy.build_tokenizer()
    toy.build_model(tokenizer).save_pretrained(model)
    tokenizer.save_pretrained(model)
    overrides = [o for o in readme_verl_command() if not o.startswith("actor_rollout_ref.model.path=")]
    assert "actor_rollout_ref.model.external_lib=verl_lampo" in overrides
    overrides.append(f"actor_rollout_ref.model.path={model}")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VERL_USE_EXTERNAL_MODULES")}
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ray = os.path.join(os.path.dirname(sys.executable), "ray")
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")                        # short: Ray's socket paths
    head = subprocess.Popen([ray, "start", "--head", "--block", f"--port={port}", "--num-cpus=1",
                             "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}"],
                            env=env, cwd="/", start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    address = f"127.0.0.1:{port}"

    def driver(overrides, cwd, **extra_env):
        result = subprocess.run([sys.executable, "-W", "ignore", "-c", PRE_STARTED_RAY_DRIVER, address,
                                 json.dumps(overrides)], capture_output=True, text=True, timeout=300, cwd=cwd,
                                env=dict(env, **extra_env))
        lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
        assert result.returncode == 0 and lines, result.stderr[-3000:]
        return json.loads(lines[-1][len("RESULT "):])

    try:
        for _ in range(120):
            if subprocess.run([ray, "status", f"--address={address}"], env=env, capture_output=True).returncode == 0:
                break
            time.sleep(1)
        # The documented command, from the repository folder: the estimator is there, with the right values.
        result = driver(overrides, HERE)
        expected = lambdapo.pairwise_advantages(torch.tensor([[1.0, 0.0]]), torch.tensor([[-2.0, -1.0]]), 1.0)
        assert "error" not in result, result
        assert torch.allclose(torch.tensor(result["advantages"]), expected[0]) and result["env"] is None
        # The variables exported for the driver alone (without external_lib): the workers never see them.
        old_way = [o for o in overrides if not o.startswith("actor_rollout_ref.model.external_lib=")]
        result = driver(old_way, HERE, VERL_USE_EXTERNAL_MODULES="verl_lampo", PYTHONPATH=HERE)
        assert "Unknown advantage estimator" in result.get("error", ""), result
        # From another folder verl_lampo is not importable there: the trainer's first init step fails, loudly.
        result = driver(overrides, str(tmp_path), PYTHONPATH=HERE)
        assert "No module named 'verl_lampo'" in result.get("error", ""), result
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()


# ---------------------------------------------------------------------------------------------------
# the reward function
# ---------------------------------------------------------------------------------------------------
def test_compute_score():
    info = {"solution": "So $x = 2$, and the answer is $\\boxed{2}$.", "task": "math"}
    right = verl_lampo.compute_score("math", "<think>x=3?</think>So $x = 2$, the answer is \\boxed{2}.", "2", info)
    assert right["acc"] == 1.0 and 0 < right["rouge"] <= 1 and right["score"] == pytest.approx(1 + 0.1 * right["rouge"])
    wrong = verl_lampo.compute_score("math", "The answer is \\boxed{3}.", "2", info, rouge_weight=0.5)
    assert wrong["acc"] == 0.0 and wrong["score"] == pytest.approx(0.5 * wrong["rouge"]) and wrong["rouge"] > 0
    assert verl_lampo.compute_score("math", "\\boxed{2}", "2", {})["score"] == 1.0          # no reference
    assert verl_lampo.compute_score("gpqa", "\\boxed{C}", "C", {"task": "multiple_choice"})["acc"] == 1.0
    assert verl_lampo.compute_score("math", None, "2", None)["score"] == 0.0                # never raises


def test_compute_score_through_verls_loader():
    # verl loads the function by file path (custom_reward_function.path) and wraps it with reward_kwargs.
    from verl.trainer.ppo.reward import get_custom_reward_fn
    config = OmegaConf.create({"reward": {"custom_reward_function": {
        "path": os.path.join(HERE, "verl_lampo.py"), "name": "compute_score", "reward_kwargs": {"rouge_weight": 0.0}}}})
    fn = get_custom_reward_fn(config)
    assert fn(data_source="math", solution_str="\\boxed{4}", ground_truth="4",
              extra_info={"solution": "2+2=\\boxed{4}"}) == {"score": 1.0, "acc": 1.0, "rouge": 0.0,
                                                                 "grade_timeout": 0.0}
    config.reward.custom_reward_function.path = "pkg://verl_lampo"
    assert get_custom_reward_fn(config)(solution_str="\\boxed{5}", ground_truth="4")["score"] == 0.0


def test_compute_score_is_bounded_in_an_executor_thread():
    # verl calls compute_score from executor threads, where math-verify's signal timeouts are off. This
    # answer keeps sympy busy for longer than 20 s there; bounded, the call returns within the timeout.
    import threading
    import time
    slow = r"\boxed{(x+y+z)^{99} - (x+y+z)^{98}}"
    results = []

    def score(**kwargs):
        started = time.time()
        results.append((verl_lampo.compute_score("math", kwargs.pop("text"), kwargs.pop("gold"), {}, **kwargs),
                        time.time() - started))

    def in_thread(**kwargs):
        thread = threading.Thread(target=score, kwargs=kwargs, daemon=True)
        thread.start()
        thread.join(60)
        assert not thread.is_alive(), "compute_score did not return"
        return results[-1]

    in_thread(text="\\boxed{1}", gold="1")                              # starts a grading process
    result, seconds = in_thread(text=slow, gold="x^2+1", timeout_s=1.0)
    assert result["acc"] == 0.0 and seconds < 10 and result["grade_timeout"] == 1.0
    # timeout 0: given up at once (and counted); the killed process is replaced, the next answer graded right
    before = verl_lampo.grade_timeouts
    result, _ = in_thread(text="\\boxed{\\frac{1}{2}}", gold="0.5", timeout_s=0.0)
    assert result == {"score": 0.0, "acc": 0.0, "rouge": 0.0, "grade_timeout": 1.0}
    assert verl_lampo.grade_timeouts == before + 1
    result, _ = in_thread(text="\\boxed{\\frac{1}{2}}", gold="0.5")
    assert result == {"score": 1.0, "acc": 1.0, "rouge": 0.0, "grade_timeout": 0.0}
    # in the main thread it grades in place (math-verify's own timeouts are on)
    assert verl_lampo.compute_score("math", "\\boxed{2}", "2", {})["grade_timeout"] == 0.0
    # concurrent threads (as verl's executor) each get a grading process, at most GRADER_PROCESSES of them
    threads = [threading.Thread(target=score, kwargs=dict(text=f"\\boxed{{{k}}}", gold=str(k)), daemon=True)
               for k in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert [r["acc"] for r, _ in results[-3:]] == [1.0, 1.0, 1.0]
    assert 1 <= len(verl_lampo._idle_graders) <= min(3, verl_lampo.GRADER_PROCESSES)


# ---------------------------------------------------------------------------------------------------
# data preparation, read back by verl's own dataset class
# ---------------------------------------------------------------------------------------------------
def read_back(path, tokenizer):
    from verl.utils.dataset.rl_dataset import RLHFDataset
    config = OmegaConf.create({"prompt_key": "prompt", "max_prompt_length": 512, "filter_overlong_prompts": True,
                               "filter_overlong_prompts_workers": 1, "truncation": "error",
                               "cache_dir": os.path.join(os.path.dirname(path), "cache")})
    return RLHFDataset(data_files=[path], tokenizer=tokenizer, config=config)


def test_prepare_writes_parquet_that_verls_dataset_reads(tmp_path):
    out = tmp_path / "data"
    result = subprocess.run([sys.executable, os.path.join(HERE, "verl_lampo.py"), "prepare", "--dataset", "math",
                             "--data_file", os.path.join(HERE, "fixtures", "math_train.jsonl"),
                             "--val_data_file", os.path.join(HERE, "fixtures", "math500.jsonl"), "--out", str(out)],
                            capture_output=True, text=True, timeout=300, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    import data
    train_records = data.load_train_dataset("math", data_file=os.path.join(HERE, "fixtures", "math_train.jsonl"))
    val_records = data.load_benchmark("math500", data_file=os.path.join(HERE, "fixtures", "math500.jsonl"))
    tokenizers = [toy.build_tokenizer()]
    qwen3 = os.path.join(HERE, "..", "shared", "tokenizers", "qwen3")
    if os.path.isdir(qwen3):                                  # the real tokenizer, where shared/ is beside the clone
        from transformers import AutoTokenizer
        tokenizers.append(AutoTokenizer.from_pretrained(qwen3))
    for tokenizer in tokenizers:
        for name, records, source in (("train", train_records, "math"), ("test", val_records, "math500")):
            dataset = read_back(str(out / f"{name}.parquet"), tokenizer)
            assert len(dataset) == len(records) > 0
            for k in (0, len(records) - 1):
                row = dataset[k]
                assert row["raw_prompt"] == [{"role": "user", "content": records[k]["prompt"]}]
                assert row["data_source"] == source and row["ability"] == "math"
                assert row["reward_model"] == {"style": "rule", "ground_truth": records[k]["answer"]}
                assert row["extra_info"]["solution"] == (records[k]["solution"] or "")
                assert row["extra_info"]["split"] == name and row["index"] == k
                # what verl's reward manager hands compute_score for a right answer
                score = verl_lampo.compute_score(row["data_source"], f"\\boxed{{{records[k]['answer']}}}",
                                                 row["reward_model"]["ground_truth"], row["extra_info"])
                assert score["acc"] == 1.0


def test_prepare_usage_message():
    result = subprocess.run([sys.executable, os.path.join(HERE, "verl_lampo.py")], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2 and "prepare --dataset math --out DIR" in result.stderr


# ---------------------------------------------------------------------------------------------------
# docs/verl.md's 8-GPU command: composed by verl's own hydra config and accepted by verl's validate_config
# ---------------------------------------------------------------------------------------------------
def readme_verl_command():
    import re
    import shlex
    text = open(os.path.join(HERE, "docs", "verl.md"), encoding="utf-8").read()
    block = re.search(r"python -m verl\.trainer\.main_ppo \\\n(.*?)\n```", text, re.DOTALL).group(1)
    return shlex.split(block.replace("\\\n", " ").replace("$HOME", "/home/user"))


def test_readme_verl_command_is_a_valid_verl_config():
    from hydra import compose, initialize_config_module
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config
    overrides = readme_verl_command()
    assert "algorithm.adv_estimator=lampo" in overrides and "trainer.n_gpus_per_node=8" in overrides
    with initialize_config_module(config_module="verl.trainer.config", version_base=None):
        config = compose(config_name="ppo_trainer", overrides=overrides)
    validate_config(config=config, use_reference_policy=need_reference_policy(config), use_critic=need_critic(config))
    assert config.algorithm.adv_estimator == "lampo" and config.algorithm.lampo_tau == 1.0
    assert config.reward.custom_reward_function.path == "pkg://verl_lampo"
    assert core_algos.get_adv_estimator_fn(config.algorithm.adv_estimator) is verl_lampo.compute_lampo_outcome_advantage
