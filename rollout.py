"""Rollout: prompts -> G sampled completions per prompt, their masks, and per-token log-probabilities.

For each prompt q the policy samples a *group* o_1..o_G (GRPO, arXiv 2402.03300 §4.1; LamPO keeps
this). Groups are contiguous: rows g·G … g·G + G − 1 of every tensor belong to prompt g, so
`rewards.view(num_prompts, G)` is the group view the advantage functions expect.

Layout of one rollout batch (B = num_prompts · G rows), prompts left-padded so that every completion
starts at the same column P:

    input_ids       [pad pad q q q | o o o EOS pad]          (B, P + T)
    attention_mask  [ 0   0  1 1 1 | 1 1 1  1   0 ]          (B, P + T)
    completion_mask                [ 1 1 1  1   0 ]          (B, T)   real tokens up to and including EOS

The completion mask comes from the position of the *first EOS*, never from pad ids: many tokenizers
(ours included) use the EOS id as the pad id, and a mask built from `ids != pad_id` would hide the EOS
itself, so the model would never be rewarded for stopping. A completion with no EOS within
`max_new_tokens` is *truncated* (`Rollout.truncated`); its mask covers all T tokens.

Per-token log-probs (`token_logprobs`) are computed from logits divided by the sampling temperature:
those are the probabilities the tokens were actually sampled with, which the PPO ratio must use. With
top_p < 1 the tokens were sampled from the nucleus of that distribution, renormalised, so the log-probs are
the nucleus's too (`nucleus`): log p(y) − log Z_p, Z_p the nucleus's mass. The policy being trained is then
the sampling procedure itself, and π_θ / π_old, the TIS weights and the KL all compare the distributions that
really sample (docs/design.md §1).
"""

from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch.utils.checkpoint import checkpoint

# Tokens whose float32 logits exist at once in `token_logprobs` (1024 × 151,936 × 4 bytes ≈ 0.6 GB for Qwen3).
LOGIT_CHUNK_TOKENS = 1024


@dataclass
class SamplingConfig:
    """How completions are sampled. temperature = 0 (or do_sample=False) means greedy decoding."""
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    do_sample: bool = True
    batch_size: int = 256          # sequences generated at once (memory bound, not a statistical knob)

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0


@dataclass
class Rollout:
    """One batch of sampled completions; row b belongs to prompt b // group_size."""
    prompt_ids: torch.Tensor        # (B, P)  left-padded
    prompt_mask: torch.Tensor       # (B, P)
    completion_ids: torch.Tensor    # (B, T)  anything after the first EOS is padding
    completion_mask: torch.Tensor   # (B, T)  1 on real tokens up to and including the first EOS
    truncated: torch.Tensor         # (B,)    bool: no EOS within max_new_tokens
    completions: list[str]          # B decoded texts (without the EOS)
    group_size: int
    prompts: list[str] = field(default_factory=list)   # the num_prompts formatted prompt strings
    sampling_logps: torch.Tensor | None = None          # (B, T) log π_sampler of each token (fast engine only; 0 off-mask)

    @property
    def input_ids(self) -> torch.Tensor:                # (B, P + T)
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:           # (B, P + T)
        return torch.cat([self.prompt_mask, self.completion_mask.to(self.prompt_mask.dtype)], dim=1)

    @property
    def completion_lengths(self) -> torch.Tensor:       # (B,)
        return self.completion_mask.sum(dim=1)


def keep_groups(parts: list[tuple[Rollout, list[int]]], pad_id: int) -> Rollout:
    """One rollout of the chosen groups of several rollouts, in the order given (DAPO's dynamic sampling
    keeps only groups with a reward spread, from several rounds of sampling).

    parts: (rollout, group indices to keep) pairs, all with the same group_size. Rounds differ in their
    padded widths, so prompts are re-padded on the left (to the widest prompt: every completion still starts
    at one column P) and completions on the right with `pad_id`, masks 0 there. Padding is invisible to the
    log-probs (masked keys, explicit positions), so a kept row scores exactly as in its own round.
    """
    G = parts[0][0].group_size
    pieces = [(r, [g * G + k for g in groups for k in range(G)], groups) for r, groups in parts if groups]
    P = max(r.prompt_ids.shape[1] for r, _, _ in pieces)
    T = max(r.completion_ids.shape[1] for r, _, _ in pieces)

    def pad(tensor, width, value, left):                  # (rows, w) -> (rows, width)
        fill = tensor.new_full((tensor.shape[0], width - tensor.shape[1]), value)
        return torch.cat([fill, tensor] if left else [tensor, fill], dim=1)

    def join(name, width, value, left):
        return torch.cat([pad(getattr(r, name)[rows], width, value, left) for r, rows, _ in pieces])

    has_logps = all(r.sampling_logps is not None for r, _, _ in pieces)
    return Rollout(prompt_ids=join("prompt_ids", P, pad_id, True), prompt_mask=join("prompt_mask", P, 0, True),
                   completion_ids=join("completion_ids", T, pad_id, False),
                   completion_mask=join("completion_mask", T, 0, False),
                   truncated=torch.cat([r.truncated[rows] for r, rows, _ in pieces]),
                   completions=[r.completions[row] for r, rows, _ in pieces for row in rows], group_size=G,
                   prompts=[r.prompts[g] for r, _, groups in pieces for g in groups if g < len(r.prompts)],
                   sampling_logps=join("sampling_logps", T, 0.0, False) if has_logps else None)


