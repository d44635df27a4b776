"""Throughput and memory of the three phases of a training step: rollout, log-probs, update.

    python bench.py --shape tiny                     # CPU, seconds (CI runs it)
    python bench.py --shape qwen3-1.7b               # GPU: Qwen3-1.7B's exact config, random weights
    python bench.py --model runs/demo/final          # any save_pretrained folder (or a FILE.gguf)
    python bench.py --shape qwen3-1.7b --save DIR --tokenizer TOK
                                                     # write that random-weight model (bf16) with the tokenizer
                                                     # folder TOK (else the toy one), for `train.py --model DIR`
                                                     # / `eval.py --model DIR` offline
    python bench.py --shape qwen3-1.7b --lora_rank 16 --gradient_checkpointing   # LoRA: bf16 base, fp32 adapters
    python bench.py --shape qwen3-1.7b --attention --num_sequences 16 --prompt_len 512 --max_new_tokens 1024
                                                     # one layer's decode attention: K/V copy vs the engine's
    python bench.py --shape qwen3-1.7b --workload preset --gradient_checkpointing --keep_engine
                                                     # train.py's LLM preset: 128 rows × (512 + 1,024) tokens,
                                                     # the engine kept through the update as train.py keeps it

What is measured (tokens are completion tokens unless named otherwise):
- rollout/plain:  `model.generate` with sampling, every sequence forced to `max_new_tokens`.
- rollout/static: the same with `cache_implementation="static"` (compiled decoding), on CUDA only.
- rollout/fast:   engine.FastGenerator (our static-cache loop; compiled and on a bf16 copy on CUDA); its
                  ratios to plain and static are printed. First-call (compile) time is reported separately.
- logprobs:       rollout.token_logprobs without grad (the old/reference log-probs of a step).
- update:         forward + backward + AdamW step, float32 master weights, bf16 autocast on CUDA,
                  micro-batched, optional gradient checkpointing; tokens/s and model FLOP utilisation.
- peak memory:    torch.cuda.max_memory_allocated (GPU) or the process's peak RSS (CPU); on GPU also per phase
                  (rollout, update). Before the update the engine is dropped (it holds no reference cycle, so its
                  KV cache and bf16 copy go at once) and dynamo's caches, which hold the CUDA-graph pool, are reset;
                  with --keep_engine all of it stays, as in train.py, and the update's peak compares with
                  train.py's start-up estimate for the same shape, printed as memory_estimate.
- checks (GPU):   the engine's sampling log-probs against token_logprobs of the float32 policy under bf16
                  autocast (mean / max |Δ| over completion tokens: how off-policy the bf16 sampler is), and
                  greedy agreement of the engine with `generate` (share of identical tokens before the first
                  divergence; bf16 near-ties legitimately flip).
- with --lora_rank: the policy is the frozen base (bf16 on CUDA) with float32 adapters (models.add_lora);
  rollout/plain samples through peft (adapter-aware), rollout/fast from the merged copy
  (engine.MergedLoraGenerator), and rollout/fast_adapter_aware runs our loop through peft, for comparison.
One JSON object is printed on the last line of stdout; nothing is cached, every number is measured now.
"""

import argparse
import dataclasses
import gc
import json
import platform
import resource
import sys
import time

import torch

import models
import toy
from engine import FastGenerator, MergedLoraGenerator
from rollout import SamplingConfig, token_logprobs
from train import enable_checkpointing

QWEN3_1_7B = dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                  num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                  rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, eos_token_id=151645,
                  pad_token_id=151643, bos_token_id=151643)
QWEN3_4B = dict(QWEN3_1_7B, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32)
SHAPES = {"qwen3-1.7b": QWEN3_1_7B, "qwen3-4b": QWEN3_4B}
# (rows, prompt tokens, new tokens) of one rollout batch. "small" hides what only long caches show (attention
# traffic grows with the cache); "preset" is train.py's LLM preset: a 128-row generation batch, prompts up to
# 512 tokens, 1,024 new tokens.
WORKLOADS = {"small": {"cuda": (64, 256, 512), "cpu": (16, 16, 32)}, "preset": {"cuda": (128, 512, 1024),
                                                                               "cpu": (128, 512, 1024)}}


