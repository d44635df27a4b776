"""Datasets -> records.

Every loader in this file returns a plain ``list[dict]`` of records of one shape:

    {
        "prompt":   str,         # the user-message text: problem + instruction (NOT chat-formatted)
        "answer":   str,         # the reference final answer the grader compares against ("18", "\\frac{1}{2}", "C")
        "solution": str | None,  # a worked reference solution (used by the ROUGE-L reward), None if the source has none
        "task":     str,         # "math" (free-form answer) or "multiple_choice" (answer is a letter A-D)
        "id":       str,         # a stable id: the source's own when it has one, else "<name>/<row index>"
    }

Why is the prompt not chat-formatted here? Because the chat template belongs to the model, not to the data:
the same record is used with Qwen3's template, with the tiny offline model's template, or with none at all.
rollout.py applies ``tokenizer.apply_chat_template`` to ``[{"role": "user", "content": prompt}]`` later.

Sources: the Hugging Face Hub through ``datasets.load_dataset`` (imported lazily, so ``import data`` stays light),
or a local ``.jsonl`` / ``.json`` / ``.parquet`` file (``data_file=``) holding the same fields, read through the
same record-building code. Hub ids used (split, fields):
    math (train)  DigitalLearningGmbH/MATH-lighteval  "default", train   problem, solution, level, type
                  (the full 7,500-problem MATH train set in one config; EleutherAI/hendrycks_math splits it in 7)
    gsm8k         openai/gsm8k                        "main", train/test  question, answer ("... #### 18")
    math500       HuggingFaceH4/MATH-500              test               problem, solution, answer, unique_id
    aime24        HuggingFaceH4/aime_2024             train              id, problem, solution, answer
    aime25        math-ai/aime25                      test               id, problem, answer (30 problems, I + II in
                  one split; opencompass/AIME2025 splits them in two configs and names the field "question": a local
                  file in either layout works, and MathArena's "problem_idx" is accepted as id)
    gpqa_diamond  Idavidrein/gpqa                     "gpqa_diamond", train  Question, Correct Answer,
                  Incorrect Answer 1..3, Explanation, Record ID  (gated: accept its terms on the Hub first)
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from typing import Any

# The common Qwen-Math / DeepSeek-R1 evaluation instruction, appended to every math problem.
MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
# Multiple choice: same spirit, the final answer is one letter in \boxed{} (rewards.py also reads "Answer: X").
MC_INSTRUCTION = "Please reason step by step, and put the letter of your final answer (A, B, C or D) within \\boxed{}."
LETTERS = "ABCD"

# name -> (Hub id, config, split) for the evaluation benchmarks; "toy" is built in (toy.py).
BENCHMARKS: dict[str, tuple[str, str | None, str] | None] = {
    "toy": None,
    "toy_hard": None,
    "math500": ("HuggingFaceH4/MATH-500", None, "test"),
    "aime24": ("HuggingFaceH4/aime_2024", None, "train"),
    "aime25": ("math-ai/aime25", None, "test"),
    "gpqa_diamond": ("Idavidrein/gpqa", "gpqa_diamond", "train"),
    "gsm8k": ("openai/gsm8k", "main", "test"),
}
MATH_TRAIN_HUB = ("DigitalLearningGmbH/MATH-lighteval", "default")
GSM8K_HUB = ("openai/gsm8k", "main")
GPQA_TERMS_URL = "https://huggingface.co/datasets/Idavidrein/gpqa"

# Field names tried, in order, when a generic dataset does not say which field is which.
PROBLEM_FIELDS = ("problem", "question", "prompt", "Question", "input", "query")
ANSWER_FIELDS = ("answer", "final_answer", "ground_truth", "gt_answer", "target", "expected_answer")
SOLUTION_FIELDS = ("solution", "reasoning", "explanation", "Explanation", "rationale", "response")
TOY_TASKS = ("toy", "toy_hard")  # the built-in tasks (toy.TASKS): a training set and a benchmark each
TOY_TRAIN_SIZE = 5000  # records made by toy.train_records when no limit is given
TOY_HELDOUT_SIZE = 200  # records made by toy.heldout_records when no limit is given


class DatasetFieldError(ValueError):
    """A requested field is not in the dataset; the message lists the fields that are."""


class DatasetLoadError(RuntimeError):
    """A dataset could not be loaded (offline, gated, missing file, unknown name)."""


# ----------------------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------------------
def seed_from(key: Any, seed: int = 0) -> int:
    """A stable 64-bit seed from any key: sha256, NOT Python's hash() (salted per process)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "big")