# ---------------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------------
def format_prompts(tokenizer, prompts: list[str], system_prompt: str | None = None,
                   chat_template_kwargs: dict | None = None) -> list[str]:
    """User messages -> model input strings, through the tokenizer's chat template when it has one.

    `chat_template_kwargs` go to the template, e.g. {"enable_thinking": False} for Qwen3.
    A base model without a template gets the raw text.
    """
    if not getattr(tokenizer, "chat_template", None):
        return [(system_prompt + "\n\n" if system_prompt else "") + prompt for prompt in prompts]
    formatted = []
    for prompt in prompts:
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + \
                   [{"role": "user", "content": prompt}]
        formatted.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                       **(chat_template_kwargs or {})))
    return formatted


def thinking_kwargs(tokenizer, enable_thinking: bool | None, model_name: str = "the model") -> dict:
    """The chat-template options for a thinking switch: {"enable_thinking": x} when the template has one, else {}.

    Qwen3's template reads `enable_thinking`; most others (Llama, SmolLM2, Phi) have no thinking mode and
    would silently ignore it, so asking one of them to think (True) is an error, not a no-op. The template
    itself is asked, not the model's name: a Qwen3 GGUF file or a run's final/ folder carries it too.
    """
    has_switch = "enable_thinking" in (getattr(tokenizer, "chat_template", None) or "")
    if enable_thinking and not has_switch:
        raise ValueError(f"--enable_thinking true: the chat template of {model_name} has no thinking mode "
                         f"(no enable_thinking switch); leave it off")
    return {"enable_thinking": bool(enable_thinking)} if has_switch and enable_thinking is not None else {}


