"""The tests: every formula against hand-computed or independently computed values, masks, log-probs,
gradients, the training loop end to end. CPU only, tiny models, no network: `pytest -q` (see README).

Sections: 1. advantages  2. clipped loss  3. masks and log-probs  4. the toy world  5. training loop
6. evaluation  then the tests of rewards.py and data.py.
"""

import json
import math
import os
import random
import signal
import statistics
import sys
import threading
import time
import types

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

import data
import rewards
import lambdapo
import rollout
import toy
from engine import FastGenerator, MergedLoraGenerator, sample_next_token
from lambdapo import clipped_policy_loss, confidence_weights, grpo_advantages, pairwise_advantages
from rewards import (accuracy_reward, extract_boxed, final_answer, multiple_choice_reward, reward, rouge_l_reward,
                     score_completions, strip_thinking)

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


@pytest.fixture(autouse=True)
def grader_never_crashes():
    """In every test, an answer graded wrong was judged wrong: the grader's catch-alls (which turn an exception
    into 0.0 so that a run survives odd model output) caught nothing. A grader that raises fails here."""
    before = rewards.grader_errors()
    yield
    assert rewards.grader_errors() == before, "a grading function raised (and its catch-all returned 0.0)"


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# ===================================================================================================
# 1. Advantages
# ===================================================================================================
def test_grpo_advantages_hand_computed():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    # mean 0.25; unbiased std = sqrt((0.75² + 3·0.25²)/3) = 0.5
    expected = torch.tensor([[0.75, -0.25, -0.25, -0.25]]) / (0.5 + 1e-6)
    torch.testing.assert_close(grpo_advantages(rewards), expected)
    torch.testing.assert_close(grpo_advantages(rewards, scale_by_std=False), torch.tensor([[0.75, -0.25, -0.25, -0.25]]))


def test_confidence_weights_hand_computed():
    rewards = torch.tensor([[1.0, 0.0, 0.5]])
    seq_logps = torch.tensor([[-1.0, -0.5, -2.0]])
    tau = 0.5
    weights = confidence_weights(rewards, seq_logps, tau)
    # pair (0,1): r0 > r1 but ℓ0 < ℓ1 (wrong order): w = 2σ(−(+1)(−1 − (−0.5))/0.5) = 2σ(1)
    assert weights[0, 0, 1].item() == pytest.approx(2 * sigmoid(1.0), abs=1e-6)
    # pair (0,2): r0 > r2 and ℓ0 > ℓ2 (right order): w = 2σ(−(−1 + 2)/0.5) = 2σ(−2)
    assert weights[0, 0, 2].item() == pytest.approx(2 * sigmoid(-2.0), abs=1e-6)
    # pair (1,2): r1 < r2 (s = −1), ℓ1 − ℓ2 = 1.5: w = 2σ(1.5/0.5) = 2σ(3)  (wrong order: ℓ prefers the worse)
    assert weights[0, 1, 2].item() == pytest.approx(2 * sigmoid(3.0), abs=1e-6)
    torch.testing.assert_close(weights, weights.transpose(1, 2))           # w_ij = w_ji
    assert torch.all(weights.diagonal(dim1=1, dim2=2) == 1.0)
    assert torch.all((weights > 0) & (weights < 2))


def reference_pairwise(rewards: list[float], scores: list[float], tau: float) -> list[float]:
    """docs/design.md §1 written as plain Python loops: an independent implementation."""
    G = len(rewards)
    out = []
    for i in range(G):
        total = 0.0
        for j in range(G):
            if j == i:
                continue
            s = (rewards[i] > rewards[j]) - (rewards[i] < rewards[j])
            w = 2.0 * sigmoid(-s * (scores[i] - scores[j]) / tau)
            total += (rewards[i] - rewards[j]) * w
        out.append(total / (G - 1))
    return out


def test_pairwise_advantages_match_loop_formula():
    generator = torch.Generator().manual_seed(0)
    rewards = torch.randint(0, 2, (5, 6), generator=generator).float() + 0.3 * torch.rand(5, 6, generator=generator)
    seq_logps = -3 * torch.rand(5, 6, generator=generator)
    for tau in (0.3, 1.0, 4.0):
        got = pairwise_advantages(rewards, seq_logps, tau)
        for g in range(5):
            expected = reference_pairwise(rewards[g].tolist(), seq_logps[g].tolist(), tau)
            assert got[g].tolist() == pytest.approx(expected, abs=1e-5)


def test_pairwise_advantages_small_worked_example():
    # G = 2: A_0 = (1 − 0) · 2σ(−(ℓ0 − ℓ1)) = 2σ(1) with ℓ0 = −2, ℓ1 = −1; A_1 = −A_0.
    advantages = pairwise_advantages(torch.tensor([[1.0, 0.0]]), torch.tensor([[-2.0, -1.0]]))
    assert advantages[0, 0].item() == pytest.approx(2 * sigmoid(1.0), abs=1e-6)
    assert advantages[0, 1].item() == pytest.approx(-2 * sigmoid(1.0), abs=1e-6)


def test_pairwise_scale_by_std_divides_by_the_group_std():
    rewards, seq_logps = torch.tensor([[1.0, 0.0, 0.0, 0.5]]), torch.tensor([[-1.0, -0.2, -3.0, -0.7]])
    std = statistics.stdev([1.0, 0.0, 0.0, 0.5])          # unbiased (n − 1), as GRPO, TRL and verl
    torch.testing.assert_close(pairwise_advantages(rewards, seq_logps, scale_by_std=True),
                               pairwise_advantages(rewards, seq_logps) / (std + 1e-6))


def test_pairwise_advantages_sum_to_zero_per_group():
    rewards = torch.rand(7, 8)
    advantages = pairwise_advantages(rewards, torch.randn(7, 8), tau=0.7)
    torch.testing.assert_close(advantages.sum(dim=1), torch.zeros(7), atol=1e-5, rtol=0)


def test_relative_tau_hand_computed_and_scale_free():
    # spread = mean of the groups' unbiased stds: (std(-1, -3) + std(-2, -2)) / 2 = (√2 + 0) / 2
    seq_logps = torch.tensor([[-1.0, -3.0], [-2.0, -2.0]])
    assert lambdapo.relative_tau(seq_logps, tau=2.0) == pytest.approx(2 * math.sqrt(2) / 2)
    # one pair one spread apart, the better one scoring lower: w = 2σ(1/0.7071 · 1) by hand
    rewards, logps = torch.tensor([[1.0, 0.0]]), torch.tensor([[-2.0, -1.0]])
    tau = lambdapo.relative_tau(logps, tau=1.0)
    assert tau == pytest.approx(1 / math.sqrt(2))
    assert pairwise_advantages(rewards, logps, tau=tau)[0, 0].item() == pytest.approx(2 * sigmoid(math.sqrt(2)))
    # scale-free: multiplying every ℓ by c (e.g. sum vs mean of equal-length completions) changes no weight,
    # while a fixed τ does change them
    rewards, logps = torch.rand(5, 8), torch.randn(5, 8) * 0.05
    relative = pairwise_advantages(rewards, logps, tau=lambdapo.relative_tau(logps, 0.5))
    for c in (40.0, 0.1):
        torch.testing.assert_close(pairwise_advantages(rewards, c * logps, tau=lambdapo.relative_tau(c * logps, 0.5)),
                                   relative)
        assert not torch.allclose(pairwise_advantages(rewards, c * logps, tau=0.5), pairwise_advantages(rewards, logps, tau=0.5))
    # no spread at all (G = 1, or every ℓ equal): the floor keeps τ > 0 and the weights at 1 (RLOO)
    assert lambdapo.relative_tau(torch.zeros(3, 1), 1.0) == 1e-6
    flat = torch.full((2, 4), -0.5)
    torch.testing.assert_close(pairwise_advantages(rewards[:2, :4], flat, tau=lambdapo.relative_tau(flat, 1.0)),
                               lambdapo.rloo_advantages(rewards[:2, :4]))


@pytest.mark.parametrize("algo", ["lampo", "grpo", "dr_grpo", "rloo"])
def test_equal_rewards_give_zero_advantage_not_nan(algo):
    rewards = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    advantages = lambdapo.compute_advantages(algo, rewards, torch.randn(2, 4), scale_by_std=None)
    assert torch.all(advantages == 0)
    advantages = pairwise_advantages(rewards, torch.randn(2, 4), scale_by_std=True)
    assert not torch.isnan(advantages).any() and torch.all(advantages == 0)


def test_lampo_tends_to_rloo_as_tau_grows():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0, 0.2]])
    seq_logps = torch.tensor([[-0.1, -3.0, -0.5, -2.0, -1.0]])
    # RLOO by hand: r_i − mean of the others
    rloo = torch.tensor([[r - (rewards.sum() - r) / 4 for r in rewards[0].tolist()]])
    torch.testing.assert_close(pairwise_advantages(rewards, seq_logps, tau=float("inf")), rloo)
    torch.testing.assert_close(pairwise_advantages(rewards, seq_logps, tau=1e6), rloo, atol=1e-5, rtol=0)
    assert not torch.allclose(pairwise_advantages(rewards, seq_logps, tau=1.0), rloo, atol=1e-3)
    # GRPO without std scaling is RLOO × (G − 1)/G
    torch.testing.assert_close(grpo_advantages(rewards, scale_by_std=False), rloo * 4 / 5)


def test_confidence_weights_are_constants_of_the_loss():
    seq_logps = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    advantages = pairwise_advantages(torch.tensor([[1.0, 0.0, 0.0]]), seq_logps)
    assert not advantages.requires_grad


def test_lampo_weights_unsure_pairs_more():
    # Right completion scored higher by the policy (already learned) vs lower (still to learn).
    learned = pairwise_advantages(torch.tensor([[1.0, 0.0]]), torch.tensor([[-0.5, -3.0]]))
    to_learn = pairwise_advantages(torch.tensor([[1.0, 0.0]]), torch.tensor([[-3.0, -0.5]]))
    assert 0 < learned[0, 0] < 1 < to_learn[0, 0] < 2


def test_sequence_scores_mean_and_sum():
    logps = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    torch.testing.assert_close(lambdapo.sequence_scores(logps, mask), torch.tensor([-2.0, -4.0]))
    torch.testing.assert_close(lambdapo.sequence_scores(logps, mask, "sum"), torch.tensor([-6.0, -4.0]))


def test_compute_advantages_rejects_unknown_algo_and_small_groups():
    with pytest.raises(ValueError, match="unknown algo"):
        lambdapo.compute_advantages("ppo", torch.zeros(1, 4), torch.zeros(1, 4))
    with pytest.raises(ValueError, match="at least 2"):
        pairwise_advantages(torch.zeros(3, 1), torch.zeros(3, 1))


# ===================================================================================================
# 2. The clipped loss
# ===================================================================================================
def test_clipped_loss_hand_computed_per_token_and_clip_fraction():
    # Token a: A = +1, ρ = e^0.5 = 1.6487 > 1.2  -> clipped: L = −1.2
    # Token b: A = −1, ρ = e^−0.5 = 0.6065 < 0.8 -> clipped: L = −(0.8 · −1) = 0.8
    # Token c: A = +1, ρ = e^0.1 = 1.1052 inside -> L = −1.1052
    # Token d: A = −1, ρ = e^0.5 = 1.6487 (bad direction, never clipped) -> L = 1.6487
    logps = torch.tensor([[0.5, 0.1], [-0.5, 0.5]])
    old = torch.zeros(2, 2)
    advantages = torch.tensor([1.0, -1.0])
    mask = torch.ones(2, 2)
    loss, stats = clipped_policy_loss(logps, old, advantages, mask)
    # rows: [a, c] with A = +1 ; [b, d] with A = −1
    expected = (-1.2 - math.exp(0.1) + 0.8 + math.exp(0.5)) / 4
    assert loss.item() == pytest.approx(expected, abs=1e-5)
    assert stats["clip_fraction"] == pytest.approx(0.5)


def test_clipped_loss_asymmetric_clip_range():
    logps = torch.tensor([[math.log(1.25)]])
    loss, stats = clipped_policy_loss(logps, torch.zeros(1, 1), torch.tensor([1.0]), torch.ones(1, 1),
                                      clip_low=0.2, clip_high=0.28)
    assert loss.item() == pytest.approx(-1.25, abs=1e-6) and stats["clip_fraction"] == 0.0
    loss, stats = clipped_policy_loss(logps, torch.zeros(1, 1), torch.tensor([1.0]), torch.ones(1, 1),
                                      clip_low=0.2, clip_high=0.2)
    assert loss.item() == pytest.approx(-1.2, abs=1e-6) and stats["clip_fraction"] == 1.0


def test_loss_aggregations_hand_computed():
    # ρ = 1 everywhere, so L_t = −A_i; row 0 has 1 real token (A=2), row 1 has 3 (A=−1), T = 4.
    logps = torch.zeros(2, 4)
    advantages = torch.tensor([2.0, -1.0])
    mask = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 0]])
    token_mean, _ = clipped_policy_loss(logps, logps, advantages, mask, aggregation="token-mean")
    seq_mean, _ = clipped_policy_loss(logps, logps, advantages, mask, aggregation="seq-mean")
    fixed, _ = clipped_policy_loss(logps, logps, advantages, mask, aggregation="fixed-length")
    assert token_mean.item() == pytest.approx((-2 + 3) / 4)
    assert seq_mean.item() == pytest.approx((-2 + 1) / 2)
    assert fixed.item() == pytest.approx((-2 + 3) / (2 * 4))


def test_k3_kl_penalty_hand_computed():
    logps = torch.tensor([[-1.0, -2.0]])
    ref = torch.tensor([[-1.5, -1.0]])
    loss, stats = clipped_policy_loss(logps, logps, torch.tensor([0.0]), torch.ones(1, 2), ref_logps=ref, beta=0.1)
    kl = [math.exp(d) - d - 1 for d in (-0.5, 1.0)]          # d = log π_ref − log π_θ
    assert stats["kl"] == pytest.approx(sum(kl) / 2, abs=1e-6)
    assert loss.item() == pytest.approx(0.1 * sum(kl) / 2, abs=1e-6)
    with pytest.raises(ValueError, match="ref_logps"):
        clipped_policy_loss(logps, logps, torch.tensor([0.0]), torch.ones(1, 2), beta=0.1)


def test_k3_kl_gradient_hand_computed_away_from_the_reference():
    # d/dlogp [β (e^{ref − logp} − (ref − logp) − 1)] = β (1 − e^{ref − logp}); zero only at logp = ref, so the
    # test sits away from it. A = 0 isolates the KL term; token-mean over 2 tokens divides by 2.
    logps = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0]])
    loss, _ = clipped_policy_loss(logps, logps.detach(), torch.tensor([0.0]), torch.ones(1, 2), ref_logps=ref, beta=0.1)
    loss.backward()
    expected = [0.1 * (1 - math.exp(r - l)) / 2 for l, r in ((-1.0, -1.5), (-2.0, -1.0))]
    assert logps.grad[0].tolist() == pytest.approx(expected, abs=1e-7)
    assert expected[0] > 0 > expected[1]                        # π_θ above π_ref is pulled down, below it up


def test_clipped_loss_gradient_hand_computed():
    # Unclipped token: d/dlogp [−ρ A / N] = −ρ A / N.  Clipped token: gradient exactly 0.
    logps = torch.tensor([[0.1, 0.5]], requires_grad=True)
    loss, _ = clipped_policy_loss(logps, torch.zeros(1, 2), torch.tensor([2.0]), torch.ones(1, 2))
    loss.backward()
    assert logps.grad[0, 0].item() == pytest.approx(-math.exp(0.1) * 2 / 2, abs=1e-6)
    assert logps.grad[0, 1].item() == 0.0


@pytest.mark.parametrize("importance_level", lambdapo.IMPORTANCE_LEVELS)
@pytest.mark.parametrize("aggregation", lambdapo.AGGREGATIONS)
def test_gradient_does_not_depend_on_micro_batch_split(aggregation, importance_level):
    generator = torch.Generator().manual_seed(1)
    B, T = 6, 5
    old = -torch.rand(B, T, generator=generator)
    advantages = torch.randn(B, generator=generator)
    mask = torch.ones(B, T, dtype=torch.long)
    for row, length in enumerate([1, 5, 2, 4, 3, 5]):
        mask[row, length:] = 0
    init = old + 0.3 * torch.randn(B, T, generator=generator)

    full = init.clone().requires_grad_(True)
    loss, _ = clipped_policy_loss(full, old, advantages, mask, aggregation=aggregation, importance_level=importance_level)
    loss.backward()

    split = init.clone().requires_grad_(True)
    for rows in (slice(0, 1), slice(1, 4), slice(4, 6)):      # uneven micro-batches
        micro_loss, _ = clipped_policy_loss(split[rows], old[rows], advantages[rows], mask[rows], aggregation=aggregation,
                                            importance_level=importance_level)
        (micro_loss * lambdapo.micro_batch_scale(mask[rows], mask, aggregation)).backward()
    torch.testing.assert_close(split.grad, full.grad, atol=1e-6, rtol=1e-5)


def test_sequence_level_ratio_loss_and_gradient_hand_computed():
    """GSPO: one ratio per completion, s_i = exp(mean over real tokens of log π_θ − log π_old).
    Row 0: A = +1, log ratios [0.3, −0.1] (+ a padding token at 5.0 that must not count): s_0 = e^0.1 = 1.1052,
           inside [0.8, 1.2], L_t = −s_0 on its 2 tokens; d L_t / d log π_θ(t') = −s_0 / 2 for each real t'.
    Row 1: A = −1, log ratios [−0.4, −0.5, −0.6]: s_1 = e^−0.5 = 0.6065 < 0.8, the clipped branch (−0.8 · −1)
           is the larger loss: L_t = 0.8 on its 3 tokens, no gradient, and all 3 tokens count as clipped."""
    old = torch.zeros(2, 3)
    logps = torch.tensor([[0.3, -0.1, 5.0], [-0.4, -0.5, -0.6]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    advantages = torch.tensor([1.0, -1.0])
    s0 = math.exp(0.1)
    loss, stats = clipped_policy_loss(logps, old, advantages, mask, importance_level="sequence")
    assert loss.item() == pytest.approx((2 * -s0 + 3 * 0.8) / 5, abs=1e-6)           # token-mean over 5 tokens
    assert stats["clip_fraction"] == pytest.approx(3 / 5)
    loss.backward()
    # each of row 0's 2 tokens: (1/5) Σ_t' d(−s_0)/d logp_t = (2/5) · (−s_0 / 2) = −s_0 / 5; padding and row 1: 0
    assert logps.grad.flatten().tolist() == pytest.approx([-s0 / 5, -s0 / 5, 0.0, 0.0, 0.0, 0.0], abs=1e-6)
    # seq-mean (GSPO's paper form): (−s_0 + 0.8) / 2, and row 0's tokens get (1/2) · (−s_0 / 2)
    logps.grad = None
    loss, _ = clipped_policy_loss(logps, old, advantages, mask, aggregation="seq-mean", importance_level="sequence")
    assert loss.item() == pytest.approx((-s0 + 0.8) / 2, abs=1e-6)
    loss.backward()
    assert logps.grad.flatten().tolist() == pytest.approx([-s0 / 4, -s0 / 4, 0.0, 0.0, 0.0, 0.0], abs=1e-6)
    # the token-level ratio on the same numbers differs: row 0's first token (e^0.3 > 1.2) is clipped, its second
    # (e^−0.1) is not; row 1's three (e^−0.4 … e^−0.6 < 0.8) are clipped
    token_loss, _ = clipped_policy_loss(logps, old, advantages, mask)
    assert token_loss.item() == pytest.approx((-1.2 - math.exp(-0.1) + 3 * 0.8) / 5, abs=1e-6)
    with pytest.raises(ValueError, match="importance_level"):
        clipped_policy_loss(logps, old, advantages, mask, importance_level="seq")


def test_sequence_level_kl_and_is_weights_stay_per_token():
    """With β > 0 and TIS weights the sequence ratio changes only the policy-gradient term: the KL is still
    β · k3 per token, and each token's policy-gradient term is still multiplied by its own weight."""
    logps = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    old = torch.tensor([[-1.1, -1.9]])                                  # log ratios 0.1, −0.1: s = 1 exactly
    ref = torch.tensor([[-1.5, -1.0]])
    weights = torch.tensor([[0.5, 2.0]])
    loss, stats = clipped_policy_loss(logps, old, torch.tensor([3.0]), torch.ones(1, 2), ref_logps=ref, beta=0.1,
                                      is_weights=weights, importance_level="sequence")
    kl = [math.exp(r - l) - (r - l) - 1 for l, r in ((-1.0, -1.5), (-2.0, -1.0))]
    assert loss.item() == pytest.approx((-3.0 * 0.5 - 3.0 * 2.0 + 0.1 * sum(kl)) / 2, abs=1e-6)
    assert stats["kl"] == pytest.approx(sum(kl) / 2, abs=1e-6)
    assert stats["policy_kl"] == pytest.approx(sum(math.exp(-d) + d - 1 for d in (0.1, -0.1)) / 2, abs=1e-7)
    loss.backward()
    # policy term: −A · (w_0 + w_1) · s / 2 over 2 tokens, d s / d logp_t = s / 2 = 1/2 for each token
    pg = -3.0 * (0.5 + 2.0) / 2 / 2
    expected = [pg + 0.1 * (1 - math.exp(r - l)) / 2 for l, r in ((-1.0, -1.5), (-2.0, -1.0))]
    assert logps.grad[0].tolist() == pytest.approx(expected, abs=1e-6)


def gspo_token_loss(logps, old, advantages, mask, clip_low, clip_high, aggregation):
    """An independent form of GSPO: the paper's "GSPO-token" ratio s_i,t = sg[s_i] · π_θ(t) / sg[π_θ(t)], with
    s_i written as a product of token ratios to the power 1/|o_i| (no mean of logs), and the clipped
    objective per sequence in Python loops. For every sequence its value is s_i and its gradient that of s_i."""
    token_terms = []
    for i in range(logps.shape[0]):
        real = [t for t in range(logps.shape[1]) if mask[i, t]]
        product = torch.ones((), dtype=logps.dtype)
        for t in real:
            product = product * torch.exp(logps[i, t] - old[i, t])
        s_i = product ** (1.0 / len(real))
        terms = []
        for t in real:
            s_it = s_i.detach() * torch.exp(logps[i, t] - logps[i, t].detach())
            a = advantages[i]
            terms.append(-torch.minimum(s_it * a, s_it.clamp(1 - clip_low, 1 + clip_high) * a))
        token_terms.append(terms)
    if aggregation == "token-mean":
        return sum(sum(terms) for terms in token_terms) / sum(len(terms) for terms in token_terms)
    if aggregation == "seq-mean":
        return sum(sum(terms) / len(terms) for terms in token_terms) / len(token_terms)
    return sum(sum(terms) for terms in token_terms) / (logps.shape[0] * logps.shape[1])


@pytest.mark.parametrize("aggregation", lambdapo.AGGREGATIONS)
def test_sequence_level_loss_and_gradient_match_an_independent_gspo(aggregation):
    """Random rows of different lengths, some clipped above, some below, some inside: the loss and its gradient
    equal the GSPO-token form's, and torch.autograd.gradcheck (finite differences) confirms the gradient."""
    generator = torch.Generator().manual_seed(3)
    B, T = 6, 5
    old = -torch.rand(B, T, generator=generator, dtype=torch.float64)
    mask = torch.ones(B, T, dtype=torch.long)
    for row, length in enumerate([1, 5, 2, 4, 3, 5]):
        mask[row, length:] = 0
    advantages = torch.tensor([1.0, -0.5, 2.0, -1.5, 0.7, -0.3], dtype=torch.float64)
    shift = torch.tensor([0.02, -0.03, 0.0005, 0.0001, -0.02, 0.03], dtype=torch.float64)[:, None]
    init = old + shift + 0.01 * torch.randn(B, T, generator=generator, dtype=torch.float64)
    clip_low, clip_high = 0.01, 0.01                          # |mean log ratio| ≈ |shift|: some rows clip
    ours = init.clone().requires_grad_(True)
    loss, stats = clipped_policy_loss(ours, old, advantages, mask, clip_low, clip_high, aggregation=aggregation,
                                      importance_level="sequence")
    loss.backward()
    theirs = init.clone().requires_grad_(True)
    expected = gspo_token_loss(theirs, old, advantages, mask, clip_low, clip_high, aggregation)
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-10, abs=1e-12)
    torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-9, atol=1e-12)
    assert 0 < stats["clip_fraction"] < 1                     # both branches were exercised
    assert torch.autograd.gradcheck(lambda x: clipped_policy_loss(x, old, advantages, mask, clip_low, clip_high,
                                                                  aggregation=aggregation,
                                                                  importance_level="sequence")[0],
                                    init.clone().requires_grad_(True))


# ===================================================================================================
# 3. Masks and per-token log-probabilities
# ===================================================================================================
@pytest.fixture(scope="module")
def tiny():
    """A random-weight tiny Qwen3 and the character tokenizer (pad == EOS)."""
    tokenizer = toy.build_tokenizer()
    model = toy.build_model(tokenizer, seed=0).eval()
    return model, tokenizer


def test_completion_mask_with_pad_equal_to_eos():
    eos = 0
    ids = torch.tensor([[5, 6, eos, eos, eos],     # stops: EOS kept, padding after it masked
                        [eos, eos, eos, eos, eos],  # stops at once: only the EOS is real
                        [5, 6, 7, 8, 9]])          # never stops: truncated
    mask, truncated = rollout.completion_mask_from_eos(ids, [eos])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert truncated.tolist() == [False, False, True]
    # A mask from pad ids would have hidden the EOS (and everything in row 1): the trap we avoid.
    assert (ids != eos).long().tolist()[0] == [1, 1, 0, 0, 0]


def test_completion_mask_with_several_eos_ids():
    mask, truncated = rollout.completion_mask_from_eos(torch.tensor([[4, 9, 3, 9], [4, 4, 4, 4]]), [3, 9])
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]] and truncated.tolist() == [False, True]


def nucleus_log_mass(scaled_logits, top_p):
    """log Z_p, the mass of the top_p nucleus, through transformers' own TopPLogitsWarper (the rule
    model.generate samples with), independent of rollout.nucleus. (..., V) -> (...)"""
    from transformers import TopPLogitsWarper
    V = scaled_logits.shape[-1]
    warped = TopPLogitsWarper(top_p)(None, scaled_logits.reshape(-1, V)).reshape(scaled_logits.shape)
    return torch.logsumexp(warped, -1) - torch.logsumexp(scaled_logits, -1), warped


def plain_logprobs(model, input_ids, attention_mask, completion_ids, temperature, top_p=1.0):
    """Independent reference: one full forward, full log_softmax, gather; with top_p < 1 minus log Z_p. (B, T)"""
    positions = (attention_mask.cumsum(-1) - 1).clamp_min(0)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions).logits
    T = completion_ids.shape[1]
    scaled = logits[:, -T - 1:-1].float() / temperature
    logprobs = torch.log_softmax(scaled, dim=-1)
    if top_p < 1.0:
        logprobs = logprobs - nucleus_log_mass(scaled, top_p)[0][..., None]
    return logprobs.gather(-1, completion_ids[..., None]).squeeze(-1)


def sample_rollout(model, tokenizer, G=3, max_new_tokens=12, seed=0):
    torch.manual_seed(seed)
    prompts = ["1+2=", "345+678=", "9+9="]
    return rollout.generate(model, tokenizer, prompts, G, rollout.SamplingConfig(max_new_tokens=max_new_tokens))


