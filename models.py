"""The policy: which weights, in which dtype, with or without LoRA adapters, and one-line load errors.

train.py, eval.py and bench.py (and the TRL launcher) load every model through this file, so "toy", a local
folder and a Hub name mean the same thing everywhere and fail with the same one-line message.

    load_model(name, device, dtype, trust_remote_code, log)  -> (model, tokenizer)    toy | folder | FILE.gguf | Hub name
    add_lora(model, rank, alpha, dropout, target_modules, seed, adapter_dir=None) -> peft.PeftModel
    save_model(path, model, tokenizer)                       a plain save_pretrained folder (LoRA merged in)
    merged_copy(peft_model)                                  the plain model W + (α / r) B A (engine.py samples from it)

A GGUF file (`--model FILE.gguf`, the llama.cpp format many small models are published in) is read through
transformers' GGUF support, which needs the optional `gguf` package: every tensor is dequantized to float32,
the tokenizer and chat template come from the file's metadata, and the model is then an ordinary float32
transformers model (load_gguf says why a copy is needed), so training, checkpoints, `initial/` and `final/`
are the same as for a folder.

LoRA (Hu et al. 2021, arXiv 2106.09685) through `peft`, the library TRL users already know: each targeted
linear layer W (out × in) gets a trainable low-rank update, y = W x + (α / r) · B (A x), A (r × in) random,
B (out × r) zero, so the wrapped model starts exactly at W. Only A and B are trained: the base weights are
frozen in bf16 on CUDA (float32 on CPU) and need neither gradients nor AdamW state, which is what lets a
1.7B model train on a 24 GB GPU. The adapters stay float32 (peft's `autocast_adapter_dtype`): they are the
master weights that AdamW updates, and pure-bf16 AdamW drops small updates (docs/design.md §5).

A LoRA policy is a `peft.PeftModel`. Three things follow from that, and train.py relies on each:
- the reference policy π_ref of the KL penalty is the same model with its adapters switched off
  (`adapters_disabled`): no second copy of the weights;
- a checkpoint is the adapter (`PeftModel.save_pretrained`: adapter_config.json + adapter_model.safetensors,
  a few MB) plus the optimizer state of the adapters only;
- `final/` (and `initial/`) are merged (W + (α / r) B A) plain model folders: `AutoModelForCausalLM`, eval.py
  and vLLM load them like any other model, with no peft installed.
"""

import copy
import os
import warnings
from contextlib import nullcontext

import torch

from data import TOY_TASKS

# peft's own name for "every nn.Linear except the output head": q/k/v/o_proj of attention and
# gate/up/down_proj of the MLP on Qwen3 and Llama-style models, qkv_proj/o_proj/gate_up_proj/down_proj on
# Phi-4-mini. The embeddings and the LM head (tied to them on small Qwen3 models) stay frozen.
ALL_LINEAR = "all-linear"


class ModelLoadError(RuntimeError):
    """A model name or folder that cannot be loaded, or LoRA settings that do not fit it; one line says why."""


# ---------------------------------------------------------------------------------------------------
# Loading: "toy", a local save_pretrained folder, or a Hub name
# ---------------------------------------------------------------------------------------------------
def is_gguf(name: str) -> bool:
    """A GGUF model file (llama.cpp's single-file format), named by its extension."""
    return str(name).lower().endswith(".gguf")


def is_local_path(name: str) -> bool:
    """A Hub name is "owner/model" (or a bare legacy name); anything else is meant as a local folder or file."""
    name = os.path.expanduser(name)
    return os.path.exists(name) or name.startswith((".", "/")) or name.count("/") > 1 or is_gguf(name)


def check_model_name(name: str) -> None:
    """Fail at once (before any data or weights load) on a local model folder or GGUF file that does not exist."""
    if name in TOY_TASKS or not is_local_path(name):
        return
    path = os.path.expanduser(name)
    if is_gguf(path):
        if not os.path.isfile(path):
            raise ModelLoadError(f"GGUF file not found: {name}")
        check_gguf_installed(name)
    elif not os.path.isdir(path):
        raise ModelLoadError(f"model folder not found: {name}")


def check_gguf_installed(name: str) -> None:
    """The `gguf` package is optional (only GGUF files need it): without it, one line saying what to install."""
    from transformers.utils import is_gguf_available
    from transformers.utils.import_utils import GGUF_MIN_VERSION

    if not is_gguf_available():
        raise ModelLoadError(f"--model {name}: reading a GGUF file needs the gguf package "
                             f"(pip install 'gguf>={GGUF_MIN_VERSION}')")


