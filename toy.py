"""The offline world: a synthetic arithmetic task, a character tokenizer, a tiny Qwen3 and its warm start.

Why it exists: `python train.py` must show RL *working* on a laptop CPU with no network, in minutes.
Nothing in this file is part of the algorithm (that is lambdapo.py); it only builds a small, honest
stand-in for "a pretrained reasoning model and a verifiable task":

- **The task.** Add two 1–3 digit numbers. Each problem has a worked, column-by-column reference
  solution (so the ROUGE-L reward has something to match) and a final `\\boxed{}` answer:

      85+47=              ->   5+7+0=12
                               8+4+1=13
                               \\boxed{132}

- **The flaw RL must fix.** The warm start imitates a deliberately imperfect *teacher* that, in most
  cases (`TEACHER_DROP_RATE`), forgets the final carry and writes \\boxed{32}. The verifier checks the true
  sum. So the warm-started model is right on problems without a final carry (about half) and wrong on
  most others: a systematic flaw that imitation copied and that only the reward can reveal. With a
  perfect teacher, RL has almost nothing to fix and the demo proves little.
- **The held-out set.** A fixed, hash-defined tenth of all (a, b) pairs is never used by the warm start
  or by RL; `heldout_records` draws the evaluation problems from it.
- **The harder task, `toy_hard`.** Operands of 2–4 digits, and a teacher that loses *every* carry
  independently with probability HARD_DROP_RATE (0.95). Greedy decoding of its warm start is right only
  on carry-free problems (16% held-out); a problem with k carries is sampled right about 0.05^k of the
  time, and the worked solution's column lines give ROUGE-L partial credit. Learning takes 100+ RL
  steps instead of 20, and right completions are the policy's *unlikely* ones: the regime in which
  LamPO's confidence weights could matter (docs/study.md).
- **The model.** A ~0.8M-parameter `Qwen3ForCausalLM` (the same class as the real run), a character
  tokenizer that is a real `PreTrainedTokenizerFast` with a chat template, both saved with
  `save_pretrained` and cached, so tests and the demo do not redo the warm start.
"""

import hashlib
import json
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

# Bump when the task, tokenizer, model or warm start changes: it is part of the cache key.
TOY_VERSION = 1
TEACHER_DROP_RATE = 0.8          # share of final carries the teacher forgets
HARD_DROP_RATE = 0.95            # toy_hard: share of *each* carry the teacher forgets
HELDOUT_MODULUS = 10             # 1 pair in 10 is held out for evaluation

EOS = "<|endoftext|>"            # also the pad token, on purpose: masks must never come from pad ids
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
CHARS = list("0123456789+-*/=()[]{}\\.,:;?!'\" \n^_<>|$%&#~@`") + [chr(c) for c in range(ord("a"), ord("z") + 1)] \
    + [chr(c) for c in range(ord("A"), ord("Z") + 1)]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}" + USER + "{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}" + ASSISTANT + "{{ message['content'] }}" + EOS +
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}" + ASSISTANT + "{% endif %}"
)


# ---------------------------------------------------------------------------------------------------
# The task
# ---------------------------------------------------------------------------------------------------
def worked_solution(a: int, b: int, drop_final_carry: bool = False, forget_carry=None) -> str:
    """Column-by-column addition, least significant column first, then the boxed sum.

    `drop_final_carry` is the toy teacher's flaw (the last carry is lost); `forget_carry(column)` is the hard
    task's (called at each column that carries out, True loses that carry: the next column adds +0).

    >>> print(worked_solution(85, 47))
    5+7+0=12
    8+4+1=13
    \\boxed{132}
    >>> worked_solution(85, 47, drop_final_carry=True).splitlines()[-1]
    '\\\\boxed{32}'
    >>> print(worked_solution(85, 47, forget_carry=lambda column: column == 0))
    5+7+0=12
    8+4+0=12
    \\boxed{122}
    """
    digits_a, digits_b = str(a)[::-1], str(b)[::-1]
    lines, carry, answer_digits = [], 0, []
    for column in range(max(len(digits_a), len(digits_b))):
        da = int(digits_a[column]) if column < len(digits_a) else 0
        db = int(digits_b[column]) if column < len(digits_b) else 0
        total = da + db + carry
        lines.append(f"{da}+{db}+{carry}={total}")
        answer_digits.append(str(total % 10))
        carry = total // 10
        if carry and forget_carry is not None and forget_carry(column):
            carry = 0
    if carry and not drop_final_carry:
        answer_digits.append(str(carry))
    answer = "".join(reversed(answer_digits)).lstrip("0") or "0"
    return "\n".join(lines) + "\n\\boxed{" + answer + "}"