def test_keep_groups_repads_rounds_and_keeps_each_rows_logprobs(tiny):
    """Groups from two rounds of different widths (prompt and completion lengths): the kept rows, re-padded, have
    the tokens, masks, texts and log-probs they had in their own round, in the order asked for."""
    model, tokenizer = tiny
    first = sample_rollout(model, tokenizer, G=2, max_new_tokens=5, seed=0)            # prompts up to 8 characters
    torch.manual_seed(1)
    second = rollout.generate(model, tokenizer, ["7+1=", "2+2="], 2, rollout.SamplingConfig(max_new_tokens=9))
    assert first.prompt_ids.shape[1] != second.prompt_ids.shape[1]
    assert first.completion_ids.shape[1] != second.completion_ids.shape[1]
    kept = rollout.keep_groups([(first, [2, 1]), (second, [1])], tokenizer.pad_token_id)
    rows = [(first, 4), (first, 5), (first, 2), (first, 3), (second, 2), (second, 3)]
    assert kept.completions == [r.completions[i] for r, i in rows]
    assert kept.truncated.tolist() == [bool(r.truncated[i]) for r, i in rows]
    assert kept.completion_mask.sum(1).tolist() == [int(r.completion_mask[i].sum()) for r, i in rows]
    with torch.no_grad():
        logps = rollout.token_logprobs(model, kept.input_ids, kept.attention_mask, kept.completion_mask)
        for k, (r, i) in enumerate(rows):
            own = rollout.token_logprobs(model, r.input_ids, r.attention_mask, r.completion_mask)[i]
            length = int(r.completion_mask[i].sum())
            torch.testing.assert_close(logps[k, :length], own[:length], atol=1e-5, rtol=1e-5)
            assert logps[k, length:].abs().sum() == 0


def test_token_logprobs_match_plain_forward(tiny, monkeypatch):
    model, tokenizer = tiny
    r = sample_rollout(model, tokenizer)
    monkeypatch.setattr(rollout, "LOGIT_CHUNK_TOKENS", 7)      # force several vocabulary chunks
    with torch.no_grad():
        got, entropy = rollout.token_logprobs(model, r.input_ids, r.attention_mask, r.completion_mask,
                                              temperature=0.7, micro_batch_size=4, return_entropy=True)
        expected = plain_logprobs(model, r.input_ids, r.attention_mask, r.completion_ids, 0.7) * r.completion_mask
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert torch.all(got[r.completion_mask == 0] == 0)
    assert torch.all(entropy[r.completion_mask == 1] > 0)


def test_plain_token_logprobs_equal_the_memory_optimised_ones(tiny):
    model, tokenizer = tiny
    r = sample_rollout(model, tokenizer)
    weights = torch.randn(r.completion_mask.shape) * r.completion_mask
    grads = []
    for function in (rollout.plain_token_logprobs, rollout.token_logprobs):
        model.zero_grad()
        logps = function(model, r.input_ids, r.attention_mask, r.completion_mask, temperature=0.7)
        (logps * weights).sum().backward()
        grads.append((logps.detach(), [p.grad.clone() for p in model.parameters()]))
    (plain, plain_grads), (fast, fast_grads) = grads
    torch.testing.assert_close(plain, fast, atol=1e-5, rtol=1e-5)
    assert torch.all(plain[r.completion_mask == 0] == 0) and torch.all(plain[r.completion_mask == 1] < 0)
    for a, b in zip(plain_grads, fast_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_token_logprobs_gradient_matches_plain_forward(tiny):
    model, tokenizer = tiny
    r = sample_rollout(model, tokenizer, G=2)
    weights = torch.randn(r.completion_mask.shape) * r.completion_mask
    model.zero_grad()
    (rollout.token_logprobs(model, r.input_ids, r.attention_mask, r.completion_mask, 0.9, 2) * weights).sum().backward()
    ours = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    (plain_logprobs(model, r.input_ids, r.attention_mask, r.completion_ids, 0.9) * weights).sum().backward()
    for a, b in zip(ours, [p.grad for p in model.parameters()]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    model.zero_grad()


def test_logprobs_do_not_depend_on_left_padding(tiny):
    model, tokenizer = tiny
    prompt = torch.tensor([[1, 11, 12, 13, 2]])
    completion = torch.tensor([[14, 15, 16, 0]])
    results = []
    for pad in (0, 3, 9):
        ids = torch.cat([torch.zeros(1, pad, dtype=torch.long), prompt, completion], dim=1)
        attention = torch.cat([torch.zeros(1, pad, dtype=torch.long), torch.ones(1, 9, dtype=torch.long)], dim=1)
        with torch.no_grad():
            results.append(rollout.token_logprobs(model, ids, attention, torch.ones(1, 4, dtype=torch.long)))
    torch.testing.assert_close(results[1], results[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(results[2], results[0], atol=1e-5, rtol=1e-5)


def test_generate_groups_masks_and_texts(tiny):
    model, tokenizer = tiny
    r = sample_rollout(model, tokenizer, G=4, max_new_tokens=10)
    assert r.completion_ids.shape[0] == 12 and r.group_size == 4
    for g in range(3):                                           # groups are contiguous copies of one prompt
        assert all(torch.equal(r.prompt_ids[g * 4], r.prompt_ids[g * 4 + k]) for k in range(4))
    assert r.prompt_mask[:, -1].all()                            # left padding: every prompt ends at column P
    for row in range(12):
        length = int(r.completion_mask[row].sum())
        ids = r.completion_ids[row, :length].tolist()
        if not r.truncated[row]:
            assert ids[-1] == tokenizer.eos_token_id and tokenizer.eos_token_id not in ids[:-1]
            ids = ids[:-1]
        assert r.completions[row] == tokenizer.decode(ids, skip_special_tokens=True)


def test_greedy_generation_is_deterministic_per_group(tiny):
    model, tokenizer = tiny
    r = rollout.generate(model, tokenizer, ["12+34="], 3, rollout.SamplingConfig(max_new_tokens=8, do_sample=False))
    assert r.completions[0] == r.completions[1] == r.completions[2]


@pytest.mark.parametrize("group_size", [1, 3])
def test_fast_engine_matches_plain_generate_under_greedy(tiny, group_size):
    model, tokenizer = tiny
    prompts = ["1+2=", "345+678=", "9+9=", "12+3="]
    sampling = rollout.SamplingConfig(max_new_tokens=20, do_sample=False, batch_size=5)
    plain = rollout.generate(model, tokenizer, prompts, group_size, sampling)
    fast = rollout.generate(model, tokenizer, prompts, group_size, sampling, engine=FastGenerator(model))
    assert torch.equal(plain.completion_ids, fast.completion_ids)
    assert torch.equal(plain.completion_mask, fast.completion_mask) and plain.completions == fast.completions


@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_fast_engine_reports_the_logprobs_of_its_samples(tiny, top_p):
    """The sampler's log-probs are those of the distribution it sampled (the renormalised nucleus when top_p < 1),
    which token_logprobs computes with the same top_p: the PPO ratio and TIS start at exactly 1."""
    model, tokenizer = tiny
    formatted = rollout.format_prompts(tokenizer, ["1+2=", "345+678="])
    prompt_ids, prompt_mask = rollout.tokenize_prompts(tokenizer, formatted)
    torch.manual_seed(0)
    sampling = rollout.SamplingConfig(max_new_tokens=10, temperature=0.8, top_p=top_p)
    completion_ids, sampling_logps = FastGenerator(model).decode(prompt_ids, prompt_mask, sampling, [0], 0)
    mask, _ = rollout.completion_mask_from_eos(completion_ids, [0])
    with torch.no_grad():
        logps = rollout.token_logprobs(model, torch.cat([prompt_ids, completion_ids], 1),
                                       torch.cat([prompt_mask, mask], 1), mask, temperature=0.8, top_p=top_p)
        oracle = plain_logprobs(model, torch.cat([prompt_ids, completion_ids], 1), torch.cat([prompt_mask, mask], 1),
                                completion_ids, 0.8, top_p) * mask
    torch.testing.assert_close(sampling_logps * mask, logps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logps, oracle, atol=1e-5, rtol=1e-5)


def test_nucleus_is_transformers_top_p_rule():
    torch.manual_seed(0)
    logits = torch.randn(300, 40) * torch.rand(300, 1) * 4                 # flat to peaked rows
    for top_p in (0.3, 0.8, 0.95, 0.999):
        log_mass, warped = nucleus_log_mass(logits, top_p)
        keep, mine = rollout.nucleus(torch.log_softmax(logits, -1), top_p)
        assert torch.equal(keep, warped.isfinite())
        torch.testing.assert_close(mine, log_mass)
        assert bool((mine.exp() >= top_p - 1e-6).all()) and bool(keep.any(-1).all())


def test_token_logprobs_with_top_p_are_the_nucleus_and_its_gradient(tiny):
    """Log-probs, entropy and gradient under the renormalised nucleus: token_logprobs = plain_token_logprobs = the
    transformers-warper oracle; a token outside the nucleus gets log p − log Z_p (finite), not −∞."""
    model, tokenizer = tiny
    r = sample_rollout(model, tokenizer, G=2, max_new_tokens=8)              # sampled at top_p 1: some tokens fall outside
    top_p, T = 0.6, 0.9
    logps, entropy = rollout.token_logprobs(model, r.input_ids, r.attention_mask, r.completion_mask, T,
                                            micro_batch_size=2, return_entropy=True, top_p=top_p)
    plain = rollout.plain_token_logprobs(model, r.input_ids, r.attention_mask, r.completion_mask, T, top_p)
    mask = r.completion_mask
    with torch.no_grad():
        oracle = plain_logprobs(model, r.input_ids, r.attention_mask, r.completion_ids, T, top_p) * mask
        full = plain_logprobs(model, r.input_ids, r.attention_mask, r.completion_ids, T) * mask
        positions = (r.attention_mask.cumsum(-1) - 1).clamp_min(0)
        logits = model(input_ids=r.input_ids, attention_mask=r.attention_mask, position_ids=positions).logits
        _, warped = nucleus_log_mass(logits[:, -mask.shape[1] - 1:-1].float() / T, top_p)
        q = torch.log_softmax(warped, -1)
        expected_entropy = -torch.where(q.isfinite(), q.exp() * q, 0.0).sum(-1) * mask
    torch.testing.assert_close(logps, oracle, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(plain, oracle, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy * mask, expected_entropy, atol=1e-5, rtol=1e-5)
    assert bool((logps[mask.bool()] > full[mask.bool()]).all())          # renormalised: Z_p < 1 raises every token
    outside = ~torch.gather(warped.isfinite(), -1, r.completion_ids[..., None]).squeeze(-1) & mask.bool()
    assert outside.any() and bool(logps[outside].isfinite().all())
    (logps * mask).sum().backward()                                       # through log p and log Z_p
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    (plain_logprobs(model, r.input_ids, r.attention_mask, r.completion_ids, T, top_p) * mask).sum().backward()
    for got, expected in zip(grads, (p.grad for p in model.parameters())):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    model.zero_grad()


def test_sampled_tokens_follow_temperature_and_top_p():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    temperature, top_p, n = 0.7, 0.8, 40_000
    # Independent expectation: softmax(logits / T), keep the smallest top set whose mass reaches top_p.
    probs = [math.exp(x / temperature) for x in logits.tolist()]
    probs = [p / sum(probs) for p in probs]
    kept, mass = [], 0.0
    for index in sorted(range(5), key=lambda i: -probs[i]):
        if mass >= top_p:
            break
        kept.append(index)
        mass += probs[index]
    expected = [probs[i] / mass if i in kept else 0.0 for i in range(5)]
    torch.manual_seed(0)
    tokens, _ = sample_next_token(logits.expand(n, 5), temperature, top_p, greedy=False)
    empirical = torch.bincount(tokens, minlength=5).float() / n
    assert empirical.tolist() == pytest.approx(expected, abs=0.01)
    assert all(empirical[i] == 0 for i in range(5) if i not in kept)
    assert torch.equal(sample_next_token(logits.expand(3, 5), 1.0, 1.0, greedy=True)[0], torch.zeros(3, dtype=torch.long))


def test_update_with_positive_advantage_raises_logprob(tiny):
    model, tokenizer = tiny
    model = toy.build_model(tokenizer, seed=3)
    r = sample_rollout(model, tokenizer, G=2, seed=1)
    rows = slice(0, 1)
    with torch.no_grad():
        before = rollout.token_logprobs(model, r.input_ids[rows], r.attention_mask[rows], r.completion_mask[rows])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    logps = rollout.token_logprobs(model, r.input_ids[rows], r.attention_mask[rows], r.completion_mask[rows])
    loss, _ = clipped_policy_loss(logps, before, torch.tensor([1.0]), r.completion_mask[rows])
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        after = rollout.token_logprobs(model, r.input_ids[rows], r.attention_mask[rows], r.completion_mask[rows])
    mask = r.completion_mask[rows]
    assert (after * mask).sum() > (before * mask).sum()


def test_float32_master_weights_take_tiny_updates(tiny):
    model = toy.build_model(tiny[1], seed=4)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.0)
    model(input_ids=torch.tensor([[3, 4, 5, 6]]), labels=torch.tensor([[3, 4, 5, 6]])).loss.backward()
    optimizer.step()
    changed = sum(int(not torch.equal(a, p.detach())) for a, p in zip(before, model.parameters()))
    assert changed == len(before)
    # The same step on bf16 weights is lost to rounding for most of them (why we keep float32 masters).
    weight = torch.full((1000,), 0.5, dtype=torch.bfloat16)
    assert torch.equal(weight - torch.tensor(1e-6, dtype=torch.bfloat16), weight)


# ===================================================================================================
# 4. The toy world
# ===================================================================================================
def test_toy_tokenizer_round_trip_and_template(tmp_path):
    from transformers import AutoTokenizer
    tokenizer = toy.build_tokenizer()
    text = "5+7+0=12\n8+4+1=13\n\\boxed{132} (x^2)"
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    for tok in (tokenizer, loaded):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(text)                          # one token per character
        assert tok.decode(ids) == text
        assert tok.pad_token_id == tok.eos_token_id
        formatted = rollout.format_prompts(tok, ["85+47="])[0]
        assert formatted == "<|user|>85+47=<|assistant|>"


def test_toy_worked_solution_and_flawed_teacher():
    for a in range(0, 120, 7):
        for b in range(0, 120, 11):
            sol = toy.worked_solution(a, b)
            assert sol.endswith("\\boxed{" + str(a + b) + "}")
            flawed = toy.worked_solution(a, b, drop_final_carry=True)
            final_carry = len(str(a + b)) > max(len(str(a)), len(str(b)))
            assert (flawed != sol) == final_carry


def test_toy_heldout_is_fixed_and_disjoint_from_training():
    heldout = toy.heldout_records(200)
    assert heldout == toy.heldout_records(200)
    train_prompts = {r["prompt"] for r in toy.train_records(3000, seed=5)}
    assert not train_prompts & {r["prompt"] for r in heldout}
    assert all(toy.is_heldout(*map(int, r["prompt"][:-1].split("+"))) for r in heldout)


def test_toy_warm_start_is_cached_and_loadable(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    monkeypatch.setenv("LAMBDAPO_CACHE", str(tmp_path))
    calls = []
    real_warm_start = toy.warm_start
    monkeypatch.setattr(toy, "warm_start", lambda *a, **k: calls.append(1) or real_warm_start(*a, **k))
    path = toy.warm_started_model_dir(log=lambda message: None, steps=2, batch_size=4, warmup=1)
    assert toy.warm_started_model_dir(log=lambda message: None, steps=2, batch_size=4, warmup=1) == path
    assert len(calls) == 1                                       # the second call used the cache
    assert [p.name for p in tmp_path.iterdir()] == [path.name]   # no temporary folder left behind
    model, tokenizer = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    assert model.config.vocab_size == len(tokenizer) and tokenizer.pad_token_id == tokenizer.eos_token_id


def _carries(a: int, b: int) -> int:
    """How many columns of a + b carry out (an independent count: digit sums, not the worked solution)."""
    count = carry = 0
    while a or b:
        carry = (a % 10 + b % 10 + carry) // 10
        count += carry
        a, b = a // 10, b // 10
    return count


def test_toy_hard_teacher_loses_each_carry_and_the_verifier_sees_it():
    # the worked solution with every carry kept is the true sum; each lost carry lowers the answer
    import rewards
    assert toy.worked_solution(999, 999, forget_carry=lambda column: True) == \
        "9+9+0=18\n9+9+0=18\n9+9+0=18\n\\boxed{888}"                       # hand-computed
    rng = random.Random(0)
    kept = lost = 0
    for _ in range(400):
        a, b = rng.randint(10, 9999), rng.randint(10, 9999)
        right = toy.worked_solution(a, b)
        assert right == toy.worked_solution(a, b, forget_carry=lambda column: False)
        assert rewards.accuracy_reward(right, str(a + b)) == 1.0
        flawed = toy.teacher_solution(a, b, rng, task="toy_hard")
        for line in flawed.splitlines()[:-1]:                           # each line is right arithmetic
            left, total = line.split("=")
            assert sum(map(int, left.split("+"))) == int(total)
        correct = rewards.accuracy_reward(flawed, str(a + b)) == 1.0
        assert correct == (flawed == right)
        if _carries(a, b):
            kept, lost = kept + correct, lost + (not correct)
        else:
            assert correct                                              # nothing to lose
    # with p = 0.95 per carry, a problem with k ≥ 1 carries survives with 0.05^k: a few percent at most
    assert lost > 0 and kept / (kept + lost) < 0.15


def test_toy_hard_records_heldout_and_budget():
    train_records, heldout = toy.train_records(2000, seed=3, task="toy_hard"), toy.heldout_records(200, task="toy_hard")
    assert heldout == toy.heldout_records(200, task="toy_hard")
    assert not {r["prompt"] for r in train_records} & {r["prompt"] for r in heldout}
    for r in train_records + heldout:
        a, b = map(int, r["prompt"][:-1].split("+"))
        assert 2 <= len(str(a)) == len(str(b)) <= 4 and r["answer"] == str(a + b)
        assert r["solution"] == toy.worked_solution(a, b)
        assert len(toy.build_tokenizer()(r["solution"] + toy.EOS)["input_ids"]) <= toy.TASKS["toy_hard"].max_new_tokens
    # the greedy warm start can only be right without a carry: that share is the starting point (≤ 30%)
    no_carry = sum(_carries(*map(int, r["prompt"][:-1].split("+"))) == 0 for r in heldout) / len(heldout)
    assert 0.05 < no_carry < 0.3
    loaded = data.load_benchmark("toy_hard", limit=5)
    assert [r["prompt"] for r in loaded] == [r["prompt"] for r in heldout[:5]] and loaded[0]["id"] == "toy_hard/0"
    import eval as evaluation
    assert evaluation.toy_budget("toy_hard") == 64 and evaluation.toy_budget("toy") == 48


def test_toy_hard_warm_start_is_its_own_cache_entry(tmp_path, monkeypatch):
    monkeypatch.setenv("LAMBDAPO_CACHE", str(tmp_path))
    batches = []
    real_sft_batch = toy.sft_batch
    monkeypatch.setattr(toy, "sft_batch", lambda tok, pairs, rng, task="toy": batches.append((pairs, task))
                        or real_sft_batch(tok, pairs, rng, task))
    for name, value in dict(steps=2, batch_size=4, warmup=1).items():   # a 2-step warm start of each task
        monkeypatch.setitem(toy.WARM_START, name, value)
        monkeypatch.setitem(toy.HARD_WARM_START, name, value)
    hard = toy.warm_started_model_dir(task="toy_hard", log=lambda message: None)
    easy = toy.warm_started_model_dir(log=lambda message: None)
    assert hard != easy and hard.name.startswith("toy-hard-") and easy.name.startswith("toy-")
    assert {task for _, task in batches} == {"toy_hard", "toy"}
    assert all(2 <= len(str(a)) <= 4 for pairs, task in batches if task == "toy_hard" for a, _ in pairs)
    import models
    model, tokenizer = models.load_model("toy_hard", log=lambda message: None)   # the name loads that entry
    assert model.config.vocab_size == len(tokenizer)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([hard.name, easy.name])


def test_train_relative_tau_is_tau_times_the_logged_spread(tiny_model_dir, tmp_path):
    import train
    train.main(tiny_args(tiny_model_dir, tmp_path / "run", "--relative_tau", "--tau", "0.5", "--eval_limit", "1"))
    steps = [m for m in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "reward" in m]
    for m in steps:
        assert m["lampo/tau"] == pytest.approx(max(0.5 * m["lampo/seq_logp_std"], 1e-6))


def test_train_dataset_toy_hard_selects_its_model_and_preset():
    import train
    config = train.parse_config(["--dataset", "toy_hard"])
    assert config.model == "toy_hard" and config.eval_benchmark == "toy_hard"
    assert (config.num_steps, config.max_new_tokens) == (200, 64)
    assert train.parse_config(["--model", "toy_hard"]).dataset == "toy_hard"
    assert train.parse_config([]).model == "toy" and train.parse_config([]).num_steps == 80   # the demo is unchanged


# ===================================================================================================
# 5. The training loop, end to end on CPU
# ===================================================================================================
@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_model")
    tokenizer = toy.build_tokenizer()
    model = toy.build_model(tokenizer, seed=0)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def tiny_args(model_dir, out_dir, *extra):
    return ["--model", model_dir, "--out_dir", str(out_dir), "--dataset", "toy", "--eval_benchmark", "toy",
            "--eval_limit", "4", "--prompts_per_step", "2", "--group_size", "3", "--max_new_tokens", "6",
            "--num_steps", "2", "--lr", "1e-3", "--warmup_steps", "1", "--mini_batches", "2",
            "--micro_batch_size", "2", "--gradient_checkpointing", "false", "--plot", "false", *extra]


def read_jsonl(path):
    return [json.loads(line) for line in open(path)]


def test_train_runs_and_writes_everything(tiny_model_dir, tmp_path):
    import train
    out = tmp_path / "run"
    train.main(tiny_args(tiny_model_dir, out, "--save_every", "1"))
    for name in ("config.json", "metrics.jsonl", "samples.jsonl", "initial/config.json", "final/config.json",
                 "final/tokenizer.json", "checkpoint-2/trainer_state.pt"):
        assert (out / name).exists(), name
    metrics = read_jsonl(out / "metrics.jsonl")
    steps = [m for m in metrics if "reward" in m]
    assert [m["step"] for m in steps] == [1, 2]
    for key in ("reward", "reward_std", "frac_reward_zero_std", "accuracy", "rouge", "completions/mean_length",
                "completions/clipped_ratio", "clip_fraction", "entropy", "grad_norm", "lr", "time/rollout",
                "time/update", "lampo/weight_mean", "lampo/weight_std", "lampo/misordered_pairs",
                "lampo/seq_logp_std", "lampo/corr_rloo"):
        assert key in steps[0], key
    assert "eval/accuracy" in metrics[0] and "eval/accuracy" in metrics[-1]
    assert steps[0]["lr"] == pytest.approx(1e-3)
    assert all(m["lampo/tau"] == 1.0 for m in steps)                  # τ in nats unless --relative_tau
    # the policy moved
    from transformers import AutoModelForCausalLM
    initial = AutoModelForCausalLM.from_pretrained(out / "initial")
    final = AutoModelForCausalLM.from_pretrained(out / "final")
    assert not torch.equal(initial.model.embed_tokens.weight, final.model.embed_tokens.weight)


def numeric_rows(path) -> dict:
    """{(step, name): value} of metrics.jsonl's numbers, the last value of a repeated (step, name) winning."""
    return {(row["step"], name): value for row in read_jsonl(path) for name, value in row.items()
            if name != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)}


def wandb_history(run_file) -> dict:
    """{(step, name): value} read back from an offline wandb run file (run-*.wandb): the records are wandb's
    protobufs in the LevelDB log format (32 KiB blocks of chunks: crc32, little-endian length, type)."""
    import struct
    from wandb.proto import wandb_internal_pb2
    raw, position, chunks, history = open(run_file, "rb").read(), 7, b"", {}   # 7: the ":W&B" file header
    while position + 7 <= len(raw):
        if 32768 - position % 32768 < 7:                     # a block's tail too short for a chunk header: padding
            position += 32768 - position % 32768
            continue
        length, kind = struct.unpack("<HB", raw[position + 4:position + 7])
        chunks += raw[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):                                   # FULL, or LAST of FIRST/MIDDLE/LAST
            record = wandb_internal_pb2.Record.FromString(chunks)
            chunks = b""
            if record.WhichOneof("record_type") == "history":
                items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
                for name, value in items.items():
                    if not name.startswith("_"):
                        history[(items["_step"], name)] = value
    return history


@pytest.mark.parametrize("tracker", ["tensorboard", "wandb"])
def test_report_to_logs_the_rows_of_metrics_jsonl(tiny_model_dir, tmp_path, monkeypatch, tracker):
    """--report_to writes every number of metrics.jsonl at its step, read back from the offline writers' files."""
    pytest.importorskip(tracker)              # optional packages: CI installs both, so CI runs both cases
    import train
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    train.main(tiny_args(tiny_model_dir, out, "--eval_every", "1", "--report_to", tracker))
    expected = numeric_rows(out / "metrics.jsonl")
    assert {step for step, _ in expected} == {0, 1, 2} and (2, "eval/accuracy") in expected and (1, "loss") in expected
    if tracker == "tensorboard":
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
        events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0}).Reload()
        logged = {(event.step, name): event.value for name in events.Tags()["scalars"] for event in events.Scalars(name)}
    else:   # wandb's service process may still be writing the run file when finish() returns: wait for it
        run_file, deadline = next((out / "wandb").glob("offline-run-*/run-*.wandb")), time.time() + 60
        while (logged := wandb_history(run_file)).keys() != expected.keys() and time.time() < deadline:
            time.sleep(0.5)
    assert logged.keys() == expected.keys()
    assert all(logged[key] == pytest.approx(value, rel=1e-6) for key, value in expected.items())


def test_report_to_a_missing_tracker_is_one_line_before_loading(tiny_model_dir, tmp_path, monkeypatch):
    import importlib.util
    import train
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    with pytest.raises(SystemExit) as exit_info:
        train.main(tiny_args(tiny_model_dir, tmp_path / "run", "--report_to", "wandb"))
    assert exit_info.value.code == "train.py: error: --report_to wandb needs the wandb package: pip install wandb"
    assert not (tmp_path / "run" / "initial").exists()                 # refused before anything loaded


def test_train_with_the_fast_engine_matches_plain_under_greedy_eval(tiny_model_dir, tmp_path):
    import train
    train.main(tiny_args(tiny_model_dir, tmp_path / "fast", "--rollout_engine", "fast"))
    train.main(tiny_args(tiny_model_dir, tmp_path / "plain", "--rollout_engine", "plain"))
    fast, plain = read_jsonl(tmp_path / "fast" / "metrics.jsonl"), read_jsonl(tmp_path / "plain" / "metrics.jsonl")
    assert [m["step"] for m in fast] == [m["step"] for m in plain]
    assert fast[0]["eval/accuracy"] == plain[0]["eval/accuracy"]          # greedy: the same completions
    assert fast[0]["eval/mean_completion_tokens"] == plain[0]["eval/mean_completion_tokens"]
    assert all(m["completions/mean_length"] > 0 for m in fast if "reward" in m)


def test_resume_continues_exactly(tiny_model_dir, tmp_path):
    import train
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train.main(tiny_args(tiny_model_dir, straight, "--num_steps", "3", "--save_every", "1"))
    train.main(tiny_args(tiny_model_dir, resumed, "--num_steps", "2", "--save_every", "1"))
    train.main(tiny_args(tiny_model_dir, resumed, "--num_steps", "3", "--save_every", "1", "--resume"))
    a = read_jsonl(straight / "metrics.jsonl")
    b = read_jsonl(resumed / "metrics.jsonl")
    assert [m["step"] for m in a] == [m["step"] for m in b]
    for x, y in zip(a, b):
        if "reward" in x:
            assert x["reward"] == pytest.approx(y["reward"]) and x["loss"] == pytest.approx(y["loss"], abs=1e-6)
    from transformers import AutoModelForCausalLM
    wa = AutoModelForCausalLM.from_pretrained(straight / "final").state_dict()
    wb = AutoModelForCausalLM.from_pretrained(resumed / "final").state_dict()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=1e-6, rtol=1e-5)


def test_resume_inside_the_warm_up_with_two_epochs_continues_exactly(tiny_model_dir, tmp_path):
    """Interrupted at step 2 of a 5-step warm-up, 2 epochs per step: the learning rate, AdamW's moments and the
    mini-batch order all carry over, so the resumed run is the uninterrupted one."""
    import train
    extra = ("--warmup_steps", "5", "--epochs", "2", "--save_every", "1", "--eval_benchmark", "none")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train.main(tiny_args(tiny_model_dir, straight, "--num_steps", "4", *extra))
    train.main(tiny_args(tiny_model_dir, resumed, "--num_steps", "2", *extra))
    train.main(tiny_args(tiny_model_dir, resumed, "--num_steps", "4", "--resume", *extra))
    a, b = read_jsonl(straight / "metrics.jsonl"), read_jsonl(resumed / "metrics.jsonl")
    assert [m["lr"] for m in a] == pytest.approx([1e-3 * k / 5 for k in (1, 2, 3, 4)])     # still warming up
    assert [m["lr"] for m in b] == pytest.approx([m["lr"] for m in a], rel=1e-12)
    assert [m["optimizer_steps"] for m in b] == [4] * 4                                   # 2 epochs × 2 mini-batches
    for x, y in zip(a, b):
        assert x["reward"] == pytest.approx(y["reward"]) and x["loss"] == pytest.approx(y["loss"], abs=1e-6)
    from transformers import AutoModelForCausalLM
    wa = AutoModelForCausalLM.from_pretrained(straight / "final").state_dict()
    wb = AutoModelForCausalLM.from_pretrained(resumed / "final").state_dict()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=1e-6, rtol=1e-5)