def tokenize_prompts(tokenizer, texts: list[str], device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad formatted prompts: every completion then starts at the same column. (B, P) each.

    A chat template already writes its special tokens (BOS included, where the model has one), so
    `add_special_tokens` is off; raw text (no template) gets the tokenizer's usual specials.
    """
    encoded = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left",
                        add_special_tokens=not getattr(tokenizer, "chat_template", None))
    return encoded["input_ids"].to(device), encoded["attention_mask"].to(device)


def prompt_token_counts(tokenizer, prompts: list[str], system_prompt: str | None = None,
                        chat_template_kwargs: dict | None = None) -> list[int]:
    """Tokens of each user prompt as the model reads it (chat template and its special tokens included): the
    row lengths `tokenize_prompts` gives before padding. `--max_prompt_tokens` is checked against these."""
    formatted = format_prompts(tokenizer, prompts, system_prompt, chat_template_kwargs)
    encoded = tokenizer(formatted, add_special_tokens=not getattr(tokenizer, "chat_template", None))
    return [len(ids) for ids in encoded["input_ids"]]


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends a completion: the tokenizer's EOS and the model's generation EOS ids.

    (Qwen3 ends a chat turn with <|im_end|> and a document with <|endoftext|>: both stop.)
    """
    ids = set()
    for source in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif source is not None:
            ids.update(source)
    if not ids:
        raise ValueError("the tokenizer and the model define no EOS token: completions could never end")
    return sorted(ids)


# ---------------------------------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------------------------------
def completion_mask_from_eos(completion_ids: torch.Tensor, eos_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask = 1 on tokens up to and including the first EOS; truncated = no EOS at all.

    Worked example, EOS = pad = 0 (so pad ids cannot tell the EOS from the padding after it):

    >>> mask, truncated = completion_mask_from_eos(torch.tensor([[5, 6, 0, 0], [7, 8, 9, 4]]), [0])
    >>> mask
    tensor([[1, 1, 1, 0],
            [1, 1, 1, 1]])
    >>> truncated
    tensor([False,  True])
    """
    is_eos = torch.isin(completion_ids, torch.tensor(eos_ids, device=completion_ids.device))  # (B, T)
    T = completion_ids.shape[1]
    # argmax returns the first maximum: the first EOS. Rows with none get T (everything is real).
    first_eos = torch.where(is_eos.any(dim=1), is_eos.int().argmax(dim=1), torch.full_like(is_eos[:, 0], T, dtype=torch.long))
    positions = torch.arange(T, device=completion_ids.device)[None, :]                       # (1, T)
    mask = (positions <= first_eos[:, None]).long()                                          # (B, T)
    return mask, ~is_eos.any(dim=1)


def decode_completions(tokenizer, completion_ids: torch.Tensor, completion_mask: torch.Tensor,
                       truncated: torch.Tensor) -> list[str]:
    """Text of each completion up to (not including) its EOS."""
    texts = []
    for ids, length, cut in zip(completion_ids.tolist(), completion_mask.sum(1).tolist(), truncated.tolist()):
        texts.append(tokenizer.decode(ids[: length if cut else length - 1], skip_special_tokens=True))
    return texts


# ---------------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], group_size: int, sampling: SamplingConfig,
             chat_template_kwargs: dict | None = None, system_prompt: str | None = None,
             autocast_dtype: torch.dtype | None = None, engine=None) -> Rollout:
    """Sample `group_size` completions for each user prompt.

    With `engine` (an engine.FastGenerator) decoding runs in our own static-cache loop; without it, through
    `model.generate` (the plain path: the reference, and the default on CPU).

    Every sampling option is passed explicitly: transformers' GenerationConfig defaults are `None` (or
    the model's own `generation_config.json`, e.g. Qwen3's top_k=20), and samples must come from
    exactly the distribution the loss assumes: softmax(logits / temperature), nucleus top_p, no top-k.
    """
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    formatted = format_prompts(tokenizer, prompts, system_prompt, chat_template_kwargs)
    prompt_ids, prompt_mask = tokenize_prompts(tokenizer, formatted, device)                 # (num_prompts, P)
    prompt_ids = prompt_ids.repeat_interleave(group_size, dim=0)                             # (B, P), groups contiguous
    prompt_mask = prompt_mask.repeat_interleave(group_size, dim=0)
    eos_ids = eos_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    config = GenerationConfig(
        max_new_tokens=sampling.max_new_tokens, do_sample=not sampling.greedy,
        temperature=None if sampling.greedy else sampling.temperature,
        top_p=None if sampling.greedy else sampling.top_p, top_k=None if sampling.greedy else 0,
        pad_token_id=pad_id, eos_token_id=eos_ids, bos_token_id=None)

    was_training = model.training
    model.eval()
    chunks, logp_chunks = [], []
    autocast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
    with autocast:
        for start in range(0, prompt_ids.shape[0], sampling.batch_size):
            rows = slice(start, start + sampling.batch_size)
            if engine is not None:
                ids, logps = engine.decode(prompt_ids[rows], prompt_mask[rows], sampling, eos_ids, pad_id)
                chunks.append(ids)
                logp_chunks.append(logps)
                continue
            output = model.generate(input_ids=prompt_ids[rows], attention_mask=prompt_mask[rows],
                                    generation_config=config)
            chunks.append(output[:, prompt_ids.shape[1]:])
    model.train(was_training)

    def stack(pieces, fill, dtype):                       # chunks may stop at different lengths
        out = torch.full((prompt_ids.shape[0], T), fill, dtype=dtype, device=device)
        start = 0
        for piece in pieces:
            out[start:start + piece.shape[0], :piece.shape[1]] = piece
            start += piece.shape[0]
        return out

    T = max(chunk.shape[1] for chunk in chunks)
    completion_ids = stack(chunks, pad_id, torch.long)                                      # (B, T)
    completion_mask, truncated = completion_mask_from_eos(completion_ids, eos_ids)
    completion_ids = completion_ids.masked_fill(completion_mask == 0, pad_id)   # nothing after EOS but pad
    longest = max(int(completion_mask.sum(dim=1).max()), 1) if completion_ids.numel() else T
    completion_ids, completion_mask = completion_ids[:, :longest], completion_mask[:, :longest]  # no all-pad columns
    sampling_logps = None
    if logp_chunks:
        sampling_logps = (stack(logp_chunks, 0.0, torch.float32)[:, :longest] * completion_mask).float()
    return Rollout(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                   completion_mask=completion_mask, truncated=truncated,
                   completions=decode_completions(tokenizer, completion_ids, completion_mask, truncated),
                   group_size=group_size, prompts=formatted, sampling_logps=sampling_logps)


# ---------------------------------------------------------------------------------------------------
# Per-token log-probabilities
# ---------------------------------------------------------------------------------------------------
def nucleus(log_probs: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The top_p nucleus of each row of normalised log-probs (N, V): (keep (N, V) bool, log Z_p (N,)).

    The nucleus is the smallest set of most likely tokens whose mass reaches top_p: a token stays when the mass
    ranked above it is < top_p (the most likely one always stays), the rule of transformers' TopPLogitsWarper
    and of the engine's sampler (which calls this). Z_p is the nucleus's mass; log p − log Z_p is the
    renormalised log-prob. Differentiable in log_probs (the set itself is piecewise constant).

    >>> keep, log_mass = nucleus(torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log(), 0.9)   # mass above: 0, .5, .8, .95
    >>> keep, round(log_mass.exp().item(), 4)
    (tensor([[ True,  True,  True, False]]), 0.95)
    """
    sorted_log_probs, order = log_probs.sort(dim=-1, descending=True)
    sorted_probs = sorted_log_probs.exp()
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs                    # probability ranked above each token
    keep_sorted = mass_before < top_p
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    log_mass = torch.logsumexp(sorted_log_probs.masked_fill(~keep_sorted, float("-inf")), dim=-1)
    return keep, log_mass


def _logprobs_and_entropy(hidden: torch.Tensor, lm_head: torch.nn.Module, targets: torch.Tensor,
                          temperature: float, with_entropy: bool,
                          top_p: float = 1.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log softmax(lm_head(hidden) / temperature)[target] and, if asked, the entropy, for N tokens. (N,), (N,)
    With top_p < 1, of the renormalised nucleus (`nucleus`).

    The entropy costs a second pass over (N, V); the update's forward does not need it, so it skips it.
    """
    logits = lm_head(hidden).float() / temperature                      # (N, V) float32, one chunk only
    log_normalizer = torch.logsumexp(logits, dim=-1)                    # (N,)
    logps = logits.gather(-1, targets[:, None]).squeeze(-1) - log_normalizer
    if top_p < 1.0:
        # A target outside the nucleus (the sampler's and this forward's numerics differ at the nucleus's edge,
        # or π_θ has moved since π_old sampled) keeps the same formula log p − log Z_p, finite, not −∞: its
        # ratio stays defined and the clip bounds it.
        keep, log_mass = nucleus(logits - log_normalizer[:, None], top_p)          # (N, V), (N,)
        logps = logps - log_mass
        if not with_entropy:
            return logps, None
        log_q = (logits - log_normalizer[:, None] - log_mass[:, None]).masked_fill(~keep, float("-inf"))
        return logps, -(log_q.exp() * log_q.masked_fill(~keep, 0.0)).sum(-1)      # H of the renormalised nucleus
    if not with_entropy:
        return logps, None
    entropy = log_normalizer - (torch.softmax(logits, dim=-1) * logits).sum(-1)    # H = log Z − E_p[logit]
    return logps, entropy


def _backbone_and_head(model):
    """The transformer body and the output projection, if the model has the usual CausalLM layout.

    Going through them separately lets us apply the (large) vocabulary projection only to completion
    tokens, a chunk at a time. Models that post-process logits (soft-capping, scaling) use the plain path.
    """
    config = model.config
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return None, None
    backbone = getattr(model, "model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if backbone is None or head is None:
        return None, None
    return backbone, head


def _used_columns(attention_mask: torch.Tensor, completion_mask: torch.Tensor) -> tuple[int, int]:
    """(first column with a real token in any row, number of completion columns with a real token in any row)."""
    prompt_length = attention_mask.shape[1] - completion_mask.shape[1]
    real_prompt_columns = attention_mask[:, :prompt_length].any(dim=0)
    first = int(real_prompt_columns.int().argmax()) if bool(real_prompt_columns.any()) else prompt_length
    real_completion_columns = completion_mask.any(dim=0).nonzero()
    used = int(real_completion_columns.max()) + 1 if real_completion_columns.numel() else 0
    return first, used


def plain_token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor,
                         temperature: float = 1.0, top_p: float = 1.0) -> torch.Tensor:
    """`token_logprobs` in the ten lines to copy (tested equal to it): one forward, the whole vocabulary. (B, T)

    It holds (B, T, V) float32 logits at once (Qwen3: 0.6 MB per token), fine for a few sequences; an RL batch
    wants `token_logprobs` below, which computes the same numbers in bounded memory.
    """
    T = completion_mask.shape[1]
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)     # left padding must not shift RoPE
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    logits = logits[:, -T - 1:-1].float() / temperature                     # the state at t − 1 predicts token t
    log_probs = torch.log_softmax(logits, dim=-1)                           # (B, T, V)
    if top_p < 1.0:                                                         # sampled from the nucleus, renormalised
        log_probs = log_probs - nucleus(log_probs, top_p)[1][..., None]
    logps = log_probs.gather(-1, input_ids[:, -T:, None]).squeeze(-1)       # (B, T)
    return logps * completion_mask                                          # 0 after EOS


def token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor,
                   temperature: float = 1.0, micro_batch_size: int | None = None,
                   return_entropy: bool = False, top_p: float = 1.0) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of every completion token under `model`, with logits / temperature (and with top_p < 1,
    under the renormalised top_p nucleus the tokens were sampled from: `nucleus`). (B, T)

    input_ids, attention_mask: (B, P + T), prompts left-padded; completion_mask: (B, T). Values where
    completion_mask = 0 are 0. Differentiable when called with grad enabled (the update's forward).
    With `return_entropy` also returns the per-token entropy of the same distribution (no gradient).

    The token at position t is predicted by the hidden state at t − 1: states[:, P−1 : P+T−1] score
    ids[:, P : P+T]. Positions are counted from each row's first real token (left padding must not shift
    RoPE), exactly as `generate` does. Columns that are padding in every row of a micro-batch are not
    computed (sort rows by length first to make the most of it). The vocabulary projection runs only on
    real completion tokens, LOGIT_CHUNK_TOKENS at a time, so no (B, T, V) float32 tensor ever exists;
    under autograd each chunk is recomputed in the backward pass (activation checkpointing) instead of
    keeping its float32 logits alive.
    """
    B, T = completion_mask.shape
    model = model.get_base_model() if hasattr(model, "get_base_model") else model   # peft: the model with LoRA inside
    micro_batch_size = micro_batch_size or B
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)  # (B, P + T)
    backbone, head = _backbone_and_head(model)
    logps_pieces, entropy_pieces = [], []
    for start in range(0, B, micro_batch_size):
        rows = slice(start, start + micro_batch_size)
        # Trim the columns that are padding in every row of this micro-batch (left padding before the longest
        # prompt, completion columns after the last EOS): they would cost compute and change nothing.
        first, used = _used_columns(attention_mask[rows], completion_mask[rows])
        end = input_ids.shape[1] - T + used
        inputs = dict(input_ids=input_ids[rows, first:end], attention_mask=attention_mask[rows, first:end],
                      position_ids=position_ids[rows, first:end])
        if used == 0:                                                               # nothing to score
            states, project = torch.zeros(0, device=input_ids.device), torch.nn.Identity()
        elif backbone is not None:
            states = backbone(**inputs, use_cache=False).last_hidden_state[:, -used - 1:-1]         # (b, used, H)
            project = head
        else:   # plain path: the model's own (post-processed) logits, then the same math
            states = model(**inputs, use_cache=False, logits_to_keep=used + 1).logits[:, :-1]       # (b, used, V)
            project = torch.nn.Identity()
        mask = completion_mask[rows, :used].bool()                                  # (b, used)
        states, targets = states[mask], input_ids[rows, -T:][:, :used][mask]        # (N, H), (N,): real tokens only
        flat_logps, flat_entropy = [], []
        for chunk in range(0, targets.shape[0], LOGIT_CHUNK_TOKENS):
            piece = slice(chunk, chunk + LOGIT_CHUNK_TOKENS)
            arguments = (states[piece], project, targets[piece], temperature, return_entropy, top_p)
            if torch.is_grad_enabled():
                chunk_logps, chunk_entropy = checkpoint(_logprobs_and_entropy, *arguments, use_reentrant=False)
            else:
                chunk_logps, chunk_entropy = _logprobs_and_entropy(*arguments)
            flat_logps.append(chunk_logps)
            if return_entropy:
                flat_entropy.append(chunk_entropy.detach())
        # Scatter the real-token values back into (b, T), out of place so autograd sees every piece.
        full_mask = torch.nn.functional.pad(mask, (0, T - used))                   # (b, T)
        zeros = torch.zeros(full_mask.shape, device=input_ids.device)
        logps_pieces.append(zeros.masked_scatter(full_mask, torch.cat(flat_logps)) if flat_logps else zeros)
        entropy_pieces.append(zeros.masked_scatter(full_mask, torch.cat(flat_entropy)) if flat_entropy else zeros)
    logps = torch.cat(logps_pieces, dim=0)                                          # (B, T)
    return (logps, torch.cat(entropy_pieces, dim=0)) if return_entropy else logps