def prompt_text(a: int, b: int) -> str:
    return f"{a}+{b}="


def is_heldout(a: int, b: int) -> bool:
    """A stable (process-independent) hash split: about 1/HELDOUT_MODULUS of all pairs are held out."""
    digest = hashlib.sha256(f"{a}+{b}".encode()).digest()
    return digest[0] % HELDOUT_MODULUS == 0


def _random_operand(rng: random.Random, num_digits: int) -> int:
    return rng.randint(0 if num_digits == 1 else 10 ** (num_digits - 1), 10 ** num_digits - 1)


def _sample_pairs(num: int, rng: random.Random, heldout: bool, digits: tuple[int, int]) -> list[tuple[int, int]]:
    """Both operands get the same number of digits (uniform in `digits`: 1–3 for the toy). Why: with unequal
    lengths a final carry is rare (~15% of problems) and the teacher's flaw would leave RL little to
    fix; with equal lengths about 45% of problems end in a carry."""
    pairs = []
    while len(pairs) < num:
        num_digits = rng.randint(*digits)
        a, b = _random_operand(rng, num_digits), _random_operand(rng, num_digits)
        if is_heldout(a, b) == heldout:
            pairs.append((a, b))
    return pairs


def _record(a: int, b: int) -> dict:
    return {"prompt": prompt_text(a, b), "answer": str(a + b), "solution": worked_solution(a, b),
            "task": "math"}


def train_records(num: int, seed: int = 0, task: str = "toy") -> list[dict]:
    """`num` training problems {prompt, answer, solution}; never from the held-out pairs."""
    pairs = _sample_pairs(num, random.Random(seed), heldout=False, digits=TASKS[task].digits)
    return [_record(a, b) for a, b in pairs]


def heldout_records(num: int = 200, seed: int = 1234, task: str = "toy") -> list[dict]:
    """A fixed, seeded evaluation set from the held-out pairs (identical in every process)."""
    return [_record(a, b) for a, b in _sample_pairs(num, random.Random(seed), heldout=True, digits=TASKS[task].digits)]