def last_boxed(text: str | None) -> str | None:
    """Content of the last complete \\boxed{...} / \\fbox{...} in text, nested braces kept; None if none.

    The grader's own extractor (rewards.extract_boxed), so a dataset's answer and a completion's answer are
    read the same way; imported here, on first use, to keep `import data` light (no sympy).
    "\\boxed{\\frac{1}{2}}" -> "\\frac{1}{2}". Also "\\boxed 2" (no braces, seen twice in MATH) -> "2".
    """
    if not text:
        return None
    from rewards import extract_boxed

    return extract_boxed(text)


# The gold of a worked solution (MATH train has no answer field). Its last box, except when the problem asks for
# several answers and the solution's final statement boxes each of them: "Find all points where they intersect" and
# "... the points of intersection are $\boxed{(-2,18)}$ and $\boxed{(8,38)}$" has the gold "(-2,18), (8,38)", not
# the last box alone, which the reference solution itself would fail (the grader reads the final statement's boxes as
# one answer, rewards.final_answer). A solution that boxes one answer in two forms ("$\boxed{28}$ or
# $\boxed{28_9}$" for "What is $N$, in base 9?") or one of two acceptable answers ("Enter only one of the foci")
# keeps its last box: the problem asks for one answer.
_SEVERAL_ANSWERS = re.compile(r"\b(?:all|list|separated\s+by|comma-separated)\b", re.IGNORECASE)
_ONE_ANSWER = re.compile(r"\b(?:only|just|any)\s+one\b|\beither\s+(?:one\s+)?of\b", re.IGNORECASE)
# A problem that fixes the order of its answer's parts: "first write the length of $BP$, then ...", "in increasing
# order", "from the greatest to the least", "in order of increasing $x$-coordinate", "the ordered pair". Not "in
# that order", which MATH uses for the problem's own objects ("form an arithmetic sequence, in that order").
_ORDERED = re.compile(
    r"\b(?:in|by)\s+(?:strictly\s+)?(?:increasing|decreasing|ascending|descending)\s+order\b|\bin\s+order\s+of\b"
    r"|\bordered\s+(?:pair|triple|quadruple|tuple)"
    r"|\bfrom\s+(?:the\s+)?(?:least|smallest|lowest|greatest|largest|highest)\s+to\b"
    r"|\bfirst\s+(?:write|enter|give|list|put)\b",
    re.IGNORECASE,
)
_UNORDERED = re.compile(r"\bin\s+any\s+order\b|\bnot\s+necessarily\s+in\b", re.IGNORECASE)


def solution_answer(solution: str | None, problem: str = "") -> str | None:
    """The gold answer of a worked solution (see the rule above); None without a box.

    >>> solution_answer(r"The points are $\\boxed{(-2,18)}$ and $\\boxed{(8,38)}$.", "Find all points.")
    '(-2,18), (8,38)'
    >>> solution_answer(r"In base 9 this is $\\boxed{28}$ or $\\boxed{28_9}$.", "What is $N$ in base 9?")
    '28_9'
    """
    last = last_boxed(solution)
    if last is None or not _SEVERAL_ANSWERS.search(problem) or _ONE_ANSWER.search(problem):
        return last
    from rewards import final_answer  # lazy, as in last_boxed

    return final_answer(solution) or last


