"""--model FILE.gguf (models.load_gguf) on a tiny GGUF file written here with the `gguf` package.

These tests need the optional `gguf` package, so they live outside the core suite (pytest.ini's testpaths):
    pip install -r requirements-gguf.txt && python -m pytest -q test_gguf.py
CI runs them in the core environment after installing it. The file is a 2-layer Llama of width 32 with a
byte-level BPE vocabulary of 261 tokens, a chat template with a default system prompt, and pad = EOS =
<|im_end|>: the layout of SmolLM2-135M-Instruct's GGUF at a size that loads in a second. Some tensors are
Q8_0-quantized, so the loader's dequantization is checked against gguf's own.
"""

import json

import numpy as np
import pytest
import torch

import gguf
import models

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
HIDDEN, FFN, LAYERS, HEADS, KV_HEADS = 32, 64, 2, 4, 2
HEAD_DIM = HIDDEN // HEADS
# SmolLM2's template, shortened: a conversation without a system message gets a default one.
CHAT_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                 "{{ '<|im_start|>system\nYou are a tiny model<|im_end|>\n' }}{% endif %}"
                 "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def byte_level_alphabet() -> list[str]:
    """GPT-2's 256 printable stand-ins for the bytes 0..255 (the vocabulary of a byte-level BPE without merges)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = [], 0
    for byte in range(256):
        if byte in printable:
            codes.append(byte)
        else:
            codes.append(256 + extra)
            extra += 1
    return [chr(code) for code in codes]


def permute_for_gguf(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert script reorders q/k rows (interleaved rotary halves); transformers undoes it on load."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def write_tiny_gguf(path, seed: int = 0) -> dict[str, np.ndarray]:
    """Write the tiny Llama GGUF; return the float32 weights (transformers' names and layout) it must load as."""
    rng = np.random.default_rng(seed)
    tokens = SPECIALS + byte_level_alphabet() + ["he", "ll"]     # and two merges (a BPE file must have some)
    vocab = len(tokens)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(LAYERS)
    writer.add_context_length(128)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_vocab_size(vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL] * len(SPECIALS) + [gguf.TokenType.NORMAL] * (vocab - len(SPECIALS)))
    writer.add_token_merges(["h e", "l l"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)          # pad = EOS, as SmolLM2's
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    expected = {}

    def add(gguf_name, hf_name, shape, quantize=False, heads=None):
        weight = rng.normal(0.0, 0.1, size=shape).astype(np.float32)       # transformers' (out, in) layout
        stored = permute_for_gguf(weight, heads) if heads else weight       # llama.cpp's layout
        if quantize:              # Q8_0: blocks of 32 along the input dimension; the loader must dequantize
            data = gguf.quants.quantize(stored, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(gguf_name, data, raw_shape=data.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            stored = gguf.quants.dequantize(data, gguf.GGMLQuantizationType.Q8_0)   # what the file holds
        else:
            writer.add_tensor(gguf_name, stored)
        expected[hf_name] = unpermute(stored, heads)

    add("token_embd.weight", "model.embed_tokens.weight", (vocab, HIDDEN), quantize=True)
    add("output_norm.weight", "model.norm.weight", (HIDDEN,))
    for i in range(LAYERS):
        prefix, hf = f"blk.{i}.", f"model.layers.{i}."
        add(prefix + "attn_norm.weight", hf + "input_layernorm.weight", (HIDDEN,))
        add(prefix + "ffn_norm.weight", hf + "post_attention_layernorm.weight", (HIDDEN,))
        add(prefix + "attn_q.weight", hf + "self_attn.q_proj.weight", (HIDDEN, HIDDEN), quantize=True, heads=HEADS)
        add(prefix + "attn_k.weight", hf + "self_attn.k_proj.weight", (KV_HEADS * HEAD_DIM, HIDDEN), heads=KV_HEADS)
        add(prefix + "attn_v.weight", hf + "self_attn.v_proj.weight", (KV_HEADS * HEAD_DIM, HIDDEN))
        add(prefix + "attn_output.weight", hf + "self_attn.o_proj.weight", (HIDDEN, HIDDEN))
        add(prefix + "ffn_gate.weight", hf + "mlp.gate_proj.weight", (FFN, HIDDEN), quantize=True)
        add(prefix + "ffn_up.weight", hf + "mlp.up_proj.weight", (FFN, HIDDEN))
        add(prefix + "ffn_down.weight", hf + "mlp.down_proj.weight", (HIDDEN, FFN))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


def unpermute(stored: np.ndarray, heads: int | None) -> np.ndarray:
    """The inverse of permute_for_gguf: the (out, in) rows in transformers' order."""
    if not heads:
        return stored
    return stored.reshape(heads, stored.shape[0] // heads // 2, 2, *stored.shape[1:]).swapaxes(1, 2).reshape(stored.shape)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.Q8_0.gguf"
    expected = write_tiny_gguf(path)
    return path, expected


def test_unpermute_inverts_the_llama_cpp_permutation():
    weight = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
    assert np.array_equal(unpermute(permute_for_gguf(weight, 2), 2), weight)
    assert not np.array_equal(permute_for_gguf(weight, 2), weight)


def test_gguf_loads_dequantized_float32_with_its_tokenizer_and_template(tiny_gguf):
    path, expected = tiny_gguf
    model, tokenizer = models.load_model(str(path))
    assert type(model).__name__ == "LlamaForCausalLM"
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert not hasattr(model.config, "quantization_config") and getattr(model, "hf_quantizer", None) is None
    state = model.state_dict()
    for name, weight in expected.items():          # Q8_0 tensors: exactly gguf's own dequantization
        assert torch.equal(state[name], torch.from_numpy(weight)), name
    assert model.lm_head.weight is model.model.embed_tokens.weight          # no output.weight: tied head
    assert model.model.rotary_emb.inv_freq.device.type == "cpu"            # the buffers are real tensors
    # the file's tokenizer: byte-level, pad = EOS = <|im_end|>, and its chat template with the default system prompt
    assert (tokenizer.eos_token, tokenizer.pad_token, tokenizer.eos_token_id) == ("<|im_end|>", "<|im_end|>", 2)
    assert model.generation_config.eos_token_id == 2 and model.generation_config.pad_token_id == 2
    text = tokenizer.apply_chat_template([{"role": "user", "content": "1+1?"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>system\nYou are a tiny model<|im_end|>\n<|im_start|>user\n1+1?<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.decode(tokenizer("héllo 12")["input_ids"]) == "héllo 12"
    # it computes: a forward pass on a tokenized prompt gives finite logits over the vocabulary
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    logits = model(**ids).logits
    assert logits.shape == (1, ids["input_ids"].shape[1], len(tokenizer)) and torch.isfinite(logits).all()


def test_gguf_model_saves_as_an_ordinary_folder(tiny_gguf, tmp_path):
    path, expected = tiny_gguf
    model, tokenizer = models.load_model(str(path))
    models.save_model(tmp_path / "saved", model, tokenizer)
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    again, tokenizer_again = models.load_model(str(tmp_path / "saved"))
    for name, weight in expected.items():
        assert torch.equal(again.state_dict()[name], torch.from_numpy(weight)), name
    assert tokenizer_again.chat_template == CHAT_TEMPLATE and tokenizer_again.pad_token == "<|im_end|>"


def tiny_train_args(model, out_dir, *extra):
    return ["--model", str(model), "--out_dir", str(out_dir), "--dataset", "toy", "--eval_benchmark", "toy",
            "--eval_limit", "2", "--prompts_per_step", "2", "--group_size", "2", "--max_new_tokens", "4",
            "--num_steps", "2", "--lr", "1e-3", "--warmup_steps", "0", "--mini_batches", "1",
            "--micro_batch_size", "4", "--gradient_checkpointing", "false", "--plot", "false", *extra]


# peft looks for the base's config.json on every adapter save and warns when the named folder has none
@pytest.mark.filterwarnings("error:Could not find a config file")
@pytest.mark.parametrize("extra", [[], ["--lora_rank", "2", "--beta", "0.1"]], ids=["full", "lora_beta"])
def test_train_from_a_gguf_file_writes_plain_folders_and_resumes(tiny_gguf, tmp_path, extra):
    import train
    path, expected = tiny_gguf
    out = tmp_path / "run"
    train.main(tiny_train_args(path, out, "--num_steps", "1", "--save_every", "1", *extra))
    train.main(tiny_train_args(path, out, "--resume", *extra))         # from checkpoint-1 (and initial/) to step 2
    steps = [json.loads(line) for line in open(out / "metrics.jsonl") if '"reward"' in line]
    assert [m["step"] for m in steps] == [1, 2]
    for folder in ("initial", "final"):
        config = json.loads((out / folder / "config.json").read_text())
        assert "quantization_config" not in config, folder
    initial, _ = models.load_model(str(out / "initial"))
    final, _ = models.load_model(str(out / "final"))
    assert torch.equal(initial.state_dict()["model.norm.weight"], torch.from_numpy(expected["model.norm.weight"]))
    assert not all(torch.equal(a, b) for a, b in zip(initial.state_dict().values(), final.state_dict().values()))


def test_eval_and_bench_take_a_gguf_file(tiny_gguf, tmp_path, capsys):
    import bench
    import eval as evaluation
    path, _ = tiny_gguf
    summary = evaluation.main(["--model", str(path), "--benchmark", "toy", "--limit", "2", "--max_new_tokens", "4",
                               "--out", str(tmp_path / "toy.json")])
    assert summary["n"] == 2 and 0.0 <= summary["accuracy"] <= 1.0
    bench.main(["--model", str(path), "--num_sequences", "2", "--prompt_len", "4", "--max_new_tokens", "3"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["model"] == str(path) and result["parameters"] == sum(w.size for w in tiny_gguf[1].values())


def test_pad_equal_to_eos_inside_a_chat_prompt_stays_attended(tiny_gguf):
    """The template writes <|im_end|> (= EOS = pad) after its default system prompt and after the user turn:
    those prompt tokens are real and attended; only the left padding is masked; masks never come from pad ids."""
    import rollout
    path, _ = tiny_gguf
    model, tokenizer = models.load_model(str(path))
    sampling = rollout.SamplingConfig(temperature=1.0, max_new_tokens=3)
    torch.manual_seed(0)
    out = rollout.generate(model, tokenizer, ["1+1?", "a longer question"], 2, sampling)
    pad = tokenizer.pad_token_id
    assert pad == tokenizer.eos_token_id == 2
    for ids, mask in zip(out.prompt_ids.tolist(), out.prompt_mask.tolist()):
        width = sum(mask)
        assert mask == [0] * (len(mask) - width) + [1] * width                 # left padding only
        assert ids[len(ids) - width:].count(pad) == 2                          # system and user turns end in EOS
    assert rollout.eos_token_ids(model, tokenizer) == [2]                     # from the file's metadata
    assert out.completion_mask.shape == out.completion_ids.shape and out.completion_mask[:, 0].all()