def load_gguf(path: str, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) from a GGUF file: weights dequantized to float32, tokenizer and chat template from its metadata.

    transformers dequantizes every tensor on load, but the model it returns still carries the GGUF
    "quantizer", and save_pretrained refuses it ("quantized with gguf and is not serializable"): a run could not
    write initial/, checkpoints or final/. The float32 weights are therefore moved into a fresh model of the
    same architecture whose config has no quantization_config; it is then an ordinary model in every respect.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, file = os.path.split(os.path.abspath(path))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = dtype
    # No source folder: the GGUF's folder has no config.json, and peft, seeing one named, would look for it on
    # each adapter save ("Could not find a config file ..."). A run's base is its initial/ folder anyway.
    config._name_or_path = ""
    with torch.device("meta"):                     # no random initialisation: every tensor is taken from `loaded`
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False, assign=True)
    model.tie_weights()                            # assign=True gave a tied head its own tensor: share it again
    # non-persistent buffers (the rotary inv_freq) are in no state dict: take them as they are
    for name, buffer in loaded.named_buffers():
        owner, _, leaf = name.rpartition(".")
        model.get_submodule(owner)._buffers[leaf] = buffer
    still_meta = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    if still_meta or unexpected:
        raise ModelLoadError(f"GGUF file {path}: its tensors do not fit a {type(model).__name__} "
                             f"(missing {still_meta[:3]}, unexpected {list(unexpected)[:3]})")
    model.generation_config = loaded.generation_config      # EOS / pad / BOS ids from the file's metadata
    return model.to(dtype).eval(), tokenizer


def resolve_device(name: str | None) -> torch.device:
    """--device: cpu, cuda or cuda:N (default: cuda when torch sees a GPU), checked before anything loads."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ModelLoadError(f"--device {name}: not a device (use cpu, cuda or cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise ModelLoadError(f"--device {name}: only cpu and cuda are supported")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"--device {name}: torch sees no CUDA GPU (use cpu)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ModelLoadError(f"--device {name}: there are only {torch.cuda.device_count()} CUDA device(s)")
    return device


def load_model(name: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               trust_remote_code: bool = False, log=print):
    """(model, tokenizer) from "toy" (the cached warm-started tiny model), a local folder, a GGUF file or a Hub name.

    Weights load in `dtype`: float32 for full fine-tuning (float32 master weights; bf16 autocast does the
    math), bf16 for a frozen LoRA base on CUDA or for evaluation on CUDA. `trust_remote_code` stays off
    unless the user asks: it runs Python shipped with the checkpoint.
    """
    if name in TOY_TASKS:                      # the tiny model warm-started on that built-in task's teacher
        import toy
        name = str(toy.warm_started_model_dir(log=log, task=name))
    name = os.path.expanduser(name)
    check_model_name(name)
    looks_local = is_local_path(name)
    if is_gguf(name):
        try:
            model, tokenizer = load_gguf(name, dtype)
        except (OSError, ValueError, KeyError) as error:     # not a GGUF, or an architecture transformers cannot read
            raise ModelLoadError(f"could not load GGUF file '{name}': {str(error).splitlines()[0]}") from error
    else:
        model, tokenizer = load_pretrained(name, looks_local, dtype, trust_remote_code)
    if tokenizer.pad_token_id is None:              # many base models ship without a pad token
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device), tokenizer


def load_pretrained(name: str, looks_local: bool, dtype: torch.dtype, trust_remote_code: bool):
    """(model, tokenizer) from a save_pretrained folder or a Hub name, with one-line errors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if looks_local and not any(os.path.exists(os.path.join(name, f)) for f in ("config.json", "adapter_config.json")):
        raise ModelLoadError(f"could not load local folder '{name}': it has no config.json (not a save_pretrained "
                             f"model folder; a training run's model is its final/ folder)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        where = "local folder" if looks_local else "Hub model (no network? wrong name? gated?)"
        raise ModelLoadError(f"could not load {where} '{name}': {str(error).splitlines()[0]}") from error
    return model, tokenizer


# ---------------------------------------------------------------------------------------------------
# LoRA
# ---------------------------------------------------------------------------------------------------
def parse_target_modules(text: str) -> str | list[str]:
    """--lora_target_modules: "all-linear" (peft's every-linear-but-the-head) or comma-separated module names.

    >>> parse_target_modules("all-linear"), parse_target_modules("q_proj, v_proj")
    ('all-linear', ['q_proj', 'v_proj'])
    """
    if text.strip() == ALL_LINEAR:
        return ALL_LINEAR
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise ModelLoadError(f"--lora_target_modules: no module names in {text!r} (e.g. all-linear or q_proj,v_proj)")
    return names


def lora_config(rank: int, alpha: float, dropout: float = 0.0, target_modules: str | list[str] = ALL_LINEAR):
    """The peft.LoraConfig of a policy (also what a TRL GRPOTrainer takes as `peft_config`)."""
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                      bias="none", task_type="CAUSAL_LM")