def ordered_answer(answer: str, problem: str) -> str:
    """A list answer whose order the problem fixes, written as the tuple it is: "12,9" for "first write the length
    of BP, then the length of QT" becomes "(12, 9)". The grader reads a bare list as a set (a list of solutions, as
    math-verify does) and a tuple in order, so "9, 12" is wrong here and right for "Find all ...".

    >>> ordered_answer("12,9", "First write the length of $BP$, then that of $QT$.")
    '(12, 9)'
    >>> ordered_answer("12,9", "Find all $x$.")
    '12,9'
    """
    if not _ORDERED.search(problem) or _UNORDERED.search(problem):
        return answer
    from rewards import answer_parts

    parts = answer_parts(answer)
    return "(" + ", ".join(parts) + ")" if len(parts) > 1 else answer


def split_gsm8k_answer(text: str) -> tuple[str, str]:
    """GSM8K's answer field -> (solution, final answer).

    "She has 16 - 3 = <<16-3=13>>13 eggs.\\n#### 1,013" -> ("She has 16 - 3 = 13 eggs.", "1013")
    The <<calc>> annotations are calculator calls of the original data, not text a model should write.
    """
    solution, _, final = text.rpartition("####")
    solution = re.sub(r"<<[^>]*>>", "", solution).strip()
    return solution, final.strip().replace(",", "")


def math_prompt(problem: str) -> str:
    return f"{problem.strip()}\n{MATH_INSTRUCTION}"


def multiple_choice(question: str, correct: str, incorrect: list[str], key: Any, seed: int = 0) -> tuple[str, str]:
    """(prompt, answer letter): the correct option and the wrong ones shuffled by a stable per-question seed."""
    options = [correct.strip()] + [x.strip() for x in incorrect]
    order = list(range(len(options)))
    random.Random(seed_from(key, seed)).shuffle(order)
    lines = [f"{LETTERS[k]}) {options[i]}" for k, i in enumerate(order)]
    prompt = f"{question.strip()}\n\n" + "\n".join(lines) + f"\n\n{MC_INSTRUCTION}"
    return prompt, LETTERS[order.index(0)]  # where option 0 (the correct one) landed


def _field(row: dict, requested: str | None, candidates: tuple[str, ...], what: str, required: bool = True) -> str | None:
    """The field name to use: the requested one (must exist) or the first candidate present."""
    if requested is not None:
        if requested not in row:
            raise DatasetFieldError(f"field '{requested}' not in dataset (fields: {', '.join(row)})")
        return requested
    for name in candidates:
        if name in row:
            return name
    if required:
        raise DatasetFieldError(
            f"no {what} field found: tried {', '.join(candidates)} (fields: {', '.join(row)}); "
            f"name it with the {what}_field argument"
        )
    return None


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