def build(shape: str, model_path: str | None, device: torch.device, tokenizer_path: str | None = None):
    """(model in float32, tokenizer, label)."""
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM
    if model_path:
        model, tokenizer = models.load_model(model_path, device, torch.float32)
        return model, tokenizer, model_path
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path) if tokenizer_path else toy.build_tokenizer()
    if shape == "tiny":
        return toy.build_model(tokenizer).to(device), tokenizer, "tiny"
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3ForCausalLM(Qwen3Config(**SHAPES[shape])).float()
    return model, tokenizer, shape


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(function, device):
    synchronize(device)
    start = time.perf_counter()
    result = function()
    synchronize(device)
    return result, time.perf_counter() - start


def peak_memory_gib(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20      # KiB on Linux


@torch.no_grad()
def engine_checks(model, generation_model, engine, prompts, prompt_mask, T) -> dict:
    """Correctness of the fast path on this device: the bf16 sampler's log-probs against the float32 policy's
    (what π_old is in train.py), and greedy tokens against `generate` on the same bf16 copy."""
    B = prompts.shape[0]
    torch.manual_seed(1)
    ids, sampling_logps = engine.decode(prompts, prompt_mask, SamplingConfig(temperature=1.0, max_new_tokens=T),
                                        eos_ids=[-1], pad_id=0)
    mask = torch.ones_like(ids)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logps = token_logprobs(model, torch.cat([prompts, ids], 1), torch.cat([prompt_mask, mask], 1), mask, 1.0, 8)
    gap = (logps - sampling_logps).abs()
    rows, new = min(B, 16), min(T, 128)
    greedy = SamplingConfig(do_sample=False, max_new_tokens=new)
    fast, _ = engine.decode(prompts[:rows], prompt_mask[:rows], greedy, eos_ids=[-1], pad_id=0)
    plain = generation_model.generate(input_ids=prompts[:rows], attention_mask=prompt_mask[:rows], do_sample=False,
                                      max_new_tokens=new, min_new_tokens=new, pad_token_id=0,
                                      eos_token_id=None)[:, prompts.shape[1]:]
    differs = fast != plain                                                   # (rows, new)
    first_divergence = torch.where(differs.any(1), differs.int().argmax(1), torch.full((rows,), new, device=differs.device))
    return {"check_logp_gap_mean": round(gap.mean().item(), 5), "check_logp_gap_max": round(gap.max().item(), 4),
            "check_greedy_rows_identical": f"{int((first_divergence == new).sum())}/{rows}",
            "check_greedy_tokens_before_divergence": round(first_divergence.float().mean().item() / new, 3)}


def attention_step_ms(shape: dict, B: int, P: int, T: int, device, every: int = 16) -> dict:
    """One layer's decode attention, milliseconds per step averaged over every `every`-th of T steps after a
    P-token prompt, three ways: the compiled transformers path (K/V copied to the query heads by repeat_kv,
    SDPA over every cache slot), the engine's folded query over every slot, and the engine's attention over the
    attended-length buckets (engine.decode_attention). Random K/V in the model's heads; float32 on CPU."""
    import types
    from transformers.integrations.sdpa_attention import repeat_kv
    from engine import KV_BLOCK, attended_length, decode_attention
    heads, kv_heads, head_dim = shape["num_attention_heads"], shape["num_key_value_heads"], shape["head_dim"]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    slots, groups = P + T, heads // kv_heads
    torch.manual_seed(0)
    key, value = (torch.randn(B, kv_heads, slots, head_dim, device=device, dtype=dtype) for _ in range(2))
    query = torch.randn(B, heads, 1, head_dim, device=device, dtype=dtype)
    module = types.SimpleNamespace(num_key_value_groups=groups)
    scale = head_dim ** -0.5

    def mask(position, length):                            # (B, 1, 1, length): the written slots
        return (torch.arange(length, device=device) <= position).expand(B, 1, 1, length)

    def repeated(position):
        return torch.nn.functional.scaled_dot_product_attention(
            query, repeat_kv(key, groups), repeat_kv(value, groups), attn_mask=mask(position, slots), scale=scale)

    ways = {"attention_repeat_kv_all_slots_ms": repeated,
            "attention_folded_all_slots_ms": lambda p: decode_attention(module, query, key, value, mask(p, slots),
                                                                        scaling=scale)[0],
            "attention_engine_ms": lambda p: decode_attention(module, query, key, value,
                                                              mask(p, attended_length(p, slots, KV_BLOCK)),
                                                              scaling=scale)[0]}
    positions = range(P, P + T, every)
    result = {}
    for name, attend in ways.items():
        attend(P)                                                              # warm-up
        _, seconds = timed(lambda: [attend(p) for p in positions], device)
        result[name] = round(seconds / len(positions) * 1e3, 3)
    return result


def memory_estimate(model, args, B: int, P: int, T: int, on_gpu: bool) -> dict:
    """train.py's start-up estimate for this shape: one generation batch of B rows, the engine's bf16 copy, no
    reference, the update in micro-batches of args.micro_batch_size."""
    import train
    config = dataclasses.replace(train.parse_config(["--model", "bench"]), generation_batch_size=B,
                                 prompts_per_step=B, group_size=1, max_new_tokens=T, eval_max_new_tokens=None,
                                 micro_batch_size=args.micro_batch_size, lora_rank=args.lora_rank,
                                 gradient_checkpointing=args.gradient_checkpointing, compile_rollout=args.compile)
    return train.memory_estimate_gib(model, config, has_reference=False, on_gpu=on_gpu, has_generation_copy=True,
                                     prompt_tokens=P)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--shape", default="tiny", choices=["tiny", *SHAPES], help="built-in model shape (random weights)")
    parser.add_argument("--model", default=None, help="measure this save_pretrained folder (or FILE.gguf, "
                        "dequantized to float32) instead of a built-in shape")
    parser.add_argument("--workload", default="small", choices=list(WORKLOADS),
                        help="rows × prompt + new tokens: small (64 × 256 + 512 GPU, 16 × 16 + 32 CPU) or preset "
                             "(train.py's LLM preset, 128 × 512 + 1,024; GPU-sized)")
    parser.add_argument("--num_sequences", type=int, default=None, help="completions per rollout (default: the workload's)")
    parser.add_argument("--prompt_len", type=int, default=None, help="prompt tokens (default: the workload's)")
    parser.add_argument("--max_new_tokens", type=int, default=None, help="completion tokens (default: the workload's)")
    parser.add_argument("--attention", action="store_true", help="only time one layer's decode attention, three "
                        "ways (K/V copied to the query heads vs the engine's), at the shape's heads, and exit")
    parser.add_argument("--keep_engine", action="store_true", help="keep the engine (KV cache, bf16 copy, CUDA "
                        "graphs) through the update, as train.py does")
    parser.add_argument("--micro_batch_size", type=int, default=8, help="sequences per forward/backward in the update")
    parser.add_argument("--gradient_checkpointing", action="store_true", help="recompute activations in backward")
    parser.add_argument("--static", action=argparse.BooleanOptionalAction, default=None,
                        help="also time cache_implementation='static' (default: on CUDA only)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="compile the fast engine's decode step (CUDA only)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                        help="on GPU: sampler-vs-policy log-prob gap and greedy agreement with generate")
    parser.add_argument("--save", default=None, help="save the built model (bf16) and tokenizer here and exit")
    parser.add_argument("--tokenizer", default=None, help="with --save: a tokenizer folder to save with the model "
                        "(e.g. the real Qwen3 tokenizer); default: the toy character tokenizer")
    parser.add_argument("--lora_rank", type=int, default=0, help="measure LoRA training: rank-r adapters (α = 2r) "
                        "on all linear layers of a frozen base, bf16 on CUDA; 0 = full fine-tuning")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    rows, prompt_tokens, new_tokens = WORKLOADS[args.workload]["cuda" if on_gpu else "cpu"]
    B, P, T = args.num_sequences or rows, args.prompt_len or prompt_tokens, args.max_new_tokens or new_tokens
    if args.attention:
        shape = SHAPES.get(args.shape, toy.MODEL_SHAPE)
        result = {"device": torch.cuda.get_device_name() if on_gpu else platform.processor() or "cpu",
                  "shape": args.shape, "num_sequences": B, "prompt_len": P, "max_new_tokens": T,
                  "torch": torch.__version__, **attention_step_ms(shape, B, P, T, device)}
        print(json.dumps(result))
        return result
    try:
        model, tokenizer, label = build(args.shape, args.model, device, args.tokenizer)
    except models.ModelLoadError as error:
        sys.exit(f"bench.py: error: {error}")
    if args.save:
        # The model's own EOS ids (Qwen3: <|im_end|> ends a chat turn) plus the tokenizer's.
        eos = {tokenizer.eos_token_id, *([model.config.eos_token_id] if args.tokenizer else [])} - {None}
        model.generation_config.eos_token_id = sorted(eos) if len(eos) > 1 else eos.pop()
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.to(torch.bfloat16).save_pretrained(args.save)                   # half the disk; loaders pick their dtype
        tokenizer.save_pretrained(args.save)
        print(json.dumps({"saved": args.save, "parameters": sum(p.numel() for p in model.parameters())}))
        return
    if args.lora_rank:            # as train.py --lora_rank: frozen base in bf16 on CUDA, float32 adapters
        model = models.add_lora(model.to(torch.bfloat16 if on_gpu else torch.float32), args.lora_rank, 2 * args.lora_rank)
    parameters, trainable = models.parameter_counts(model)
    vocab = model.config.vocab_size
    generator = torch.Generator(device="cpu").manual_seed(0)
    prompts = torch.randint(3, vocab, (B, P), generator=generator).to(device)
    prompt_mask = torch.ones_like(prompts)
    result = {"device": torch.cuda.get_device_name() if on_gpu else platform.processor() or "cpu",
              "model": label, "parameters": parameters, "trainable_parameters": trainable, "num_sequences": B, "prompt_len": P, "max_new_tokens": T,
              "torch": torch.__version__}

    # --- rollout: a bf16 copy on GPU (as train.py's generation does under autocast), forced length ---------
    generation_model = model
    if on_gpu and not args.lora_rank:                 # (a LoRA base is bf16 already: peft samples from it as is)
        import copy
        generation_model = copy.deepcopy(model).to(torch.bfloat16).eval()
    common = dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=T, min_new_tokens=T,
                  pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        generation_model.generate(input_ids=prompts[:, :8], attention_mask=prompt_mask[:, :8], max_new_tokens=2,
                                  do_sample=True, top_k=0, pad_token_id=0)           # warm-up
        output, seconds = timed(lambda: generation_model.generate(input_ids=prompts, attention_mask=prompt_mask,
                                                                  **common), device)
    result["rollout_plain_tokens_per_s"] = round(B * T / seconds, 1)
    if args.static if args.static is not None else on_gpu:
        with torch.no_grad():
            _, compile_seconds = timed(lambda: generation_model.generate(
                input_ids=prompts, attention_mask=prompt_mask, cache_implementation="static", **common), device)
            _, seconds = timed(lambda: generation_model.generate(
                input_ids=prompts, attention_mask=prompt_mask, cache_implementation="static", **common), device)
        result["rollout_static_tokens_per_s"] = round(B * T / seconds, 1)
        result["rollout_static_first_call_s"] = round(compile_seconds, 1)
        result["rollout_static_over_plain"] = round(result["rollout_static_tokens_per_s"] /
                                                    result["rollout_plain_tokens_per_s"], 2)
    # --- rollout: our engine (engine.FastGenerator), compiled + graph-captured decode step on CUDA -------------
    engine = FastGenerator(generation_model, compile=on_gpu and args.compile)   # bf16 on GPU already: no second copy
    sampling = SamplingConfig(temperature=1.0, top_p=1.0, max_new_tokens=T)
    if args.lora_rank:            # our loop through peft itself, then (below, as `fast`) from the merged copy
        timed(lambda: engine.decode(prompts, prompt_mask, sampling, eos_ids=[-1], pad_id=0), device)
        _, seconds = timed(lambda: engine.decode(prompts, prompt_mask, sampling, eos_ids=[-1], pad_id=0), device)
        result["rollout_fast_adapter_aware_tokens_per_s"] = round(B * T / seconds, 1)
        engine = MergedLoraGenerator(model, compile=on_gpu and args.compile)
        _, seconds = timed(engine.sync, device)
        result["lora_merge_s"] = round(seconds, 4)                        # paid once per optimizer step
    _, first_seconds = timed(lambda: engine.decode(prompts, prompt_mask, sampling, eos_ids=[-1], pad_id=0), device)
    (fast_ids, _), seconds = timed(lambda: engine.decode(prompts, prompt_mask, sampling, eos_ids=[-1], pad_id=0), device)
    assert fast_ids.shape == (B, T)
    result["rollout_fast_tokens_per_s"] = round(B * T / seconds, 1)
    result["rollout_fast_first_call_s"] = round(first_seconds, 1)
    result["rollout_fast_over_plain"] = round(result["rollout_fast_tokens_per_s"] / result["rollout_plain_tokens_per_s"], 2)
    if "rollout_static_tokens_per_s" in result:
        result["rollout_fast_over_static"] = round(result["rollout_fast_tokens_per_s"] /
                                                   result["rollout_static_tokens_per_s"], 2)
    if on_gpu and args.check:
        result.update(engine_checks(model, generation_model, engine, prompts, prompt_mask, T))
    result["memory_estimate"] = memory_estimate(model, args, B, P, T, on_gpu)
    if on_gpu:
        result["peak_memory_rollout_gib"] = round(peak_memory_gib(device), 2)
    if not args.keep_engine:        # free the KV cache, the bf16 copy and the CUDA-graph pool before the update
        engine = generation_model = None
        gc.collect()                # (the compiler's own tracing leftovers; the engine itself has no cycle)
        torch._dynamo.reset()       # dynamo's code caches hold the compiled steps and their CUDA-graph pool
        if on_gpu:
            torch.cuda.empty_cache()
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    input_ids = output[:, : P + T]
    attention_mask = torch.ones_like(input_ids)
    completion_mask = torch.ones(B, T, dtype=torch.long, device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if on_gpu else torch.autocast("cpu", enabled=False)

    # --- log-probs (no grad) ----------------------------------------------------------------------------------
    with torch.no_grad(), autocast:
        _, seconds = timed(lambda: token_logprobs(model, input_ids, attention_mask, completion_mask, 1.0,
                                                  args.micro_batch_size), device)
    result["logprobs_tokens_per_s"] = round(B * T / seconds, 1)

    # --- update: forward + backward + AdamW, float32 master weights -----------------------------------------
    if args.gradient_checkpointing:
        enable_checkpointing(model)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)

    def update():
        optimizer.zero_grad(set_to_none=True)
        for start in range(0, B, args.micro_batch_size):
            rows = slice(start, start + args.micro_batch_size)
            with autocast:
                logps = token_logprobs(model, input_ids[rows], attention_mask[rows], completion_mask[rows], 1.0)
            (-(logps.sum()) / (B * T)).backward()
        optimizer.step()

    update()                                                                   # warm-up (allocates AdamW state)
    _, seconds = timed(update, device)
    result["update_tokens_per_s"] = round(B * T / seconds, 1)
    result["update_all_tokens_per_s"] = round(B * (P + T) / seconds, 1)
    if on_gpu and not args.lora_rank:     # (LoRA skips the frozen weights' gradients: not 6 N per token)
        flops = 6 * parameters * B * (P + T)                                   # forward + backward, matmuls only
        peak = {"H100": 989e12, "H200": 989e12}.get(next((k for k in ("H100", "H200") if k in result["device"]), ""), None)
        if peak:
            result["update_mfu"] = round(flops / seconds / peak, 3)
    if on_gpu:
        result["peak_memory_update_gib"] = round(peak_memory_gib(device), 2)
        result["peak_memory_gib"] = max(result["peak_memory_rollout_gib"], result["peak_memory_update_gib"])
    else:
        result["peak_memory_gib"] = round(peak_memory_gib(device), 2)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    sys.exit(None if main() else 0)