# ---------------------------------------------------------------------------------------------------
# The tokenizer: one token per character, a real PreTrainedTokenizerFast
# ---------------------------------------------------------------------------------------------------
def build_tokenizer():
    """A character-level `PreTrainedTokenizerFast` with a chat template; pad == EOS (see module doc)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate([EOS, USER, ASSISTANT] + CHARS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=" "))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")   # every character
    backend.decoder = decoders.Fuse()                    # join characters back without spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=EOS, pad_token=EOS, unk_token=" ",
        additional_special_tokens=[USER, ASSISTANT], padding_side="left", model_max_length=512,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


# ---------------------------------------------------------------------------------------------------
# The model: a tiny Qwen3 (the class of the real run, so every code path is the real one)
# ---------------------------------------------------------------------------------------------------
MODEL_SHAPE = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=32, max_position_embeddings=256)


def build_model(tokenizer, seed: int = 0):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    # Qwen3Config defaults head_dim=128 and tie_word_embeddings=False whatever the size: set both.
    config = Qwen3Config(vocab_size=len(tokenizer), tie_word_embeddings=True, rope_theta=10000.0,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=None, **MODEL_SHAPE)
    return Qwen3ForCausalLM(config)


# ---------------------------------------------------------------------------------------------------
# The warm start: supervised fine-tuning on the imperfect teacher
# ---------------------------------------------------------------------------------------------------
# The warm start must learn the teacher's *distribution* (a final carry kept 20% of the time), not a rounding
# accident. At lr 5e-3 for 500 steps the fit is not converged, and where it ends depends on float rounding: the
# sampled kept-carry rate was 3–4% on one CPU and 15–17% on another, so RL had almost nothing or plenty to learn
# from. At lr 2e-3 for 1,000 steps the model converges to the data: greedy drops the final carry (the likelier
# choice) and sampling keeps it 17–19% of the time, for every warm-start seed and thread count measured (docs/demo.md).
WARM_START = dict(steps=1000, batch_size=64, lr=2e-3, warmup=30, seed=0)
HARD_WARM_START = dict(steps=1000, batch_size=64, lr=2e-3, warmup=30, seed=0)


@dataclass(frozen=True)
class Task:
    """One built-in task: which problems, and how the teacher of the warm start is wrong."""
    digits: tuple[int, int]        # operand length range (both operands of a problem have the same length)
    drop_rate: float               # how often the teacher loses a carry
    every_carry: bool              # False: only the final carry can be lost; True: every carry, independently
    warm_start: dict               # WARM_START settings
    max_new_tokens: int            # completion budget that fits the longest worked solution


TASKS = {
    "toy": Task(digits=(1, 3), drop_rate=TEACHER_DROP_RATE, every_carry=False, warm_start=WARM_START,
                max_new_tokens=48),
    "toy_hard": Task(digits=(2, 4), drop_rate=HARD_DROP_RATE, every_carry=True, warm_start=HARD_WARM_START,
                     max_new_tokens=64),
}


def teacher_solution(a: int, b: int, rng: random.Random, task: str = "toy") -> str:
    """The imperfect teacher the warm start imitates (the verifier always checks the true sum)."""
    spec = TASKS[task]
    if spec.every_carry:                    # toy_hard: each carry is lost independently
        return worked_solution(a, b, forget_carry=lambda column: rng.random() < spec.drop_rate)
    return worked_solution(a, b, drop_final_carry=rng.random() < spec.drop_rate)


def sft_batch(tokenizer, pairs, rng: random.Random, task: str = "toy"):
    """Left-padded prompt + teacher completion + EOS; labels = -100 outside the completion."""
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": prompt_text(a, b)}],
                                             tokenize=False, add_generation_prompt=True) for a, b in pairs]
    completions = [teacher_solution(a, b, rng, task) + EOS for a, b in pairs]
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    completion_ids = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in completions]
    length = max(len(p) + len(c) for p, c in zip(prompt_ids, completion_ids))
    input_ids = torch.full((len(pairs), length), tokenizer.pad_token_id)
    attention_mask = torch.zeros((len(pairs), length), dtype=torch.long)
    labels = torch.full((len(pairs), length), -100)
    for row, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        ids = torch.tensor(p + c)
        input_ids[row, length - len(ids):] = ids
        attention_mask[row, length - len(ids):] = 1
        labels[row, length - len(c):] = torch.tensor(c)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)
    return input_ids, attention_mask, position_ids, labels


def warm_start(out_dir: str | Path, steps: int, batch_size: int, lr: float, warmup: int, seed: int,
               log=print, task: str = "toy") -> None:
    """Train the tiny model on teacher solutions of training pairs and `save_pretrained` it."""
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, seed=seed)
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model.train()
    start = time.time()
    for step in range(steps):
        input_ids, attention_mask, position_ids, labels = sft_batch(
            tokenizer, _sample_pairs(batch_size, rng, heldout=False, digits=TASKS[task].digits), rng, task)
        loss = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                     labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"  warm start step {step:4d}/{steps}  loss {loss.item():.4f}  ({time.time() - start:.0f}s)")
    model.eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def cache_dir() -> Path:
    return Path(os.environ.get("LAMBDAPO_CACHE", Path.home() / ".cache" / "lambdapo"))


def warm_started_model_dir(log=print, task: str = "toy", **overrides) -> Path:
    """Path of the cached warm-started toy model, training it first if the cache has none.

    The cache key hashes everything that shapes the model, so a change to any of it trains anew.
    The folder is written under a temporary name and renamed, so an interrupted warm start never
    leaves a half-written model behind.
    """
    spec = TASKS[task]
    settings = {**spec.warm_start, **overrides}
    fields = {"version": TOY_VERSION, "shape": MODEL_SHAPE, "drop": spec.drop_rate, "chars": "".join(CHARS),
              "warm_start": settings}
    if task != "toy":                        # (the toy's key predates the tasks: keep its cached model valid)
        fields.update(task=task, digits=spec.digits, every_carry=spec.every_carry)
    key = json.dumps(fields, sort_keys=True)
    path = cache_dir() / f"{task.replace('_', '-')}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    if (path / "config.json").exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    log(f"Warm-starting the toy model (once; cached in {path}) ...")
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=".warm-start-"))
    try:
        warm_start(tmp, log=log, task=task, **settings)
        os.replace(tmp, path)                # atomic: the cache entry is complete or absent
    except OSError:
        if not (path / "config.json").exists():
            raise                            # (otherwise another process finished first: keep theirs)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
