"""The fast decode engine: prefill once, then one token per step on a static KV cache (compiled and
CUDA-graph-captured on a GPU), sampling on the device from exactly softmax(logits / T) within top_p.

    FastGenerator(policy, compile)          rollout.generate(..., engine=...) decodes through it
    MergedLoraGenerator(peft_policy)        the same loop on a merged copy W + (α / r) B A of a LoRA policy
    make_engine / make_lora_engine          `--rollout_engine fast|plain|auto` → an engine or None (model.generate)
    decode_attention                        its attention: K/V read once at their own heads, over the written slots

rollout.py is the whole story of a rollout without this file: `model.generate` is the plain path (the
reference, and the CPU default). This file exists because on a GPU `generate`'s per-token bookkeeping
dominates small-batch decoding (docs/performance.md). Tests: greedy tokens equal `generate`'s, the reported
log-probs equal a plain forward, and the sampler's empirical distribution equals softmax(logits / T) with top-p.
"""

import copy
import inspect
import warnings
from collections import OrderedDict
from contextlib import contextmanager, nullcontext

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


KV_BLOCK = 256            # attended-length bucket of the decode step, in cache slots (FastGenerator's kv_block)
MIN_PROMPT_BUCKET = 64    # the narrowest prompt bucket when compiling (FastGenerator's min_prompt_bucket)


def cache_shape(rows: int, prompt_tokens: int, max_new_tokens: int,
                min_prompt_bucket: int = MIN_PROMPT_BUCKET) -> tuple[int, int]:
    """(batch, slots) of the static cache the compiled engine allocates for `rows` prompts of at most
    `prompt_tokens` tokens: both rounded up as `decode` does (train.py's memory estimate reads it here).

    >>> cache_shape(100, 400, 1024)
    (128, 1536)
    """
    return _power_of_two_at_least(rows), max(_power_of_two_at_least(prompt_tokens), min_prompt_bucket) + max_new_tokens


def _cache_argument_name(model) -> str:
    """transformers renamed the KV-cache argument `past_key_values` to `cache` (5.2x); an unknown keyword
    would be swallowed by **kwargs and decoding would silently run without a cache, so ask the class."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model     # through a peft wrapper
    return "cache" if "cache" in inspect.signature(type(base).forward).parameters else "past_key_values"


# ---------------------------------------------------------------------------------------------------
# Decode attention: grouped-query attention without copying K/V, over the slots written so far
# ---------------------------------------------------------------------------------------------------
# transformers' SDPA attention, compiled with a mask (a static cache always has one), takes its `repeat_kv`
# path: every layer, every token, K and V are copied from the key/value heads to the query heads over the
# whole cache (docs/design.md §5), and the static cache hands attention all of its slots, written or not.
# SDPA's own `enable_gqa=True` is no way out on CUDA: with a mask, flash attention is excluded and the
# memory-efficient kernel needs equal head counts, so it falls back to the math kernel (which expands K/V
# itself). The route that needs no kernel support: one query token per row means each key/value head serves
# `groups` query heads at the same position, so those heads are laid out as `groups` query *rows* of that
# head, (B, H, 1, D) -> (B, H_kv, groups, D), an ordinary equal-heads attention with a mask, read once.
# The engine passes its own 4-D mask (B, 1, 1, L) over the first L cache slots (a bucket, below), and K/V
# are sliced to those L slots: a view, no copy.
DECODE_ATTENTION = "lambdapo_decode"


def decode_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The engine's attention: a single-query decode step reads each K/V head once, over the first
    attention_mask.shape[-1] cache slots. Anything else (the prefill) is transformers' SDPA attention.

    query (B, H, q, D); key, value (B, H_kv, max_cache_len, D); attention_mask (B, 1, q, L) boolean."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    if attention_mask is not None and attention_mask.dim() == 4 and attention_mask.shape[-1] < key.shape[2]:
        length = attention_mask.shape[-1]
        key, value = key[:, :, :length], value[:, :, :length]                      # (B, H_kv, L, D) views
    groups = getattr(module, "num_key_value_groups", 1)
    if query.shape[2] != 1 or attention_mask is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    batch, heads, _, head_dim = query.shape
    # Query head h = j · groups + r reads K/V head j (repeat_kv's order), so the fold is a plain reshape.
    folded = query.reshape(batch, heads // groups, groups, head_dim)                # (B, H_kv, groups, D)
    output = torch.nn.functional.scaled_dot_product_attention(
        folded, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling)   # (B, H_kv, groups, D)
    return output.reshape(batch, heads, 1, head_dim).transpose(1, 2).contiguous(), None   # (B, 1, H, D)


def _register_decode_attention() -> None:
    """Register the engine's attention (and, for the prefill's 2-D mask, SDPA's mask builder) under its own
    name; models that do not use it are untouched."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask
    AttentionInterface.register(DECODE_ATTENTION, decode_attention)
    if DECODE_ATTENTION not in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionMaskInterface.register(DECODE_ATTENTION, sdpa_mask)


