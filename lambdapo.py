"""LamPO: Lambda-Style Policy Optimization — the advantage and the loss, as equations in code.

Paper: "LamPO / LambdaPO: Lambda-Style Policy Optimization" (arXiv 2605.21235 / 2605.19416, withdrawn,
no public code). Our exact formulas are fixed in docs/design.md §1; this file is pure tensor code (no model).

GRPO (Shao et al. 2024, arXiv 2402.03300) gives each of the G completions of a prompt the scalar
advantage (r_i − mean r) / std r. LamPO keeps GRPO's critic-free, PPO-clipped update and replaces that
baseline by a *Pairwise Decomposed Advantage*, each pair weighted as in LambdaRank (Burges 2010):

    ℓ_i  = (1/|o_i|) Σ_t log π_old(o_i,t | q, o_i,<t)          sequence score under the sampling policy
    s_ij = sign(r_i − r_j)
    w_ij = 2 · σ( −s_ij · (ℓ_i − ℓ_j) / τ )                    confidence-aware weight, w_ij = w_ji ∈ (0, 2)
    A_i  = 1/(G−1) · Σ_{j≠i} (r_i − r_j) · w_ij                 Pairwise Decomposed Advantage

A pair the policy already orders correctly (the better completion has the higher score ℓ) gets w → 0:
it has little left to teach. A pair it orders wrongly gets w → 2. With τ → ∞ every w_ij = 1 and
A_i = r_i − mean_{j≠i} r_j, which is exactly RLOO (Ahmadian et al. 2024).

The update is GRPO/PPO's clipped surrogate per completion token t, ρ_t = exp(log π_θ − log π_old):

    L_t  = −min(ρ_t A_i, clip(ρ_t, 1 − ε_low, 1 + ε_high) A_i) + β · KL_t
    KL_t = exp(log π_ref − log π_θ) − (log π_ref − log π_θ) − 1        (k3 estimator, only when β > 0)

aggregated over real completion tokens ("token-mean", DAPO), per sequence ("seq-mean", GRPO) or over a
fixed budget ("fixed-length", Dr. GRPO). `importance_level="sequence"` replaces ρ_t by GSPO's one ratio per
completion, the geometric mean of its token ratios (arXiv 2507.18071). Shapes: rewards, seq_logps (num_prompts, G);
logps, old_logps, ref_logps, mask (B, T) with B = num_prompts · G and groups contiguous; advantages (B,).

Drop this into your GRPO trainer: where it computes (r − mean r) / std r, compute ℓ from the old log-probs it
already has and call `pairwise_advantages`; the clipped loss is unchanged.

>>> rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0]])                  # (num_prompts, G) verifier scores
>>> old_logps = torch.tensor([[-0.9] * 3, [-0.2] * 3, [-1.1] * 3, [-0.4] * 3])    # (B, T) log π_old per token
>>> mask = torch.ones(4, 3)                                          # (B, T) real completion tokens
>>> seq_logps = sequence_scores(old_logps, mask).view(-1, 4)         # ℓ (num_prompts, G), no gradient
>>> advantages = pairwise_advantages(rewards, seq_logps, tau=1.0).reshape(-1)     # (B,), instead of GRPO's
>>> advantages      # right but unlikely (0) > right and likely (3); wrong and likely (1) < wrong and unlikely (2)
tensor([ 0.7456, -0.8120, -0.5213,  0.5878])
>>> logps = old_logps.clone().requires_grad_(True)                   # (B, T) log π_θ, from your forward
>>> loss, stats = clipped_policy_loss(logps, old_logps, advantages, mask)
>>> loss.backward()

GRPO gives both right completions 0.866 and both wrong ones −0.866, whatever the policy believes. Everything
in this file follows docs/design.md §1, except `relative_tau`, which is this project's extension (the paper's τ
is a fixed number).
"""

import torch