def test_setup_randomness_does_not_change_the_run(tiny_model_dir, tmp_path, monkeypatch):
    """A cold cache (the toy warm start runs in-process and draws random numbers) must give the same run
    as a warm one."""
    import train
    train.main(tiny_args(tiny_model_dir, tmp_path / "a"))
    real_load_model = train.load_model
    monkeypatch.setattr(train, "load_model", lambda *a, **k: (torch.rand(1000), random.random(), real_load_model(*a, **k))[-1])
    train.main(tiny_args(tiny_model_dir, tmp_path / "b"))
    rewards_a = [m["reward"] for m in read_jsonl(tmp_path / "a" / "metrics.jsonl") if "reward" in m]
    rewards_b = [m["reward"] for m in read_jsonl(tmp_path / "b" / "metrics.jsonl") if "reward" in m]
    assert rewards_a == rewards_b
    samples_a = read_jsonl(tmp_path / "a" / "samples.jsonl")
    assert samples_a == read_jsonl(tmp_path / "b" / "samples.jsonl")


def test_ctrl_c_finishes_the_step_saves_and_exits(tiny_model_dir, tmp_path, monkeypatch):
    import rewards
    import train
    calls = {"n": 0}
    real_reward = rewards.reward

    def reward_then_interrupt(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 7:                      # during step 2's reward phase (6 completions per step)
            os.kill(os.getpid(), signal.SIGINT)
        return real_reward(*args, **kwargs)

    monkeypatch.setattr(rewards, "reward", reward_then_interrupt)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        train.main(tiny_args(tiny_model_dir, out, "--num_steps", "5", "--save_every", "0"))
    assert exit_info.value.code == 130
    assert (out / "checkpoint-2" / "trainer_state.pt").exists()
    assert not (out / "final").exists()
    assert torch.load(out / "checkpoint-2" / "trainer_state.pt", weights_only=False)["step"] == 2


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_checkpoint(tiny_model_dir, tmp_path, monkeypatch):
    import train
    real_loss = lambdapo.clipped_policy_loss
    calls = {"n": 0}

    def loss_that_turns_nan(*args, **kwargs):
        calls["n"] += 1
        loss, stats = real_loss(*args, **kwargs)
        return (loss * float("nan"), stats) if calls["n"] > 6 else (loss, stats)   # 4 micro-batches a step: step 2

    monkeypatch.setattr(lambdapo, "clipped_policy_loss", loss_that_turns_nan)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        train.main(tiny_args(tiny_model_dir, out, "--num_steps", "3", "--save_every", "1"))
    message = str(exit_info.value.code)
    assert "non-finite loss" in message and "checkpoint-1" in message and "\n" not in message
    assert (out / "checkpoint-1" / "trainer_state.pt").exists()


@pytest.mark.parametrize("extra, message", [
    (["--group_size", "1"], "group_size must be at least 2"),
    (["--model", "/no/such/model"], "model folder not found"),
    (["--model", os.path.dirname(os.path.abspath(__file__))], "could not load local folder"),   # no config.json
])
def test_bad_input_gives_one_line_error(tiny_model_dir, tmp_path, capsys, extra, message):
    import train
    with pytest.raises(SystemExit) as exit_info:
        train.main(tiny_args(tiny_model_dir, tmp_path / "run", *extra))
    assert message in str(exit_info.value.code) and "\n" not in str(exit_info.value.code)


def test_gguf_file_errors_are_one_line_in_train_eval_and_bench(tiny_model_dir, tmp_path, monkeypatch):
    import bench
    import eval as evaluation
    import train
    import transformers.utils
    fake = tmp_path / "model.Q4_1.gguf"
    fake.write_bytes(b"GGUF")                  # exists; its content is never reached without the package
    monkeypatch.setattr(transformers.utils, "is_gguf_available", lambda *args: False)   # gguf not installed
    for main, argv in [(train.main, tiny_args(tiny_model_dir, tmp_path / "run", "--model", str(fake))),
                       (evaluation.main, ["--model", str(fake), "--benchmark", "toy", "--limit", "1"]),
                       (bench.main, ["--model", str(fake)])]:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        message = str(exit_info.value.code)
        assert "needs the gguf package (pip install 'gguf>=" in message and "\n" not in message, message
    with pytest.raises(SystemExit, match="GGUF file not found: .*missing.gguf"):
        train.main(tiny_args(tiny_model_dir, tmp_path / "run", "--model", str(tmp_path / "missing.gguf")))
    with pytest.raises(SystemExit, match="GGUF file not found"):
        bench.main(["--model", "missing.gguf"])


def test_unknown_algo_is_a_one_line_error(capsys):
    import train
    with pytest.raises(SystemExit) as exit_info:
        train.parse_config(["--algo", "ppo"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "invalid choice: 'ppo'" in err and len(err.splitlines()) == 1


def test_out_dir_with_a_run_is_refused_without_resume_or_overwrite(tiny_model_dir, tmp_path):
    import train
    out = tmp_path / "run"
    train.main(tiny_args(tiny_model_dir, out, "--num_steps", "1"))
    with pytest.raises(SystemExit) as exit_info:
        train.main(tiny_args(tiny_model_dir, out, "--num_steps", "1"))
    assert "holds another run" in str(exit_info.value.code)
    train.main(tiny_args(tiny_model_dir, out, "--num_steps", "1", "--overwrite"))
    assert len([m for m in read_jsonl(out / "metrics.jsonl") if "reward" in m]) == 1


def test_help_documents_every_option(capsys):
    import dataclasses
    import train
    with pytest.raises(SystemExit):
        train.parse_config(["--help"])
    text = capsys.readouterr().out
    for item in dataclasses.fields(train.Config):
        assert f"--{item.name}" in text


def test_beta_loads_reference_and_logs_kl(tiny_model_dir, tmp_path):
    import train
    train.main(tiny_args(tiny_model_dir, tmp_path / "run", "--num_steps", "2", "--beta", "0.1"))
    steps = [m for m in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "reward" in m]
    assert all("kl" in m and m["kl"] >= 0 for m in steps)
    assert steps[-1]["kl"] > 0                   # the policy moved away from the reference after step 1


def test_llm_preset_runs_offline_on_local_files(tiny_model_dir, tmp_path, capsys):
    """The real-run path (`--model PATH`: MATH-style data, gradient checkpointing, micro-batches, MATH-500
    evaluation) through local files, as a user without network would run it."""
    import train
    out = tmp_path / "run"
    train.main(["--model", tiny_model_dir, "--out_dir", str(out), "--data_file", os.path.join(FIXTURES, "math_train.jsonl"),
                "--eval_data_file", os.path.join(FIXTURES, "math500.jsonl"), "--num_steps", "1",
                "--prompts_per_step", "2", "--group_size", "2", "--max_new_tokens", "6", "--plot", "false"])
    config = json.loads((out / "config.json").read_text())
    assert config["dataset"] == "math" and config["gradient_checkpointing"] and config["lr"] == 1e-6
    assert config["eval_benchmark"] == "math500"
    metrics = read_jsonl(out / "metrics.jsonl")
    assert metrics[0]["eval/n"] == 3 and any("reward" in m for m in metrics)
    assert "memory estimate (GiB)" in capsys.readouterr().out


def test_prompt_batches_are_deterministic_and_cover_the_dataset():
    import train
    records = [{"prompt": str(i)} for i in range(10)]
    seen = [r["prompt"] for step in range(5) for r in train.prompt_batch(records, step, 2, seed=3)]
    assert sorted(seen) == [str(i) for i in range(10)]           # one epoch = every record once
    second_epoch = [r["prompt"] for step in range(5, 10) for r in train.prompt_batch(records, step, 2, seed=3)]
    assert sorted(second_epoch) == sorted(seen) and second_epoch != seen     # every record again, reshuffled
    other_seed = [r["prompt"] for step in range(5) for r in train.prompt_batch(records, step, 2, seed=4)]
    assert other_seed != seen                                     # the seed chooses the order
    # stateless: step 7 alone is the 4th and 5th record of the second epoch's order (what --resume relies on)
    assert [r["prompt"] for r in train.prompt_batch(records, 7, 2, seed=3)] == second_epoch[4:6]


# ===================================================================================================
# 5a. The loop oracle: one train.py run watched from outside and recomputed independently
#
# `LoopSpy` records what the loop did without changing it: the rollouts it sampled (the real
# rollout.generate, wrapped) and, at every optimizer step, the weights, the gradient and the learning
# rate the optimizer was handed (a global optimizer pre-step hook). `loop_oracle` then recomputes every
# step from those rollouts with its own code (a plain full forward at the sampling temperature, its own
# masks, its own advantage and loss formulas, its own mini-batch order, its own gradient clipping) and
# checks the gradients, the logged metrics and the AdamW trajectory against it. A loop that ascends, uses
# the wrong temperature, regroups ℓ, forgets a mask, a scale, an epoch or the schedule fails here.
# ===================================================================================================
class LoopSpy:
    def __init__(self, monkeypatch):
        import train
        self.rollouts, self.samplings, self.prompts, self.steps = [], [], [], []
        real_generate = train.generate

        def generate(model, tokenizer, prompts, group_size, sampling, **kwargs):
            result = real_generate(model, tokenizer, prompts, group_size, sampling, **kwargs)
            self.rollouts.append(result)
            self.samplings.append(sampling)
            self.prompts.append(list(prompts))
            return result

        def before_optimizer_step(optimizer, args, kwargs):
            params = [p for group in optimizer.param_groups for p in group["params"]]
            self.steps.append({"weights": [p.detach().clone() for p in params],
                               "grads": [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
                                         for p in params],
                               "lr": optimizer.param_groups[0]["lr"]})

        monkeypatch.setattr(train, "generate", generate)
        self.handle = register_optimizer_step_pre_hook(before_optimizer_step)

    def close(self):
        self.handle.remove()


def oracle_advantages(algo, r, ell, tau, scale_by_std):
    """A (G,) for one group, written out as the equations read (python floats, no lambdapo)."""
    G = len(r)
    mean, std = sum(r) / G, statistics.stdev(r)
    if algo == "lampo":
        def w(i, j):
            s = (r[i] > r[j]) - (r[i] < r[j])
            return 2 * sigmoid(-s * (ell[i] - ell[j]) / tau)
        A = [sum((r[i] - r[j]) * w(i, j) for j in range(G) if j != i) / (G - 1) for i in range(G)]
        scale = bool(scale_by_std)
    elif algo in ("grpo", "dr_grpo"):
        A = [x - mean for x in r]
        scale = (algo == "grpo") if scale_by_std is None else scale_by_std
    else:                                                                   # rloo: r_i − mean of the others
        A = [r[i] - (sum(r) - r[i]) / (G - 1) for i in range(G)]
        scale = False
    return [a / (std + 1e-6) for a in A] if scale else A


def oracle_loss(logps, old, ref, A, mask, options, is_weights=None):
    """The clipped surrogate + k3 KL of docs/design.md §1 over the rows given (one whole mini-batch).
    With importance_level "sequence" (GSPO) each row's tokens share exp(mean over its real tokens of the log ratio)."""
    if options.get("importance_level", "token") == "sequence":
        rows = []
        for i in range(logps.shape[0]):
            real = mask[i].bool()
            log_s = (logps[i][real] - old[i][real]).mean() if real.any() else logps.new_zeros(())
            rows.append(torch.exp(log_s).expand(logps.shape[1]))
        ratio = torch.stack(rows)
    else:
        ratio = torch.exp(logps - old)
    clipped_ratio = ratio.clamp(1 - options["clip_low"], 1 + options["clip_high"])
    pg = -torch.minimum(ratio * A[:, None], clipped_ratio * A[:, None])
    if is_weights is not None:
        pg = pg * is_weights
    per_token = pg
    if options["beta"] > 0:
        d = ref - logps
        per_token = pg + options["beta"] * (torch.exp(d) - d - 1)
    m = mask.float()
    if options["aggregation"] == "token-mean":
        loss = (per_token * m).sum() / m.sum().clamp_min(1)
    elif options["aggregation"] == "seq-mean":
        loss = ((per_token * m).sum(1) / m.sum(1).clamp_min(1)).mean()
    else:                                                                   # fixed-length: B · T
        loss = (per_token * m).sum() / (m.shape[0] * m.shape[1])
    clipped = ((clipped_ratio * A[:, None]) < (ratio * A[:, None])).float() * m
    kl = (torch.exp(ref - logps) - (ref - logps) - 1) * m if ref is not None else None
    policy_kl = ((torch.exp(old - logps) - (old - logps) - 1) * m).sum().item()      # k3 of π_θ from π_old
    return loss, clipped.sum().item(), (kl.sum().item() if kl is not None else 0.0), policy_kl


@pytest.fixture(scope="module")
def eos_model_dir(tmp_path_factory):
    """The tiny random model, with its EOS logit raised along the mean hidden state: about a third of its
    8-token completions run to the budget and the rest stop early, so every oracle case meets real
    masks, padding after EOS and truncation (the plain random model almost never says EOS)."""
    path = tmp_path_factory.mktemp("eos_model")
    tokenizer = toy.build_tokenizer()
    model = toy.build_model(tokenizer, seed=0).eval()
    prompts = tokenizer(["12+34=", "5+7=", "345+678=", "9+9="], return_tensors="pt", padding=True)
    with torch.no_grad():
        hidden = model.model(**prompts).last_hidden_state.reshape(-1, model.config.hidden_size).mean(0)
        model.lm_head.weight[tokenizer.eos_token_id] = hidden * 2.5 / hidden.square().sum()   # EOS logit ≈ 2.5
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def answers_world(tmp_path_factory):
    """A tiny model that answers "3" to anything about half the time (25 quick SFT steps on the toy model), and
    two problems, 1+2 (gold 3) and 2+2 (gold 4): right and wrong answers in one group, and a reward that
    depends on which problem a completion belongs to. (model folder, training file)"""
    path = tmp_path_factory.mktemp("answers")
    problems = [{"problem": "1+2=", "answer": "3", "solution": "1+2=3"},
                {"problem": "2+2=", "answer": "4", "solution": "2+2=4"}]
    (path / "sums.jsonl").write_text("".join(json.dumps(p) + "\n" for p in problems))
    records = data.load_train_dataset(str(path / "sums.jsonl"))
    tokenizer = toy.build_tokenizer()
    model = toy.build_model(tokenizer, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    rng = random.Random(0)
    for _ in range(25):
        pairs = [(rng.choice(records)["prompt"], "3" if rng.random() < 0.5 else str(rng.randrange(10))) for _ in range(16)]
        prompts = [tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                                           add_generation_prompt=True), add_special_tokens=False)["input_ids"]
                   for q, _ in pairs]
        targets = [tokenizer(a + toy.EOS, add_special_tokens=False)["input_ids"] for _, a in pairs]
        width = max(len(p) + len(t) for p, t in zip(prompts, targets))
        ids = torch.full((16, width), tokenizer.pad_token_id)
        attention, labels = torch.zeros(16, width, dtype=torch.long), torch.full((16, width), -100)
        for row, (p, t) in enumerate(zip(prompts, targets)):
            ids[row, width - len(p) - len(t):] = torch.tensor(p + t)
            attention[row, width - len(p) - len(t):] = 1
            labels[row, width - len(t):] = torch.tensor(t)
        loss = model(input_ids=ids, attention_mask=attention, labels=labels,
                     position_ids=(attention.cumsum(-1) - 1).clamp_min(0)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(path / "model")
    tokenizer.save_pretrained(path / "model")
    return str(path / "model"), str(path / "sums.jsonl")


LOOP_DEFAULTS = dict(algo="lampo", tau=1.0, relative_tau=False, seq_logp="mean", scale_by_std="auto",
                     clip_low=0.2, clip_high=0.2, beta=0.0, aggregation="token-mean", rouge_weight=1.0,
                     mask_truncated=False, tis_cap=0.0, group_size=4, prompts_per_step=2, max_new_tokens=8,
                     temperature=1.0, top_p=1.0, num_steps=2, lr=1e-3, warmup_steps=3, weight_decay=0.0,
                     max_grad_norm=1.0, epochs=1, mini_batches=2, micro_batch_size=3, seed=0)


def run_loop_oracle(model_dir, out_dir, monkeypatch, dataset="toy", **changes):
    """Run train.py with LOOP_DEFAULTS + changes, recompute it, assert agreement; returns what it saw."""
    import train
    from transformers import AutoModelForCausalLM
    options = {**LOOP_DEFAULTS, **changes}
    args = ["--model", model_dir, "--out_dir", str(out_dir), "--dataset", dataset, "--eval_benchmark", "none",
            "--save_every", "0", "--plot", "false", "--gradient_checkpointing", "false"]
    for name, value in options.items():
        args += [f"--{name}", str(value)]
    spy = LoopSpy(monkeypatch)
    try:
        train.main(args)
    finally:
        spy.close()
    for name in ("clip_low", "clip_high"):              # a case may leave them to the preset: what the run chose
        options[name] = json.loads((out_dir / "config.json").read_text())[name]

    tokenizer = toy.build_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(out_dir / "initial", dtype=torch.float32).eval()
    params = [p for p in model.parameters()]
    record_list = data.load_train_dataset(dataset, seed=options["seed"])
    records = {r["prompt"]: r for r in record_list}
    G, T_sample = options["group_size"], options["temperature"]
    scale_by_std = {"auto": None, "true": True, "false": False}[options["scale_by_std"]]
    dynamic = str(options.get("dynamic_sampling", False)).lower() == "true"
    # every round of sampling reads the next prompts_per_step prompts of one seeded order (records_at)
    assert [p for prompts in spy.prompts for p in prompts] == [
        r["prompt"] for r in train.prompt_batch(record_list, 0, len(spy.prompts) * options["prompts_per_step"],
                                                options["seed"])]
    if not dynamic:
        assert len(spy.rollouts) == options["num_steps"]
    metrics = [m for m in read_jsonl(out_dir / "metrics.jsonl") if "reward" in m]
    assert len(metrics) == options["num_steps"]

    def load(weights):
        with torch.no_grad():
            for p, w in zip(params, weights):
                p.copy_(w)

    def forward(weights, ids, attention, completion_ids):
        load(weights)
        return plain_logprobs(model, ids, attention, completion_ids, T_sample, options["top_p"])      # (B, T)

    generator = torch.Generator().manual_seed(options["seed"])              # the documented mini-batch order
    seen = {"advantages": [], "truncated": 0, "finished": 0, "clipped_tokens": 0.0, "norm_clipped": 0, "kl": 0.0,
            "batches": [], "right": 0, "wrong": 0, "rounds": [], "groups_sampled": 0, "groups_trained": 0,
            "surplus": 0}
    rounds = list(zip(spy.rollouts, spy.prompts, spy.samplings))            # every generate call, in order
    first_update, step_starts = 0, []                                       # where each RL step's updates begin
    for step in range(options["num_steps"]):
        # --- this step's rounds of sampling: one, or with dynamic sampling as many as the rule asks for ---
        P, eos = options["prompts_per_step"], tokenizer.eos_token_id
        step_rounds, kept, with_spread = [], [], 0
        while True:
            result, prompts, sampling = rounds.pop(0)
            assert sampling.temperature == T_sample and sampling.top_p == options["top_p"] and not sampling.greedy
            is_eos = (result.completion_ids == eos).long()
            round_mask = ((is_eos.cumsum(1) - is_eos) == 0).long()          # up to and including the first EOS
            round_r = []
            for row, text in enumerate(result.completions):
                record = records[prompts[row // G]]
                round_r.append(rewards.accuracy_reward(text, record["answer"])
                               + options["rouge_weight"] * rewards.rouge_l_reward(text, record["solution"]))
            step_rounds.append((result, prompts, round_mask, is_eos.sum(1) == 0, round_r))
            for g in range(len(prompts)):
                spread = max(round_r[g * G:(g + 1) * G]) != min(round_r[g * G:(g + 1) * G])
                with_spread += spread
                if dynamic and spread and len(kept) < P:
                    kept.append((len(step_rounds) - 1, g))
            if not dynamic or len(kept) >= P or len(step_rounds) == options["max_generation_rounds"]:
                break
        if not kept:                               # no dynamic sampling, or nothing kept: the last round, whole
            kept = [(len(step_rounds) - 1, g) for g in range(len(step_rounds[-1][1]))]
        seen["surplus"] += with_spread - len(kept) if with_spread else 0       # groups with a spread, dropped
        seen["rounds"].append(len(step_rounds))
        seen["groups_sampled"] += sum(len(prompts) for _, prompts, _, _, _ in step_rounds)
        seen["groups_trained"] += len(kept)
        # --- the trained rows, re-padded here: prompts on the left, completions on the right, masks 0 there ---
        rows_of = [(step_rounds[i], g * G + k) for i, g in kept for k in range(G)]
        P_max = max(rnd[0].prompt_ids.shape[1] for rnd, _ in rows_of)
        T_max = max(rnd[0].completion_ids.shape[1] for rnd, _ in rows_of)

        def padded(ids, width, left):                                       # (w,) token ids -> (width,)
            fill = ids.new_full((width - ids.shape[0],), tokenizer.pad_token_id)
            return torch.cat([fill, ids] if left else [ids, fill])

        prompt_ids = torch.stack([padded(rnd[0].prompt_ids[row], P_max, True) for rnd, row in rows_of])
        prompt_mask = torch.stack([torch.cat([torch.zeros(P_max - rnd[0].prompt_ids.shape[1], dtype=torch.long),
                                              rnd[0].prompt_mask[row].long()]) for rnd, row in rows_of])
        completion_ids = torch.stack([padded(rnd[0].completion_ids[row], T_max, False) for rnd, row in rows_of])
        mask = torch.stack([torch.cat([rnd[2][row], torch.zeros(T_max - rnd[2].shape[1], dtype=torch.long)])
                            for rnd, row in rows_of])
        truncated = torch.stack([rnd[3][row] for rnd, row in rows_of])
        sampling_logps = None
        if step_rounds[0][0].sampling_logps is not None:
            sampling_logps = torch.stack([torch.cat([rnd[0].sampling_logps[row],
                                                     torch.zeros(T_max - rnd[0].completion_ids.shape[1])])
                                          for rnd, row in rows_of])
        completions = [rnd[0].completions[row] for rnd, row in rows_of]
        prompts = [step_rounds[i][1][g] for i, g in kept]
        r = [rnd[4][row] for rnd, row in rows_of]
        B = len(r)
        per_step = options["epochs"] * min(options["mini_batches"], B)
        optimizer_steps = spy.steps[first_update:first_update + per_step]
        assert len(optimizer_steps) == per_step                             # every epoch, every mini-batch
        step_starts.append(first_update)
        first_update += per_step
        # π_old is the policy the step started from; π_ref the initial policy
        ids = torch.cat([prompt_ids, completion_ids], 1)
        attention = torch.cat([prompt_mask, mask], 1)
        seen["truncated"] += int(truncated.sum())
        seen["finished"] += int((~truncated).sum())
        old = forward(optimizer_steps[0]["weights"], ids, attention, completion_ids).detach()
        ref = forward(spy.steps[0]["weights"], ids, attention, completion_ids).detach()
        if sampling_logps is not None:                                      # the sampler is π_old at T
            torch.testing.assert_close(sampling_logps * mask, old * mask, atol=1e-4, rtol=1e-4)
        # rewards, grouped by prompt (rows i·G … i·G+G−1 belong to prompts[i]), computed with the rounds above
        for row, text in enumerate(completions):
            seen["right" if rewards.accuracy_reward(text, records[prompts[row // G]]["answer"]) else "wrong"] += 1
        # sequence scores and advantages, group by group
        token_sums = (old * mask).sum(1)
        ell = token_sums / mask.sum(1) if options["seq_logp"] == "mean" else token_sums
        groups = [list(range(g * G, (g + 1) * G)) for g in range(len(prompts))]
        tau = options["tau"]
        if options["relative_tau"]:
            tau = tau * sum(statistics.stdev([ell[i].item() for i in rows]) for rows in groups) / len(groups)
        A = torch.zeros(len(r))
        for rows in groups:
            A[rows] = torch.tensor(oracle_advantages(options["algo"], [r[i] for i in rows],
                                                     [ell[i].item() for i in rows], tau, scale_by_std))
        seen["advantages"].append(A)
        loss_mask = mask * (~truncated).long()[:, None] if options["mask_truncated"] else mask
        is_weights = None
        if options["tis_cap"]:
            is_weights = torch.exp(old - sampling_logps).clamp(max=options["tis_cap"]) * mask
        # the optimizer steps of this RL step
        losses, norms, clipped_tokens, kl_sum, policy_kl_sum, tokens = [], [], 0.0, 0.0, 0.0, 0.0
        orders = [torch.randperm(len(r), generator=generator) for _ in range(options["epochs"])]
        mini_batches = [rows for order in orders for rows in order.tensor_split(min(options["mini_batches"], B))]
        for observed, rows in zip(optimizer_steps, mini_batches):
            logps = forward(observed["weights"], ids[rows], attention[rows], completion_ids[rows])
            model.zero_grad()
            loss, clipped, kl, policy_kl = oracle_loss(logps, old[rows], ref[rows], A[rows], loss_mask[rows], options,
                                                       None if is_weights is None else is_weights[rows])
            loss.backward()
            grads = [p.grad.clone() for p in params]
            norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
            grads = [g * min(1.0, options["max_grad_norm"] / (norm.item() + 1e-6)) for g in grads]
            seen["norm_clipped"] += int(norm.item() > options["max_grad_norm"])
            norms.append(norm.item())
            expected, got = torch.cat([g.flatten() for g in grads]), torch.cat([g.flatten() for g in observed["grads"]])
            assert expected.norm() > 0, "a vacuous case: the oracle's gradient is zero"
            error = ((got - expected).norm() / expected.norm()).item()
            assert error < 1e-3, f"RL step {step + 1}: the loop's gradient is {error:.2e} away from the oracle's"
            losses.append(loss.item())
            clipped_tokens += clipped
            kl_sum += kl
            policy_kl_sum += policy_kl
            tokens += float(loss_mask[rows].sum())
        seen["clipped_tokens"] += clipped_tokens
        seen["kl"] += kl_sum
        seen["batches"].append((ids, attention, completion_ids, A, loss_mask))
        # the learning rate: linear warm-up over RL steps, then constant; the same for every mini-batch
        factor = min(1.0, (step + 1) / max(options["warmup_steps"], 1))
        for observed in optimizer_steps:
            assert observed["lr"] == pytest.approx(options["lr"] * factor, rel=1e-9)
        # the logged metrics are the step's
        logged = metrics[step]
        assert logged["reward"] == pytest.approx(sum(r) / len(r), abs=1e-6)
        assert logged["accuracy"] == pytest.approx(sum(rewards.accuracy_reward(text, records[prompts[row // G]]["answer"])
                                                       for row, text in enumerate(completions)) / len(r))
        assert logged["advantages/abs_mean"] == pytest.approx(A.abs().mean().item(), abs=1e-5)
        assert logged["loss"] == pytest.approx(sum(losses) / len(losses), abs=1e-5)
        assert logged["clip_fraction"] == pytest.approx(clipped_tokens / max(tokens, 1), abs=1e-6)
        assert logged["optimizer_steps"] == per_step and logged["lr"] == pytest.approx(options["lr"] * factor)
        assert logged["completions/clipped_ratio"] == pytest.approx(truncated.float().mean().item())
        assert logged["reward/grader_errors"] == 0
        assert logged["lampo/tau"] == pytest.approx(tau, rel=1e-5)
        if dynamic:     # the sampling cost and the filter's pass rate, as the rounds above recount them
            sampled = sum(len(prompts) for _, prompts, _, _, _ in step_rounds)
            assert logged["dynamic_sampling/rounds"] == len(step_rounds)
            assert logged["dynamic_sampling/groups_kept"] == (len(kept) if with_spread else 0)
            assert logged["dynamic_sampling/kept_share"] == pytest.approx(with_spread / sampled)
            assert logged["dynamic_sampling/completions_generated"] == sampled * G
            assert logged["dynamic_sampling/completions_total"] == (len(spy.prompts) - len(rounds)) * P * G
        else:
            assert not any(key.startswith("dynamic_sampling/") for key in logged)
        if options["beta"] > 0:
            # relative: a float32 sum over the step's tokens (a KL near 1.6 after a large --lr step: 1e-6 absolute
            # is below float32's resolution of a differently ordered sum)
            assert logged["kl"] == pytest.approx(kl_sum / max(tokens, 1), rel=1e-5, abs=1e-6)
        assert logged["policy_kl"] == pytest.approx(policy_kl_sum / max(tokens, 1), rel=1e-5, abs=1e-6)
        assert logged["grad_norm"] == pytest.approx(sum(norms) / len(norms), rel=1e-4)     # before clipping
        # entropy of softmax(logits / T) under π_old, over the real completion tokens
        with torch.no_grad():
            load(optimizer_steps[0]["weights"])
            positions = (attention.cumsum(-1) - 1).clamp_min(0)
            logits = model(input_ids=ids, attention_mask=attention, position_ids=positions).logits
            scaled = logits[:, -completion_ids.shape[1] - 1:-1].float() / T_sample
            if options["top_p"] < 1.0:                                      # of the renormalised nucleus
                scaled = nucleus_log_mass(scaled, options["top_p"])[1]
            logp_all = torch.log_softmax(scaled, dim=-1)
            entropy = -torch.where(logp_all.isfinite(), logp_all.exp() * logp_all, 0.0).sum(-1)
        assert logged["entropy"] == pytest.approx(((entropy * mask).sum() / mask.sum()).item(), rel=1e-4)
        assert logged["completions/mean_length"] == pytest.approx(mask.sum(1).float().mean().item())
    assert not rounds and first_update == len(spy.steps)                    # every rollout and update accounted for
    # AdamW, fed the (now verified) gradients, reproduces every step's weights and final/
    weights = [w.clone().requires_grad_(True) for w in spy.steps[0]["weights"]]
    adam = torch.optim.AdamW(weights, lr=options["lr"], weight_decay=options["weight_decay"])
    for index, observed in enumerate(spy.steps):
        for w, expected in zip(weights, observed["weights"]):
            torch.testing.assert_close(w.detach(), expected, atol=1e-6, rtol=0)
        for group in adam.param_groups:
            group["lr"] = observed["lr"]
        for w, g in zip(weights, observed["grads"]):
            w.grad = g
        adam.step()
    final = AutoModelForCausalLM.from_pretrained(out_dir / "final", dtype=torch.float32)
    for w, p in zip(weights, final.parameters()):
        torch.testing.assert_close(w.detach(), p.detach(), atol=1e-6, rtol=0)
    # The direction: over each RL step, Σ_i A_i · log π(o_i) (the log-likelihood of the completions
    # weighted by their advantages) rises: completions with A > 0 became likelier, those with A < 0 less so.
    ends = [spy.steps[i]["weights"] for i in step_starts[1:]] + [[p.detach() for p in final.parameters()]]
    seen["objective"] = []
    for step, (ids, attention, completion_ids, A, loss_mask) in enumerate(seen["batches"]):
        start = spy.steps[step_starts[step]]["weights"]
        with torch.no_grad():
            before, after = (forward(w, ids, attention, completion_ids) for w in (start, ends[step]))
        seen["objective"].append([float((A * (logps * loss_mask).sum(1)).sum()) for logps in (before, after)])
    return seen


LOOP_CASES = {
    "lampo": {},
    "temperature": {"temperature": 0.7},
    "seq_logp sum": {"seq_logp": "sum"},
    "scale_by_std": {"scale_by_std": "true"},
    "seq-mean": {"aggregation": "seq-mean"},
    "fixed-length": {"aggregation": "fixed-length"},
    "mask_truncated": {"mask_truncated": "true"},
    "beta": {"beta": 1.0},
    "epochs": {"epochs": 2, "weight_decay": 0.1},
    "one mini-batch, one row per micro": {"mini_batches": 1, "micro_batch_size": 1},
    "three mini-batches, whole micro": {"mini_batches": 3, "micro_batch_size": 8},
    "relative_tau": {"relative_tau": "true", "tau": 0.5},
    "tight clip and grad norm": {"clip_low": 0.001, "clip_high": 0.002, "max_grad_norm": 0.01, "epochs": 2},
    "grpo": {"algo": "grpo"},
    "dr_grpo": {"algo": "dr_grpo"},
    "rloo": {"algo": "rloo", "tau": 0.3},
    "fast engine, TIS": {"rollout_engine": "fast", "tis_cap": 0.5, "beta": 0.5},
    # GSPO: one ratio per completion; a clip range at which some sequences clip and others do not
    "importance_level sequence": {"importance_level": "sequence", "clip_low": 0.05, "clip_high": 0.1,
                                  "epochs": 2, "lr": 1e-4},
    "top_p": {"top_p": 0.7, "beta": 0.5},
    "top_p, fast engine, TIS": {"top_p": 0.8, "rollout_engine": "fast", "tis_cap": 1.5},
}


def test_training_loop_oracle_with_right_and_wrong_answers(answers_world, tmp_path, monkeypatch):
    """The oracle where accuracy is not always 0: each completion is graded against its own prompt's answer,
    and accuracy and ROUGE-L add up as r = accuracy + α · ROUGE-L."""
    model_dir, problems = answers_world
    seen = run_loop_oracle(model_dir, tmp_path / "run", monkeypatch, dataset=problems, rouge_weight=0.1)
    assert seen["right"] > 0 and seen["wrong"] > 0
    assert all(after > before for before, after in seen["objective"]), seen["objective"]


def sums_file(path, answers=("3", "4", "3", "9")):
    """A training file of sums the answers_world model answers "3" to about half the time: the problems whose gold
    is 3 get groups with right and wrong answers, the others almost always all wrong (no reward spread)."""
    problems = [{"problem": q, "answer": a, "solution": f"{q}{a}"} for q, a in zip(("1+2=", "2+2=", "0+3=", "5+4="), answers)]
    path.write_text("".join(json.dumps(p) + "\n" for p in problems))
    return str(path)


def test_training_loop_oracle_with_dynamic_sampling(answers_world, tmp_path, monkeypatch):
    """--dynamic_sampling recomputed from outside: the oracle regrades every round, keeps the groups with a reward
    spread in data order until prompts_per_step are kept or max_generation_rounds are spent, rebuilds the
    trained batch from the kept rows of several rounds, and checks the gradients, the weights and the logged
    rounds, kept share and sampling cost. Every round read the next prompts of the run's one seeded order."""
    model_dir, _ = answers_world
    problems = sums_file(tmp_path / "sums.jsonl", answers=("3", "4", "3", "3"))
    seen = run_loop_oracle(model_dir, tmp_path / "run", monkeypatch, dataset=problems, rouge_weight=0.0,
                           dynamic_sampling="true", max_generation_rounds=3, num_steps=3, mini_batches=4,
                           micro_batch_size=4)
    assert max(seen["rounds"]) > 1 and seen["groups_trained"] < seen["groups_sampled"]   # the filter acted
    assert seen["surplus"] > 0                               # and a last round had more groups than were needed
    assert all(A.abs().sum() > 0 for A in seen["advantages"])
    assert all(after > before for before, after in seen["objective"]), seen["objective"]


def test_dynamic_sampling_resumes_exactly_and_is_reproducible(answers_world, tmp_path):
    """The prompt position (how many prompts the extra rounds read) is in the checkpoint: a run stopped after step 2
    and resumed equals the uninterrupted one, and the same seed gives the same run."""
    import train
    model_dir, _ = answers_world
    problems = sums_file(tmp_path / "sums.jsonl")
    extra = ("--dataset", problems, "--eval_benchmark", "none", "--rouge_weight", "0", "--dynamic_sampling",
             "--prompts_per_step", "1", "--group_size", "4", "--save_every", "1", "--log_rollouts")
    straight, again, resumed = tmp_path / "straight", tmp_path / "again", tmp_path / "resumed"
    train.main(tiny_args(model_dir, straight, "--num_steps", "4", *extra))
    train.main(tiny_args(model_dir, again, "--num_steps", "4", *extra))
    train.main(tiny_args(model_dir, resumed, "--num_steps", "2", *extra))
    train.main(tiny_args(model_dir, resumed, "--num_steps", "4", "--resume", *extra))
    a, b, c = (read_jsonl(path / "metrics.jsonl") for path in (straight, resumed, again))
    rounds = [m["dynamic_sampling/rounds"] for m in a]
    assert sum(rounds) > len(rounds)                         # extra rounds: the position is not step · prompts_per_step
    keys = [k for k in a[0] if not k.startswith("time/") and k != "tokens_per_second"]
    for x, y, z in zip(a, b, c):
        assert [x[k] for k in keys] == pytest.approx([y[k] for k in keys], abs=1e-6)
        assert [x[k] for k in keys] == [z[k] for k in keys]
    assert read_jsonl(straight / "samples.jsonl") == read_jsonl(resumed / "samples.jsonl")
    assert read_jsonl(straight / "rollouts.jsonl") == read_jsonl(resumed / "rollouts.jsonl")    # --log_rollouts
    assert len(read_jsonl(straight / "rollouts.jsonl")) == 4 * 4
    from transformers import AutoModelForCausalLM
    wa = AutoModelForCausalLM.from_pretrained(straight / "final").state_dict()
    wb = AutoModelForCausalLM.from_pretrained(resumed / "final").state_dict()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=1e-6, rtol=1e-5)


def test_importance_level_sequence_presets_gspos_clip_range():
    import train
    assert (train.parse_config([]).clip_low, train.parse_config([]).clip_high) == (0.2, 0.2)
    gspo = train.parse_config(["--importance_level", "sequence"])
    assert (gspo.clip_low, gspo.clip_high) == (3e-4, 4e-4)                       # GSPO's paper, §5.1
    mixed = train.parse_config(["--importance_level", "sequence", "--clip_high", "0.01"])
    assert (mixed.clip_low, mixed.clip_high) == (3e-4, 0.01)                    # an explicit value wins
    assert train.parse_config(["--clip_low", "0.1"]).clip_high == 0.2


@pytest.mark.parametrize("case", list(LOOP_CASES))
def test_training_loop_matches_an_independent_oracle(eos_model_dir, tmp_path, monkeypatch, case):
    seen = run_loop_oracle(eos_model_dir, tmp_path / "run", monkeypatch, **LOOP_CASES[case])
    assert all(A.abs().sum() > 0 for A in seen["advantages"])               # the case exercised the loss
    assert seen["truncated"] > 0 and seen["finished"] > 0                   # masks and truncation both mattered
    assert all(after > before for before, after in seen["objective"]), seen["objective"]
    options = {**LOOP_DEFAULTS, **LOOP_CASES[case]}
    if options["clip_low"] <= 0.05:
        assert seen["clipped_tokens"] > 0                                   # the clip really acted
    if case == "tight clip and grad norm":
        assert seen["norm_clipped"] > 0                                     # and so did the norm clip
    if options["beta"] > 0:
        assert seen["kl"] > 0                                               # π_θ left π_ref: the KL had a gradient


# ===================================================================================================
# 5b. Off the CPU: devices, the compiled engine's shape buckets, sampler vs π_old numerics
#     (`meta` tensors stand in for CUDA: they have a device but no values, so a device mix-up raises)
# ===================================================================================================
@pytest.mark.parametrize("algo", ["lampo", "grpo", "dr_grpo", "rloo"])
def test_advantages_take_cpu_rewards_and_return_on_the_logprob_device(algo):
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0]])                        # Python-side verifier output, on CPU
    seq_logps = torch.zeros(1, 4, device="meta")                           # ℓ on the accelerator
    advantages = lambdapo.compute_advantages(algo, rewards, seq_logps)
    assert advantages.device.type == "meta" and advantages.shape == (4,)


def test_pairwise_functions_and_loss_work_on_the_device_of_their_inputs():
    rewards, meta = torch.tensor([[1.0, 0.0, 0.5]]), torch.device("meta")
    assert confidence_weights(rewards, torch.zeros(1, 3, device=meta)).device == meta
    assert pairwise_advantages(rewards, torch.zeros(1, 3, device=meta), scale_by_std=True).device == meta
    assert grpo_advantages(rewards.to(meta)).device == meta
    logps = torch.zeros(3, 5, device=meta, requires_grad=True)
    loss, stats = clipped_policy_loss(logps, torch.zeros(3, 5, device=meta), torch.ones(3),   # CPU advantages
                                      torch.ones(3, 5, dtype=torch.long), ref_logps=torch.zeros(3, 5, device=meta),
                                      beta=0.1, is_weights=torch.ones(3, 5))
    assert loss.device == meta and set(stats) >= {"clip_fraction", "kl", "policy_kl"}
    loss.backward()                                                        # the graph is device-consistent
    assert logps.grad.device == meta
    assert lambdapo.sequence_scores(torch.zeros(3, 5, device=meta), torch.ones(3, 5, device=meta)).device == meta


def test_one_training_step_advantage_and_loss_path_off_the_cpu():
    """train.py's own pieces, in loop order, with the policy's tensors on a non-CPU device."""
    import train
    meta = torch.device("meta")
    config = train.parse_config(["--group_size", "2"])
    scored = [{"reward": r, "accuracy": a, "rouge": 0.0} for r, a in [(1.0, 1.0), (0.0, 0.0), (0.5, 0.0), (0.5, 0.0)]]
    rewards, accuracy, rouge = train.reward_tensors(scored, 2, meta)
    assert rewards.shape == (2, 2) and {rewards.device, accuracy.device, rouge.device} == {meta}
    old_logps, mask = torch.zeros(4, 6, device=meta), torch.ones(4, 6, dtype=torch.long, device=meta)
    seq_logps = lambdapo.sequence_scores(old_logps, mask).view(-1, 2)
    advantages = lambdapo.compute_advantages("lampo", rewards, seq_logps)
    gap, weights = train.sampler_gap(old_logps, torch.zeros(4, 6, device=meta), mask, tis_cap=2.0)
    assert weights.device == meta and set(gap) >= {"sampling/logp_gap_mean", "sampling/logp_gap_max"}
    logps = torch.zeros(2, 6, device=meta, requires_grad=True)
    scaled, scale, stats = train.micro_batch_loss(config, logps, old_logps[:2], advantages[:2], mask[:2], mask,
                                                  is_weights=weights[:2])
    scaled.backward()
    assert scaled.device == meta and logps.grad.device == meta


def test_reward_tensors_keep_groups_contiguous():
    import train
    scored = [{"reward": float(i), "accuracy": float(i % 2), "rouge": i / 10} for i in range(6)]
    rewards, accuracy, rouge = train.reward_tensors(scored, 3, "cpu")
    assert rewards.tolist() == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
    assert accuracy.tolist() == [0, 1, 0, 1, 0, 1] and rouge[4].item() == pytest.approx(0.4)


def test_sampler_gap_and_truncated_importance_weights_hand_computed():
    import train
    old = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, 0.0]])
    sampler = torch.tensor([[-1.5, -1.0, -0.5], [-1.0, -3.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    stats, weights = train.sampler_gap(old, sampler, mask, tis_cap=2.0)
    assert stats["sampling/logp_gap_mean"] == pytest.approx((0.5 + 1.0 + 0.0 + 0.0 + 2.0) / 5)
    assert stats["sampling/logp_gap_max"] == pytest.approx(2.0)
    # exp(old − sampler), capped at 2: e^0.5 = 1.6487, e^-1, 1, 1, min(e^2, 2) = 2, masked token 0
    torch.testing.assert_close(weights, torch.tensor([[math.exp(0.5), math.exp(-1.0), 1.0], [1.0, 2.0, 0.0]]))
    assert train.sampler_gap(old, sampler, mask, tis_cap=0.0)[1] is None             # off by default
    assert train.sampler_gap(old, None, mask, tis_cap=2.0) == ({}, None)              # plain engine: no sampler log-probs


def test_importance_weights_scale_only_the_policy_gradient_term():
    logps = torch.tensor([[0.0, 0.0]], requires_grad=True)
    weights = torch.tensor([[0.5, 2.0]])
    # ratio 1, A = 1: per-token PG loss −1 each, weighted −0.5 and −2; KL term 0 (ref = logps) is not weighted
    loss, _ = clipped_policy_loss(logps, torch.zeros(1, 2), torch.tensor([1.0]), torch.ones(1, 2),
                                  ref_logps=torch.zeros(1, 2), beta=1.0, is_weights=weights)
    assert loss.item() == pytest.approx((-0.5 - 2.0) / 2)
    loss.backward()
    # d/dlogp of −w·ρ·A is −w·A (ratio 1); the k3 KL gradient at equality is 0
    torch.testing.assert_close(logps.grad, torch.tensor([[-0.25, -1.0]]))


def test_reference_shares_the_policys_numerics_so_kl_is_zero_at_step_0(tiny):
    """Under bf16 autocast (what CUDA uses) a float32 reference copy gives log-probs identical to the
    policy's; a pure-bf16 copy (the old behaviour) does not, and its KL penalty would act on rounding."""
    import train
    model, tokenizer = tiny
    reference = train.make_reference(model)
    assert next(reference.parameters()).dtype == torch.float32 and not any(p.requires_grad for p in reference.parameters())
    r = rollout.generate(model, tokenizer, ["12+34=", "5+6="], 2, rollout.SamplingConfig(max_new_tokens=6))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logps = rollout.token_logprobs(model, r.input_ids, r.attention_mask, r.completion_mask)
        ref_logps = rollout.token_logprobs(reference, r.input_ids, r.attention_mask, r.completion_mask)
        bf16_logps = rollout.token_logprobs(reference.to(torch.bfloat16), r.input_ids, r.attention_mask,
                                            r.completion_mask)
    _, stats = clipped_policy_loss(logps, logps, torch.ones(4), r.completion_mask, ref_logps=ref_logps, beta=0.1)
    assert stats["kl"] == 0.0
    assert not torch.equal(bf16_logps, logps)                 # why the reference must not be pure bf16


def test_token_logprobs_builds_no_kv_cache(tiny, monkeypatch):
    model, tokenizer = tiny
    seen = []
    original = model.model.forward
    monkeypatch.setattr(model.model, "forward", lambda *a, **k: seen.append(k.get("use_cache")) or original(*a, **k))
    r = rollout.generate(model, tokenizer, ["1+2="], 2, rollout.SamplingConfig(max_new_tokens=4, do_sample=False))
    seen.clear()
    rollout.token_logprobs(model, r.input_ids, r.attention_mask, r.completion_mask)
    assert seen == [False]


class GraphCounter:
    """A torch.compile backend that records each graph it is given and runs it as traced (no codegen)."""
    def __init__(self):
        self.graphs = []

    def __call__(self, graph_module, example_inputs):
        self.graphs.append(tuple(tuple(x.shape) for x in example_inputs if isinstance(x, torch.Tensor)))
        return graph_module.forward


def test_compiled_engine_compiles_once_per_bucket_over_20_rollouts(tiny):
    """RL prompts change width every step: 20 rollouts over widths 4..40 must compile once per
    (batch, cache length) bucket, and padding into buckets must not change any greedy token."""
    torch._dynamo.reset()
    model, tokenizer = tiny
    counter = GraphCounter()
    engine = FastGenerator(model, compile=True, backend=counter, max_cached_shapes=4)
    eager = FastGenerator(model)                                   # exact shapes, no padding, no compile
    sampling = rollout.SamplingConfig(max_new_tokens=8, do_sample=False)
    rng = random.Random(0)
    for _ in range(20):
        prompts = ["+".join(str(rng.randrange(10 ** rng.randint(1, 3))) for _ in range(rng.randint(1, 6))) + "="
                   for _ in range(rng.randint(2, 3))]
        compiled = rollout.generate(model, tokenizer, prompts, 2, sampling, engine=engine)
        reference = rollout.generate(model, tokenizer, prompts, 2, sampling, engine=eager)
        assert torch.equal(compiled.completion_ids, reference.completion_ids)
        assert compiled.completions == reference.completions
    buckets = engine.compiled_shapes                                      # (batch, cache length, attended length)
    assert {batch for batch, _, _ in buckets} <= {4, 8}                   # 4 or 6 rows → 4 or 8
    assert {length - 8 for _, length, _ in buckets} <= {64}               # every width ≤ 64 → one prompt bucket
    graphs_per_compile = len(counter.graphs) / max(len(set(counter.graphs)), 1)
    assert len(set(counter.graphs)) <= len(buckets) * graphs_per_compile  # no shape compiled twice
    assert len(counter.graphs) == len(set(counter.graphs))
    assert engine.eager_fallbacks == 0 and len(buckets) <= 2


def test_compiled_engine_reuses_one_cache_per_bucket(tiny):
    model, tokenizer = tiny
    engine = FastGenerator(model, compile=True, backend=GraphCounter())
    sampling = rollout.SamplingConfig(max_new_tokens=4, do_sample=False)
    rollout.generate(model, tokenizer, ["1+2=", "3+4="], 2, sampling, engine=engine)
    (key, cache), = engine._caches.items()
    rollout.generate(model, tokenizer, ["12+345=", "6+7="], 2, sampling, engine=engine)   # other width, same bucket
    assert list(engine._caches.items()) == [(key, cache)]                 # the same object: reset, not rebuilt
    engine.release()
    assert not engine._caches


def test_compiled_engine_fallback_to_eager_is_visible(tiny):
    torch._dynamo.reset()
    model, tokenizer = tiny
    engine = FastGenerator(model, compile=True, backend=GraphCounter(), max_compiled_shapes=1)
    sampling = rollout.SamplingConfig(max_new_tokens=4, do_sample=False)
    rollout.generate(model, tokenizer, ["1+2="], 2, sampling, engine=engine)            # bucket (2, 68, 68)
    with pytest.warns(UserWarning, match="compile budget"):
        rollout.generate(model, tokenizer, ["1+2=", "3+4=", "5+6="], 2, sampling, engine=engine)   # (8, 68, 68)
    assert engine.eager_fallbacks == 1


class AttentionRecorder:
    """A torch.compile backend that records, for every scaled_dot_product_attention of the traced graph, the
    shapes of its query and key, and every op name; it runs the graph as traced."""
    def __init__(self):
        self.attention, self.ops = [], set()

    def __call__(self, graph_module, example_inputs):
        for node in graph_module.graph.nodes:
            if node.op in ("call_function", "call_method"):
                self.ops.add(getattr(node.target, "__name__", str(node.target)))
            if node.op == "call_function" and "scaled_dot_product_attention" in str(node.target):
                query, key, value = (node.args[i].meta["example_value"] for i in range(3))
                self.attention.append((tuple(query.shape), tuple(key.shape), tuple(value.shape)))
        return graph_module.forward


def test_compiled_decode_step_reads_each_kv_head_once_over_the_written_slots(tiny):
    """The compiled decode step attends with K/V at the key/value heads (2 of the tiny model's 4 query heads:
    no repeat_kv copy to 4) and over the slots written so far in kv_block buckets (80, 96, 104 of a 104-slot
    cache: 64-wide prompt bucket + 40 new tokens), not the whole cache; greedy tokens equal `generate`'s."""
    torch._dynamo.reset()
    model, tokenizer = tiny
    config = model.config
    recorder = AttentionRecorder()
    engine = FastGenerator(model, compile=True, backend=recorder, kv_block=16)
    sampling = rollout.SamplingConfig(max_new_tokens=40, do_sample=False)
    prompts = ["1+2=", "345+678="]
    fast = rollout.generate(model, tokenizer, prompts, 2, sampling, engine=engine)
    plain = rollout.generate(model, tokenizer, prompts, 2, sampling)
    assert torch.equal(fast.completion_ids, plain.completion_ids) and fast.completions == plain.completions
    assert config.num_key_value_heads < config.num_attention_heads          # the model has grouped-query attention
    assert recorder.attention, "no attention in the compiled decode step"
    for query, key, value in recorder.attention:
        assert key[1] == value[1] == config.num_key_value_heads, (query, key)  # no expansion to the query heads
        assert query[1] * query[2] == config.num_attention_heads              # query heads folded onto K/V heads
    assert {key[2] for _, key, _ in recorder.attention} == {80, 96, 104}     # attended lengths grow in buckets
    assert "expand" not in recorder.ops and "repeat_interleave" not in recorder.ops
    assert engine.compiled_shapes == {(4, 104, 80), (4, 104, 96), (4, 104, 104)} and engine.eager_fallbacks == 0
    assert config._attn_implementation == "sdpa"                           # the policy's own setting is back


@pytest.mark.parametrize("kv_block", [1, 16])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_engine_attention_buckets_change_no_greedy_token(tiny, kv_block, attention):
    """Eager decoding through the engine's attention, at any bucket size, gives `generate`'s greedy tokens;
    a model on another attention implementation keeps it (and attends to the whole cache)."""
    model, tokenizer = tiny
    model.config._attn_implementation = attention
    try:
        prompts = ["1+2=", "345+678=", "9+9="]
        sampling = rollout.SamplingConfig(max_new_tokens=24, do_sample=False)
        plain = rollout.generate(model, tokenizer, prompts, 2, sampling)
        fast = rollout.generate(model, tokenizer, prompts, 2, sampling, engine=FastGenerator(model, kv_block=kv_block))
        assert torch.equal(fast.completion_ids, plain.completion_ids)
        assert model.config._attn_implementation == attention
    finally:
        model.config._attn_implementation = "sdpa"


def test_engine_is_freed_without_the_garbage_collector(tiny):
    """No reference cycle: once dropped, a used (compiled) engine and its KV cache are freed at once, so
    memory measured after the rollout (bench.py's update) does not include them."""
    import gc
    import weakref
    torch._dynamo.reset()
    model, tokenizer = tiny
    engine = FastGenerator(model, compile=True, backend=GraphCounter())
    rollout.generate(model, tokenizer, ["1+2="], 2, rollout.SamplingConfig(max_new_tokens=4), engine=engine)
    (_, cache), = engine._caches.values()
    engine_ref, cache_ref = weakref.ref(engine), weakref.ref(cache)
    gc.collect()                  # only the compiler's own tracing leftovers: engine and cache are still referenced
    gc.disable()
    try:
        del engine, cache
        assert engine_ref() is None and cache_ref() is None
    finally:
        gc.enable()


def test_prompt_buckets_never_pass_the_cap_and_longer_prompts_decode_at_their_width(tiny):
    torch._dynamo.reset()
    model, tokenizer = tiny
    engine = FastGenerator(model, compile=True, backend=GraphCounter(), max_prompt_tokens=24, min_prompt_bucket=16)
    assert [engine.prompt_width(P) for P in (3, 16, 17, 24, 25, 40)] == [16, 16, 24, 24, 25, 40]
    uncapped = FastGenerator(model, compile=True, backend=GraphCounter(), min_prompt_bucket=16)
    assert [uncapped.prompt_width(P) for P in (3, 17, 25, 40)] == [16, 32, 32, 64]
    assert FastGenerator(model, max_prompt_tokens=24).prompt_width(17) == 17      # eager: no padding at all
    sampling = rollout.SamplingConfig(max_new_tokens=6, do_sample=False)
    short, long = ["1+2="], ["+".join(["12"] * 12) + "="]                             # 6 and 38 tokens templated
    assert rollout.prompt_token_counts(tokenizer, short + long) == [6, 38]
    for prompts in (short, long):
        compiled = rollout.generate(model, tokenizer, prompts, 2, sampling, engine=engine)
        reference = rollout.generate(model, tokenizer, prompts, 2, sampling)             # model.generate
        assert torch.equal(compiled.completion_ids, reference.completion_ids)
    assert engine.compiled_shapes == {(2, 16 + 6, 16 + 6)}    # the long prompt went eagerly, at its own width
    assert list(engine._caches) == [2] and engine._caches[2][0] == 38 + 6 and engine.eager_fallbacks == 0


def test_prompt_token_counts_are_the_rows_tokenize_prompts_gives(tiny):
    _, tokenizer = tiny
    prompts = ["1+2=", "345+678=", "1" * 50]
    counts = rollout.prompt_token_counts(tokenizer, prompts)
    _, mask = rollout.tokenize_prompts(tokenizer, rollout.format_prompts(tokenizer, prompts))
    assert counts == mask.sum(1).tolist() and counts[2] > counts[1] > counts[0]


def test_train_drops_overlong_training_prompts_and_grades_every_eval_problem(tiny_model_dir, tmp_path, monkeypatch):
    """Training prompts over --max_prompt_tokens are dropped at load and counted; evaluation drops none: it says
    how many are longer and generates them in batches of as many KV-cache slots as a batch at the cap."""
    import train
    problems = ["1+2", "3+4", "5+6", "7+8", "+".join(["1"] * 40), "+".join(["2"] * 60)]
    train_file, eval_file = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train_file.write_text("".join(json.dumps({"problem": p, "answer": "3"}) + "\n" for p in problems))
    eval_file.write_text("".join(json.dumps({"problem": p, "answer": "3"}) + "\n" for p in problems[3:]))
    tokenizer = toy.build_tokenizer()
    counts = rollout.prompt_token_counts(tokenizer, [data.math_prompt(p) for p in problems])
    cap = max(counts[:4])
    assert min(counts[4:]) > cap
    logged = []
    args = tiny_args(tiny_model_dir, tmp_path / "run", "--dataset", str(train_file), "--eval_benchmark", "math500",
                     "--eval_data_file", str(eval_file), "--eval_limit", "3", "--generation_batch_size", "8",
                     "--max_prompt_tokens", str(cap))
    config = train.parse_config(args)
    s = train.setup(config, log=logged.append)
    assert sorted(r["prompt"] for r in s.records) == sorted(data.math_prompt(p) for p in problems[:4])
    assert f"--max_prompt_tokens {cap}: dropped 2 of 6 training prompts longer than that (longest {max(counts)} tokens)" in logged
    longest = max(counts[4:])
    batch = train.long_prompt_batch_size(8, cap, longest, 6)
    assert batch == 8 * (cap + 6) // (longest + 6) and 1 <= batch < 8
    assert f"--max_prompt_tokens {cap}: 2 of 3 math500 prompts are longer (longest {longest} tokens); all are graded, " \
           f"those in generation batches of {batch}" in logged
    calls, real_evaluate = [], train.evaluate

    def spy(model, tokenizer, records, k, sampling, *args, **kwargs):
        calls.append((len(records), sampling.batch_size))
        return real_evaluate(model, tokenizer, records, k, sampling, *args, **kwargs)

    monkeypatch.setattr(train, "evaluate", spy)
    assert train.held_out_eval(s, config, 0, log=logged.append)["eval/n"] == 3                # every problem graded
    assert calls == [(1, 8), (2, batch)]
    with pytest.raises(SystemExit) as exit_info:                                   # nothing left to train on
        train.main(tiny_args(tiny_model_dir, tmp_path / "none", "--dataset", str(train_file), "--max_prompt_tokens", "3"))
    assert f"every training prompt is longer than --max_prompt_tokens 3 (the shortest has {min(counts)} tokens)" \
        in str(exit_info.value.code)
    assert train.parse_config([]).max_prompt_tokens == 64 and train.parse_config(["--model", "Qwen/Qwen3-1.7B"]).max_prompt_tokens == 512


def test_mini_batches_are_exactly_as_many_as_asked_and_lr_is_this_steps(tiny_model_dir, tmp_path):
    """6 rows in 4 mini-batches: torch.chunk would give 3; the logged lr is the rate the step used."""
    import train
    train.main(tiny_args(tiny_model_dir, tmp_path / "run", "--prompts_per_step", "3", "--group_size", "2",
                         "--mini_batches", "4", "--num_steps", "2", "--warmup_steps", "4", "--eval_benchmark", "none"))
    steps = [m for m in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "reward" in m]
    assert [m["optimizer_steps"] for m in steps] == [4, 4]
    assert [m["lr"] for m in steps] == pytest.approx([1e-3 / 4, 2e-3 / 4])   # warm-up factors 1/4, 2/4


def test_train_logs_the_sampler_gap_with_the_fast_engine(tiny_model_dir, tmp_path):
    import train
    train.main(tiny_args(tiny_model_dir, tmp_path / "run", "--rollout_engine", "fast", "--tis_cap", "2",
                         "--eval_benchmark", "none"))
    steps = [m for m in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "reward" in m]
    for m in steps:   # on CPU the engine samples from the float32 policy itself: the gap is rounding only
        assert 0.0 <= m["sampling/logp_gap_mean"] <= m["sampling/logp_gap_max"] < 1e-3
        assert m["sampling/tis_weight_mean"] == pytest.approx(1.0, abs=1e-3)
        assert m["sampling/eager_fallbacks"] == 0


def test_eval_of_a_run_folder_uses_the_runs_settings(tiny_model_dir, tmp_path, capsys):
    """runs/X/final is evaluated as training evaluated it: the run's template mode and budget, greedy."""
    import shutil
    import eval as evaluation
    run = tmp_path / "run"
    shutil.copytree(tiny_model_dir, run / "final")
    (run / "config.json").write_text(json.dumps({"algo": "lampo", "group_size": 8, "model": "Qwen/Qwen3-1.7B",
                                                 "enable_thinking": False, "max_new_tokens": 9,
                                                 "eval_max_new_tokens": 3}))
    summary = evaluation.main(["--model", str(run / "final"), "--benchmark", "toy", "--limit", "3"])
    assert summary["settings"]["max_new_tokens"] == 3 and summary["settings"]["greedy"]
    assert summary["settings"]["enable_thinking"] is False
    assert summary["settings"]["defaults_from"] == "training run"
    err = capsys.readouterr().err
    assert "settings" in err and "hit max_new_tokens=3" in err                 # 3 tokens cannot finish an addition
    plain = evaluation.main(["--model", tiny_model_dir, "--benchmark", "toy", "--limit", "3"])
    assert plain["settings"]["defaults_from"] == "model family" and plain["settings"]["max_new_tokens"] == 48


def test_compare_runs_a_grid_resumes_and_reports_failures(tiny_model_dir, tmp_path, capsys):
    """Two run strings and a bad one, through real train.py subprocesses; a second call skips what finished."""
    import compare
    out = tmp_path / "cmp"
    common = tiny_args(tiny_model_dir, tmp_path / "unused", "--num_steps", "2", "--eval_every", "1")
    common = [a for i, a in enumerate(common) if a != "--out_dir" and (i == 0 or common[i - 1] != "--out_dir")]
    runs = ["lampo", "lampo --no_such_option 1"]
    summary = compare.main(["--runs", *runs, "--seeds", "0", "--out_dir", str(out), "--threshold", "0.25", "--", *common])
    assert list(summary) == runs
    entry = summary["lampo"]
    evals = [m for m in read_jsonl(out / "lampo" / "seed-0" / "metrics.jsonl") if "eval/accuracy" in m]
    assert [m["step"] for m in evals] == [0, 1, 2] and sorted(map(int, entry["curve"])) == [0, 1, 2]
    assert entry["seeds"] == [0] and entry["final_accuracy_std"] == 0.0
    assert entry["final_accuracy_mean"] == evals[-1]["eval/accuracy"]
    assert entry["steps_to_threshold"] == [next((m["step"] for m in evals if m["eval/accuracy"] >= 0.25), None)]
    assert entry["per_seed"] == [{"seed": 0, "final_accuracy": evals[-1]["eval/accuracy"],
                                  "area": compare.area_under_curve({m["step"]: m["eval/accuracy"] for m in evals}),
                                  "steps_to_threshold": entry["steps_to_threshold"][0]}]
    assert not entry["failed"] and "vs_baseline" not in entry
    bad = summary["lampo --no_such_option 1"]
    assert bad["seeds"] == [] and "no_such_option" in bad["failed"][0]["error"]
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))
    assert (out / "summary.md").exists() and (out / "curves.png").exists()
    # a run string's options override the common ones, and the grid's seed and folder override both
    command = compare.train_command("grpo --tau 0.5", 3, tmp_path / "cell", [*common, "--tau", "2", "--seed", "9"])
    import train
    config = train.parse_config(command[2:])
    assert (config.algo, config.tau, config.seed, config.out_dir) == ("grpo", 0.5, 3, str(tmp_path / "cell"))
    log = (out / "lampo" / "seed-0" / "train.log").read_text()
    # a --baseline that --runs does not name is run too; with no seed in common the statistics are empty
    summary = compare.main(["--runs", "lampo", "--seeds", "0", "--out_dir", str(out),
                            "--baseline", "lampo --no_such_option 1", "--", *common])
    assert (out / "lampo" / "seed-0" / "train.log").read_text() == log           # finished: not run again
    assert list(summary) == ["lampo --no_such_option 1", "lampo"]
    assert summary["lampo"]["vs_baseline"]["seeds"] == [] and summary["lampo"]["vs_baseline"]["p_value_sign_flip"] is None
    assert json.loads((out / "lampo" / "seed-0" / "compare.json").read_text())["command"].startswith("python train.py ")


def test_compare_aggregates_by_hand(tmp_path):
    import compare
    for seed, accs in [(0, [0.5, 0.7, 0.9]), (1, [0.5, 0.9, 0.8])]:
        folder = tmp_path / "x" / f"seed-{seed}"
        folder.mkdir(parents=True)
        steps = [{"step": 10 * i, "lampo/weight_mean": w, "lampo/misordered_pairs": m, "lampo/seq_logp_std": 0.1}
                 for i, (w, m) in enumerate([(0.9 + seed, 0.5), (0.0, 0.0), (1.1, 0.25)], start=1)]   # step 20: no pair
        (folder / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in
                                                      [{"step": 10 * i, "eval/accuracy": a} for i, a in enumerate(accs)] + steps))
    statuses = [{"run": "x", "seed": s, "folder": str(tmp_path / "x" / f"seed-{s}"), "returncode": 0,
                 "wall_seconds": 10.0 + s, "error": None} for s in (0, 1)]
    entry = compare.summarize(statuses, ["x"], [0, 1, 2], threshold=0.85)["x"]
    assert entry["final_accuracy_mean"] == pytest.approx(0.85)
    assert entry["final_accuracy_std"] == pytest.approx(statistics.stdev([0.9, 0.8]))
    assert entry["steps_to_threshold"] == [20, 10, None]                          # seed 2 never ran
    assert entry["auc_mean"] == pytest.approx(((0.5 + 0.7) / 2 + (0.7 + 0.9) / 2 + (0.5 + 0.9) / 2 + (0.9 + 0.8) / 2) / 4)
    assert entry["curve"]["10"]["mean"] == pytest.approx(0.8) and entry["wall_seconds_mean"] == 10.5
    # diagnostics: per seed the mean over steps with a reward gap (step 20 logged 0.0: left out), then over seeds
    assert entry["diagnostics"]["lampo/weight_mean"] == pytest.approx(((0.9 + 1.1) / 2 + (1.9 + 1.1) / 2) / 2)
    assert entry["diagnostics"]["lampo/misordered_pairs"] == pytest.approx(0.375)
    assert entry["diagnostics"]["lampo/seq_logp_std"] == pytest.approx(0.1)
    assert "lampo/corr_rloo" not in entry["diagnostics"]
    assert "| `x` | 1.250 | — | 0.375 | 0.100 | — |" in compare.markdown({"x": entry})


def test_compare_paired_statistics_by_hand(tmp_path):
    """per_seed and vs_baseline from hand-made curves; every statistic recomputed here by hand."""
    import compare
    # curve {0: a, 10: b}: area (a + b) / 2, final accuracy b
    curves = {"base": [(0.2, 0.4), (0.2, 0.6), (0.4, 0.6), (0.0, 0.2)],
              "new": [(0.2, 0.6), (0.4, 0.6), (0.2, 0.6), (0.4, 0.8)]}
    statuses = []
    for run, rows in curves.items():
        for seed, (a, b) in enumerate(rows):
            folder = tmp_path / run / f"seed-{seed}"
            folder.mkdir(parents=True)
            (folder / "metrics.jsonl").write_text(json.dumps({"step": 0, "eval/accuracy": a}) + "\n"
                                                  + json.dumps({"step": 10, "eval/accuracy": b}) + "\n")
            statuses.append({"run": run, "seed": seed, "folder": str(folder), "returncode": 0,
                             "wall_seconds": 1.0, "error": None})
    summary = compare.summarize(statuses, ["base", "new"], [0, 1, 2, 3], threshold=0.6, baseline="base")
    assert "vs_baseline" not in summary["base"]
    assert summary["base"]["per_seed"][1] == {"seed": 1, "final_accuracy": 0.6, "area": pytest.approx(0.4),
                                              "steps_to_threshold": 10}
    assert [row["steps_to_threshold"] for row in summary["base"]["per_seed"]] == [None, 10, 10, None]
    v = summary["new"]["vs_baseline"]
    assert v["baseline"] == "base" and v["seeds"] == [0, 1, 2, 3]
    # area differences: 0.4−0.3, 0.5−0.4, 0.4−0.5, 0.6−0.1
    assert v["area_diff"] == pytest.approx([0.1, 0.1, -0.1, 0.5])
    assert v["area_diff_mean"] == pytest.approx(0.15)
    sd = math.sqrt(((0.1 - 0.15) ** 2 * 2 + (-0.1 - 0.15) ** 2 + (0.5 - 0.15) ** 2) / 3)
    assert v["paired_t"] == pytest.approx(0.15 / (sd / 2))
    # sign flips of (.1, .1, −.1, .5), sum .6: with the .5 kept, .5 + (±.1 ±.1 ∓.1) ≥ .6 for 4 of 8; mirrored: 8/16
    sums = [abs(a * 0.1 + b * 0.1 + c * -0.1 + d * 0.5) for a in (1, -1) for b in (1, -1) for c in (1, -1) for d in (1, -1)]
    assert v["p_value_sign_flip"] == sum(x >= 0.6 - 1e-9 for x in sums) / 16 == 8 / 16
    low, high = v["area_diff_ci95"]
    assert -0.1 <= low < 0.15 < high <= 0.5
    # final accuracy differences: .2, 0, 0, .6
    assert v["final_accuracy_diff"] == pytest.approx([0.2, 0.0, 0.0, 0.6])
    assert v["final_accuracy_diff_mean"] == pytest.approx(0.2)
    assert v["final_accuracy_p_value_sign_flip"] == 8 / 16      # the zeros' flips change nothing: ±.2 ± .6 ≥ .8 when signs agree
    # the bootstrap of two differences 0 and 1: means 0, .5, 1 with probability 1/4, 1/2, 1/4
    assert compare.bootstrap_ci95([0.0, 1.0]) == [0.0, 1.0]
    assert compare.sign_flip_p_value([0.2]) == 1.0 and compare.paired_t([0.2]) is None
    table = compare.markdown(summary)
    assert "Paired by seed against `base`" in table and "| `new` | 4 | +0.150 |" in table and "| 0.500 |" in table
    # a seed only one side finished is left out of the pairing
    summary = compare.summarize(statuses[:-1], ["base", "new"], [0, 1, 2, 3], threshold=0.6, baseline="base")
    assert summary["new"]["vs_baseline"]["seeds"] == [0, 1, 2]


def test_compare_sampling_cost_by_hand(tmp_path):
    """Completions per kept group (a trained group with a reward spread), with and without dynamic sampling."""
    import compare
    runs = {"grpo": [{"reward": 0.5, "frac_reward_zero_std": 0.5}, {"reward": 0.5, "frac_reward_zero_std": 0.0}],
            "grpo --dynamic_sampling": [
                {"reward": 0.5, "frac_reward_zero_std": 0.0, "dynamic_sampling/completions_generated": 16,
                 "dynamic_sampling/groups_kept": 2},
                {"reward": 0.5, "frac_reward_zero_std": 0.0, "dynamic_sampling/completions_generated": 24,
                 "dynamic_sampling/groups_kept": 1}]}
    statuses = []
    for run, rows in runs.items():
        folder = tmp_path / compare.slug(run) / "seed-0"
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps({"prompts_per_step": 2, "group_size": 4}))
        (folder / "metrics.jsonl").write_text("".join(json.dumps({"step": i + 1, **row}) + "\n" for i, row in enumerate(rows))
                                              + json.dumps({"step": 2, "eval/accuracy": 0.5}) + "\n")
        statuses.append({"run": run, "seed": 0, "folder": str(folder), "returncode": 0, "wall_seconds": 1.0, "error": None})
    summary = compare.summarize(statuses, list(runs), [0], threshold=0.8)
    # without the filter: 2 steps × 2 prompts × G = 4 completions; kept groups 2 · (1 − 0.5) + 2 · 1 = 3
    assert summary["grpo"]["completions_generated_mean"] == 16
    assert summary["grpo"]["completions_per_kept_group_mean"] == pytest.approx(16 / 3)
    # with it: what the steps logged, 16 + 24 completions for 2 + 1 kept groups
    assert summary["grpo --dynamic_sampling"]["completions_generated_mean"] == 40
    assert summary["grpo --dynamic_sampling"]["completions_per_kept_group_mean"] == pytest.approx(40 / 3)
    assert "| `grpo --dynamic_sampling` | 40 | 13.33 |" in compare.markdown(summary)


def write_rollouts(folder, steps):
    """A rollouts.jsonl as train.py --log_rollouts writes it: steps = [[(group, reward, ℓ_mean, ℓ_sum), ...], ...]."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"step": step, "group": g, "reward": r, "accuracy": r, "length": 4, "truncated": False,
             "seq_logp_mean": mean, "seq_logp_sum": total, "advantage": 0.0}
            for step, completions in enumerate(steps, start=1) for g, r, mean, total in completions]
    (folder / "rollouts.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_compare_weight_grid_by_hand(tmp_path, capsys):
    """compare.py --weights: w = 2σ(−s(ℓ_i − ℓ_j)/τ) on logged rollouts, by hand, for ℓ mean and sum, τ in nats and
    in spreads, early and late; a step without a reward gap counts for the ℓ spread only."""
    import compare
    w = lambda x: 2 / (1 + math.exp(-x))                                  # the weight of a pair with s·Δℓ = −x
    # step 1: one pair, the better completion the less likely (misordered); step 2: equal rewards (no pair);
    # step 3: two groups, both ordered right
    write_rollouts(tmp_path / "run", [
        [(0, 1.0, -2.0, -6.0), (0, 0.0, -1.0, -1.0)],
        [(0, 1.0, -1.0, -2.0), (0, 1.0, -3.0, -3.0)],
        [(0, 1.0, -1.0, -1.0), (0, 0.0, -1.5, -4.0), (1, 0.0, -2.0, -2.0), (1, 1.0, -1.0, -3.0)]])
    grid = compare.weight_grid([tmp_path / "run"], taus=(1.0,), phases=1)
    cell = {(row["seq_logp"], row["relative"]): row for row in grid}
    assert len(grid) == 4 and all(row["steps"] == 3 for row in grid)
    mean = cell[("mean", False)]
    # the weighed steps 1 and 3: step 1's pair w(1); step 3's pairs w(−0.5) and w(−1), mean and population std
    step3 = [w(-0.5), w(-1.0)]
    assert mean["lampo/weight_mean"] == pytest.approx((w(1.0) + statistics.fmean(step3)) / 2)
    assert mean["lampo/weight_std"] == pytest.approx((0.0 + statistics.pstdev(step3)) / 2)
    assert mean["lampo/misordered_pairs"] == pytest.approx((1.0 + 0.0) / 2)
    # ℓ spread: every step; unbiased std per group, averaged over groups; √0.5 = std of two values 1 apart
    spreads = [math.sqrt(0.5), math.sqrt(2.0), (math.sqrt(0.125) + math.sqrt(0.5)) / 2]
    assert mean["lampo/seq_logp_std"] == pytest.approx(statistics.fmean(spreads))
    assert mean["tau_eff"] == 1.0
    relative = cell[("mean", True)]
    assert relative["tau_eff"] == pytest.approx(statistics.fmean(spreads))          # τ = 1 × each step's spread
    assert relative["lampo/weight_mean"] == pytest.approx(
        (w(1.0 / spreads[0]) + (w(-0.5 / spreads[2]) + w(-1.0 / spreads[2])) / 2) / 2)
    summed = cell[("sum", False)]           # summed, step 3's second pair is misordered: its better one has −3 < −2
    assert summed["lampo/weight_mean"] == pytest.approx((w(5.0) + (w(-3.0) + w(1.0)) / 2) / 2)
    assert summed["lampo/misordered_pairs"] == pytest.approx((1.0 + 0.5) / 2)
    # one pair: LamPO's advantages are RLOO's times w, perfectly correlated
    write_rollouts(tmp_path / "pair", [[(0, 1.0, -2.0, -6.0), (0, 0.0, -1.0, -1.0)]])
    assert compare.weight_grid([tmp_path / "pair"], taus=(1.0,), phases=1)[0]["lampo/corr_rloo"] == pytest.approx(1.0)
    # phases: 3 steps in 3 parts are the steps themselves; step 2 has no reward gap
    by_phase = [row for row in compare.weight_grid([tmp_path / "run"], taus=(1.0,), phases=3)
                if row["seq_logp"] == "mean" and not row["relative"]]
    assert [row["phase"] for row in by_phase] == [1, 2, 3]
    assert by_phase[0]["lampo/weight_mean"] == pytest.approx(w(1.0)) and by_phase[1]["lampo/weight_mean"] is None
    assert by_phase[1]["lampo/seq_logp_std"] == pytest.approx(spreads[1])
    # the command line: tables written and printed; a run without rollouts.jsonl is one line
    compare.main(["--weights", str(tmp_path / "run"), "--weight_taus", "1", "--phases", "3", "--out_dir", str(tmp_path / "out")])
    table = (tmp_path / "out" / "weights.md").read_text()
    assert f"| mean | 1 | 1.000 → 1.000 → 1.000 | {spreads[0]:.3f} → {spreads[1]:.3f} → {spreads[2]:.3f} |" in table
    assert "| sum | 1 × spread |" in table and table in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "weights.json").read_text())["grid"] == [
        json.loads(json.dumps(row)) for row in compare.weight_grid([tmp_path / "run"], taus=(1.0,), phases=3)]
    with pytest.raises(SystemExit) as exit_info:
        compare.main(["--weights", str(tmp_path / "nothing"), "--out_dir", str(tmp_path / "out2")])
    assert exit_info.value.code == 2 and "--log_rollouts" in capsys.readouterr().err


def test_train_log_rollouts_recomputes_the_logged_diagnostics(tiny_model_dir, tmp_path):
    """--log_rollouts: every completion of every step, and from those rows compare.weight_grid gives back the
    lampo/* diagnostics train.py logged at the run's τ (ℓ mean, τ = 1 nat), step by step."""
    import compare
    import train
    out = tmp_path / "run"
    train.main(tiny_args(tiny_model_dir, out, "--log_rollouts", "--num_steps", "3", "--eval_benchmark", "none",
                         "--max_new_tokens", "8"))
    rows = read_jsonl(out / "rollouts.jsonl")
    steps = [m for m in read_jsonl(out / "metrics.jsonl") if "reward" in m]
    assert len(rows) == 3 * 2 * 3                                          # steps × prompts_per_step × G
    for step in steps:
        mine = [row for row in rows if row["step"] == step["step"]]
        assert [row["group"] for row in mine] == [0, 0, 0, 1, 1, 1]
        assert statistics.fmean(row["reward"] for row in mine) == pytest.approx(step["reward"], abs=1e-6)
        assert statistics.fmean(row["length"] for row in mine) == pytest.approx(step["completions/mean_length"])
        for row in mine:
            assert row["seq_logp_sum"] == pytest.approx(row["seq_logp_mean"] * max(row["length"], 1), rel=1e-5)
            assert row["seq_logp_mean"] < 0
        for group in (0, 1):                                                # pairwise advantages sum to 0 in a group
            assert sum(row["advantage"] for row in mine if row["group"] == group) == pytest.approx(0.0, abs=1e-5)
    grid = [row for row in compare.weight_grid([out], taus=(1.0,), phases=3)
            if row["seq_logp"] == "mean" and not row["relative"]]
    for row, step in zip(grid, steps):
        for name in ("lampo/seq_logp_std", "lampo/weight_std", "lampo/misordered_pairs", "lampo/corr_rloo"):
            expected = step[name] if step["lampo/weight_mean"] > 0 or name == "lampo/seq_logp_std" else None
            assert row[name] == (None if expected is None else pytest.approx(expected, abs=1e-5)), name


# ===================================================================================================
# 6. Evaluation
# ===================================================================================================
def test_bench_tiny_reports_every_phase(capsys):
    import bench
    result = bench.main(["--shape", "tiny", "--num_sequences", "4", "--prompt_len", "6", "--max_new_tokens", "8"])
    for key in ("rollout_plain_tokens_per_s", "rollout_fast_tokens_per_s", "logprobs_tokens_per_s",
                "update_tokens_per_s", "peak_memory_gib"):
        assert result[key] > 0, key
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result     # JSON on the last line


def test_bench_has_the_llm_presets_rollout_shape():
    """`bench.py --workload preset` is train.py's LLM rollout batch: 128 rows, prompts up to 512 tokens, 1,024
    new tokens (where decode attention over long caches shows; the small default hides it)."""
    import bench
    import train
    preset = train.PRESETS["llm"]
    assert bench.WORKLOADS["preset"]["cuda"] == (preset["generation_batch_size"], 512, preset["max_new_tokens"])


def test_bench_times_decode_attention_both_ways():
    import bench
    result = bench.main(["--shape", "tiny", "--attention", "--num_sequences", "2", "--prompt_len", "8",
                         "--max_new_tokens", "16"])
    assert all(result[k] > 0 for k in ("attention_repeat_kv_all_slots_ms", "attention_folded_all_slots_ms",
                                       "attention_engine_ms"))


def test_pass_at_k_unbiased_estimator():
    import eval as evaluation
    assert evaluation.pass_at_k(10, 0, 1) == 0.0
    assert evaluation.pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert evaluation.pass_at_k(5, 2, 2) == pytest.approx(1 - math.comb(3, 2) / math.comb(5, 2))
    assert evaluation.pass_at_k(5, 4, 2) == 1.0


def test_eval_cli_writes_summary_and_per_problem_results(tiny_model_dir, tmp_path):
    import eval as evaluation
    out = tmp_path / "eval.json"
    summary = evaluation.main(["--model", tiny_model_dir, "--benchmark", "math500", "--data_file",
                               os.path.join(FIXTURES, "math500.jsonl"), "--num_samples", "2", "--temperature", "1.0",
                               "--max_new_tokens", "5", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["n"] == 3 and saved["k"] == 2 and 0.0 <= saved["accuracy"] <= 1.0 and "pass@2" in saved
    assert saved == json.loads(json.dumps(summary))
    rows = read_jsonl(out.with_suffix(".jsonl"))
    assert len(rows) == 3 and all(len(r["completions"]) == 2 and len(r["correct"]) == 2 for r in rows)


def test_evaluate_grades_by_the_benchmark_answer(tiny):
    import eval as evaluation
    model, tokenizer = tiny
    records = [{"prompt": "1+1=", "answer": "2", "task": "math"}, {"prompt": "2+2=", "answer": "5", "task": "math"}]
    fixed = lambda *args, **kwargs: types.SimpleNamespace(
        completions=["so \\boxed{2}", "\\boxed{4}"], truncated=torch.tensor([False, False]),
        completion_lengths=torch.tensor([3, 4]))
    summary, results = evaluation.evaluate(model, tokenizer, records, generate_fn=fixed)
    assert summary["accuracy"] == 0.5 and results[0]["extracted"] == ["2"] and results[1]["correct"] == [0.0]


def test_qwen3_style_template_passes_enable_thinking():
    tokenizer = toy.build_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}<|user|>{{ m['content'] }}{% endfor %}<|assistant|>"
        "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}")
    thinking = rollout.format_prompts(tokenizer, ["1+1="])[0]
    direct = rollout.format_prompts(tokenizer, ["1+1="], chat_template_kwargs={"enable_thinking": False})[0]
    assert thinking == "<|user|>1+1=<|assistant|>"
    assert direct == "<|user|>1+1=<|assistant|><think>\n\n</think>\n\n"


def test_thinking_switch_follows_the_chat_template_not_the_model_name(tiny_model_dir, tmp_path, capsys):
    import eval as evaluation
    import train
    qwen3_style, other = toy.build_tokenizer(), toy.build_tokenizer()
    qwen3_style.chat_template = "{% if enable_thinking is defined and enable_thinking is false %}x{% endif %}"
    other.chat_template = "{{ '<|im_start|>system\nYou are a helpful assistant<|im_end|>\n' }}"   # SmolLM2-like
    assert rollout.thinking_kwargs(qwen3_style, False) == {"enable_thinking": False}
    assert rollout.thinking_kwargs(qwen3_style, True) == {"enable_thinking": True}
    assert rollout.thinking_kwargs(qwen3_style, None) == {}          # the template's own default
    assert rollout.thinking_kwargs(other, False) == rollout.thinking_kwargs(other, None) == {}
    with pytest.raises(ValueError, match="has no thinking mode"):
        rollout.thinking_kwargs(other, True, "SmolLM2")
    # asking a model without the switch to think is refused in one line, not silently ignored
    with pytest.raises(SystemExit, match="--enable_thinking true: the chat template of .* has no thinking mode"):
        train.main(tiny_args(tiny_model_dir, tmp_path / "run", "--enable_thinking", "true"))
    with pytest.raises(SystemExit, match="has no thinking mode"):
        evaluation.main(["--model", tiny_model_dir, "--benchmark", "toy", "--limit", "1", "--enable_thinking", "true"])


# ===================================================================================================
# 7. Rewards (rewards.py): extraction, equivalence, multiple choice, ROUGE-L, hostile input
# ===================================================================================================
# ---- where the answer is ------------------------------------------------------------------------------------
def test_rewards_strip_thinking():
    assert strip_thinking("<think>maybe 3</think>The answer is 4.") == "The answer is 4."
    assert strip_thinking("a</think>b</think>c") == "c"  # the last </think> counts
    assert strip_thinking("no tags at all") == "no tags at all"
    assert strip_thinking("<think>cut off mid-thought") == ""  # opened, never closed: no answer
    assert strip_thinking("<think>a</think>b<think>c") == ""  # reopened and never closed


def test_rewards_extract_boxed_keeps_nested_braces():
    assert extract_boxed(r"so $x = \boxed{\frac{1}{2}}$.") == r"\frac{1}{2}"
    assert extract_boxed(r"\boxed{\left\{ 1, 2 \right\}}") == r"\left\{ 1, 2 \right\}"  # escaped braces ignored
    assert extract_boxed(r"\boxed{}") == ""


def test_rewards_extract_boxed_last_box_wins():
    assert extract_boxed(r"first \boxed{1}, then \boxed{2}") == "2"
    assert extract_boxed(r"\boxed{1} and \boxed{2") == "1"  # the last *complete* box
    assert extract_boxed("no box here") is None


def test_rewards_extract_boxed_fbox_and_bare_token():
    assert extract_boxed(r"\fbox{42}") == "42"
    assert extract_boxed(r"$\framebox{204}$ minutes") == "204"
    assert extract_boxed(r"the answer is $\boxed 5$.") == "5"
    assert extract_boxed(r"\boxed 7.") == "7"
    assert extract_boxed(r"\boxedfoo{3}") is None  # another command, not a box


def test_rewards_extract_boxed_unbalanced_is_none():
    assert extract_boxed(r"\boxed{\frac{1}{2}") is None
    assert extract_boxed(r"\boxed{") is None
    assert extract_boxed("}}}}") is None


@pytest.mark.parametrize(
    "text",
    [
        "\\boxed{" + "{" * 1_000_000,  # 1 MB, never closed
        "\\boxed{" * 100_000,  # 100k unbalanced boxes (a per-box scan would be quadratic)
        "\\boxed{" + "{" * 100_000 + "7" + "}" * 100_000 + "}",  # deep nesting (a recursive parser would overflow)
        "x" * 1_000_000 + "\\boxed" + " " * 100_000,
    ],
)
def test_rewards_extract_boxed_hostile_input_is_fast(text):
    start = time.perf_counter()
    result = extract_boxed(text)
    assert time.perf_counter() - start < 1.0
    assert result is None or result.startswith("{")


# ---- is the answer right? -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "completion, answer",
    [
        (r"$\boxed{\frac12}$", "0.5"),
        (r"$\boxed{0.5}$", r"\dfrac{1}{2}"),
        (r"$\boxed{\dfrac{1}{2}}$", r"\frac{1}{2}"),
        (r"\boxed{25}", "025"),  # AIME answers: compare as integers
        (r"\boxed{(3,\frac{\pi}{2})}", r"\left( 3, \frac{\pi}{2} \right)"),
        (r"\boxed{\sqrt{18}}", r"3\sqrt{2}"),
        (r"\boxed{C}", r"\text{(C)}"),
        (r"\boxed{90}", r"90^\circ"),
        (r"\boxed{p-q}", "p - q"),
        (r"\boxed{\$70,000}", "70000"),
        (r"\boxed{x = 5}", "5"),
    ],
)
def test_rewards_accuracy_equivalent_forms(completion, answer):
    assert accuracy_reward(completion, answer) == 1.0


def test_rewards_accuracy_wrong_answer_is_zero():
    assert accuracy_reward(r"\boxed{24}", "025") == 0.0
    assert accuracy_reward(r"\boxed{\frac{1}{3}}", "0.5") == 0.0
    assert accuracy_reward(r"\boxed{2\sqrt{3}}", r"3\sqrt{2}") == 0.0
    assert accuracy_reward(r"\boxed{(3, \pi)}", r"\left( 3, \frac{\pi}{2} \right)") == 0.0


def test_rewards_accuracy_grades_only_after_think():
    assert accuracy_reward(r"<think>it is \boxed{5}</think> I am not sure.", "5") == 0.0
    assert accuracy_reward(r"<think>it is \boxed{5}</think> \boxed{6}", "5") == 0.0
    assert accuracy_reward(r"<think>it is \boxed{5}", "5") == 0.0  # never finished thinking
    assert accuracy_reward(r"<think>maybe 6?</think> So the answer is $\boxed{5}$.", "5") == 1.0


def test_rewards_accuracy_falls_back_to_plain_answer_without_box():
    assert accuracy_reward("... so the answer is 14/3.", r"\frac{14}{3}") == 1.0
    assert accuracy_reward("Therefore the final answer is 42.", "42") == 1.0
    assert accuracy_reward("Therefore the final answer is 41.", "42") == 0.0


@pytest.mark.parametrize(
    "completion, answer",
    [
        (None, "5"),
        (r"\boxed{5}", None),
        (r"\boxed{5}", ""),  # empty gold: never rewarded
        (r"\boxed{}", "5"),
        ("", "5"),
        (12345, "5"),
        (r"\boxed{\frac{}{}\sqrt[}{\left(}", "5"),
        (r"\boxed{\begin{pmatrix} 1 & \\ \end{matrix}}", r"\frac{1}{2}"),
        ("\\boxed{" + "\\frac{1}{" * 40 + "2" + "}" * 40 + "}", "5"),
        (r"\boxed{9^{9^{9^{9}}}}", "3"),  # sympy would evaluate this power tower forever
        ("so it is $9^{9^{9^{9}}}$", "3"),
        (r"\boxed{999999^{999999}}", "3"),
        (r"\boxed{(x+1)^{3000}}", "x^{3000}+1"),  # symbolic expansion of a huge power
        (r"\boxed{(10!)!}", "3"),
        ("\\boxed{" + "1+" * 400_000 + "1}", "5"),  # a huge boxed answer
        ("garbage " * 100_000, "5"),
    ],
)
def test_rewards_accuracy_never_raises_and_is_fast(completion, answer):
    start = time.perf_counter()
    assert accuracy_reward(completion, answer) == 0.0
    assert time.perf_counter() - start < 3.0


def test_grader_errors_count_what_the_catch_alls_caught(monkeypatch):
    """The catch-all keeps a run alive, and the count tells it happened (train.py logs reward/grader_errors)."""
    monkeypatch.setattr(rewards, "_errors", 0)                  # restored afterwards: the autouse check stays exact

    def broken(*args):
        raise RuntimeError("grader bug")

    assert accuracy_reward(r"\boxed{2}", "2") == 1.0 and rewards.grader_errors() == 0
    monkeypatch.setattr(rewards, "_is_correct", broken)
    assert accuracy_reward(r"\boxed{2}", "2") == 0.0 and rewards.grader_errors() == 1
    monkeypatch.setattr(rewards, "_final_answers", broken)
    assert final_answer(r"\boxed{2}") is None and rewards.grader_errors() == 2


def test_rewards_accuracy_works_in_a_thread():
    # math_verify's timeouts use SIGALRM, which only the main thread may use; graders often run in pools.
    results = []
    worker = threading.Thread(
        target=lambda: results.extend(
            [
                accuracy_reward(r"\boxed{\frac12}", "0.5"),
                accuracy_reward(r"\boxed{\sqrt{18}}", r"3\sqrt{2}"),
                accuracy_reward("the answer is 14/3.", r"\frac{14}{3}"),
                accuracy_reward(r"\boxed{7}", "0.5"),
                accuracy_reward(r"\boxed{9^{9^{9^{9}}}}", "3"),
            ]
        )
    )
    worker.start()
    worker.join(timeout=20)
    assert not worker.is_alive()
    assert results == [1.0, 1.0, 1.0, 0.0, 0.0]


# ---- the final answer: several boxes of one statement, late answer sentences, hedges --------------
def test_rewards_final_answer_joins_the_boxes_of_one_statement():
    assert final_answer(r"$$\boxed{(2, 2)} \quad \text{and} \quad \boxed{(6, 2)}$$") == "(2, 2), (6, 2)"
    assert final_answer(r"\boxed{1},\boxed{2},\boxed{3}") == "1, 2, 3"
    assert final_answer(r"$$\boxed{(3, 3)} \text{ for part (a) and } \boxed{(1, 1)}$$") == "(3, 3), (1, 1)"
    assert final_answer(r"so $k = \boxed{12}$ and $k = \boxed{18}$ work") == "12, 18"  # labels are separators
    assert final_answer(r"first \boxed{1}, then \boxed{2}") == "2"  # a word between: two statements
    assert final_answer(r"x = \boxed{3}, so y = \boxed{4}") == "4"
    assert final_answer(r"So \boxed{143}. **Final Answer** \boxed{143}") == "143"
    assert final_answer(r"\boxed{\boxed{7}}") == "7"  # nested: one box, not two
    assert final_answer("no answer here") is None


def test_rewards_final_answer_unit_words_between_boxes_and_a_lone_number():
    assert final_answer(r"\boxed{1} papers and \boxed{2} bins") == "1, 2"  # a unit word, then a joining separator
    assert final_answer(r"$\boxed{1}$ papers and $\boxed{2}$ bins") == "1, 2"
    assert final_answer(r"\boxed{12} \text{ hours and } \boxed{30} minutes") == "12, 30"
    assert final_answer(r"\boxed{3} is wrong, so \boxed{4}") == "4"  # "is" carries the sentence on: no unit
    assert final_answer(r"\boxed{5} cm, and the width is \boxed{3}") == "3"  # more than units and separators
    assert final_answer(r"\boxed{1} no no no no no \boxed{2}") == "2"
    assert final_answer("Final Answer: Jane started growing Sphere 3 hours ago. I hope it is correct.") == "3"
    assert final_answer("Final Answer: Rod grew for 8 hours and Sphere for 3 hours.") is None  # two numbers: none
    assert final_answer("Final Answer: It is not 3 hours.") is None  # after "is": prose, a negation


def test_rewards_final_answer_late_sentence_and_no_box():
    late = r"First \boxed{200}, later \boxed{255}. Final Answer: The final answer is $10,455$. I hope it is correct."
    assert final_answer(late) == "10,455"
    assert final_answer(r"\boxed{12}. The final answer is boxed above.") == "12"  # states no math: the box stands
    assert final_answer(r"\boxed{12}. Answer: 13") == "12"  # a bare "Answer:" does not override a box
    assert final_answer("The final answer is $14,916$. Note: " + "more words. " * 100) == "14,916"  # not in the tail
    assert final_answer("The answer is 3. Wait, no: the answer is 5 apples.") == "5"  # the last sentence
    assert final_answer("The final answer is $7$. So the answer is 8.") == "7"  # "final answer" outranks "answer"
    assert final_answer("<think>The final answer is $7$.</think>I am not sure.") is None


@pytest.mark.parametrize(
    "answer, completion",
    [
        ("(2, 2), (6, 2)", r"The solutions are $$\boxed{(2, 2)} \quad \text{and} \quad \boxed{(6, 2)}$$"),
        ("1, 2, 3", r"The roots are \boxed{1},\boxed{2},\boxed{3}"),
        ("k = 45, n = 2", r"Hence $$\boxed{k = 45} \quad \text{and} \quad \boxed{n = 2}$$"),
        ("10455", r"So \boxed{200}. Next \boxed{255}. Adding up: Final Answer: The final answer is $10,455$."),
        ("14916", "The final answer is $14,916$. Note: " + "we double-check each digit. " * 40),  # no box, long note
        ("1, 2, 3", r"\boxed{3} and \boxed{1} and \boxed{2}"),  # a set of solutions, in any order
        ("3, 4", r"$x = \boxed{3}$ or $x = \boxed{4}$"),  # "or" between solutions states the set
        ("2 - b", r"\boxed{-b+2}, or \boxed{2 - b}"),  # one answer in two forms is not a hedge
        ("-1,3,3", r"\boxed{3}, \boxed{-1}, \boxed{3}"),  # a double root entered twice
        (r"\pm 2", r"\boxed{2} or \boxed{-2}"),
        ("k = 45, n = 2", r"\boxed{45} and \boxed{2}"),  # bare values, in the gold's order
        ("k = 45, n = 2", r"\boxed{n = 2} and \boxed{k = 45}"),  # named values, in any order
        ("4", r"x = \boxed{3}, so y = \boxed{4}"),  # two statements: the last box
        ("5", r"Try \boxed{3}. That fails; after more work the answer is \boxed{5}."),  # an intermediate box
        ("3, 4", r"<think>\boxed{3}? or \boxed{5}?</think>The roots are \boxed{3} and \boxed{4}."),
        ("34", "Final Answer: The largest $n$ is 34."),  # the answer after the sentence's "is"
        (r"\{1, 2, 3\}", r"\boxed{1}, \boxed{2} and \boxed{3}"),  # a gold written as a set
        ("$${1,2,3}$$", r"\boxed{1} and \boxed{2} and \boxed{3}"),  # ... inside display math (math-verify's cases)
        ("$${1,2,3}$$", r"\boxed{1},\boxed{2},\boxed{3}"),
        ("$x \\in [-2,7]$", r"\boxed{x \in [-2, 7]}"),  # a gold in one math span: the delimiters carry no value
        ("3", "Final Answer: Jane started growing Sphere 3 hours ago. I hope it is correct."),  # one number, no "is"
        ("1, 2", r"\boxed{1} papers and \boxed{2} bins"),  # boxes apart by a unit word are one answer
        ("12, 30", r"\boxed{12} \text{ hours and } \boxed{30} minutes"),
        ("4", r"\boxed{3} is wrong, so \boxed{4}"),  # not a unit: two statements, the last box
        ("12, 9", r"\boxed{9, 12}"),  # a bare list gold is a set ...
        ("(12, 9)", r"\boxed{12, 9}"),  # ... a tuple gold is ordered: its order, in one box ...
        ("(12, 9)", r"$BP = \boxed{12}$ and $QT = \boxed{9}$"),  # ... or in several
        ("((-2,18), (8,38))", r"the points are $\boxed{(-2,18)}$ and $\boxed{(8,38)}$."),
        ("((-4, 27), (2, 15))", r"\boxed{(-4, 27);(2, 15)}"),
        ("(1, 2)", r"\boxed{(1, 2)} or \boxed{(1,2)}"),  # a restatement is no hedge
        (r"8\!:\!34 \text{ p.m.}", r"$\boxed{20\!:\!34}$ or $\boxed{8\!:\!34 \text{ p.m.}}$"),  # one time, two clocks
        ("8:34 p.m.", r"\boxed{20:34}"),
        # a worked solution as the gold: graded by what its final statement answers
        (r"so the solutions are $n = \boxed{1,-2}.$", r"\[ \boxed{-2} \quad \text{and} \quad \boxed{1}. \]"),
    ],
)
def test_rewards_accuracy_multi_part_and_late_answers(answer, completion):
    assert accuracy_reward(completion, answer) == 1.0


@pytest.mark.parametrize(
    "answer, completion",
    [
        ("3", r"\boxed{3} or \boxed{4}"),  # two candidates for one value: a hedge ...
        ("3", r"\boxed{4} or \boxed{3}"),  # ... in either order (the last box used to win) ...
        ("3", r"\boxed{3, 4}"),  # ... exactly as in one box ...
        ("3", r"$\boxed{3}$ or maybe $\boxed{4}$"),
        ("4", r"\boxed{3 \text{ (or maybe 4)}}"),  # ... or inside one box
        ("3", "The final answer is $3$ or $4$."),
        ("3", r"<think>hmm</think>\boxed{3} or \boxed{4}"),
        ("3", r"\boxed{3}. Final answer: $4$"),  # the late sentence overrides the box
        ("1, 2, 3", r"\boxed{1}, \boxed{2}"),  # a part missing
        ("1, 2", r"\boxed{1}, \boxed{2}, \boxed{3}"),  # a part too many
        ("-1,3,3", r"\boxed{-1, 3}"),  # the multiplicity the gold asks for is missing
        ("k = 45, n = 2", r"\boxed{2} and \boxed{45}"),  # bare values in the wrong order
        ("k = 45, n = 2", r"\boxed{n = 45} and \boxed{k = 2}"),
        ("(1, 2)", r"\boxed{1} or \boxed{2}"),  # an ordered pair is one value
        ("32349", r"\boxed{32, 349}"),  # a list, not digit grouping
        ("1000", r"\boxed{1}, \boxed{000}"),
        ("5", "The answer is 4 because 2 + 3 = 5."),  # math-verify alone would read the last 5
        ("5", "Final Answer: The answer is 4 because 2 + 3 is 5."),
        ("4", "I computed it: 3 or 4"),  # no box, no answer sentence, still a hedge
        (r"\begin{pmatrix} -1 & 0 \\ 0 & -1 \end{pmatrix}.", r"\boxed{-1}"),  # a gold's stray period hid the matrix
        ("5", r"<think>\boxed{5} and \boxed{5}</think>\boxed{6}"),
        ("$${1,2,3}$$", r"\boxed{1},\boxed{2}"),  # a set gold in display math still wants every element
        ("$${1,2,3}$$", r"\boxed{1},\boxed{2},\boxed{4}"),
        ("8", "Final Answer: Jane started growing Sphere 3 hours ago."),  # the one number is not the gold
        ("3", "Final Answer: Rod grew for 8 hours and Sphere for 3 hours."),  # two numbers: no answer
        ("3", "Final Answer: Jane did not start 3 hours ago."),  # a negation
        ("3", "Final Answer: Jane started about 3 hours ago."),  # an approximation
        ("3", "Final Answer: maybe 3 hours, or 4."),
        ("2", r"\boxed{1} papers and \boxed{2} bins"),  # joined: a two-valued answer for a single gold
        ("3", r"\boxed{3} apples or \boxed{4} apples"),  # a hedge with units ...
        ("4", r"\boxed{3} apples or \boxed{4} apples"),  # ... whichever value the gold is (the last box used to win)
        ("4", r"So it is $\boxed{3}$ apples or $\boxed{4}$ apples."),  # ... inside math spans too
        ("1, 2", r"\boxed{1} no no no no no \boxed{2}"),  # words that are no units: two statements
        ("(12, 9)", r"\boxed{9, 12}"),  # an ordered gold in the wrong order, in one box ...
        ("(12, 9)", r"\boxed{9} and \boxed{12}"),  # ... or in several
        ("(12, 9)", r"\boxed{(9, 12)}"),
        ("(1, 2)", r"\boxed{1 \text{ or } 2}"),  # alternatives are not a pair (math-verify reads this as (1, 2))
        ("(1, 2)", r"\boxed{(1, 2)} or \boxed{(2, 1)}"),
        ("((-2,18), (8,38))", r"\boxed{(8,38)} and \boxed{(-2,18)}"),
        ("(12, 9)", r"\boxed{12}, \boxed{9}, \boxed{9}"),  # a part too many
        ("8:34 p.m.", r"\boxed{8:34}"),  # a bare time is on the 24-hour clock
        ("8:34 p.m.", r"\boxed{8:34 \text{ a.m.}}"),
        (r"\boxed{1} no no no no no \boxed{2}", r"$\boxed{1,2}$"),  # a worked gold answers its final statement: 2
    ],
)
def test_rewards_accuracy_hedges_and_wrong_parts_are_zero(answer, completion):
    assert accuracy_reward(completion, answer) == 0.0


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("\\boxed{3}" * 10_000, 0.0),  # 10,000 boxes of one statement: more parts than any answer
        ("".join(f"\\boxed{{{i}}} or " for i in range(10_000)), 0.0),
        ("\\boxed{3" + "{" * 200_000, 0.0),  # unbalanced braces
        ("}" * 100_000 + "\\boxed{" * 10_000 + "\\boxed{3}", 1.0),
        ("The final answer is " + "$3$ and " * 25_000, 0.0),  # 200k characters of answer spans
        ("final answer is " * 12_500, 0.0),  # 200k characters of anchors
        ("x" * 200_000 + " The final answer is $3$.", 1.0),
        ("\\boxed{4}" + " \\quad \\text{and} " * 10_000 + "\\boxed{3}", 1.0),  # too far apart to be one answer
    ],
    ids=["10k-boxes", "10k-hedges", "unbalanced", "stray-braces", "200k-spans", "200k-anchors", "200k-prose",
         "200k-separators"],
)
def test_rewards_accuracy_multi_part_hostile_inputs_are_fast(completion, expected):
    start = time.perf_counter()
    assert accuracy_reward(completion, "3") == expected
    assert time.perf_counter() - start < 2.0


def test_rewards_accuracy_multi_part_works_in_a_thread():
    results = []
    worker = threading.Thread(
        target=lambda: results.extend(
            [
                accuracy_reward(r"$$\boxed{k = 45} \quad \text{and} \quad \boxed{n = 2}$$", "k = 45, n = 2"),
                accuracy_reward(r"\boxed{2} or \boxed{-2}", r"\pm 2"),
                accuracy_reward(r"\boxed{4} or \boxed{3}", "3"),
            ]
        )
    )
    worker.start()
    worker.join(timeout=20)
    assert not worker.is_alive()
    assert results == [1.0, 1.0, 0.0]


@pytest.mark.parametrize(
    "completion, letter, expected",
    [
        (r"\boxed{B}", "B", 1.0),
        (r"\boxed{\text{b}}", "B", 1.0),
        (r"$\boxed{(C)}$", "c", 1.0),
        ("Answer: D", "D", 1.0),
        ("**Answer:** (a)", "A", 1.0),
        ("so the answer is (B).", "B", 1.0),
        (r"Answer: B. On reflection, \boxed{D}", "B", 0.0),  # the last one counts
        (r"\boxed{D}. Final answer: B", "B", 1.0),
        ("<think>Answer: A</think> I cannot decide.", "A", 0.0),  # only after </think>
        ("The answer is a prime number.", "A", 0.0),  # English "a", not option (a)
        (r"\boxed{E}", "E", 0.0),  # only A-D exist
        ("Answer: C", "B", 0.0),
        (None, "A", 0.0),
        (r"$\boxed{A}$ or $\boxed{B}$", "B", 0.0),  # a hedge: wrong whichever letter is gold
        (r"$\boxed{A}$ or $\boxed{B}$", "A", 0.0),
        (r"\boxed{A} \text{ and } \boxed{B}", "A", 0.0),
        (r"\boxed{B} and \boxed{\text{(B)}}", "B", 1.0),  # the same letter twice is no hedge
        (r"\boxed{C} \quad \boxed{12 \text{ cm}}", "C", 1.0),  # one letter and its value
        ("Answer: A or B", "B", 0.0),
        ("Answer: (A) or (B)", "A", 0.0),
        ("The answer is B, C.", "B", 0.0),
        ("Answer: A, a fine choice.", "A", 1.0),  # a lower-case word is not a second option
        (r"\boxed{A} or \boxed{B}. Answer: B", "B", 1.0),  # a later commitment counts, as always
    ],
)
def test_rewards_multiple_choice(completion, letter, expected):
    assert multiple_choice_reward(completion, letter) == expected


# ---- ROUGE-L ------------------------------------------------------------------------------------------------
def test_rewards_rouge_identical_and_symbols_matter():
    assert rouge_l_reward("x^2 + 1", "x^2 + 1") == pytest.approx(1.0)
    assert rouge_l_reward("x^2 + 1", "x^2 - 1") < 1.0  # the stock tokenizer would call these identical
    assert rouge_l_reward("x^2 \u2212 1", "x^2 - 1") == pytest.approx(1.0)  # unicode minus is a minus
    assert rouge_l_reward("<think>scratch</think>So x = 2.", "So x = 2.") == pytest.approx(1.0)


def test_rewards_rouge_empty_bounds_and_never_raises():
    assert rouge_l_reward("", "x = 1") == 0.0
    assert rouge_l_reward("x = 1", "") == 0.0
    assert rouge_l_reward("x = 1", None) == 0.0
    assert rouge_l_reward(None, "x = 1") == 0.0
    assert rouge_l_reward("<think>x = 1", "x = 1") == 0.0  # unfinished thinking is not graded
    for a, b in [("a b c", "c b a"), ("1 + 1 = 2", "so 1 + 1 is 2"), ("\\frac{1}{2}", "one half")]:
        assert 0.0 <= rouge_l_reward(a, b) <= 1.0


def test_rewards_rouge_long_inputs_are_capped():
    long_text = "x + y = z, so z - x = y. " * 20_000  # ~260k tokens each
    start = time.perf_counter()
    score = rouge_l_reward(long_text, long_text[::-1])
    assert time.perf_counter() - start < 3.0
    assert 0.0 <= score <= 1.0


def _lcs_by_table(a: list, b: list) -> int:
    """The textbook O(n·m) dynamic programme, independent of both implementations under test."""
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def test_rewards_lcs_length_equals_the_table():
    assert rewards.lcs_length(list("ABCBDAB"), list("BDCABA")) == 4     # CLRS's example: "BCBA"
    assert rewards.lcs_length(list("ABCBDAB"), []) == 0
    rng = random.Random(0)
    for _ in range(2_000):
        # small alphabets make long, ambiguous common subsequences; lengths cross the 64-bit word boundary
        alphabet = "abcdefghij"[: rng.randint(1, 10)]
        a = [rng.choice(alphabet) for _ in range(rng.randint(0, 150))]
        b = [rng.choice(alphabet) for _ in range(rng.randint(0, 150))]
        assert rewards.lcs_length(a, b) == rewards.lcs_length(b, a) == _lcs_by_table(a, b), (a, b)


def test_rewards_rouge_equals_rouge_score_exactly():
    """The fast ROUGE-L is rouge-score's F-measure on the same tokens, to the last bit: random texts over a small
    math vocabulary (short and over the token cap) and the fixtures' worked solutions against each other."""
    from rouge_score import rouge_scorer
    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=rewards._MathTokenizer())
    rng = random.Random(1)
    vocabulary = ["x", "y", "=", "+", "-", "2", "10", "(", ")", "\\frac", "{", "}", "so", "the", "is", "^"]
    pairs = [(" ".join(rng.choice(vocabulary[: rng.randint(2, 16)]) for _ in range(rng.randint(0, 120))),
              " ".join(rng.choice(vocabulary) for _ in range(rng.randint(0, 120)))) for _ in range(3_000)]
    pairs += [(" ".join(rng.choice(vocabulary) for _ in range(rng.randint(900, 1_300))),
               " ".join(rng.choice(vocabulary) for _ in range(rng.randint(300, 1_300)))) for _ in range(8)]
    solutions = [json.loads(line)["solution"] for name in ("math_train.jsonl", "math500.jsonl")
                 for line in open(os.path.join(FIXTURES, name))]
    pairs += [(a, b) for a in solutions for b in solutions]
    for completion, reference in pairs:
        expected = scorer.score(reference, completion)["rougeL"].fmeasure if completion.strip() and reference.strip() else 0.0
        assert rouge_l_reward(completion, reference) == expected, (completion, reference)


def test_rewards_rouge_does_not_use_the_quadratic_table(monkeypatch):
    """ROUGE-L of a 1,000-token completion is ~0.1 s through rouge-score's O(n·m) table (30 s a step for 256
    completions): the reward must not call it."""
    from rouge_score import rouge_scorer

    def table(*args):
        raise AssertionError("rouge-score's O(n·m) LCS table was used")

    monkeypatch.setattr(rouge_scorer, "_lcs_table", table)
    text = "x + y = z, so z - x = y. " * 100
    assert 0.0 < rouge_l_reward(text, text[::-1]) < 1.0     # the autouse fixture: no catch-all fired either


# ---- the reward ---------------------------------------------------------------------------------------------
def test_rewards_reward_combines_accuracy_and_rouge():
    completion, reference = r"so 1 + 1 = 2, \boxed{2}", r"1 + 1 = 2, so \boxed{2}"
    rouge = rouge_l_reward(completion, reference)
    assert 0.0 < rouge < 1.0
    out = reward(completion, "2", reference=reference, rouge_weight=0.1)
    assert out["accuracy"] == 1.0 and out["rouge"] == pytest.approx(rouge)
    assert out["reward"] == pytest.approx(1.0 + 0.1 * rouge)
    wrong = reward(r"so 1 + 1 = 3, \boxed{3}", "2", reference=reference, rouge_weight=0.1)
    assert wrong["accuracy"] == 0.0 and 0.0 < wrong["reward"] < 0.1  # ROUGE breaks ties, never beats a right answer
    assert reward(completion, "2", reference=reference) == {"reward": 1.0, "accuracy": 1.0, "rouge": 0.0}
    assert reward(completion, "2", reference=None, rouge_weight=0.5)["rouge"] == 0.0  # no reference, no ROUGE


def test_rewards_reward_tasks_and_batch():
    assert reward("Answer: C", "C", task="multiple_choice")["reward"] == 1.0
    with pytest.raises(ValueError):
        reward(r"\boxed{1}", "1", task="poetry")
    outs = score_completions([r"\boxed{1}", r"\boxed{2}"], ["1", "1"], [None, "x"], rouge_weight=0.5)
    assert [o["accuracy"] for o in outs] == [1.0, 0.0]
    assert outs[0]["rouge"] == 0.0


def _grading_batch(n: int):
    """n completions with answers, references and tasks: right and wrong answers, ROUGE, multiple choice."""
    rng = random.Random(0)
    completions, answers, references, tasks = [], [], [], []
    for i in range(n):
        if i % 5 == 4:
            completions.append(f"The answer is ({'ABCD'[i % 4]}).")
            answers.append("ABCD"[(i // 2) % 4]), references.append(None), tasks.append("multiple_choice")
            continue
        value = rng.randint(1, 30)
        completions.append(rf"We get $x^2 = {value * value}$, so $x = \boxed{{{value + i % 2}}}$.")
        answers.append(str(value)), references.append(rf"Since $x^2 = {value * value}$, $x = \boxed{{{value}}}$.")
        tasks.append("math")
    return completions, answers, references, tasks


def test_score_completions_in_processes_equals_the_plain_loop():
    completions, answers, references, tasks = _grading_batch(80)
    plain = [reward(c, a, r, 0.1, t) for c, a, r, t in zip(completions, answers, references, tasks)]
    assert score_completions(completions, answers, references, 0.1, tasks, workers=1) == plain
    assert score_completions(completions, answers, references, 0.1, tasks, workers=2) == plain
    for worker in rewards._process_pool(2)._pool:      # Ctrl-C reaches the workers too: they leave it to train.py
        os.kill(worker.pid, signal.SIGINT)
    start = time.monotonic()
    assert score_completions(completions, answers, references, 0.1, tasks, workers=2) == plain
    assert time.monotonic() - start < 10                # no chunk was lost to a dead worker (and its hard timeout)
    assert 0 < sum(p["accuracy"] for p in plain) < 80 and all(p["rouge"] > 0 for p, t in zip(plain, tasks) if t == "math")
    with pytest.raises(ValueError, match="unknown task 'poetry'"):
        score_completions(completions, answers, references, 0.1, ["poetry"] * 80, workers=2)
    with pytest.raises(ValueError, match="lengths differ"):
        score_completions(completions, answers[:-1], workers=2)


def test_score_completions_workers_keep_the_timeouts_and_count_errors(monkeypatch):
    """A worker grades in its own main thread, so math-verify's SIGALRM timeouts are on there (in a thread they are
    off); what its catch-alls catch is counted in this process; a stuck worker is cut off at HARD_TIMEOUT_S."""
    rewards._close_pool()                        # the next pool is forked from this test's state
    assert rewards._process_pool(2).apply(rewards._timeouts) == (rewards.PARSE_TIMEOUT_S, rewards.VERIFY_TIMEOUT_S)
    rewards._close_pool()
    monkeypatch.setattr(rewards, "_errors", 0)                  # restored afterwards: the autouse check stays exact
    real_is_correct = rewards._is_correct

    def broken_or_stuck(completion, answer):
        if "stuck" in completion:
            time.sleep(60)                      # what SIGALRM cannot interrupt (a C call) looks like this
        if "bug" in completion:
            raise RuntimeError("grader bug")
        return real_is_correct(completion, answer)

    monkeypatch.setattr(rewards, "_is_correct", broken_or_stuck)
    monkeypatch.setattr(rewards, "HARD_TIMEOUT_S", 0.1)       # per completion of a worker's share: 3.2 s here
    completions = [r"\boxed{1}"] * 30 + ["bug"] * 3 + ["stuck"] + [r"\boxed{1}"] * 30
    start = time.monotonic()
    try:
        scored = score_completions(completions, ["1"] * len(completions), workers=2)
        assert rewards._pool is None                            # the stuck worker is gone with its pool
    finally:
        rewards._close_pool()                   # no worker of this test's patched graders outlives it
    assert time.monotonic() - start < 15
    accuracy = [s["accuracy"] for s in scored]
    assert len(accuracy) == 64 and accuracy[30:34] == [0.0] * 4
    # every completion of a chunk lost to the stuck worker counts as an error, and every bug: at least 4
    assert rewards.grader_errors() >= 4 and sum(accuracy) >= 64 - rewards.grader_errors()


# ===================================================================================================
# 8. Data (data.py): every loader on small invented fixtures (fixtures/), no network
# ===================================================================================================
def fixture(name: str) -> str:
    return os.path.join(FIXTURES, name)


def test_math500_fixture_records():
    recs = data.load_benchmark("math500", data_file=fixture("math500.jsonl"))
    assert len(recs) == 3
    r = recs[0]
    assert r["prompt"] == "What is $\\frac{3}{4} + \\frac{1}{8}$?\n" + data.MATH_INSTRUCTION
    assert r["answer"] == "\\frac{7}{8}"
    assert r["solution"].endswith("$\\boxed{\\frac{7}{8}}$.")
    assert r["task"] == "math" and r["id"] == "test/prealgebra/9001.json"
    assert [x["answer"] for x in recs] == ["\\frac{7}{8}", "6", "(2,2)"]


def test_aime_fixtures_keep_answer_strings_and_accept_question_field(tmp_path):
    a24 = data.load_benchmark("aime24", data_file=fixture("aime24.jsonl"))
    assert [r["answer"] for r in a24] == ["401", "025", "333"]  # leading zero kept: the grader compares as integers
    assert a24[1]["id"] == "902" and a24[1]["solution"].startswith("$100 = ")
    a25 = data.load_benchmark("aime25", data_file=fixture("aime25.jsonl"))
    assert [r["answer"] for r in a25] == ["12", "400", "120"] and all(r["solution"] is None for r in a25)
    assert a25[2]["prompt"].startswith("Find $\\binom{10}{3}$.\n")
    # opencompass/AIME2025 layout: "question" instead of "problem"
    f = tmp_path / "aime25_oc.jsonl"
    f.write_text(json.dumps({"question": "Compute $2+2$.", "answer": "4"}) + "\n")
    (r,) = data.load_benchmark("aime25", data_file=str(f))
    assert r["prompt"] == "Compute $2+2$.\n" + data.MATH_INSTRUCTION and r["answer"] == "4" and r["id"] == "aime25/0"


def test_gsm8k_split_strips_calc_and_commas():
    recs = data.load_benchmark("gsm8k", data_file=fixture("gsm8k.jsonl"))
    assert [r["answer"] for r in recs] == ["14", "1234", "49"]
    assert recs[1]["solution"] == "It has 1,000 + 234 = 1,234 pens."  # annotation gone, text commas kept
    assert all("<<" not in r["solution"] and "####" not in r["solution"] for r in recs)
    assert recs[0]["prompt"].startswith("Tom has 12 apples") and recs[0]["prompt"].endswith(data.MATH_INSTRUCTION)
    assert data.split_gsm8k_answer("a <<1+1=2>>2\n#### -3,000.5") == ("a 2", "-3000.5")
    train = data.load_train_dataset("gsm8k", data_file=fixture("gsm8k.jsonl"))
    assert [r["answer"] for r in train] == ["14", "1234", "49"]


def test_math_train_answer_is_last_boxed_with_nested_braces():
    recs = data.load_train_dataset("math", data_file=fixture("math_train.jsonl"))
    assert [r["answer"] for r in recs] == ["\\frac{1}{2}", "\\{1,2,3\\}", "120"]  # last box, nested braces, "\boxed 120"
    assert recs[0]["solution"].startswith("We have") and recs[0]["prompt"].startswith("Simplify")
    assert data.last_boxed("x \\boxed{a{b}c} y \\fbox{\\sqrt{2}} z") == "\\sqrt{2}"
    assert data.last_boxed("\\boxed{1} then \\boxed{2") == "1"  # an unfinished last box is skipped
    assert data.last_boxed("no box here") is None and data.last_boxed(None) is None


# Invented MATH-style rows (no answer field, as on the Hub): the kinds of solution whose last box is not the gold.
GOLD_ROWS = [
    # (problem, solution, the gold data.py must derive)
    ("Find all points where the parabolas meet.",
     r"So the points are $\boxed{(-2,18)}$ and $\boxed{(8,38)}$.", "(-2,18), (8,38)"),
    ("Find all $t$ such that $x-t$ is a factor. Enter your answer as a list separated by commas.",
     r"Hence $t = \boxed{\frac{1}{3}}$ or $t = \boxed{-\frac{5}{2}}$.", r"\frac{1}{3}, -\frac{5}{2}"),
    ("Enter the two smallest solutions, separated by commas.",
     r"but $k = \boxed{12}$ and $k = \boxed{18}$ work", "12, 18"),
    ("What is $N$, expressed in base 9?", r"Written in base $9$, this is $\boxed{28}$ or $\boxed{28_9}$.", "28_9"),
    ("What time will it be in 1234 minutes?", r"It will be $\boxed{20\!:\!34}$ or $\boxed{8\!:\!34 \text{ p.m.}}$.",
     r"8\!:\!34 \text{ p.m.}"),
    ("What is my final expression in simplest form?", r"This yields $\boxed{-b+2}$, or $\boxed{2 - b}$.", "2 - b"),
    ("Find all $x$. Enter all the solutions, separated by commas.", r"So $x = \boxed{1, 9}$.", "1, 9"),
    ("Find the lengths of $BP$ and $QT$. First write the length of $BP$, then a comma, then the length of $QT$.",
     r"Our final answer is then $\boxed{12,9}$.", "(12, 9)"),
    ("Give all points where they intersect. List the points in order of increasing $x$-coordinate.",
     r"the points of intersection are $\boxed{(-2, 23)}$ and $\boxed{(0, 1)}$.", "((-2, 23), (0, 1))"),
    ("List the values in increasing order separated by commas.", r"undefined at $\boxed{-2, 2}$", "(-2, 2)"),
    ("Enter the values $a,$ $b,$ $c,$ separated by commas, in any order.", r"so $\boxed{1,i,-i}$", "1,i,-i"),
    ("If $\cos a,$ $\cos 2a,$ $\cos 3a$ form an arithmetic sequence, in that order, enter all solutions.",
     r"so $\boxed{45^\circ, 135^\circ}$", r"45^\circ, 135^\circ"),
]


@pytest.mark.parametrize("problem, solution, gold", GOLD_ROWS)
def test_math_gold_from_the_solution_and_the_problem(problem, solution, gold):
    (record,) = data.math_records([{"problem": problem, "solution": solution}], "gold")
    assert record["answer"] == gold
    assert accuracy_reward(solution, record["answer"]) == 1.0  # a reference solution is right against its own gold


def test_math_gold_kept_when_the_problem_asks_for_one_answer():
    # "Enter only one of the foci": the last box stays the gold (MATH's own), and the solution that boxes both
    # foci is a hedge against it. The one MATH train solution of this kind is the one that grades wrong.
    problem = "Find the coordinates of either of them. (Enter only one of the foci, not both.)"
    solution = r"which gives two points: $\boxed{(-5, 7)}$ and $\boxed{(-5, 1)}.$ (Either point is acceptable.)"
    (record,) = data.math_records([{"problem": problem, "solution": solution}], "gold")
    assert record["answer"] == "(-5, 1)"
    assert accuracy_reward(r"\boxed{(-5, 1)}", record["answer"]) == 1.0 and accuracy_reward(solution, "(-5, 1)") == 0.0


def test_math_gold_given_answers_are_ordered_by_the_problem_too():
    rows = [{"problem": "List Trisha's five test scores from the greatest to the least, separated by commas.",
             "answer": "89, 88, 85, 73, 70"},
            {"problem": "Enter all the solutions, separated by commas.", "answer": "8,1,-1,-8"}]
    ordered, unordered = data.math_records(rows, "given")
    assert ordered["answer"] == "(89, 88, 85, 73, 70)" and unordered["answer"] == "8,1,-1,-8"
    assert accuracy_reward(r"\boxed{89, 88, 85, 73, 70}", ordered["answer"]) == 1.0
    assert accuracy_reward(r"\boxed{70, 73, 85, 88, 89}", ordered["answer"]) == 0.0  # the order is the answer
    assert accuracy_reward(r"\boxed{-8, -1, 1, 8}", unordered["answer"]) == 1.0  # a set of solutions


def test_gpqa_shuffle_deterministic_and_letter_points_at_correct_option():
    path = fixture("gpqa_diamond.jsonl")
    recs = data.load_benchmark("gpqa_diamond", data_file=path)
    rows = data.read_rows(path)
    for r, row in zip(recs, rows):
        assert r["task"] == "multiple_choice" and r["answer"] in "ABCD" and r["id"] == row["Record ID"]
        lines = r["prompt"].split("\n")
        assert lines[0] == row["Question"]
        options = {line[0]: line[3:] for line in lines if len(line) > 2 and line[1:3] == ") "}
        assert sorted(options) == ["A", "B", "C", "D"]
        assert options[r["answer"]] == row["Correct Answer"].strip()  # the letter names the correct text
        assert sorted(options.values()) == sorted(x.strip() for x in [row["Correct Answer"]] +
                                                  [row[f"Incorrect Answer {k}"] for k in (1, 2, 3)])
    random.seed(12345)  # the global RNG must not matter
    again = data.load_benchmark("gpqa_diamond", data_file=path)
    assert [r["prompt"] for r in again] == [r["prompt"] for r in recs]
    assert len({r["answer"] for r in recs}) > 1  # the correct option is not always in the same place
    other_seed = data.load_benchmark("gpqa_diamond", data_file=path, seed=1)
    assert [r["prompt"] for r in other_seed] != [r["prompt"] for r in recs]


def test_seed_from_is_stable_across_processes():
    # a hard-coded value: Python's hash() would change with PYTHONHASHSEED, sha256 does not
    assert data.seed_from("recFIXTURE000001", 0) == int.from_bytes(
        __import__("hashlib").sha256(b"0:recFIXTURE000001").digest()[:8], "big")
    assert data.seed_from("q", 0) != data.seed_from("q", 1)


def test_missing_field_error_names_existing_fields(tmp_path):
    f = tmp_path / "custom.jsonl"
    f.write_text(json.dumps({"question": "What is 1+1?", "response": "2"}) + "\n")
    with pytest.raises(data.DatasetFieldError) as e:
        data.load_train_dataset(str(f), answer_field="answer")
    msg = str(e.value)
    assert "'answer'" in msg and "question" in msg and "response" in msg
    assert isinstance(e.value, ValueError)
    g = tmp_path / "nofields.jsonl"
    g.write_text(json.dumps({"text": "hello", "label": "1"}) + "\n")
    with pytest.raises(data.DatasetFieldError, match="text, label"):
        data.load_train_dataset(str(g))
    with pytest.raises(data.DatasetFieldError, match="Question.*id, problem, answer"):
        data.load_benchmark("gpqa_diamond", data_file=fixture("aime25.jsonl"))


def test_field_mapping_flags_and_boxed_derivation(tmp_path):
    rows = [{"q": "Add 2 and 3.", "gt": "5", "why": "2+3=5"},
            {"q": "Halve 1.", "gt": "\\frac12", "why": "It is \\frac12."}]
    f = tmp_path / "custom.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recs = data.load_train_dataset(str(f), problem_field="q", answer_field="gt", solution_field="why")
    assert recs[0] == {"prompt": "Add 2 and 3.\n" + data.MATH_INSTRUCTION, "answer": "5", "solution": "2+3=5",
                       "task": "math", "id": "custom.jsonl/0"}
    # no answer field: derived from the solution's last \boxed{}
    g = tmp_path / "derive.json"
    g.write_text(json.dumps([{"question": "Square 3.", "reasoning": "\\boxed{6} no, \\boxed{9}"}]))
    (r,) = data.load_train_dataset("ignored-name", data_file=str(g))
    assert r["answer"] == "9" and r["solution"] == "\\boxed{6} no, \\boxed{9}"


def test_parquet_file(tmp_path):
    import pyarrow as pa                      # requirements.txt: .parquet files are read through it
    import pyarrow.parquet as pq
    f = tmp_path / "custom.parquet"
    pq.write_table(pa.table({"problem": ["One plus one?", "Two times two?"], "answer": ["2", "4"]}), str(f))
    recs = data.load_train_dataset(str(f))
    assert [r["answer"] for r in recs] == ["2", "4"] and recs[1]["prompt"].startswith("Two times two?")
    assert [r["answer"] for r in data.load_benchmark("math500", data_file=str(f))] == ["2", "4"]


def test_unknown_benchmark_lists_valid_names():
    with pytest.raises(ValueError) as e:
        data.load_benchmark("mmlu")
    for name in ("math500", "aime24", "aime25", "gpqa_diamond", "gsm8k", "toy"):
        assert name in str(e.value) and name in data.BENCHMARKS


def test_limit_takes_first_n():
    recs = data.load_benchmark("gsm8k", data_file=fixture("gsm8k.jsonl"), limit=2)
    assert [r["answer"] for r in recs] == ["14", "1234"]
    assert len(data.load_train_dataset("math", data_file=fixture("math_train.jsonl"), limit=1)) == 1
    assert data.load_benchmark("aime24", data_file=fixture("aime24.jsonl"), limit=0) == []


def test_hub_errors_are_clear(monkeypatch):
    # a fake `datasets` module that fails like an offline / gated Hub, so no network is touched
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hub")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    with pytest.raises(data.DatasetLoadError) as e:
        data.load_benchmark("math500")
    assert "HuggingFaceH4/MATH-500" in str(e.value) and "--data_file" in str(e.value)
    with pytest.raises(data.DatasetLoadError) as e:
        data.load_benchmark("gpqa_diamond")
    msg = str(e.value)
    assert "https://huggingface.co/datasets/Idavidrein/gpqa" in msg and "HF_TOKEN" in msg and "--data_file" in msg
    with pytest.raises(data.DatasetLoadError, match="not found"):
        data.load_benchmark("math500", data_file="/nonexistent/file.jsonl")


def test_hub_rows_go_through_the_same_builders(monkeypatch):
    calls = []

    def fake_load(dataset_id, config=None, split=None):
        calls.append((dataset_id, config, split))
        return [{"question": "Q?", "answer": "x = <<1+1=2>>2\n#### 2"}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=fake_load))
    (r,) = data.load_benchmark("gsm8k")
    assert calls == [("openai/gsm8k", "main", "test")] and r["answer"] == "2" and r["solution"] == "x = 2"
    data.load_train_dataset("owner/some_set:cfg", split="validation")
    assert calls[-1] == ("owner/some_set", "cfg", "validation")


def test_toy_records():
    train = data.load_train_dataset("toy", limit=5, seed=0)
    held = data.load_benchmark("toy", limit=4)
    assert len(train) == 5 and len(held) == 4
    for r in train + held:
        a, b = r["prompt"].removesuffix("=").split("+")
        assert r["answer"] == str(int(a) + int(b)) and r["task"] == "math"     # a sum, and its right answer
        assert extract_boxed(r["solution"]) == r["answer"]                    # the worked solution ends in it
    assert [r["prompt"] for r in train] == [r["prompt"] for r in data.load_train_dataset("toy", limit=5, seed=0)]
    assert {r["prompt"] for r in held}.isdisjoint(r["prompt"] for r in data.load_train_dataset("toy", seed=0))


# ---------------------------------------------------------------------------------------------------
# Rows grouped by id (the engines) and the LamPO diagnostics (hand-computed)
# ---------------------------------------------------------------------------------------------------
def test_grouped_pairwise_advantages_equal_the_contiguous_ones_in_any_order():
    torch.manual_seed(0)
    rewards, seq_logps = torch.rand(5, 4).round(), torch.randn(5, 4)
    expected = pairwise_advantages(rewards, seq_logps, tau=0.7).reshape(-1)
    group_ids = torch.arange(5).repeat_interleave(4) * 11 + 3             # ids need not be 0..P-1
    perm = torch.randperm(20)
    got = lambdapo.grouped_pairwise_advantages(rewards.reshape(-1)[perm], seq_logps.reshape(-1)[perm],
                                               group_ids[perm], tau=0.7)
    assert torch.allclose(got, expected[perm], atol=1e-6)
    scaled = lambdapo.grouped_pairwise_advantages(rewards.reshape(-1), seq_logps.reshape(-1), group_ids, tau=0.7,
                                                  scale_by_std=True)
    assert torch.allclose(scaled, pairwise_advantages(rewards, seq_logps, 0.7, scale_by_std=True).reshape(-1))


def test_grouped_pairwise_advantages_ragged_invalid_and_unscorable_rows():
    # group 0: rows 0, 2, 5 (row 5 unscorable: NaN reward); group 1: rows 1, 3; group 2: row 4 alone;
    # row 6 is padding (valid False) although it carries group 0's id.
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, float("nan"), 9.0])
    seq_logps = torch.tensor([-1.0, -2.0, -0.5, -3.0, 0.0, -1.0, 5.0])
    group_ids = torch.tensor([0, 1, 0, 1, 2, 0, 0])
    valid = torch.tensor([True, True, True, True, True, True, False])
    got = lambdapo.grouped_pairwise_advantages(rewards, seq_logps, group_ids, valid, tau=1.0)
    g0 = pairwise_advantages(torch.tensor([[1.0, 0.0]]), torch.tensor([[-1.0, -0.5]]))[0]
    g1 = pairwise_advantages(torch.tensor([[0.0, 1.0]]), torch.tensor([[-2.0, -3.0]]))[0]
    assert torch.allclose(got, torch.tensor([g0[0], g1[0], g0[1], g1[1], 0.0, 0.0, 0.0]))
    assert torch.isfinite(got).all()
    # A completion alone (G = 1, e.g. evaluation with one sample per prompt) gets 0, not a NaN.
    assert lambdapo.grouped_pairwise_advantages(torch.ones(3), torch.zeros(3), torch.arange(3)).tolist() == [0, 0, 0]


def test_grouped_relative_tau_equals_relative_tau_on_contiguous_groups_and_skips_lone_and_invalid_rows():
    torch.manual_seed(1)
    seq_logps = torch.randn(5, 4)
    group_ids = torch.arange(5).repeat_interleave(4)
    perm = torch.randperm(20)
    got = lambdapo.grouped_relative_tau(seq_logps.reshape(-1)[perm], group_ids[perm], tau=0.7)
    assert got == pytest.approx(lambdapo.relative_tau(seq_logps, 0.7), rel=1e-6)
    # by hand: group 0 = rows 0, 2 (row 4 invalid), std(−1, −3) = √2; group 1 = rows 1, 3, std(0, 0) = 0;
    # group 2 = row 5 alone: left out. τ_eff = 2 · (√2 + 0) / 2.
    rows = torch.tensor([-1.0, 0.0, -3.0, 0.0, 9.0, 4.0])
    ids, valid = torch.tensor([0, 1, 0, 1, 0, 2]), torch.tensor([True, True, True, True, False, True])
    assert lambdapo.grouped_relative_tau(rows, ids, valid, tau=2.0) == pytest.approx(math.sqrt(2))
    assert lambdapo.grouped_relative_tau(torch.zeros(3), torch.arange(3), tau=1.0) == 1e-6     # no group of 2


def test_lampo_diagnostics_one_misordered_pair():
    d = lambdapo.lampo_diagnostics(torch.tensor([[1.0, 0.0]]), torch.tensor([[-2.0, -1.0]]), tau=1.0)
    assert d["lampo/weight_mean"] == pytest.approx(2 / (1 + math.exp(-1)))     # 2σ(1): the better one scores lower
    assert d["lampo/weight_std"] == 0.0
    assert d["lampo/misordered_pairs"] == 1.0
    assert d["lampo/seq_logp_std"] == pytest.approx(math.sqrt(0.5))            # std(−2, −1), unbiased
    assert d["lampo/corr_rloo"] == pytest.approx(1.0)                          # G = 2: A ∝ RLOO's


def test_lampo_diagnostics_two_groups_hand_computed():
    # Group 0 ranks its pair wrongly (w = 2σ(1)), group 1 rightly (w = 2σ(−1)); σ(1) + σ(−1) = 1.
    rewards = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    seq_logps = torch.tensor([[-1.0, 0.0], [-1.0, 0.0]])
    high, low = 2 / (1 + math.exp(-1)), 2 / (1 + math.exp(1))
    d = lambdapo.lampo_diagnostics(rewards, seq_logps, tau=1.0)
    assert d["lampo/weight_mean"] == pytest.approx(1.0)
    assert d["lampo/weight_std"] == pytest.approx((high - low) / 2)
    assert d["lampo/misordered_pairs"] == 0.5
    assert d["lampo/seq_logp_std"] == pytest.approx(math.sqrt(0.5))
    # advantages (high, −high, −low, low) against RLOO's (1, −1, −1, 1); both have mean 0
    corr = (2 * high + 2 * low) / math.sqrt((2 * high**2 + 2 * low**2) * 4)
    assert d["lampo/corr_rloo"] == pytest.approx(corr)
    # The step's own advantages can be given (here GRPO's, which are RLOO's up to a per-group factor).
    d_grpo = lambdapo.lampo_diagnostics(rewards, seq_logps, 1.0, grpo_advantages(rewards).reshape(-1))
    assert d_grpo["lampo/corr_rloo"] == pytest.approx(1.0)
    assert d_grpo["lampo/weight_mean"] == d["lampo/weight_mean"]


def test_lampo_diagnostics_ties_equal_rewards_and_mixed_devices():
    # Three completions, equal ℓ: the two pairs with a reward gap weigh exactly 1 and none is misordered
    # (a tie in ℓ is not "lower"); the pair with equal rewards is not counted.
    d = lambdapo.lampo_diagnostics(torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64),
                                   torch.zeros(1, 3, dtype=torch.float16), tau=2.0)
    assert d == {"lampo/weight_mean": 1.0, "lampo/weight_std": 0.0, "lampo/misordered_pairs": 0.0,
                 "lampo/seq_logp_std": 0.0, "lampo/corr_rloo": pytest.approx(1.0)}
    # All rewards equal: no pair, all advantages 0; plain floats, no NaN.
    d = lambdapo.lampo_diagnostics(torch.ones(2, 4), torch.randn(2, 4), tau=1.0, advantages=torch.zeros(8))
    assert all(isinstance(v, float) and math.isfinite(v) for v in d.values())
    assert d["lampo/weight_mean"] == 0.0 and d["lampo/misordered_pairs"] == 0.0 and d["lampo/corr_rloo"] == 1.0
    assert d["lampo/seq_logp_std"] > 0
    # τ = inf: every weight is 1 and LamPO is RLOO.
    d = lambdapo.lampo_diagnostics(torch.tensor([[1.0, 0.0, 0.5]]), torch.tensor([[-3.0, 0.0, 1.0]]), float("inf"))
    assert d["lampo/weight_mean"] == 1.0 and d["lampo/weight_std"] == 0.0 and d["lampo/corr_rloo"] == pytest.approx(1.0)


def test_lampo_diagnostics_rows_with_group_ids_match_the_grouped_form():
    torch.manual_seed(1)
    rewards, seq_logps = torch.rand(3, 4).round(), torch.randn(3, 4)
    expected = lambdapo.lampo_diagnostics(rewards, seq_logps, tau=0.5)
    perm = torch.randperm(12)
    rows = lambdapo.lampo_diagnostics(rewards.reshape(-1)[perm], seq_logps.reshape(-1)[perm], 0.5,
                                      group_ids=torch.arange(3).repeat_interleave(4)[perm])
    assert rows == pytest.approx(expected)
    # A padding row (valid False) changes nothing.
    padded = lambdapo.lampo_diagnostics(torch.cat([rewards.reshape(-1), torch.tensor([5.0])]),
                                        torch.cat([seq_logps.reshape(-1), torch.tensor([9.0])]), 0.5,
                                        group_ids=torch.cat([torch.arange(3).repeat_interleave(4), torch.tensor([0])]),
                                        valid=torch.arange(13) < 12)
    assert padded == pytest.approx(expected)


# ===================================================================================================
# 9. LoRA (models.py), evaluations that survive interruption, bad input
# ===================================================================================================
def lora_with_moved_adapters(model, rank=4, seed=0):
    """A LoRA-wrapped copy of `model` whose B matrices are no longer zero (a trained adapter)."""
    import copy
    import models
    policy = models.add_lora(copy.deepcopy(model), rank, 2 * rank, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    return policy.eval()


def test_lora_freezes_a_bf16_base_and_trains_float32_adapters_only(tiny):
    import copy
    import models
    model, _ = tiny
    base = copy.deepcopy(model).to(torch.bfloat16)                      # what train.py loads on CUDA
    policy = models.add_lora(base, rank=4, alpha=8, seed=0)
    trainable = {n: p for n, p in policy.named_parameters() if p.requires_grad}
    assert len(trainable) == 2 * 7 * toy.MODEL_SHAPE["num_hidden_layers"]      # A, B on q k v o gate up down
    assert all("lora_" in n and p.dtype == torch.float32 for n, p in trainable.items())
    assert all(p.dtype == torch.bfloat16 for p in policy.parameters() if not p.requires_grad)
    torch.manual_seed(123)                                                       # A depends on the seed only
    again = models.add_lora(copy.deepcopy(model).to(torch.bfloat16), rank=4, alpha=8, seed=0)
    other = models.add_lora(copy.deepcopy(model).to(torch.bfloat16), rank=4, alpha=8, seed=1)
    a = lambda m: next(p for n, p in m.named_parameters() if "lora_A" in n)
    assert torch.equal(a(policy), a(again)) and not torch.equal(a(again), a(other))


def test_lora_reference_is_the_base_with_adapters_off_and_merge_is_exact(tiny):
    import models
    model, tokenizer = tiny
    policy = lora_with_moved_adapters(model)
    out = sample_rollout(model, tokenizer)
    args = (out.input_ids, out.attention_mask, out.completion_mask)
    with torch.no_grad():
        base_logps, policy_logps = rollout.token_logprobs(model, *args), rollout.token_logprobs(policy, *args)
        with models.adapters_disabled(policy):
            reference_logps = rollout.token_logprobs(policy, *args)
        merged_logps = rollout.token_logprobs(models.merged_copy(policy), *args)
    torch.testing.assert_close(reference_logps, base_logps)
    assert (policy_logps - base_logps).abs().max() > 1e-2                     # the adapters do something
    torch.testing.assert_close(merged_logps, policy_logps, atol=1e-5, rtol=1e-5)   # W + (α/r) B A is the policy


def test_merged_lora_engine_follows_the_adapters_after_sync(tiny):
    model, tokenizer = tiny
    policy = lora_with_moved_adapters(model)
    engine = MergedLoraGenerator(policy)
    greedy = rollout.SamplingConfig(do_sample=False, max_new_tokens=10)
    prompts = ["12+34=", "7+8="]
    peft_out = rollout.generate(policy, tokenizer, prompts, 1, greedy)                # adapter-aware, through peft
    assert rollout.generate(policy, tokenizer, prompts, 1, greedy, engine=engine).completions == peft_out.completions
    with torch.no_grad():                                                             # an optimizer step
        for name, p in policy.named_parameters():
            if "lora_A" in name:
                p.mul_(-2.0)
    layer, target = engine.pairs[0]
    expected = layer.get_base_layer().weight + layer.get_delta_weight("default")
    assert not torch.allclose(target.weight, expected)
    engine.sync()
    torch.testing.assert_close(target.weight, expected)


def test_lora_run_saves_small_checkpoints_and_a_merged_final_folder(tiny_model_dir, tmp_path, capsys):
    import eval as evaluation
    import train
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    out = tmp_path / "run"
    train.main(tiny_args(tiny_model_dir, out, "--lora_rank", "4", "--lr", "1e-2", "--save_every", "1"))
    log = capsys.readouterr().out
    assert "LoRA rank 4" in log and "adapters_grads_adam" in log and "weights_grads_adam" not in log
    checkpoint = out / "checkpoint-2"
    assert (checkpoint / "adapter_model.safetensors").exists() and not (checkpoint / "model.safetensors").exists()
    state = torch.load(checkpoint / "trainer_state.pt", weights_only=False)
    assert len(state["optimizer"]["state"]) == 2 * 7 * toy.MODEL_SHAPE["num_hidden_layers"]    # adapters only
    initial = AutoModelForCausalLM.from_pretrained(out / "initial").state_dict()
    final = AutoModelForCausalLM.from_pretrained(out / "final").state_dict()
    assert initial.keys() == final.keys() and not any("lora" in key for key in final)       # a plain model folder
    assert torch.equal(initial["model.embed_tokens.weight"], final["model.embed_tokens.weight"])    # frozen
    adapter = load_file(checkpoint / "adapter_model.safetensors")
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    delta = (8 / 4) * adapter[f"{prefix}.lora_B.weight"] @ adapter[f"{prefix}.lora_A.weight"]
    assert delta.abs().max() > 0
    torch.testing.assert_close(final["model.layers.0.self_attn.q_proj.weight"],
                               initial["model.layers.0.self_attn.q_proj.weight"] + delta)
    summary = evaluation.main(["--model", str(out / "final"), "--limit", "2", "--max_new_tokens", "4"])
    assert summary["n"] == 2


def test_lora_resume_continues_exactly(tiny_model_dir, tmp_path):
    """Adapters, their AdamW state, the dropout RNG and the adapters-off reference all survive a resume."""
    import train
    lora = ("--lora_rank", "4", "--lr", "1e-2", "--beta", "0.1", "--lora_dropout", "0.1", "--save_every", "1")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train.main(tiny_args(tiny_model_dir, straight, "--num_steps", "3", *lora))
    train.main(tiny_args(tiny_model_dir, resumed, "--num_steps", "2", *lora))
    train.main(tiny_args(tiny_model_dir, resumed, "--num_steps", "3", "--resume", *lora))
    a, b = read_jsonl(straight / "metrics.jsonl"), read_jsonl(resumed / "metrics.jsonl")
    assert [m["step"] for m in a] == [m["step"] for m in b]
    assert any(m.get("kl", 0) > 0 for m in a)
    for x, y in zip(a, b):
        if "reward" in x:
            assert (x["reward"], x["loss"], x["kl"]) == pytest.approx((y["reward"], y["loss"], y["kl"]), abs=1e-7)
    from transformers import AutoModelForCausalLM
    wa = AutoModelForCausalLM.from_pretrained(straight / "final").state_dict()
    wb = AutoModelForCausalLM.from_pretrained(resumed / "final").state_dict()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=1e-7, rtol=1e-6)
    with pytest.raises(SystemExit) as exit_info:          # the adapters cannot be resumed as a full model
        train.main(tiny_args(tiny_model_dir, resumed, "--num_steps", "4", "--resume", "--save_every", "1"))
    assert "resume with --lora_rank 4" in str(exit_info.value.code)


def test_lora_llm_preset_checkpoints_activations_and_estimates_memory(tiny_model_dir, tmp_path):
    """The real-run path with LoRA (gradient checkpointing through peft, LoRA's own lr and generation batch),
    and the start-up memory estimate of Qwen3-1.7B's shape (meta tensors: no memory used) on a GPU."""
    import bench
    import models
    import train
    from transformers import Qwen3Config, Qwen3ForCausalLM
    out = tmp_path / "run"
    train.main(["--model", tiny_model_dir, "--lora_rank", "4", "--out_dir", str(out), "--num_steps", "1",
                "--data_file", os.path.join(FIXTURES, "math_train.jsonl"), "--eval_benchmark", "none",
                "--prompts_per_step", "2", "--group_size", "2", "--max_new_tokens", "6", "--plot", "false"])
    config = json.loads((out / "config.json").read_text())
    assert (config["gradient_checkpointing"], config["lr"], config["generation_batch_size"]) == (True, 1e-5, 64)
    assert all(m["grad_norm"] > 0 for m in read_jsonl(out / "metrics.jsonl") if "reward" in m)
    with torch.device("meta"):
        shape = Qwen3ForCausalLM(Qwen3Config(**bench.QWEN3_1_7B)).to(torch.bfloat16)
    lora = train.memory_estimate_gib(models.add_lora(shape, 16, 32), train.parse_config(["--model", "x/y", "--lora_rank", "16"]),
                                     has_reference=True, on_gpu=True, has_generation_copy=True)
    assert "weights_grads_adam" not in lora and "reference" not in lora and 0.009 < lora["trainable_share"] < 0.011
    assert lora["frozen_base"] == pytest.approx(3.2, abs=0.1) and lora["peak_gib"] < 24


def qwen3_shape(shape: dict):
    """A model of this config on the `meta` device: parameters with shapes and no memory."""
    from transformers import Qwen3Config, Qwen3ForCausalLM
    with torch.device("meta"):
        return Qwen3ForCausalLM(Qwen3Config(**shape))


def qwen3_parameters(c: dict) -> int:
    """Qwen3's parameter count written out from its config (tied embeddings): an independent count."""
    h, d, heads, kv, i = c["hidden_size"], c["head_dim"], c["num_attention_heads"], c["num_key_value_heads"], \
        c["intermediate_size"]
    attention = h * heads * d + 2 * h * kv * d + heads * d * h + 2 * d          # q, k, v, o; q_norm, k_norm
    return c["vocab_size"] * h + c["num_hidden_layers"] * (attention + 3 * h * i + 2 * h) + h


def test_memory_estimate_counts_each_part_of_the_llm_preset_on_qwen3_1_7b():
    """The start-up estimate for `--model Qwen/Qwen3-1.7B` (preset, GPU, fast compiled engine), part by part
    against hand-computed sizes: N = 1.72 B parameters; the KV cache at the width the engine allocates
    (128 rows × (512-token prompt bucket + 1,024) slots × 28 layers × K and V × 8 heads × 128 × 2 bytes)."""
    import bench
    import models
    import train
    N, gib = qwen3_parameters(bench.QWEN3_1_7B), 2 ** 30
    estimate = train.memory_estimate_gib(qwen3_shape(bench.QWEN3_1_7B), train.parse_config(["--model", "x/y"]),
                                         has_reference=False, on_gpu=True, has_generation_copy=True)
    assert models.parameter_counts(qwen3_shape(bench.QWEN3_1_7B)) == (N, N) and round(N / 1e9, 2) == 1.72
    expected = {"weights": 4 * N, "gradients": 4 * N, "adamw_moments": 8 * N, "adamw_step_temporary": 4 * N,
                "autocast_weight_copies": 2 * N, "generation_copy": 2 * N,
                "kv_cache": 128 * (512 + 1024) * 28 * 2 * 8 * 128 * 2}
    for part, size in expected.items():
        assert estimate[part] == round(size / gib, 2), part
    assert estimate["kv_cache"] == 21.0 and "reference" not in estimate
    assert 0 < estimate["cuda_graph_pool"] < 1 and 2 < estimate["activations"] < 12      # estimates, not counts
    persistent = sum(estimate[p] for p in ("weights", "gradients", "adamw_moments", "generation_copy", "kv_cache",
                                           "cuda_graph_pool"))
    assert estimate["peak_at_optimizer_step"] == pytest.approx(persistent + estimate["adamw_step_temporary"], abs=0.06)
    assert estimate["peak_in_backward"] == pytest.approx(
        persistent + estimate["autocast_weight_copies"] + estimate["activations"], abs=0.06)
    assert estimate["peak_gib"] == max(estimate["peak_in_backward"], estimate["peak_at_optimizer_step"])
    assert 55 < estimate["peak_gib"] < 74.5                                  # fits one 80 GB (74.5 GiB) GPU
    beta = train.memory_estimate_gib(qwen3_shape(bench.QWEN3_1_7B), train.parse_config(["--model", "x/y"]),
                                     has_reference=True, on_gpu=True, has_generation_copy=True)
    assert beta["reference"] == round(4 * N / gib, 2)


def test_adamw_step_and_autocast_allocate_what_the_estimate_counts(tiny):
    """The two transient parts, measured on the tiny model by recording every tensor torch allocates:
    torch's multi-tensor AdamW (the default on CUDA) allocates 4 bytes per parameter inside step(); bf16
    autocast keeps a bf16 copy of each float32 weight it casts (2 bytes per matmul weight) from the forward
    through the backward. The estimate for Qwen3-1.7B uses exactly these rates."""
    from torch.multiprocessing.reductions import StorageWeakRef
    from torch.utils import _pytree as pytree
    from torch.utils._python_dispatch import TorchDispatchMode
    import bench
    import train

    class Allocations(TorchDispatchMode):
        """Storages allocated inside the mode (outputs of non-mutating ops; with `casts_of`, only dtype casts
        of those tensors) and their peak live bytes."""
        def __init__(self, casts_of=None):
            super().__init__()
            self.casts_of, self.refs, self.peak = casts_of, {}, 0

        def live(self) -> int:
            return sum(size for ref, size in self.refs.values() if not ref.expired())

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.refs = {ptr: entry for ptr, entry in self.refs.items() if not entry[0].expired()}
            if not func._schema.is_mutable and (self.casts_of is None or (
                    func is torch.ops.aten._to_copy.default and id(args[0]) in self.casts_of)):
                for tensor in pytree.tree_leaves(out):
                    if isinstance(tensor, torch.Tensor):
                        storage = tensor.untyped_storage()
                        self.refs.setdefault(storage.data_ptr(), (StorageWeakRef(storage), storage.nbytes()))
            self.peak = max(self.peak, self.live())
            return out

    model, _ = tiny
    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(params, lr=1e-3, foreach=True)
    for _ in range(2):                                   # the second step: the moments exist already
        for p in params:
            p.grad = torch.randn_like(p)
        with Allocations() as step:
            optimizer.step()
    assert step.peak == 4 * n                            # sqrt(v) of every parameter at once
    ids = torch.randint(3, 20, (2, 16))
    with Allocations(casts_of={id(p) for p in params}) as casts:      # casts of the weights themselves
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids).logits.float().mean()
        kept_through_backward = casts.live()
        loss.backward()
    assert 1.95 * n < kept_through_backward <= 2 * n     # every weight but the norms' (not cast), in bf16
    assert casts.live() == 0
    N = qwen3_parameters(bench.QWEN3_1_7B)
    estimate = train.memory_estimate_gib(qwen3_shape(bench.QWEN3_1_7B), train.parse_config(["--model", "x/y"]),
                                         has_reference=False, on_gpu=True, has_generation_copy=True)
    assert estimate["adamw_step_temporary"] == round(step.peak / n * N / 2 ** 30, 2)
    assert estimate["autocast_weight_copies"] == round(2 * N / 2 ** 30, 2)


def test_qwen3_4b_fits_one_80gb_gpu_with_lora_not_with_full_fine_tuning():
    """docs/real-run.md's recipe for Qwen3-4B: LoRA (`--lora_rank 16`, the LoRA preset); full fine-tuning with
    float32 master weights and AdamW does not fit 80 GB (74.5 GiB)."""
    import bench
    import models
    import train
    full = train.memory_estimate_gib(qwen3_shape(bench.QWEN3_4B), train.parse_config(["--model", "x/y"]),
                                     has_reference=False, on_gpu=True, has_generation_copy=True)
    assert full["weights"] + full["gradients"] + full["adamw_moments"] + full["adamw_step_temporary"] > 74.5
    assert full["peak_gib"] > 74.5
    config = train.parse_config(["--model", "x/y", "--lora_rank", "16"])
    lora = train.memory_estimate_gib(models.add_lora(qwen3_shape(bench.QWEN3_4B).to(torch.bfloat16), 16, 32), config,
                                     has_reference=True, on_gpu=True, has_generation_copy=True)
    assert lora["peak_gib"] < 74.5 / 2                   # with room to spare (the recipe's 128-row batch below)
    wide = train.memory_estimate_gib(models.add_lora(qwen3_shape(bench.QWEN3_4B).to(torch.bfloat16), 16, 32),
                                     train.parse_config(["--model", "x/y", "--lora_rank", "16",
                                                         "--generation_batch_size", "128"]),
                                     has_reference=True, on_gpu=True, has_generation_copy=True)
    assert wide["kv_cache"] == 2 * lora["kv_cache"] and wide["peak_gib"] < 74.5


def eval_args(model_dir, out, *extra):
    """math500 fixture: 3 problems, 2 samples each, 1 problem per generation batch."""
    return ["--model", model_dir, "--benchmark", "math500", "--data_file", os.path.join(FIXTURES, "math500.jsonl"),
            "-k", "2", "--temperature", "1.0", "--max_new_tokens", "5", "--batch_size", "2", "--out", str(out), *extra]


def test_eval_interrupted_and_resumed_gives_the_same_summary(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import eval as evaluation
    import rewards
    full = evaluation.main(eval_args(tiny_model_dir, tmp_path / "full.json"))
    assert "accuracy=" in capsys.readouterr().err                        # the progress bar and its running accuracy
    real_grader, calls = rewards.accuracy_reward, {"n": 0}

    def ctrl_c_in_the_second_batch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_grader(*args, **kwargs)

    monkeypatch.setattr(rewards, "accuracy_reward", ctrl_c_in_the_second_batch)
    part = tmp_path / "part.json"
    with pytest.raises(SystemExit) as exit_info:
        evaluation.main(eval_args(tiny_model_dir, part))
    assert exit_info.value.code == 130 and len(read_jsonl(part.with_suffix(".jsonl"))) == 1   # batch 1 kept
    monkeypatch.undo()
    with open(part.with_suffix(".jsonl"), "a") as file:
        file.write('{"id": "math500/1", "prom')                          # killed in the middle of a write
    resumed = evaluation.main(eval_args(tiny_model_dir, part, "--resume"))
    assert {k: v for k, v in resumed.items() if k != "seconds"} == {k: v for k, v in full.items() if k != "seconds"}
    assert read_jsonl(part.with_suffix(".jsonl")) == read_jsonl(tmp_path / "full.jsonl")
    assert json.loads(part.read_text())["complete"] is True


def test_eval_resume_refuses_other_settings_and_damaged_files(tiny_model_dir, tmp_path):
    import eval as evaluation
    out = tmp_path / "r.json"
    evaluation.main(eval_args(tiny_model_dir, out))
    with pytest.raises(SystemExit) as exit_info:
        evaluation.main(eval_args(tiny_model_dir, out, "--resume", "--temperature", "0.5"))
    assert "temperature 1.0, not 0.5" in str(exit_info.value.code)
    lines = out.with_suffix(".jsonl").read_text().splitlines()
    out.with_suffix(".jsonl").write_text("\n".join(["{damaged"] + lines[1:]) + "\n")
    with pytest.raises(SystemExit) as exit_info:
        evaluation.main(eval_args(tiny_model_dir, out, "--resume"))
    assert "r.jsonl, line 1: not valid JSON" in str(exit_info.value.code)


@pytest.fixture
def malformed_jsonl(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"problem": "1+1", "answer": "2"}\n{"problem": oops}\n')
    return str(path)


@pytest.mark.parametrize("extra, message", [
    (["--lr", "-1"], "--lr must be a finite number > 0, got -1.0"),                   # out of range
    (["--top_p", "nan"], "--top_p must be in (0, 1], got nan"),
    (["--device", "gpu"], "--device gpu: not a device"),                               # not a device
    (["--dataset", "math", "--data_file", "BAD"], "bad.jsonl, line 2: not valid JSON"),   # a malformed line
    (["--data_file", os.path.join(FIXTURES, "math_train.jsonl")], "would be ignored: the training set is the built-in toy"),
    (["--dataset", "mathh"], "--dataset mathh: not toy, toy_hard, math, gsm8k"),                # a typo, not a Hub query
    (["--lora_rank", "2", "--lora_target_modules", "qq_proj"], "LoRA: Target modules {'qq_proj'} not found"),
    (["--lora_alpha", "4"], "need --lora_rank R > 0"),                                 # given, would be ignored
    (["--dynamic_sampling", "--max_generation_rounds", "0"], "--max_generation_rounds must be at least 1, got 0"),
])
def test_train_nonsense_values_give_one_line_errors(tiny_model_dir, tmp_path, malformed_jsonl, extra, message):
    import train
    extra = [malformed_jsonl if value == "BAD" else value for value in extra]
    with pytest.raises(SystemExit) as exit_info:
        train.main(tiny_args(tiny_model_dir, tmp_path / "run", *extra))
    assert message in str(exit_info.value.code) and "\n" not in str(exit_info.value.code)
    assert not (tmp_path / "run" / "config.json").exists()                           # failed before starting


@pytest.mark.parametrize("extra, message", [
    (["--limit", "0"], "--limit must be >= 1, got 0"),
    (["--benchmark", "math500", "--data_file", "BAD"], "bad.jsonl, line 2: not valid JSON"),
    (["--data_file", os.path.join(FIXTURES, "math500.jsonl")], "would be ignored: --benchmark toy is built in"),
    (["--resume"], "--resume needs --out"),
    (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "npu"], "--device"),
])
def test_eval_nonsense_values_give_one_line_errors(tiny_model_dir, malformed_jsonl, extra, message):
    import eval as evaluation
    extra = [malformed_jsonl if value == "BAD" else value for value in extra]
    with pytest.raises(SystemExit) as exit_info:
        evaluation.main(["--model", tiny_model_dir, *extra])
    assert message in str(exit_info.value.code) and "\n" not in str(exit_info.value.code)


def test_eval_boolean_options_are_strict(capsys):
    import eval as evaluation
    with pytest.raises(SystemExit) as exit_info:              # was: anything but "true" silently meant false
        evaluation.parse_args(["--enable_thinking", "maybe"])
    assert exit_info.value.code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1


def test_bench_measures_lora(capsys):
    import bench
    result = bench.main(["--shape", "tiny", "--lora_rank", "4", "--num_sequences", "2", "--prompt_len", "4",
                         "--max_new_tokens", "4"])
    assert 0 < result["trainable_parameters"] < result["parameters"]
    for key in ("rollout_plain_tokens_per_s", "rollout_fast_tokens_per_s", "rollout_fast_adapter_aware_tokens_per_s",
                "update_tokens_per_s"):
        assert result[key] > 0, key


@pytest.mark.slow
@pytest.mark.parametrize("threads", ["1", "2"])
def test_demo_learns_whatever_the_thread_count(tmp_path, threads):
    """`python train.py` as a newcomer runs it, warm start included (built in this thread count, in a cache of
    its own): at least 25 held-out points gained (docs/demo.md). About 6 minutes with 2 threads, 9 with 1."""
    import subprocess
    env = {**os.environ, "OMP_NUM_THREADS": threads, "LAMBDAPO_CACHE": str(tmp_path / "cache")}
    out = tmp_path / "demo"
    subprocess.run([sys.executable, "train.py", "--out_dir", str(out), "--plot", "false"], check=True, env=env,
                   cwd=os.path.dirname(os.path.abspath(__file__)), capture_output=True)
    evals = [m["eval/accuracy"] for m in read_jsonl(out / "metrics.jsonl") if "eval/accuracy" in m]
    assert evals[-1] - evals[0] >= 0.25, evals


@pytest.mark.slow
def test_lora_demo_learns(tmp_path):
    """docs/lora.md: the offline demo with --lora_rank 16 at the LoRA preset's rate (5e-4) gains 20 points."""
    import train
    summary = train.main(["--lora_rank", "16", "--out_dir", str(tmp_path / "demo"), "--plot", "false"])
    assert summary["final_eval_accuracy"] - summary["initial_eval_accuracy"] >= 0.20


def test_plot_draws_the_lampo_diagnostics(tmp_path):
    import plot
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": s, "reward": 0.5, "lampo/weight_mean": 1.0 + s / 10, "lampo/misordered_pairs": 0.2} for s in (1, 2)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [key for key, _ in plot.PANELS][-3:] == ["lampo/weight_mean", "lampo/weight_std", "lampo/misordered_pairs"]
    out = plot.plot_runs([str(run)], str(tmp_path / "curves.png"))
    assert os.path.getsize(out) > 10_000
