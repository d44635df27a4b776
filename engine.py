"""The fast decode engine: prefill once, then one token per step on a static KV cache (compiled and
CUDA-graph-captured on a GPU), sampling on the device from exactly softmax(logits / T) within top_p.

    FastGenerator(policy, compile)          rollout.generate(..., engine=...) decodes through it
    MergedLoraGenerator(peft_policy)        the same loop on a merged copy W + (α / r) B A of a LoRA policy
    make_engine / make_lora_engine          `--rollout_engine fast|plain|auto` → an engine or None (model.generate)

rollout.py is the whole story of a rollout without this file: `model.generate` is the plain path (the
reference, and the CPU default). This file exists because on a GPU `generate`'s per-token bookkeeping
dominates small-batch decoding (docs/performance.md). Tests: greedy tokens equal `generate`'s, the reported
log-probs equal a plain forward, and the sampler's empirical distribution equals softmax(logits / T) with top-p.
"""

import copy
import inspect
import warnings
from collections import OrderedDict

import torch

from models import merged_copy
from rollout import SamplingConfig, nucleus


def sample_next_token(logits: torch.Tensor, temperature: float, top_p: float,
                      greedy: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row from softmax(logits / temperature), restricted to the top_p nucleus and renormalised,
    and its log-probability under that same distribution (what token_logprobs computes with the same top_p:
    log p − log Z_p, rollout.nucleus). (B,), (B,)

    One softmax per step serves both. No host synchronisation (no .item(), no multinomial): the exponential
    race argmax(p / E), E ~ Exp(1), draws exactly from p and keeps the whole decode step on the device.
    """
    log_probs = torch.log_softmax(logits.float() / (1.0 if greedy else temperature), dim=-1)   # (B, V)
    if greedy:
        token = log_probs.argmax(dim=-1)
        return token, log_probs.gather(-1, token[:, None]).squeeze(-1)
    probs = log_probs.exp()
    log_mass = torch.zeros_like(log_probs[:, 0])                                    # (B,) log Z_p = 0: all of it
    if top_p < 1.0:
        keep, log_mass = nucleus(log_probs, top_p)                                  # the first token always stays
        probs = probs.masked_fill(~keep, 0.0)
    token = (probs / torch.empty_like(probs).exponential_()).argmax(dim=-1)
    return token, log_probs.gather(-1, token[:, None]).squeeze(-1) - log_mass


def _power_of_two_at_least(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _cache_argument_name(model) -> str:
    """transformers renamed the KV-cache argument `past_key_values` to `cache` (5.2x); an unknown keyword
    would be swallowed by **kwargs and decoding would silently run without a cache, so ask the class."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model     # through a peft wrapper
    return "cache" if "cache" in inspect.signature(type(base).forward).parameters else "past_key_values"


class FastGenerator:
    """Sampling with our own decode loop: prefill once, then one token per step on a static KV cache.

    Why not `model.generate`: its per-step bookkeeping (logits processors, stopping criteria with a host
    sync per token, a cache that grows) dominates small-batch decoding on a GPU. Here every decode step has
    the same shapes (the attention mask spans the whole cache; unwritten slots are 0), so on CUDA the step
    can be compiled and graph-captured; the host checks "have all rows ended?" only every `check_every`
    tokens. On CUDA it samples from a bf16 copy of the policy (`sync` after each optimizer step), so the
    float32 master weights are never cast per step. On CPU it uses the policy itself, in float32.

    Shapes are bucketed so that compiling happens a few times per run, not every step. A compiled step is
    specialised to its shapes (batch, cache length); RL prompts change width every step, and after torch's
    recompile limit (8) dynamo would silently run the rest of the process eagerly. So, when compiling:
      - the prompt width P is left-padded up to a power of two (≥ `min_prompt_bucket`), but never past
        `max_prompt_tokens` (train.py's `--max_prompt_tokens`: a 513-token prompt must not cost a 1,024-slot
        cache): RoPE positions come from the mask, so extra left padding changes no token. A prompt longer
        than the cap (evaluation grades every problem) is decoded at its own width, eagerly: a one-off
        shape is not worth a compile;
      - the batch is padded up to a power of two with copies of row 0, marked finished from the start;
      - one StaticCache per (batch, cache length) bucket is kept and `reset()` between calls, so its
        tensors keep their addresses and a captured CUDA graph stays valid. A cache is large (Qwen3-1.7B:
        112 KiB per token, 21 GiB for 128 × 1,536), so by default only the last bucket's is kept
        (`max_cached_shapes`); `release()` frees them all.
    A shape beyond the compile budget, or a compiler error, decodes eagerly: warned once and counted in
    `eager_fallbacks` (train.py logs it as `sampling/eager_fallbacks`).
    """

    def __init__(self, policy, compile: bool = False, check_every: int = 16, backend=None,
                 min_prompt_bucket: int = 64, max_cached_shapes: int = 1, max_prompt_tokens: int | None = None):
        device = next(policy.parameters()).device
        self.policy = policy
        already_low_precision = next(policy.parameters()).dtype != torch.float32
        self.model = policy if device.type != "cuda" or already_low_precision else \
            copy.deepcopy(policy).to(torch.bfloat16).eval()
        # Compiling pays off with CUDA graphs; on CPU it is only done when a backend is named (tests count graphs).
        self.compile = compile and (device.type == "cuda" or backend is not None)
        self.backend = backend
        self.check_every = check_every
        self.min_prompt_bucket = min_prompt_bucket
        self.max_prompt_tokens = max_prompt_tokens            # prompt buckets stop here (None: no cap)
        self.max_cached_shapes = max_cached_shapes
        self.cache_argument = _cache_argument_name(self.model)
        self.compiled_shapes: set[tuple[int, int]] = set()    # (batch, cache length) the compiled step has seen
        self.eager_fallbacks = 0                               # decode calls that could not use the compiled step
        self._caches: OrderedDict[tuple[int, int], object] = OrderedDict()   # least recently used first
        self._compiled_step = None
        self._warned = False

    @torch.no_grad()
    def sync(self) -> None:
        """Copy the policy's current weights into the generation copy (call after optimizer.step())."""
        if self.model is not self.policy:
            for target, source in zip(self.model.parameters(), self.policy.parameters()):
                target.copy_(source)

    def release(self) -> None:
        """Free the KV caches (the next decode allocates anew, and CUDA graphs are captured anew)."""
        self._caches.clear()

    def _warn_once(self, message: str) -> None:
        self.eager_fallbacks += 1
        if not self._warned:
            warnings.warn(message + " (warned once; counted in sampling/eager_fallbacks)")
            self._warned = True

    def _cache(self, batch: int, length: int):
        """The StaticCache of this bucket, reset; created (and the oldest dropped) when new."""
        from transformers import StaticCache
        key = (batch, length)
        if key in self._caches:
            self._caches.move_to_end(key)
            cache = self._caches[key]
            cache.reset()                              # zeros in place: same tensors, same addresses
            return cache
        while len(self._caches) >= self.max_cached_shapes:
            self._caches.popitem(last=False)
        cache = self._caches[key] = StaticCache(config=self.model.config, max_cache_len=length)
        return cache

    def _step(self, input_ids, attention_mask, position_ids, cache):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=True, **{self.cache_argument: cache}).logits[:, -1]

    def prompt_width(self, P: int) -> int:
        """The padded prompt width of a decode: P itself when not compiling or when P is over the cap, else the
        power of two ≥ max(P, min_prompt_bucket), clamped to the cap."""
        cap = self.max_prompt_tokens
        if not self.compile or (cap is not None and P > cap):
            return P
        width = max(_power_of_two_at_least(P), self.min_prompt_bucket)
        return width if cap is None else min(width, cap)

    def _step_for(self, shape: tuple[int, int]):
        """The compiled step when this shape is within the compile budget, else the eager one."""
        if not self.compile:
            return self._step
        limit = getattr(torch._dynamo.config, "recompile_limit", None) or \
            getattr(torch._dynamo.config, "cache_size_limit", 8)
        if shape not in self.compiled_shapes and len(self.compiled_shapes) >= limit:
            self._warn_once(f"decode shape {shape} is beyond torch's recompile limit ({limit} compiled shapes): "
                            "decoding it eagerly")
            return self._step
        self.compiled_shapes.add(shape)
        if self._compiled_step is None:
            options = dict(backend=self.backend) if self.backend is not None else dict(mode="reduce-overhead")
            self._compiled_step = torch.compile(self._step, fullgraph=False, dynamic=False, **options)
        return self._compiled_step

    @torch.no_grad()
    def decode(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, sampling: SamplingConfig,
               eos_ids: list[int], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(completion_ids (B, T), sampling_logps (B, T)) for left-padded prompts (B, P).

        sampling_logps are log softmax(logits / temperature) of the chosen tokens under the generation
        model, renormalised over the top_p nucleus when top_p < 1 (0 after EOS): π_sampler, which train.py
        compares with π_old (`sampling/logp_gap_*`, TIS).
        """
        B, P = prompt_ids.shape
        T = sampling.max_new_tokens
        device = prompt_ids.device
        # Buckets (only when compiling: eager decoding gains nothing from padding).
        batch = _power_of_two_at_least(B) if self.compile else B
        width = self.prompt_width(P)
        ids = torch.full((batch, width), pad_id, dtype=prompt_ids.dtype, device=device)        # (batch, width)
        mask = torch.zeros((batch, width), dtype=prompt_mask.dtype, device=device)
        ids[:B, width - P:], mask[:B, width - P:] = prompt_ids, prompt_mask      # more left padding
        ids[B:, width - P:], mask[B:, width - P:] = prompt_ids[:1], prompt_mask[:1]   # filler rows: copies of row 0
        length = width + T
        cache = self._cache(batch, length)
        over_cap = self.max_prompt_tokens is not None and P > self.max_prompt_tokens
        step = self._step if over_cap else self._step_for((batch, length))

        attention_mask = torch.cat([mask, mask.new_zeros(batch, T)], dim=1)       # (batch, width + T), fixed shape
        position_ids = (mask.long().cumsum(-1) - 1).clamp_min(0)                   # (batch, width)
        logits = self.model(input_ids=ids, attention_mask=attention_mask, position_ids=position_ids,
                            use_cache=True, logits_to_keep=1, **{self.cache_argument: cache}).logits[:, -1]  # prefill
        next_position = position_ids[:, -1:] + 1                                   # (batch, 1)
        eos = torch.tensor(eos_ids, device=device)
        tokens = torch.full((batch, T), pad_id, dtype=torch.long, device=device)
        sampling_logps = torch.zeros(batch, T, device=device)
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        finished[B:] = True                                                        # filler rows never hold us up
        for t in range(T):
            token, token_logp = sample_next_token(logits, sampling.temperature, sampling.top_p, sampling.greedy)
            token = torch.where(finished, torch.full_like(token, pad_id), token)    # after EOS: padding
            tokens[:, t] = token
            sampling_logps[:, t] = token_logp.masked_fill(finished, 0.0)
            finished |= torch.isin(token, eos)
            if t == T - 1 or ((t + 1) % self.check_every == 0 and bool(finished.all())):
                return tokens[:B, : t + 1], sampling_logps[:B, : t + 1]
            attention_mask[:, width + t] = 1
            if step is not self._step and device.type == "cuda":
                torch.compiler.cudagraph_mark_step_begin()     # the last step's graph outputs are consumed
            try:
                logits = step(token[:, None], attention_mask, next_position, cache)
            except Exception as error:      # a compiler problem must not end a training run: decode eagerly
                if step is self._step:
                    raise
                self._warn_once(f"compiled decoding failed ({type(error).__name__}: {str(error)[:200]}); "
                                "decoding eagerly from now on")
                self.compile, step = False, self._step
                logits = step(token[:, None], attention_mask, next_position, cache)
            next_position = next_position + 1
        return tokens[:B], sampling_logps[:B]


def make_engine(choice: str, model, compile: bool = True, max_prompt_tokens: int | None = None) -> FastGenerator | None:
    """`--rollout_engine` / `--engine`: "fast", "plain" (None: model.generate), or "auto" (fast on CUDA only)."""
    on_cuda = next(model.parameters()).device.type == "cuda"
    return FastGenerator(model, compile=compile, max_prompt_tokens=max_prompt_tokens) \
        if choice == "fast" or (choice == "auto" and on_cuda) else None


# ---------------------------------------------------------------------------------------------------
# Sampling from a LoRA policy
# ---------------------------------------------------------------------------------------------------
class MergedLoraGenerator(FastGenerator):
    """FastGenerator for a LoRA policy: it samples from a plain copy of the model (bf16 on CUDA) whose
    weights are W + (α / r) B A, recomputed from the current adapters by `sync()` after each optimizer step.

    Why merged, not adapter-aware: through peft every targeted layer costs two extra small matmuls, a dtype
    cast and Python dispatch per decoded token (7 layers × 28 blocks on Qwen3-1.7B), while the merge costs
    one (out × r) @ (r × in) product per layer per *step*, and the decode step stays a plain transformers
    model (which is what the compiled, graph-captured step is tuned for). The price is one generation copy of
    the weights, the same copy full fine-tuning keeps on CUDA. `--rollout_engine plain` samples through peft
    itself instead (adapter-aware `model.generate`, no copy; the CPU default).

    The merged weights are written in place (`copy_`), so a compiled or graph-captured decode step keeps
    reading the same tensors.
    """

    def __init__(self, policy, compile: bool = False, check_every: int = 16, max_prompt_tokens: int | None = None):
        device = next(policy.parameters()).device
        dtype = torch.bfloat16 if device.type == "cuda" else next(policy.get_base_model().parameters()).dtype
        merged = merged_copy(policy).to(dtype).eval()
        super().__init__(merged, compile=compile, check_every=check_every,   # low precision or CPU: used as is
                         max_prompt_tokens=max_prompt_tokens)
        self.model = self.policy = merged       # (whatever the base class would copy: sync() writes into this one)
        self.lora_policy = policy
        merged_modules = dict(merged.named_modules())
        # (peft LoRA layer, the plain Linear of the merged copy that holds W + ΔW): module names match once
        # peft's "base_model.model." prefix is removed.
        self.pairs = [(layer, merged_modules[name.removeprefix("base_model.model.")])
                      for name, layer in policy.named_modules() if hasattr(layer, "get_delta_weight")
                      and name.removeprefix("base_model.model.") in merged_modules]
        self.sync()

    @torch.no_grad()
    def sync(self) -> None:
        """Merged weight = base weight + (α / r) B A of the current adapters, rounded once to the copy's dtype."""
        for layer, target in self.pairs:
            adapter = layer.active_adapters[0]
            delta = layer.get_delta_weight(adapter).float()                   # (α / r) · B @ A, float32
            target.weight.copy_(layer.get_base_layer().weight.float() + delta)


def make_lora_engine(choice: str, policy, compile: bool = True,
                     max_prompt_tokens: int | None = None) -> FastGenerator | None:
    """The rollout engine of a LoRA policy: "fast" (or "auto" on CUDA) -> MergedLoraGenerator; "plain" or
    "auto" on CPU -> None (peft's adapter-aware model.generate)."""
    on_cuda = next(policy.parameters()).device.type == "cuda"
    return MergedLoraGenerator(policy, compile=compile, max_prompt_tokens=max_prompt_tokens) \
        if choice == "fast" or (choice == "auto" and on_cuda) else None