AGGREGATIONS = ("token-mean", "seq-mean", "fixed-length")
IMPORTANCE_LEVELS = ("token", "sequence")       # PPO/GRPO's per-token ratio | GSPO's per-sequence ratio


# ---------------------------------------------------------------------------------------------------
# Advantages
# ---------------------------------------------------------------------------------------------------
def grpo_advantages(rewards: torch.Tensor, scale_by_std: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """GRPO's group-relative advantage: (r_i − mean r) / (std r + eps), std unbiased (as TRL and verl).

    `scale_by_std=False` is Dr. GRPO (Liu et al. 2025, arXiv 2503.20783), which drops the std division
    because it over-weights groups that are almost all right or all wrong.

    >>> grpo_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0]]), scale_by_std=False)
    tensor([[ 0.5000, -0.5000, -0.5000,  0.5000]])
    """
    rewards = rewards.float()                                             # (num_prompts, G)
    if rewards.shape[1] < 2:
        raise ValueError(f"group-relative advantages need at least 2 completions per prompt, got G={rewards.shape[1]}")
    centred = rewards - rewards.mean(dim=1, keepdim=True)                 # (num_prompts, G)
    if not scale_by_std:
        return centred
    return centred / (rewards.std(dim=1, keepdim=True) + eps)             # unbiased std (G − 1)


def confidence_weights(rewards: torch.Tensor, seq_logps: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """LambdaRank-style pair weights w_ij = 2 σ(−sign(r_i − r_j) (ℓ_i − ℓ_j) / τ), shape (num_prompts, G, G).

    Worked example (one group, G = 2): completion 0 is right (r = 1) but the policy scores it lower
    (ℓ_0 = −2 < ℓ_1 = −1): a wrongly ordered pair, so w_01 = 2σ(1) ≈ 1.46 > 1.

    >>> confidence_weights(torch.tensor([[1.0, 0.0]]), torch.tensor([[-2.0, -1.0]]))
    tensor([[[1.0000, 1.4621],
             [1.4621, 1.0000]]])

    Ties (r_i = r_j, the diagonal included) have s_ij = 0 and w_ij = 1; they carry no reward gap anyway.
    τ = inf returns all ones (RLOO). ℓ is detached: the weights are constants of the loss (docs/design.md §1).
    """
    rewards = rewards.float().to(seq_logps.device)                        # CPU rewards meet GPU ℓ here
    if tau == float("inf"):
        return torch.ones(*rewards.shape, rewards.shape[-1], dtype=rewards.dtype, device=rewards.device)
    if not tau > 0:
        raise ValueError(f"tau must be > 0 (or inf for RLOO), got {tau}")
    seq_logps = seq_logps.detach().float()
    sign = torch.sign(rewards[:, :, None] - rewards[:, None, :])          # s_ij         (num_prompts, G, G)
    score_gap = seq_logps[:, :, None] - seq_logps[:, None, :]             # ℓ_i − ℓ_j    (num_prompts, G, G)
    return 2.0 * torch.sigmoid(-sign * score_gap / tau)                   # w_ij ∈ (0, 2), symmetric


def pairwise_advantages(rewards: torch.Tensor, seq_logps: torch.Tensor, tau: float = 1.0,
                        scale_by_std: bool = False) -> torch.Tensor:
    """LamPO's Pairwise Decomposed Advantage A_i = 1/(G−1) Σ_{j≠i} (r_i − r_j) w_ij, shape (num_prompts, G).

    Σ_i A_i = 0 in every group, because (r_i − r_j) w_ij is antisymmetric in (i, j); all-equal rewards
    give exactly 0. With tau = inf it is RLOO:

    >>> pairwise_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0]]), torch.zeros(1, 4), tau=float("inf"))
    tensor([[ 0.6667, -0.6667, -0.6667,  0.6667]])

    `scale_by_std` (off by default, docs/design.md §1) divides each group's advantages by its reward std + 1e-6,
    as GRPO does; a zero-std group stays at zero.
    """
    rewards = rewards.float().to(seq_logps.device)                        # (num_prompts, G), on ℓ's device
    G = rewards.shape[1]
    if G < 2:
        raise ValueError(f"pairwise advantages need at least 2 completions per prompt, got G={G}")
    reward_gaps = rewards[:, :, None] - rewards[:, None, :]               # r_i − r_j (num_prompts, G, G); 0 on i = j
    weights = confidence_weights(rewards, seq_logps, tau)                 # w_ij      (num_prompts, G, G)
    advantages = (reward_gaps * weights).sum(dim=2) / (G - 1)             # (num_prompts, G)
    if scale_by_std:                                                      # as GRPO: unbiased std + eps
        advantages = advantages / (rewards.std(dim=1, keepdim=True) + 1e-6)   # a zero-std group is 0 / eps = 0
    return advantages


def rloo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """RLOO: A_i = r_i − mean_{j≠i} r_j, i.e. LamPO with τ = ∞ (every pair weight is 1)."""
    return pairwise_advantages(rewards, torch.zeros(rewards.shape, device=rewards.device), tau=float("inf"))


def sequence_scores(logps: torch.Tensor, mask: torch.Tensor, normalize: str = "mean") -> torch.Tensor:
    """ℓ_i: a completion's log-probability, length-normalised ("mean", default) or summed ("sum"). (B,)

    Length normalisation keeps a long completion from looking "unlikely" just for being long.
    """
    mask = mask.to(logps.dtype)
    total = (logps * mask).sum(dim=-1)                                    # (B,)
    if normalize == "sum":
        return total
    if normalize != "mean":
        raise ValueError(f"normalize must be 'mean' or 'sum', got {normalize!r}")
    return total / mask.sum(dim=-1).clamp_min(1.0)


def seq_logp_spread(seq_logps: torch.Tensor) -> torch.Tensor:
    """The mean over groups of the within-group std of ℓ (unbiased): how far apart the policy's own scores
    of one prompt's completions are. Scalar; 0 when G < 2. (num_prompts, G) -> ()

    >>> seq_logp_spread(torch.tensor([[-1.0, -3.0], [-2.0, -2.0]]))    # stds √2 and 0
    tensor(0.7071)
    """
    if seq_logps.shape[-1] < 2:
        return seq_logps.new_zeros(())
    return seq_logps.std(dim=-1).mean()


def relative_tau(seq_logps: torch.Tensor, tau: float, floor: float = 1e-6) -> float:
    """A scale-free τ: `tau` in units of the step's ℓ spread, τ_eff = τ · seq_logp_spread(ℓ). This project's
    extension, not the paper's (`--relative_tau`; off by default, so τ is the paper's fixed temperature).

    Why: the weights see only (ℓ_i − ℓ_j)/τ, and the size of an ℓ gap depends on things unrelated to
    confidence: length normalisation ("mean" gaps are ~|o| times smaller than "sum" gaps), the policy's
    entropy (it falls during training) and the model. A fixed τ = 1 nat is then RLOO on one task and a
    hard 0/2 weight on another. Measured in spreads, τ = 1 means "a pair one typical gap apart gets
    w = 2σ(±1) = 0.54 or 1.46" on every task, at every step, for mean and sum alike. One number per step
    (not per group), so a group the policy is sure about still gets weights nearer 1 than an unsure one.
    A step where every ℓ in every group is equal has no gaps to weigh: `floor` keeps τ_eff > 0.

    >>> relative_tau(torch.tensor([[-1.0, -3.0], [-2.0, -2.0]]), tau=2.0)     # 2 · 0.7071
    1.4142...
    """
    return max(tau * float(seq_logp_spread(seq_logps.detach())), floor)


def compute_advantages(algo: str, rewards: torch.Tensor, seq_logps: torch.Tensor | None = None,
                       tau: float = 1.0, scale_by_std: bool | None = None) -> torch.Tensor:
    """One switch for `--algo`: lampo | grpo | dr_grpo | rloo. Returns (num_prompts · G,), groups contiguous.

    `scale_by_std=None` means each algorithm's documented default: GRPO scales, the others do not.
    Rewards may live on any device; with `seq_logps` given, the advantages are on its device (for every
    algo, so the caller never has to care which one ran).
    """
    if seq_logps is not None:
        rewards = rewards.to(seq_logps.device)
    if algo == "lampo":
        advantages = pairwise_advantages(rewards, seq_logps, tau=tau, scale_by_std=bool(scale_by_std))
    elif algo == "grpo":
        advantages = grpo_advantages(rewards, scale_by_std=True if scale_by_std is None else scale_by_std)
    elif algo == "dr_grpo":
        advantages = grpo_advantages(rewards, scale_by_std=bool(scale_by_std))
    elif algo == "rloo":
        advantages = rloo_advantages(rewards)
    else:
        raise ValueError(f"unknown algo {algo!r}; choose one of lampo, grpo, dr_grpo, rloo")
    return advantages.reshape(-1)


# ---------------------------------------------------------------------------------------------------
# The clipped policy loss
# ---------------------------------------------------------------------------------------------------
def aggregate(per_token: torch.Tensor, mask: torch.Tensor, aggregation: str = "token-mean") -> torch.Tensor:
    """Reduce a (B, T) per-token quantity to a scalar over the real tokens (mask = 1), docs/design.md §1."""
    mask = mask.to(per_token.dtype)
    if aggregation == "token-mean":                                       # DAPO: every token counts the same
        return (per_token * mask).sum() / mask.sum().clamp_min(1.0)
    if aggregation == "seq-mean":                                         # GRPO: every sequence counts the same
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp_min(1.0)).mean()
    if aggregation == "fixed-length":                                     # Dr. GRPO: a constant denominator B·T
        return (per_token * mask).sum() / (mask.shape[0] * mask.shape[1])
    raise ValueError(f"unknown aggregation {aggregation!r}; choose one of {', '.join(AGGREGATIONS)}")


def micro_batch_scale(micro_mask: torch.Tensor, full_mask: torch.Tensor, aggregation: str) -> float:
    """Factor that turns a micro-batch's aggregated loss into its share of the *whole* batch's loss.

    Gradient accumulation must not depend on how a batch is split: averaging micro-batch token-means
    would give the tokens of a short micro-batch more weight. With this factor,
    Σ_micro scale · aggregate(micro) == aggregate(full) exactly, for every aggregation (tested).
    Both masks share the same padded length T (micro-batches are row slices of the full batch).
    """
    if aggregation == "token-mean":
        return _number(micro_mask.sum().clamp_min(1.0) / full_mask.sum().clamp_min(1.0))
    if aggregation in ("seq-mean", "fixed-length"):
        return micro_mask.shape[0] / full_mask.shape[0]
    raise ValueError(f"unknown aggregation {aggregation!r}; choose one of {', '.join(AGGREGATIONS)}")


def clipped_policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
                        mask: torch.Tensor, clip_low: float = 0.2, clip_high: float = 0.2,
                        ref_logps: torch.Tensor | None = None, beta: float = 0.0,
                        aggregation: str = "token-mean",
                        is_weights: torch.Tensor | None = None,
                        importance_level: str = "token") -> tuple[torch.Tensor, dict[str, float]]:
    """PPO/GRPO clipped surrogate with an optional k3 KL penalty, aggregated over masked tokens.

    logps (B, T) carry gradient; old_logps, ref_logps (B, T) and advantages (B,) do not. Worked example:
    one token, A = 1, ρ = e^0.5 ≈ 1.65 > 1 + ε: the clipped branch is the min, so the loss is −1.2 and
    the token counts as clipped (its gradient is zero).

    >>> loss, stats = clipped_policy_loss(torch.tensor([[0.5]]), torch.tensor([[0.0]]),
    ...                                   torch.tensor([1.0]), torch.tensor([[1]]))
    >>> round(loss.item(), 4), stats["clip_fraction"]
    (-1.2, 1.0)

    `is_weights` (B, T), optional: truncated importance-sampling weights min(π_old / π_sampler, C) for
    samples drawn by a sampler whose numerics differ from π_old's (a bf16 copy, vLLM). They multiply the
    policy-gradient term only, not the KL penalty (as TRL's and verl's TIS corrections do).

    `importance_level="sequence"` is GSPO (Zheng et al. 2025, arXiv 2507.18071): every token of completion i
    uses one ratio, the geometric mean of its token ratios over its real tokens (mask = 1),

        s_i = exp( (1/|o_i|) Σ_t m_t (log π_θ − log π_old) )                    (B, 1), broadcast over tokens

    in the same clipped surrogate, aggregated as `aggregation` says (as TRL's importance_sampling_level=
    "sequence" does; GSPO's paper averages per sequence, i.e. "seq-mean"). s_i carries gradient: d s_i /
    d log π_θ(t) = s_i / |o_i|, so an unclipped sequence pushes each of its tokens equally. GSPO's clip range
    is about 1000× narrower than PPO's (its paper: ε_low = 3e-4, ε_high = 4e-4), because s_i is a mean over
    hundreds of tokens and moves much less than one token's ratio. The KL term stays per token, and so do
    `is_weights`; "clip_fraction" then counts the real tokens of the sequences whose clipped branch is
    active, and "policy_kl" is still the per-token k3 KL.

    >>> loss, stats = clipped_policy_loss(torch.tensor([[0.1, -0.5]]), torch.zeros(1, 2), torch.tensor([1.0]),
    ...                                   torch.ones(1, 2), importance_level="sequence")     # s = e^−0.2
    >>> round(loss.item(), 4), stats["clip_fraction"]                   # clip(0.8187, 0.8, 1.2) = 0.8187
    (-0.8187, 0.0)

    Returns (loss, stats) with stats["clip_fraction"] (share of real tokens whose clipped branch is
    active, i.e. whose gradient the clip removed), stats["policy_kl"] (k3 KL of π_θ from π_old) and,
    when β > 0, stats["kl"] (k3 KL from π_ref).
    """
    device = logps.device                                                 # everything meets on logps' device
    mask = mask.to(device=device, dtype=logps.dtype)
    old_logps = old_logps.detach().to(device)
    advantages = advantages.detach().to(device=device, dtype=logps.dtype)[:, None]   # (B, 1), over tokens
    log_ratio = logps - old_logps                                         # (B, T)
    if importance_level == "token":
        ratio = torch.exp(log_ratio)                                      # ρ_t   (B, T)
    elif importance_level == "sequence":                                  # GSPO: one ratio per completion
        # the mean over real tokens only: padding and masked (e.g. truncated) rows must not dilute it
        # (a row with no real token gets log s = 0, s = 1; it has no token in the loss anyway)
        seq_log_ratio = (log_ratio * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp_min(1.0)
        ratio = torch.exp(seq_log_ratio).expand_as(log_ratio)             # s_i   (B, 1) -> (B, T)
    else:
        raise ValueError(f"unknown importance_level {importance_level!r}; choose one of {', '.join(IMPORTANCE_LEVELS)}")
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) * advantages
    per_token = -torch.min(unclipped, clipped)                            # (B, T)
    if is_weights is not None:                                            # off-policy correction (TIS)
        per_token = per_token * is_weights.detach().to(device=device, dtype=per_token.dtype)

    stats: dict[str, float] = {}
    if beta > 0:
        if ref_logps is None:
            raise ValueError("beta > 0 needs ref_logps")
        ref_log_ratio = ref_logps.detach().to(device) - logps             # log π_ref − log π_θ
        kl = torch.exp(ref_log_ratio) - ref_log_ratio - 1.0               # k3 ≥ 0 (Schulman 2020)
        per_token = per_token + beta * kl
        stats["kl"] = _number(aggregate(kl.detach(), mask, "token-mean"))

    loss = aggregate(per_token, mask, aggregation)

    with torch.no_grad():
        # The clip is active where the clipped term is strictly the smaller one (then d loss/d θ = 0).
        is_clipped = (clipped < unclipped).to(mask.dtype)
        stats["clip_fraction"] = _number(aggregate(is_clipped, mask, "token-mean"))
        stats["policy_kl"] = _number(aggregate(torch.exp(-log_ratio) + log_ratio - 1.0, mask, "token-mean"))
    return loss, stats