def add_lora(model, rank: int, alpha: float, dropout: float = 0.0, target_modules: str | list[str] = ALL_LINEAR,
             seed: int = 0, adapter_dir: str | os.PathLike | None = None):
    """Freeze `model` and wrap it with fresh LoRA adapters (or those saved in `adapter_dir`) -> peft.PeftModel.

    Fresh A matrices are drawn from their own seeded RNG (the caller's RNG is left as it was), so a run's
    adapters depend on `seed` only. Adapters are float32 whatever the base dtype. With `adapter_dir` (a
    checkpoint) the saved rank, α and targets must be the ones asked for: resuming with other LoRA settings
    would silently train something else. Returned in eval mode (train.py switches to train() for the update).
    """
    try:
        import peft
    except ImportError as error:          # absent, or too old for transformers 5 (peft < 0.18 imports HybridCache)
        raise ModelLoadError(f"--lora_rank needs peft>=0.18,<0.22 (pip install -r requirements.txt): {error}") from error
    config = lora_config(rank, alpha, dropout, target_modules)
    with warnings.catch_warnings():                      # peft asks transformers 5 a deprecated question
        warnings.simplefilter("ignore", FutureWarning)
        try:
            if adapter_dir is not None:
                saved = peft.PeftConfig.from_pretrained(str(adapter_dir))
                asked = {"rank": rank, "alpha": alpha, "target_modules": target_modules}
                found = {"rank": saved.r, "alpha": saved.lora_alpha, "target_modules": saved.target_modules}
                if isinstance(found["target_modules"], (set, list)) and not isinstance(asked["target_modules"], str):
                    found["target_modules"], asked["target_modules"] = sorted(found["target_modules"]), sorted(asked["target_modules"])
                for key in asked:
                    if key == "target_modules" and asked[key] == ALL_LINEAR:
                        continue                         # peft stores all-linear expanded to the module names
                    if asked[key] != found[key]:
                        raise ModelLoadError(f"{adapter_dir} holds LoRA adapters with {key} {found[key]}, not "
                                             f"{asked[key]}: resume with the options the run started with")
                # (eval mode, as from_pretrained gives: is_trainable=True leaves it in train mode, and π_old's
                # log-probs would then be computed with adapter dropout on)
                return peft.PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=True).eval()
            with torch.random.fork_rng(devices=[]):        # A is initialised on the CPU, then moved
                torch.manual_seed(seed)
                return peft.get_peft_model(model, config).eval()
        except ValueError as error:                        # e.g. "Target modules {'qq_proj'} not found"
            raise ModelLoadError(f"LoRA: {str(error).splitlines()[0]}") from error


def is_lora(model) -> bool:
    """True for a peft-wrapped model (one whose weights train as adapters)."""
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def adapters_disabled(model):
    """Context in which a LoRA model computes with its base weights only (π_ref); a no-op for other models.

    Used for the KL reference: log π_ref(o) are the log-probs of the frozen base, the same weights the
    adapters sit on, so β > 0 costs no second copy of the model.
    """
    return model.disable_adapter() if is_lora(model) else nullcontext()


def parameter_counts(model) -> tuple[int, int]:
    """(all parameters, trainable parameters)."""
    return (sum(p.numel() for p in model.parameters()),
            sum(p.numel() for p in model.parameters() if p.requires_grad))


def merged_copy(model):
    """A plain transformers model whose weights are W + (α / r) B A: the policy without peft. Other models: itself."""
    if not is_lora(model):
        return model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return copy.deepcopy(model).merge_and_unload()


def save_model(path, model, tokenizer) -> None:
    """A save_pretrained folder with its tokenizer; a LoRA model is saved merged (a plain model folder)."""
    merged_copy(model).save_pretrained(path)
    tokenizer.save_pretrained(path)