def _full_attention_only(config, length: int) -> bool:
    """True when every layer attends to the whole cache (no sliding window shorter than it): the engine's own
    4-D mask replaces transformers' masks, which would otherwise add the window."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return all(kind == "full_attention" for kind in layer_types)
    window = getattr(config, "sliding_window", None)
    return window is None or window >= length


def attended_length(position: int, cache_length: int, kv_block: int) -> int:
    """The cache slots a decode step attends to when it writes slot `position`: the next multiple of kv_block
    above it, at most the cache length. One compiled step per distinct value (a cache-length bucket).

    >>> [attended_length(p, 1536, 256) for p in (511, 512, 767, 768, 1535)]
    [512, 768, 768, 1024, 1536]
    """
    return min(cache_length, (position // kv_block + 1) * kv_block)


def _forward_step(model, cache_argument, input_ids, attention_mask, position_ids, cache):
    """One decode step: logits of the last position. A module-level function, not a method, so that the
    compiled step holds no reference to the engine (a bound method would make a reference cycle that keeps
    the engine's KV cache alive until the garbage collector runs)."""
    return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                 use_cache=True, **{cache_argument: cache}).logits[:, -1]


class FastGenerator:
    """Sampling with our own decode loop: prefill once, then one token per step on a static KV cache.

    Why not `model.generate`: its per-step bookkeeping (logits processors, stopping criteria with a host
    sync per token, a cache that grows) dominates small-batch decoding on a GPU. Here every decode step of a
    bucket has the same shapes, so on CUDA the step can be compiled and graph-captured; the host checks
    "have all rows ended?" only every `check_every` tokens. On CUDA it samples from a bf16 copy of the policy
    (`sync` after each optimizer step), so the float32 master weights are never cast per step. On CPU it uses
    the policy itself, in float32.

    Attention reads each key/value head once (`decode_attention`: no copy of K/V to the query heads) and only
    the cache slots written so far, rounded up to a multiple of `kv_block` (a cache-length bucket): at the
    LLM preset's 128 rows × (512 + 1,024) slots a step attends to 768, 1,024, 1,280 or 1,536 slots, not
    always 1,536. (Models whose attention is not SDPA, or that have sliding-window layers, attend as
    transformers does, to the whole cache.)

    Shapes are bucketed so that compiling happens a few times per run, not every step. A compiled step is
    specialised to its shapes (batch, cache length, attended length), and RL prompts change width every step.
    So, when compiling:
      - the prompt width P is left-padded up to a power of two (≥ `min_prompt_bucket`), but never past
        `max_prompt_tokens` (train.py's `--max_prompt_tokens`: a 513-token prompt must not cost a 1,024-slot
        cache): RoPE positions come from the mask, so extra left padding changes no token. A prompt longer
        than the cap (evaluation grades every problem) is decoded at its own width, eagerly: a one-off
        shape is not worth a compile;
      - the batch is padded up to a power of two with copies of row 0, marked finished from the start;
      - one StaticCache per batch bucket is kept and `reset()` between calls, so its tensors keep their
        addresses and a captured CUDA graph stays valid. It only grows: a narrower prompt decodes in the
        longer cache already there, so the attended-length buckets, and their compiled steps, are shared by
        all prompt widths. A cache is large (Qwen3-1.7B: 112 KiB per token, 21 GiB for 128 × 1,536), so by
        default only the last batch bucket's is kept (`max_cached_shapes`); `release()` frees them all.
    At most `max_compiled_shapes` shapes are compiled (dynamo's own recompile limit is raised to it while
    decoding, as the engine bounds the count itself); a shape beyond it, or a compiler error, decodes eagerly:
    warned once and counted in `eager_fallbacks` (train.py logs it as `sampling/eager_fallbacks`).
    """

    def __init__(self, policy, compile: bool = False, check_every: int = 16, backend=None,
                 min_prompt_bucket: int = MIN_PROMPT_BUCKET, max_cached_shapes: int = 1, kv_block: int = KV_BLOCK,
                 max_compiled_shapes: int = 32, max_prompt_tokens: int | None = None):
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
        self.kv_block = kv_block
        self.max_compiled_shapes = max_compiled_shapes
        self.cache_argument = _cache_argument_name(self.model)
        self.compiled_shapes: set[tuple[int, int, int]] = set()   # (batch, cache length, attended length) compiled
        self.eager_fallbacks = 0                               # decode calls that could not use the compiled step
        self._caches: OrderedDict[int, tuple] = OrderedDict()    # batch bucket -> (slots, StaticCache), LRU first
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
        """(slots, StaticCache) of this batch bucket with slots ≥ `length`, reset; created (and the oldest
        dropped) when there is none or the one there is too short."""
        from transformers import StaticCache
        slots, cache = self._caches.get(batch, (0, None))
        if cache is not None and slots >= length:
            self._caches.move_to_end(batch)
            cache.reset()                              # zeros in place: same tensors, same addresses
            return slots, cache
        self._caches.pop(batch, None)                  # too short: freed before the longer one is allocated
        while len(self._caches) >= self.max_cached_shapes:
            self._caches.popitem(last=False)
        self._caches[batch] = length, StaticCache(config=self.model.config, max_cache_len=length)
        return self._caches[batch]

    def _step(self, input_ids, attention_mask, position_ids, cache):
        return _forward_step(self.model, self.cache_argument, input_ids, attention_mask, position_ids, cache)

    def prompt_width(self, P: int) -> int:
        """The padded prompt width of a decode: P itself when not compiling or when P is over the cap, else the
        power of two ≥ max(P, min_prompt_bucket), clamped to the cap."""
        cap = self.max_prompt_tokens
        if not self.compile or (cap is not None and P > cap):
            return P
        width = max(_power_of_two_at_least(P), self.min_prompt_bucket)
        return width if cap is None else min(width, cap)

    def _step_for(self, shape: tuple[int, int, int]):
        """(step, compiled, why not): the compiled step when this shape is within the compile budget, else the
        eager one and the reason."""
        if not self.compile:
            return self._step, False, None
        if shape not in self.compiled_shapes and len(self.compiled_shapes) >= self.max_compiled_shapes:
            return self._step, False, (f"decode shape {shape} is beyond the compile budget "
                                       f"({self.max_compiled_shapes} compiled shapes): decoding it eagerly")
        self.compiled_shapes.add(shape)
        if self._compiled_step is None:
            options = dict(backend=self.backend) if self.backend is not None else dict(mode="reduce-overhead")
            self._compiled_step = torch.compile(_forward_step, fullgraph=False, dynamic=False, **options)
        compiled, model, argument = self._compiled_step, self.model, self.cache_argument
        return (lambda *inputs: compiled(model, argument, *inputs)), True, None   # (the lambda holds no `self`)

    @contextmanager
    def _decoding(self, cache_length: int):
        """While decoding: the engine's attention (when the model uses SDPA over full-attention layers) and,
        when compiling, dynamo's recompile limit raised to the engine's own budget. Yields whether the
        engine's attention is on. The model's own setting is restored afterwards (on CPU it is the policy)."""
        config = self.model.config
        original = config._attn_implementation
        own_attention = original == "sdpa" and _full_attention_only(config, cache_length)
        limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
        budget = max(getattr(torch._dynamo.config, limit), self.max_compiled_shapes)
        if own_attention:
            _register_decode_attention()
            config._attn_implementation = DECODE_ATTENTION
        try:
            with torch._dynamo.config.patch(**{limit: budget}) if self.compile else nullcontext():
                yield own_attention
        finally:
            if own_attention:
                config._attn_implementation = original

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
        length, cache = self._cache(batch, width + T)                           # length ≥ width + T: caches only grow
        over_cap = self.max_prompt_tokens is not None and P > self.max_prompt_tokens   # decoded eagerly
        with self._decoding(length) as own_attention:
            return self._decode_loop(ids, mask, B, T, sampling, eos_ids, pad_id, length, cache, own_attention,
                                     eager=over_cap)

    def _decode_loop(self, ids, mask, B, T, sampling, eos_ids, pad_id, length, cache, own_attention,
                     eager=False):
        batch, width = ids.shape
        device = ids.device
        visible = torch.zeros((batch, length), dtype=torch.bool, device=device)   # slots a row attends to
        visible[:, :width] = mask.bool()
        position_ids = (mask.long().cumsum(-1) - 1).clamp_min(0)                   # (batch, width)
        logits = self.model(input_ids=ids, attention_mask=visible, position_ids=position_ids,
                            use_cache=True, logits_to_keep=1, **{self.cache_argument: cache}).logits[:, -1]  # prefill
        next_position = position_ids[:, -1:] + 1                                   # (batch, 1)
        eos = torch.tensor(eos_ids, device=device)
        tokens = torch.full((batch, T), pad_id, dtype=torch.long, device=device)
        sampling_logps = torch.zeros(batch, T, device=device)
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        finished[B:] = True                                                        # filler rows never hold us up
        steps, fell_back = {}, False                                               # attended length -> step
        for t in range(T):
            token, token_logp = sample_next_token(logits, sampling.temperature, sampling.top_p, sampling.greedy)
            token = torch.where(finished, torch.full_like(token, pad_id), token)    # after EOS: padding
            tokens[:, t] = token
            sampling_logps[:, t] = token_logp.masked_fill(finished, 0.0)
            finished |= torch.isin(token, eos)
            if t == T - 1 or ((t + 1) % self.check_every == 0 and bool(finished.all())):
                return tokens[:B, : t + 1], sampling_logps[:B, : t + 1]
            visible[:, width + t] = True                                           # the slot this step writes
            # The engine's attention: a (batch, 1, 1, L) mask over the first L slots (a view); otherwise
            # transformers' masks over the whole cache.
            attended = attended_length(width + t, length, self.kv_block) if own_attention else length
            step_mask = visible[:, None, None, :attended] if own_attention else visible
            if attended not in steps:                  # a new bucket: its compiled step (or why eager)
                steps[attended] = (self._step, False, None) if eager else self._step_for((batch, length, attended))
                if steps[attended][2] and not fell_back:
                    self._warn_once(steps[attended][2])        # counted once per decode call
                    fell_back = True
            step, compiled, _ = steps[attended]
            if compiled and device.type == "cuda":
                torch.compiler.cudagraph_mark_step_begin()     # the last step's graph outputs are consumed
            try:
                logits = step(token[:, None], step_mask, next_position, cache)
            except Exception as error:      # a compiler problem must not end a training run: decode eagerly
                if not compiled:
                    raise
                self._warn_once(f"compiled decoding failed ({type(error).__name__}: {str(error)[:200]}); "
                                "decoding eagerly from now on")
                self.compile, steps = False, {}
                logits = self._step(token[:, None], step_mask, next_position, cache)
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