# ----------------------------------------------------------------------------------------------------------
# raw rows: a local file or the Hub -> list[dict]
# ----------------------------------------------------------------------------------------------------------
def read_rows(path: str) -> list[dict]:
    """Rows of a local .jsonl / .json / .parquet file."""
    if not os.path.exists(path):
        raise DatasetLoadError(f"data file not found: {path}")
    if os.path.isdir(path):
        raise DatasetLoadError(f"data file {path} is a folder; give a .jsonl, .json or .parquet file")
    if path.endswith(".parquet"):
        import pyarrow as pa  # a dependency of `datasets`
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except (pa.ArrowException, OSError) as e:
            raise DatasetLoadError(f"{path}: not a readable parquet file ({str(e).splitlines()[0]})") from None
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise DatasetLoadError(f"{path}: not UTF-8 text (byte {e.start}); expected .jsonl/.json (or .parquet)") from None
    if path.endswith(".json"):
        try:
            obj = json.loads(text)
            if isinstance(obj, dict):  # {"data": [...]} or similar: the one list inside
                obj = next(v for v in obj.values() if isinstance(v, list))
            return list(obj)
        except (json.JSONDecodeError, StopIteration):
            pass  # a .json file that is really JSON Lines: fall through
    elif not path.endswith(".jsonl"):
        raise DatasetLoadError(f"unsupported data file type (use .jsonl, .json or .parquet): {path}")
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:   # a user's file: say where, not a parser traceback
            raise DatasetLoadError(f"{path}, line {number}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            raise DatasetLoadError(f"{path}, line {number}: expected a JSON object with fields, got {type(row).__name__}")
        rows.append(row)
    return rows


def hub_rows(dataset_id: str, config: str | None, split: str) -> list[dict]:
    """Rows of a Hub dataset, with a clear error when offline or gated."""
    try:
        from datasets import load_dataset

        return list(load_dataset(dataset_id, config, split=split))
    except Exception as e:  # ConnectionError, DatasetNotFoundError, gated-repo errors, ... all mean the same here
        hint = f"or pass --data_file with a local .jsonl/.json/.parquet copy ({type(e).__name__}: {e})"
        if dataset_id == BENCHMARKS["gpqa_diamond"][0]:
            raise DatasetLoadError(
                f"could not load {dataset_id} ({config}). GPQA is gated: accept its terms at {GPQA_TERMS_URL}, "
                f"then run `huggingface-cli login` or set HF_TOKEN; {hint}"
            ) from e
        raise DatasetLoadError(
            f"could not load '{dataset_id}'" + (f" config '{config}'" if config else "")
            + f" split '{split}' from the Hugging Face Hub (offline? no such dataset?); {hint}"
        ) from e


def _rows(source: str, config: str | None, split: str, data_file: str | None, limit: int | None) -> list[dict]:
    rows = read_rows(data_file) if data_file else hub_rows(source, config, split)
    return rows[:limit] if limit is not None else rows


# ----------------------------------------------------------------------------------------------------------
# record builders: one row of a source -> one record
# ----------------------------------------------------------------------------------------------------------
def math_records(rows: list[dict], name: str, problem_field: str | None = None, answer_field: str | None = None,
                 solution_field: str | None = None) -> list[dict]:
    """Free-form math rows (MATH, MATH-500, AIME, any custom set) -> records.

    Fields are mapped by the *_field arguments or guessed. A missing answer is derived from the solution's boxes
    (`solution_answer`); GSM8K-style answers ("... #### 18") are split into solution and final answer. A list
    answer whose order the problem fixes is written as a tuple (`ordered_answer`).
    """
    if not rows:
        return []
    first = rows[0]
    p = _field(first, problem_field, PROBLEM_FIELDS, "problem")
    s = _field(first, solution_field, SOLUTION_FIELDS, "solution", required=False)
    a = _field(first, answer_field, ANSWER_FIELDS, "answer", required=s is None)  # no solution: need an answer
    idf = next((k for k in ("id", "unique_id", "problem_idx", "Record ID") if k in first), None)
    records = []
    for i, row in enumerate(rows):
        solution = _text(row.get(s)) if s else None
        answer = _text(row.get(a)) if a else None
        if answer is not None and "####" in answer:  # GSM8K layout
            solution, answer = split_gsm8k_answer(answer)
        problem = str(row[p])
        if answer is None:
            answer = solution_answer(solution, problem)
        if answer is None:
            raise DatasetFieldError(f"row {i} of {name} has no answer field and no \\boxed{{}} in its solution")
        records.append({
            "prompt": math_prompt(problem),
            "answer": ordered_answer(answer.strip(), problem),
            "solution": solution,
            "task": "math",
            "id": str(row[idf]) if idf else f"{name}/{i}",
        })
    return records


def gsm8k_records(rows: list[dict], name: str = "gsm8k") -> list[dict]:
    """GSM8K: {question, answer: "worked solution ... #### 1,234"} -> answer "1234", solution without <<calc>>."""
    return math_records(rows, name, problem_field="question", answer_field="answer")


def gpqa_records(rows: list[dict], name: str = "gpqa_diamond", seed: int = 0) -> list[dict]:
    """GPQA: Question + Correct Answer + Incorrect Answer 1..3 -> a shuffled four-option prompt, answer a letter."""
    if not rows:
        return []
    fields = ["Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3"]
    for f in fields:
        _field(rows[0], f, (), f)
    records = []
    for i, row in enumerate(rows):
        key = row.get("Record ID") or row["Question"]  # the shuffle depends on the question only, not on its position
        prompt, letter = multiple_choice(row["Question"], row["Correct Answer"],
                                         [row[f"Incorrect Answer {k}"] for k in (1, 2, 3)], key, seed)
        records.append({
            "prompt": prompt,
            "answer": letter,
            "solution": _text(row.get("Explanation")),
            "task": "multiple_choice",
            "id": str(row.get("Record ID") or f"{name}/{i}"),
        })
    return records


def toy_records(n: int | None, seed: int = 0, heldout: bool = False, task: str = "toy") -> list[dict]:
    """A built-in synthetic task of toy.py, "toy" or "toy_hard" (already {prompt, answer, solution})."""
    import toy  # lazy: toy.py builds a model and a tokenizer we do not need here

    if heldout:
        rows = toy.heldout_records(n or TOY_HELDOUT_SIZE, task=task)
    else:
        rows = toy.train_records(n or TOY_TRAIN_SIZE, seed, task=task)
    return [{"task": "math", "id": f"{task}/{i}", **r} for i, r in enumerate(rows)]


# ----------------------------------------------------------------------------------------------------------
# public entry points
# ----------------------------------------------------------------------------------------------------------
def load_benchmark(name: str, data_file: str | None = None, limit: int | None = None, seed: int = 0) -> list[dict]:
    """An evaluation benchmark (see BENCHMARKS) as records; data_file reads the same layout from a local file."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark '{name}' (valid: {', '.join(BENCHMARKS)})")
    if name in TOY_TASKS:
        return toy_records(limit, seed, heldout=True, task=name)
    source, config, split = BENCHMARKS[name]
    rows = _rows(source, config, split, data_file, limit)
    if name == "gpqa_diamond":
        return gpqa_records(rows, name, seed)
    if name == "gsm8k":
        return gsm8k_records(rows, name)
    return math_records(rows, name)  # math500, aime24, aime25 (problem or question; answer as a string)


def load_train_dataset(name: str, split: str = "train", data_file: str | None = None,
                       problem_field: str | None = None, answer_field: str | None = None,
                       solution_field: str | None = None, limit: int | None = None, seed: int = 0) -> list[dict]:
    """A training set as records.

    name: "math" (MATH train, worked solutions), "gsm8k", "toy", a local .jsonl/.json/.parquet path,
    or any Hub id ("owner/dataset" or "owner/dataset:config"). data_file reads a local file in the named layout.
    Rows with an empty answer (2 MATH problems have "\\boxed{}") are dropped: no completion could be graded right.
    """
    if name in TOY_TASKS:
        return toy_records(limit, seed, task=name)
    if name == "math":
        rows = _rows(*MATH_TRAIN_HUB, split, data_file, limit)
        records = math_records(rows, name, problem_field or "problem", answer_field, solution_field or "solution")
    elif name == "gsm8k":
        rows = _rows(*GSM8K_HUB, split, data_file, limit)
        records = math_records(rows, name, problem_field or "question", answer_field or "answer", solution_field)
    else:
        if data_file is None and os.path.exists(name):
            data_file = name
        source, _, config = name.partition(":")
        rows = _rows(source, config or None, split, data_file, limit)
        label = os.path.basename(data_file) if data_file else name
        records = math_records(rows, label, problem_field, answer_field, solution_field)
    return [r for r in records if r["answer"]]