def _number(value: torch.Tensor) -> float:
    """A 0-d tensor as a Python float for logging. `meta` tensors (shape-only stand-ins for an accelerator,
    used in tests and for tracing) hold no value: NaN, so that the shape path still runs end to end."""
    return float("nan") if value.device.type == "meta" else value.item()


# ---------------------------------------------------------------------------------------------------
# Groups given by an id per row (the engines: trl_lampo.py, verl_lampo.py)
# ---------------------------------------------------------------------------------------------------
# Above, a group is a row of a (num_prompts, G) tensor. A distributed engine hands us rows instead: verl
# marks each completion with its prompt's `uid`, in any order, with groups of different sizes (DAPO-style
# filtering) and padding rows that belong to no group; TRL drops completions no reward function could
# score. The functions below turn such rows into the (num_groups, size) form, one bucket per distinct
# size, and call the same `pairwise_advantages`: the math stays in one place.
def group_buckets(group_ids: torch.Tensor, valid: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Row indices of each group, one (num_groups_of_size_s, s) long tensor per distinct group size s.

    group_ids (N,): any integer id per row (equal id = same group; not necessarily contiguous).
    valid (N,) bool: rows that take part; the others join no group. Rows keep their original order
    inside a group. Always on the CPU (it is index bookkeeping).

    >>> [b.tolist() for b in group_buckets(torch.tensor([7, 3, 7, 3, 3, 5]))]
    [[[5]], [[0, 2]], [[1, 3, 4]]]
    """
    group_ids = torch.as_tensor(group_ids).reshape(-1).cpu()
    rows = torch.arange(group_ids.numel())
    if valid is not None:
        rows = rows[torch.as_tensor(valid).reshape(-1).cpu().bool()]
    if rows.numel() == 0:
        return []
    _, inverse, counts = torch.unique(group_ids[rows], return_inverse=True, return_counts=True)
    sorted_rows = rows[torch.argsort(inverse, stable=True)]              # group 0's rows, group 1's rows, …
    starts = torch.cumsum(counts, 0) - counts                              # where each group begins there
    buckets = []
    for size in torch.unique(counts).tolist():                             # ascending sizes
        groups = (counts == size).nonzero().squeeze(1)                     # (num_groups_s,)
        buckets.append(sorted_rows[starts[groups][:, None] + torch.arange(size)])   # (num_groups_s, size)
    return buckets


def grouped_pairwise_advantages(rewards: torch.Tensor, seq_logps: torch.Tensor, group_ids: torch.Tensor,
                                valid: torch.Tensor | None = None, tau: float = 1.0,
                                scale_by_std: bool = False) -> torch.Tensor:
    """`pairwise_advantages` for rows grouped by id: rewards, seq_logps, group_ids, valid (N,) → A (N,).

    Each group is compared among its valid rows only, with its own G = number of valid rows, so
    A_i = 1/(G−1) Σ_{j≠i} (r_i − r_j) w_ij exactly as for a full group. Rows that are not valid, that
    have a non-finite reward (an unscorable completion), or that are alone in their group get A = 0:
    with nobody to compare with there is no pairwise signal, and never a NaN.

    >>> grouped_pairwise_advantages(torch.tensor([1.0, 5.0, 0.0, 1.0]), torch.zeros(4),
    ...                             torch.tensor([0, 1, 0, 0]), tau=float("inf"))
    tensor([ 0.5000,  0.0000, -1.0000,  0.5000])
    """
    rewards = rewards.reshape(-1).float()                                 # (N,)
    seq_logps = seq_logps.reshape(-1).detach().float().to(rewards.device)   # (N,)
    usable = torch.isfinite(rewards)
    if valid is not None:
        usable &= torch.as_tensor(valid, device=rewards.device).reshape(-1).bool()
    advantages = torch.zeros_like(rewards)
    for index in group_buckets(group_ids, usable):
        if index.shape[1] < 2:
            continue                                                      # a lone completion: A = 0
        index = index.to(rewards.device)                                  # (num_groups_s, s)
        advantages[index] = pairwise_advantages(rewards[index], seq_logps[index], tau, scale_by_std)
    return advantages


def grouped_relative_tau(seq_logps: torch.Tensor, group_ids: torch.Tensor, valid: torch.Tensor | None = None,
                         tau: float = 1.0, floor: float = 1e-6) -> float:
    """`relative_tau` for rows grouped by id (the engines' layout): τ · the mean over groups of their ℓ std
    (unbiased), each group over its valid rows, groups of fewer than 2 valid rows left out (they have no
    spread to measure, and get A = 0 anyway). seq_logps, group_ids, valid (N,) → float. With complete
    contiguous groups it is exactly `relative_tau(seq_logps.view(-1, G), tau)`.

    >>> grouped_relative_tau(torch.tensor([-1.0, -2.0, -3.0, -2.0, 7.0]), torch.tensor([0, 1, 0, 1, 2]), tau=2.0)
    1.4142...
    """
    seq_logps = seq_logps.reshape(-1).detach().float()                    # (N,)
    usable = torch.isfinite(seq_logps)
    if valid is not None:
        usable &= torch.as_tensor(valid, device=seq_logps.device).reshape(-1).bool()
    stds = [seq_logps[index.to(seq_logps.device)].std(dim=1)             # (num_groups_s,) per group size s ≥ 2
            for index in group_buckets(group_ids, usable) if index.shape[1] >= 2]
    spread = float(torch.cat(stds).mean()) if stds else 0.0
    return max(tau * spread, floor)


# ---------------------------------------------------------------------------------------------------
# Diagnostics of the confidence weights (logged by train.py, trl_lampo.py and verl_lampo.py)
# ---------------------------------------------------------------------------------------------------
def lampo_diagnostics(rewards: torch.Tensor, seq_logps: torch.Tensor, tau: float = 1.0,
                      advantages: torch.Tensor | None = None, group_ids: torch.Tensor | None = None,
                      valid: torch.Tensor | None = None) -> dict[str, float]:
    """What the confidence weights did this step, as plain floats (docs/design.md §2):

        lampo/weight_mean, lampo/weight_std   mean and (population) std of w_ij over the pairs i < j of a
                                              group with r_i ≠ r_j (the pairs that carry a reward gap)
        lampo/misordered_pairs                share of those pairs whose better completion has the strictly
                                              lower ℓ: the pairs LamPO up-weights (w > 1)
        lampo/seq_logp_std                    mean over groups of the within-group std of ℓ (unbiased, G − 1);
                                              τ is on this scale: τ ≫ it means LamPO ≈ RLOO
        lampo/corr_rloo                       Pearson correlation of the step's advantages with RLOO's
                                              (LamPO's at τ when `advantages` is None)

    Shapes: rewards, seq_logps (num_prompts, G) with contiguous groups, or (N,) rows with `group_ids`
    (and optionally `valid`, as in `grouped_pairwise_advantages`); advantages (num_prompts · G,) or (N,).
    Any devices (everything is copied to the CPU). Empty cases never give a NaN: no pair with unequal
    rewards gives 0.0 for the three pair statistics, no group of ≥ 2 gives seq_logp_std 0.0, and
    corr_rloo is 1.0 when both advantage vectors are equal and have no spread (all zero), 0.0 when only
    one has none.

    >>> d = lampo_diagnostics(torch.tensor([[1.0, 0.0]]), torch.tensor([[-2.0, -1.0]]))
    >>> round(d["lampo/weight_mean"], 4), d["lampo/misordered_pairs"], round(d["lampo/seq_logp_std"], 4)
    (1.4621, 1.0, 0.7071)
    """
    rewards = rewards.detach().to("cpu", torch.float64)
    seq_logps = seq_logps.detach().to("cpu", torch.float64)
    if group_ids is None:                                                 # (num_prompts, G): row p is group p
        group_ids = torch.arange(rewards.shape[0]).repeat_interleave(rewards.shape[1] if rewards.dim() > 1 else 1)
    rewards, seq_logps = rewards.reshape(-1), seq_logps.reshape(-1)       # (N,)
    usable = torch.isfinite(rewards)
    if valid is not None:
        usable &= torch.as_tensor(valid).reshape(-1).cpu().bool()
    if advantages is None:
        advantages = grouped_pairwise_advantages(rewards, seq_logps, group_ids, usable, tau)
    advantages = advantages.detach().to("cpu", torch.float64).reshape(-1)
    rloo = grouped_pairwise_advantages(rewards, torch.zeros_like(rewards), group_ids, usable, float("inf")).double()

    weights, misordered, logp_stds, in_groups = [], [], [], []
    for index in group_buckets(group_ids, usable):
        if index.shape[1] < 2:
            continue
        r, logp = rewards[index], seq_logps[index]                        # (n, s)
        w = confidence_weights(r, logp, tau).double()                     # (n, s, s)
        s = index.shape[1]
        upper = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1)   # each pair once
        gap = torch.sign(r[:, :, None] - r[:, None, :])                   # s_ij
        pairs = upper & (gap != 0)                                        # (n, s, s) pairs with a reward gap
        weights.append(w[pairs])
        misordered.append((gap * (logp[:, :, None] - logp[:, None, :]))[pairs] < 0)
        logp_stds.append(logp.std(dim=1))
        in_groups.append(index.reshape(-1))
    weights = torch.cat(weights) if weights else torch.zeros(0, dtype=torch.float64)
    misordered = torch.cat(misordered) if misordered else torch.zeros(0, dtype=torch.bool)
    logp_stds = torch.cat(logp_stds) if logp_stds else torch.zeros(0, dtype=torch.float64)
    rows = torch.cat(in_groups) if in_groups else torch.zeros(0, dtype=torch.long)

    x, y = advantages[rows], rloo[rows]
    x_centred, y_centred = (x - x.mean(), y - y.mean()) if x.numel() else (x, y)
    norm = float((x_centred.square().sum() * y_centred.square().sum()).sqrt()) if x.numel() else 0.0
    if norm > 1e-12:
        corr = float((x_centred * y_centred).sum()) / norm
    else:                                                                 # one of them has no spread
        corr = 1.0 if torch.allclose(x, y) else 0.0
    return {
        "lampo/weight_mean": float(weights.mean()) if weights.numel() else 0.0,
        "lampo/weight_std": float(weights.std(correction=0)) if weights.numel() else 0.0,
        "lampo/misordered_pairs": float(misordered.double().mean()) if misordered.numel() else 0.0,
        "lampo/seq_logp_std": float(logp_stds.mean()) if logp_stds.numel() else 0.0,
        "lampo/corr_rloo": max(-1.0, min(1.0, corr)),
    }
