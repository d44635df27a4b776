"""Verifiable rewards: is the completion's final answer right, and how close is it to a reference solution?

The reward of one completion o for a question with gold answer a and (optionally) a reference solution s is
(docs/design.md §1)

    r = accuracy(o, a) + α · ROUGE-L-F(o, s)          α = `rouge_weight`; α = 0 or no reference ⇒ accuracy only

* accuracy is 1.0 when the final answer is *mathematically* equivalent to the gold one ("\\frac12" = "0.5",
  "025" = "25", "3\\sqrt{2}" = "\\sqrt{18}"), else 0.0. It is the verifiable part of RLVR: cheap, exact, hard to game.
* ROUGE-L is a dense auxiliary signal. Accuracy is binary, so a group of G completions that are all wrong (or all
  right) has equal rewards and, under any group-relative advantage, gives no gradient at all. When a worked
  reference solution exists, the F-measure of the longest common subsequence between the completion and that
  solution separates "wrong but on the right track" from "wrong and lost". It is weighted by a small α so that it
  can break ties but never outweigh a correct answer. ROUGE-L must see mathematics, so we tokenize symbols too
  (see `_MathTokenizer`): with the stock tokenizer "x^2 + 1" and "x^2 - 1" would be the same text.
* Only the text after the last `</think>` is graded. Reasoning models (Qwen3, DeepSeek-R1) think first and answer
  after `</think>`; the thinking is scratch work full of tentative answers ("maybe \\boxed{3}? no..."). Grading it
  would reward guesses the model itself rejected, and ROUGE on it would reward copying the reference's style into
  scratch work. A completion that opens `<think>` and never closes it (ran out of tokens) has no answer at all.

Everything here runs on untrusted model output, so every public function is total: it never raises on strange
input, never evaluates model text as code, and runs in bounded time (linear scans, length caps, no regex that can
backtrack catastrophically, no recursion).
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import re
import signal
import threading
import time
import warnings
from fractions import Fraction
from functools import lru_cache

from math_verify import parse, verify
from rouge_score import tokenizers

# Every catch-all of this file counts what it caught. A reward of 0.0 must be a verdict, never a crashed grader
# in disguise: the tests assert that the count stays put while they grade answers wrong on purpose, and train.py
# logs the step's count as `reward/grader_errors`.
_errors = 0
_errors_lock = threading.Lock()


def grader_errors() -> int:
    """How many exceptions the grading functions have caught (and turned into 0.0 or None) in this process."""
    return _errors


def _count_error() -> None:
    global _errors
    with _errors_lock:
        _errors += 1

# ---------------------------------------------------------------------------------------------------------------
# Limits. They bound the time spent on one completion whatever the model writes.
# ---------------------------------------------------------------------------------------------------------------
MAX_ANSWER_CHARS = 300  # a final answer longer than this (all its boxes together) is not graded (MATH train: 159)
MAX_GOLD_CHARS = 1_000  # gold answers are trusted, but a cap costs nothing
MAX_PARTS = 32  # a final answer of more parts is not graded (MATH train golds: 5 at most; "divisors of 360": 24)
MAX_SEPARATOR_CHARS = 80  # two boxes further apart than this belong to two statements, never to one answer
SENTENCE_CHARS = 150  # how much of "The final answer is ..." we read when it has no $...$
FALLBACK_TAIL_CHARS = 300  # no box and no answer sentence: math_verify reads this many final chars
PARSE_TIMEOUT_S = 3  # math_verify timeouts (whole seconds: they use signal.alarm, main thread only)
VERIFY_TIMEOUT_S = 3
GRADE_BUDGET_S = PARSE_TIMEOUT_S + VERIFY_TIMEOUT_S  # a multi-part answer: all its comparisons together
# ROUGE-L's longest common subsequence is computed bit-parallel (`lcs_length`: ~0.2 ms for 1,000 x 600 tokens; the
# O(n·m) table of rouge-score takes ~0.1 s). 1,000 of our tokens cover ~99% of MATH train reference solutions
# (median 160); the cap also keeps the score equal to rouge-score's on the same capped token lists.
ROUGE_MAX_TOKENS = 1_000


# ===============================================================================================================
# The public functions (docs/design.md §2). Everything below them is how they decide: the patterns that find
# the final answer, the equivalence check (a textual fast path, then math-verify), the ROUGE-L tokenizer.
# ===============================================================================================================
def reward(
    completion: str,
    answer: str,
    reference: str | None = None,
    rouge_weight: float = 0.0,
    task: str = "math",
) -> dict[str, float]:
    """r = accuracy + rouge_weight · ROUGE-L-F(completion, reference) (docs/design.md §1), with its two parts.

    `task` is "math" (equivalence grading) or "multiple_choice" (`answer` is a letter A-D). ROUGE is only computed
    when there is a reference and rouge_weight > 0.

    >>> reward(r"\\boxed{2}", "2", reference="so 1 + 1 = 2", rouge_weight=0.1)["reward"] > 1.0
    True
    """
    if task == "math":
        accuracy = accuracy_reward(completion, answer)
    elif task == "multiple_choice":
        accuracy = multiple_choice_reward(completion, answer)
    else:  # a configuration error, not model output: fail loudly
        raise ValueError(f"unknown task {task!r}: expected 'math' or 'multiple_choice'")
    rouge = rouge_l_reward(completion, reference) if reference and rouge_weight > 0 else 0.0
    return {"reward": accuracy + rouge_weight * rouge, "accuracy": accuracy, "rouge": rouge}


def accuracy_reward(completion: str, answer: str) -> float:
    """1.0 if the final answer of `completion` (after `</think>`; see `final_answer`) is mathematically equivalent
    to `answer`, else 0.0. Never raises; bounded time per call.

    >>> accuracy_reward(r"<think>hmm</think>So $x = \\boxed{\\dfrac{1}{2}}$.", "0.5")
    1.0
    >>> accuracy_reward(r"\\boxed{25}", "025"), accuracy_reward(r"\\boxed{24}", "025")
    (1.0, 0.0)
    >>> accuracy_reward(r"$\\boxed{1}$, $\\boxed{2}$ and $\\boxed{3}$", "3, 2, 1")  # one answer in three boxes
    1.0
    >>> accuracy_reward(r"\\boxed{4} or \\boxed{3}", "3")  # a hedge: wrong, as \\boxed{3, 4} is
    0.0
    """
    try:
        return 1.0 if _is_correct(completion, answer) else 0.0
    except Exception:  # a grader bug or a sympy failure on odd input is a wrong answer, not a crashed run
        _count_error()
        return 0.0


def multiple_choice_reward(completion: str, letter: str) -> float:
    """1.0 if the last letter the completion commits to (`\\boxed{X}` or `Answer: X`) equals `letter`, else 0.0.

    A hedge commits to nothing: boxes of one statement holding different letters (`\\boxed{A} or \\boxed{B}`) or
    an answer phrase naming two (`Answer: A or B`) are wrong whatever the gold, as a hedge on a math answer is.

    >>> multiple_choice_reward("<think>A? no.</think> The answer is (c).", "C")
    1.0
    >>> multiple_choice_reward(r"Answer: B. On reflection, $\\boxed{\\text{D}}$", "B")
    0.0
    >>> multiple_choice_reward(r"$\\boxed{A}$ or $\\boxed{B}$", "B"), multiple_choice_reward("Answer: (A) or (B)", "B")
    (0.0, 0.0)
    """
    try:
        gold = str(letter).strip().strip("()").upper()
        if gold not in ("A", "B", "C", "D"):
            return 0.0
        text = strip_thinking(completion)
        candidates: list[tuple[int, str | None]] = []  # (position, letter or None for a hedge); the last one wins
        group = _box_group(text)
        if group is not None:
            letters = {_boxed_letter(content) for content in group[2]} - {None}
            if letters:  # several boxes of one statement: one letter (restated), or a hedge
                candidates.append((group[0], letters.pop() if len(letters) == 1 else None))
        for match in _ANSWER_PHRASE.finditer(text):
            found = match.group(1)
            # "the answer is a prime" is English, not option (a): a lower-case letter must not start a phrase.
            if found.islower() and _FOLLOWED_BY_WORD.match(text, match.end()):
                continue
            hedged = _SECOND_LETTER.match(text, match.end()) is not None  # "Answer: A or B"
            candidates.append((match.start(), None if hedged else found.upper()))
        if not candidates:
            return 0.0
        return 1.0 if max(candidates, key=lambda candidate: candidate[0])[1] == gold else 0.0
    except Exception:
        _count_error()
        return 0.0


def rouge_l_reward(completion: str, reference: str) -> float:
    """ROUGE-L F-measure in [0, 1] between the graded part of `completion` and `reference`; 0.0 on empty input.
    Never raises. Both texts are cut at ROUGE_MAX_TOKENS tokens. Equal to rouge-score's
    `RougeScorer(["rougeL"], tokenizer=_MathTokenizer()).score(reference, completion)` F-measure (the reference
    implementation, tested against it), with a bit-parallel LCS in place of its O(n·m) table.

    >>> rouge_l_reward("x^2 + 1", "x^2 + 1")
    1.0
    >>> round(rouge_l_reward("x^2 + 1", "x^2 - 1"), 3)  # LCS "x ^ 2 1": 4 of 5 tokens
    0.8
    """
    try:
        prediction = strip_thinking(completion)
        if not isinstance(reference, str) or not prediction.strip() or not reference.strip():
            return 0.0
        score = _rouge_l_f(prediction, reference)
        return float(min(1.0, max(0.0, score)))
    except Exception:
        _count_error()
        return 0.0


def final_answer(completion: str) -> str | None:
    r"""The final answer that `accuracy_reward` grades: the boxes of the final statement (several boxes joined by
    separators are one answer), an explicit "final answer" sentence after the last box, or without any box the last
    answer sentence. Only the text after `</think>` counts. None when the completion states no answer this way
    (`accuracy_reward` then lets math-verify read the last FALLBACK_TAIL_CHARS characters, as it always did).

    >>> final_answer(r"so $$\boxed{(2, 2)} \quad \text{and} \quad \boxed{(6, 2)}$$")
    '(2, 2), (6, 2)'
    >>> final_answer(r"First \boxed{200}, then more work: \boxed{255}. Final Answer: The final answer is $10,455$.")
    '10,455'
    >>> final_answer(r"<think>\boxed{3}?</think>x = \boxed{3}, so y = \boxed{4}.")
    '4'
    >>> final_answer("The final answer is $14,916$. Note: " + "a long note. " * 50)
    '14,916'
    """
    try:
        answers = _final_answers(strip_thinking(completion))
        return ", ".join(answers) if answers else None
    except Exception:  # total, like every public function here
        _count_error()
        return None


def answer_parts(answer: str) -> list[str]:
    r"""The parts of one answer as the grader reads them: split at top-level commas, semicolons, "and" and "or";
    a bracketed tuple, interval or set stays one part, and so does digit grouping. [] when there is nothing.

    >>> answer_parts(r"2, 3, \text{ and } 4"), answer_parts("(2, 2); (6, 2)"), answer_parts("10,455")
    (['2', '3', '4'], ['(2, 2)', '(6, 2)'], ['10,455'])
    """
    try:
        return _split_parts(answer) if isinstance(answer, str) else []
    except Exception:
        _count_error()
        return []


def extract_boxed(text: str) -> str | None:
    """Content of the last complete `\\boxed{...}` (or `\\fbox{...}`, `\\framebox{...}`, `\\boxed 5`), else None.

    Nested braces are kept; a box whose braces never close is not complete and is skipped (a lone one gives None).

    >>> extract_boxed(r"so $x = \\boxed{\\frac{1}{2}}$")
    '\\\\frac{1}{2}'
    >>> extract_boxed(r"\\boxed{1} then \\fbox{2}")
    '2'
    >>> extract_boxed(r"\\boxed 5$.")
    '5'
    >>> extract_boxed(r"\\boxed{\\frac{1}{2}") is None
    True
    """
    if not isinstance(text, str):
        return None
    found = _last_boxed(text)
    return None if found is None else found[1]


def strip_thinking(text: str) -> str:
    """The part of a completion that is graded: the text after the last `</think>`.

    No `</think>` at all means a model that does not think (or a template that hides the tags): the whole text is
    the answer. But a `<think>` that is opened and never closed means the model was cut off mid-thought (or
    reopened thinking after answering): there is no final answer, and we return "" rather than grade scratch work.

    >>> strip_thinking("<think>maybe 3</think>The answer is 4.")
    'The answer is 4.'
    >>> strip_thinking("The answer is 4.")
    'The answer is 4.'
    >>> strip_thinking("<think>maybe 3, or")
    ''
    """
    if not isinstance(text, str):
        return ""
    end = text.rfind("</think>")
    tail = text if end < 0 else text[end + len("</think>") :]
    if "<think>" in tail:  # thinking opened after the last close (or never closed): unfinished
        return ""
    return tail


def score_completions(
    completions: list[str],
    answers: list[str],
    references: list[str | None] | None = None,
    rouge_weight: float = 0.0,
    task: str | list[str] = "math",
    workers: int | None = None,
) -> list[dict[str, float]]:
    """`reward` for each (completion, answer, reference[, task]) in order, graded across processes.

    `task` is one task for all, or one per completion. `workers`: processes that grade (None or 0: every core
    this process may use, once the batch has PARALLEL_MIN_COMPLETIONS completions; 1: a plain loop here). A
    1,000-token MATH completion costs a few ms to grade, so 256 of them keep one core busy for a second or more
    while the GPU waits; the workers are forked once and reused. Each worker grades in its own main thread, so
    math-verify's SIGALRM timeouts bound every completion there as they do here, and a worker stuck past
    HARD_TIMEOUT_S per completion is killed: its completions score 0 and count as grader errors. The result is
    the same list a plain loop returns.

    >>> score_completions([r"\\boxed{1}", r"\\boxed{2}"], ["1", "1"], workers=1) == [reward(r"\\boxed{1}", "1"), reward(r"\\boxed{2}", "1")]
    True
    """
    n = len(completions)
    if references is None:
        references = [None] * n
    tasks = [task] * n if isinstance(task, str) else list(task)
    if not (n == len(answers) == len(references) == len(tasks)):
        raise ValueError(f"lengths differ: {n} completions, {len(answers)} answers, "
                         f"{len(references)} references, {len(tasks)} tasks")
    for name in set(tasks) - {"math", "multiple_choice"}:      # a configuration error: say it here, not in a worker
        raise ValueError(f"unknown task {name!r}: expected 'math' or 'multiple_choice'")
    items = [(completion, answer, reference, rouge_weight, kind)
             for completion, answer, reference, kind in zip(completions, answers, references, tasks)]
    workers = _worker_count(workers, n)
    if workers <= 1:
        return [reward(*item) for item in items]
    return _score_in_processes(items, workers)


# ===============================================================================================================
# Internals
# ===============================================================================================================
# ---------------------------------------------------------------------------------------------------------------
# Where is the answer?
# ---------------------------------------------------------------------------------------------------------------
# `\boxed`, `\fbox` and `\framebox` (AoPS solutions use the last), not followed by a letter (so not `\boxedfoo`).
_BOX_COMMAND = re.compile(r"\\(?:boxed|fbox|framebox)(?![A-Za-z])")
# The only tokens that matter for brace matching: an escaped character (`\{`, `\}`, `\\` are not grouping braces)
# and the braces themselves. `finditer` with this pattern is one linear pass, no backtracking.
_BRACE_TOKEN = re.compile(r"\\.|[{}]", re.DOTALL)
_SPACES = re.compile(r"\s*")
_BARE_TOKEN = re.compile(r"[^\s$]+")  # `\boxed 5$`: the token after `\boxed `, up to a space or a `$`


def _boxes_backwards(text: str):
    """Yield (start, end, content) of every complete box in `text`, from the last box command to the first.

    Linear time: one pass matches every brace with an explicit stack (no recursion, so deep nesting is fine), then
    the box commands are tried from the last one backwards, each in O(1) (plus its own leading whitespace).
    Trying each `\\boxed{` with its own forward scan would be quadratic on "\\boxed{" * 100_000. A generator, so
    that a caller who needs only the last box (or the last few) does no more than that.
    """
    commands = list(_BOX_COMMAND.finditer(text))
    if not commands:
        return
    close_of: dict[int, int] = {}  # position of "{" -> position of its matching "}"
    open_braces: list[int] = []
    # Braces before the first box cannot be the start of a box's group; a stray "}" with an empty stack closes
    # something before the first box and is ignored, which leaves every later match unchanged.
    for token in _BRACE_TOKEN.finditer(text, commands[0].end()):
        if token.group() == "{":
            open_braces.append(token.start())
        elif token.group() == "}" and open_braces:
            close_of[open_braces.pop()] = token.start()
    for command in reversed(commands):
        after = command.end()
        i = _SPACES.match(text, after).end()
        if i < len(text) and text[i] == "{":
            close = close_of.get(i)
            if close is not None:
                yield command.start(), close + 1, text[i + 1 : close]
        elif after < i < len(text) and text[i] != "\\":  # "\boxed 5": whitespace, then a bare token
            token = _BARE_TOKEN.match(text, i)
            content = token.group().rstrip(".,;:") if token else ""
            if content:
                yield command.start(), i + len(content), content


def _last_boxed(text: str) -> tuple[int, str] | None:
    """(start position, content) of the last complete box in `text`, or None. See `extract_boxed`."""
    for start, _, content in _boxes_backwards(text):
        return start, content
    return None


# ---------------------------------------------------------------------------------------------------------------
# What is the final answer? (several boxes, late answer sentences)
# ---------------------------------------------------------------------------------------------------------------
# `extract_boxed` keeps its one rule, the last box: that is what a dataset's reference solution needs. Grading a
# model needs three more. Each follows math-verify (the field's grader; read in math_verify 0.9.0's parser.py and
# latex2sympy2_extended's `extract_boxed_content`), except where its convention would accept a wrong answer:
#
# 1. Several boxes in one final statement are ONE answer: "$\boxed{(2, 2)} \quad \text{and} \quad \boxed{(6, 2)}$"
#    answers "(2, 2), (6, 2)". math-verify joins a box to the next one when fewer than 10 characters of anything, or
#    fewer than 70 with a comma, ";", "and" or "or" among them, stand between. We join only when EVERY character
#    between is a separator (`_SEPARATOR_TOKEN`): "x = \boxed{3}, so y = \boxed{4}" is a result and then another
#    result, not a two-part answer. Like math-verify, the joined boxes form a collection and "or" joins too, so that
#    "\boxed{3} or \boxed{4}" is the two-valued answer {3, 4}: right for gold "3, 4", a hedge (wrong) for gold "3".
# 2. An explicit "final answer" sentence after the last box overrides it ("\boxed{200} ... \boxed{255} ... Final
#    Answer: The final answer is $10,455$."). math-verify gives "final answer ... is" the same priority as a box and
#    takes the rightmost; we do the same, only when the sentence states something that looks like math ("The final
#    answer is boxed above." leaves the box standing). A bare "answer:" after a box does not override it, as in
#    math-verify, which ranks it below boxes.
# 3. Without a box: the last "final answer is/:" sentence anywhere in the graded text, else the last "answer is/:"
#    sentence (math-verify's order of priority), however long the text after it. Without either, grading falls back
#    to math-verify on the last FALLBACK_TAIL_CHARS characters, as before (but a hedge in the closing line, "so it
#    is 3 or 4", is no answer: math-verify would read its last number).
# 4. Boxes may also stand apart by the unit word of the first one: "\boxed{1} papers and \boxed{2} bins" answers
#    "1, 2", as in math-verify. One or two words right after a box, then a separator that joins (a comma, ";", "and",
#    "or"), and never a word that carries the sentence on ("\boxed{3} is wrong, so \boxed{4}": `_NOT_UNIT`). This
#    only ever makes a single-valued gold harder to meet ("\boxed{3} apples or \boxed{4} apples" is a hedge), and a
#    list gold is met only when every part is right.
# 5. A closing "Final Answer:" sentence of plain prose with no "is" states its one number ("Final Answer: Jane started
#    growing Sphere 3 hours ago." answers 3), as math-verify reads it. Exactly one number, no relation, no hedge and
#    no negation in the sentence; anything else there ("4 because 2 + 3 = 5") is still no answer.

# What may stand between two boxes of one statement. `_only_separators` deletes these tokens and checks that nothing
# but whitespace is left; every quantifier is bounded and it never sees more than MAX_SEPARATOR_CHARS characters.
_SEPARATOR_TOKEN = re.compile(
    r"\\(?:q?quad|text|textbf|textrm|textit|mathrm|mbox)(?![A-Za-z])|\\[,;:! ]"  # spacing and text commands
    r"|\\[()\[\]]|\\\\|[{}$,;:&~*]"  # math delimiters, line breaks, the braces of \text{...}, punctuation, **bold**
    r"|\b(?:and|or|either|maybe|perhaps|possibly)\b"  # hedge words join too, so that a hedge is seen whole
    r"|(?:\bfor\s{1,3})?(?:\bpart\s{0,3})?\(\s{0,3}(?:[a-h]|[ivx]{1,4})\s{0,3}\)|\bpart\s{1,3}[a-h]\b"  # "for part (a)"
    # a label: "y =", "x_2 =", "\theta ="
    r"|(?<![\w\\])(?:[A-Za-z]{1,2}|\\[A-Za-z]{2,6})(?:_\{?\w{1,3}\}?)?\s{0,3}=(?!=)",
    re.IGNORECASE,
)


def _only_separators(between: str) -> bool:
    r"""True when `between` (the text between two boxes) holds nothing but separators and short labels.

    >>> _only_separators(r"} \quad \text{and} \quad $$ $$"), _only_separators(r"$ for part (a) and $y_2 = ")
    (True, True)
    >>> _only_separators(", so y = "), _only_separators(". Then we add ")
    (False, False)
    """
    return len(between) <= MAX_SEPARATOR_CHARS and not _SEPARATOR_TOKEN.sub("", between).strip()


# Rule 4: the unit words that may follow a box before the separator. Words that carry a sentence on are never units.
# Before the unit: the end of the box's math ("$", "\)", "}"), then maybe a text command: "$\boxed{1}$ papers",
# "\boxed{1} \text{ papers".
_UNIT_START = re.compile(r"(?:\s|\$|\\[)\]]|\}){0,8}(?:\\(?:text|textrm|mathrm|mbox)\s{0,3}\{)?\s{0,3}")
_UNIT_WORD = re.compile(r"[A-Za-z]{1,15}(?![A-Za-z])\s{0,3}")
_NOT_UNIT = frozenset(
    "and or either maybe perhaps possibly so then thus hence therefore but because since as is are was were be been "
    "not no which that this it its gives give yields we get if when where while with for of to from by at in on the "
    "a an wrong right correct incorrect also only".split()
)
_JOINER = re.compile(r"[,;]|(?<![A-Za-z])(?:and|or)(?![A-Za-z])", re.IGNORECASE)
_OR_WORD = re.compile(r"(?<![A-Za-z\\])or(?![A-Za-z])", re.IGNORECASE)  # alternatives, not a list


def _joins(between: str) -> bool:
    r"""Do two boxes (or math spans) with `between` between them state one answer? Separators only, or rule 4's
    unit words followed by a separator that joins.

    >>> _joins(" papers and "), _joins(r" \text{ cm}, "), _joins("$ apples or $"), _joins(r"\) cm and \(")
    (True, True, True, True)
    >>> _joins(" is wrong, so "), _joins(" cm, and then "), _joins("$. Apples or $")
    (False, False, False)
    """
    if _only_separators(between):
        return True
    i, words = _UNIT_START.match(between).end(), 0
    while words < 2 and (word := _UNIT_WORD.match(between, i)) and word.group().strip().lower() not in _NOT_UNIT:
        i, words = word.end(), words + 1
    rest = between[i:]
    return words > 0 and _JOINER.search(rest) is not None and _only_separators(rest)


class _Parts(list):
    """The strings of one final answer (one per box or math span), and whether an "or" stood between two of them:
    "\boxed{1} or \boxed{2}" lists alternatives, never the ordered pair (1, 2)."""

    alternatives = False


# "The final answer is $10,455$", "**Final Answer:** 7", "the answers are $1$ and $2$". The `{0,40}?` gap admits
# "final answer to part (b) is"; bounded, so each anchor costs O(40) and a scan of the whole text stays linear.
_FINAL_ANSWER = re.compile(r"\bfinal\s{1,3}answers?\b[^\n$]{0,40}?(?:\bis\b|\bare\b|:)", re.IGNORECASE)
_ANSWER_IS = re.compile(r"\banswers?\b[^\n$]{0,20}?(?:\bis\b|\bare\b|:)", re.IGNORECASE)
_ANSWER_LEAD = re.compile(r"[\s*:\"']{0,12}")  # between "is" and the answer: spaces, a colon, **bold**, quotes
_VERB = re.compile(r"\b(?:is|are|equals)\b")
# A math span right after the anchor: $...$, $$...$$, \(...\), \[...\] (bounded, lazy: the first closing delimiter).
_MATH_SPAN = re.compile(r"\$\$(.{1,300}?)\$\$|\$([^$\n]{1,300}?)\$|\\\((.{1,300}?)\\\)|\\\[(.{1,300}?)\\\]", re.DOTALL)
_MATH_SPAN_START = re.compile(r"\$|\\[(\[]")
_SENTENCE_END = re.compile(r"\.(?!\d)|\n")  # a period that is not a decimal point, or a line break
# The first word of prose in a plain-text answer ("5 apples", "4 because ..."): three letters or more, not a
# command (\frac), not a function name (sqrt), not a separator or hedge word (those must stay visible).
_PROSE_WORD = re.compile(
    r"(?<![\\A-Za-z])(?!(?:and|sqrt|sin|cos|tan|cot|sec|csc|log|exp|mod|infty|either|maybe|perhaps|possibly)"
    r"(?![A-Za-z]))[A-Za-z]{3,}"
)
_DIGIT = re.compile(r"\d")
_MATHY_START = re.compile(r"[-+\d.(\[\\]")  # what a plain-text answer that overrides a box must start with


def _math_spans(text: str, i: int) -> list[str] | None:
    """The math spans from position i on, joined by separators only ("$1$, $2$ and $3$" -> ["1", "2", "3"]);
    None when no span starts at i."""
    span = _MATH_SPAN.match(text, i)
    if not span:
        return None
    answers = _Parts([next(group for group in span.groups() if group is not None)])
    end = span.end()
    while len(answers) <= MAX_PARTS:
        start = _MATH_SPAN_START.search(text, end, end + MAX_SEPARATOR_CHARS + 1)
        following = _MATH_SPAN.match(text, start.start()) if start else None
        if not following or not _joins(text[end : start.start()]):
            break
        answers.alternatives |= _OR_WORD.search(text, end, start.start()) is not None
        answers.append(next(group for group in following.groups() if group is not None))
        end = following.end()
    answers[:] = [answer.strip() for answer in answers if answer.strip()]
    return answers


def _answer_sentence(text: str, anchor: re.Pattern, pos: int = 0, math_only: bool = False) -> list[str] | None:
    """What the last `anchor` sentence at or after `pos` states as the answer: its math spans joined by separators
    ("$k = 45$ and $n = 2$" -> ["k = 45", "n = 2"]), else its plain text up to the end of the sentence. [] when the
    sentence is there but states nothing gradable; None when there is no such sentence (or, with `math_only`, when
    it states no math).
    """
    found = None
    for found in anchor.finditer(text, pos):  # one linear scan; the last one wins
        pass
    if found is None:
        return None
    i = _ANSWER_LEAD.match(text, found.end()).end()
    spans = _math_spans(text, i)
    if spans is not None:
        return spans
    stop = _SENTENCE_END.search(text, i, i + SENTENCE_CHARS)
    end = stop.start() if stop else min(len(text), i + SENTENCE_CHARS)
    # "Final Answer: The largest $n$ is 34.": a sentence that opens with prose states its answer after its first
    # "is" (the first: in "the answer is 4 because 2 + 3 is 5" the answer is 4, and the prose after it is caught below).
    verb = _VERB.search(text, i, end) if _PROSE_WORD.match(text, i) else None
    if verb:
        i = _ANSWER_LEAD.match(text, verb.end(), end).end()
        spans = _math_spans(text, i)
        if spans is not None:
            return spans
    plain = text[i:end].strip().strip("*").strip()
    word = _PROSE_WORD.search(plain)
    if word:
        if _DIGIT.search(plain, word.start()):  # "4 because 2 + 3 = 5", "3, but it could be 4": not one answer
            if math_only:
                return None
            # Rule 5: a sentence of prose that states one number, "Jane started growing Sphere 3 hours ago".
            lone = _lone_number(plain) if word.start() == 0 else None
            return [lone] if lone else []
        plain = plain[: word.start()] or word.group()  # "5 apples" -> "5"; "Evelyn" stays "Evelyn"
    plain = plain.rstrip(" ,;:")
    if math_only and not _MATHY_START.match(plain):
        return None
    return [plain] if plain else []


# Rule 5: what a sentence that states one number may not hold besides it: math, a relation, a hedge, a negation,
# an approximation. `_NUMBER_RUN` counts every number; `_CLEAN_NUMBER` is the one that may be the answer.
_LONE_BLOCKER = re.compile(
    r"[=<>^\\{}$]|n't\b|(?<![A-Za-z])(?:not|no|never|cannot|or|maybe|perhaps|possibly|about|approximately|around"
    r"|nearly|almost|between|either)(?![A-Za-z])",
    re.IGNORECASE,
)
_NUMBER_RUN = re.compile(r"\d+(?:[.,/]\d+)*")
_CLEAN_NUMBER = re.compile(r"(?<![\w.,/-])-?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?(?![\w.,/])")


def _lone_number(sentence: str) -> str | None:
    """The one number a prose sentence states, else None.

    >>> _lone_number("Jane started growing Sphere 3 hours ago"), _lone_number("Rod grew for 8 hours, Sphere for 3")
    ('3', None)
    >>> _lone_number("It is not 3"), _lone_number("About 3 hours"), _lone_number("The 3rd one")
    (None, None, None)
    """
    if _LONE_BLOCKER.search(sentence) or len(_NUMBER_RUN.findall(sentence)) != 1:
        return None
    found = _CLEAN_NUMBER.findall(sentence)
    return found[0] if len(found) == 1 else None


def _box_group(text: str) -> tuple[int, int, _Parts] | None:
    """The last box and the boxes joined to it (rule 1, rule 4): (start of the first, end of the last, their
    contents in order), or None without a box. Multiple choice reads the same group."""
    boxes = _boxes_backwards(text)
    last = next(boxes, None)
    if last is None:
        return None
    start, end, content = last
    contents = _Parts([content])
    for box_start, box_end, box_content in boxes:  # backwards, while only separators stand between
        if box_end > start or start - box_end > MAX_SEPARATOR_CHARS or len(contents) > MAX_PARTS:
            break  # a box nested in the later one, a new statement, or more parts than any answer has
        between = text[box_end:start]
        if not _joins(between):
            break
        contents.alternatives |= _OR_WORD.search(between) is not None
        contents.append(box_content)
        start = box_start
    contents.reverse()
    return start, end, contents


def _final_answers(text: str) -> list[str] | None:
    """The final answer of the graded text, as what the model wrote for it (one string per box or per math span);
    [] when it states an answer that cannot be graded; None when it commits to no answer (see the rules above)."""
    group = _box_group(text)
    if group is None:
        for anchor in (_FINAL_ANSWER, _ANSWER_IS):
            answers = _answer_sentence(text, anchor)
            if answers is not None:
                return answers
        return None
    late = _answer_sentence(text, _FINAL_ANSWER, pos=group[1], math_only=True)
    return late if late else group[2]


# ---------------------------------------------------------------------------------------------------------------
# Is the answer right? (math)
# ---------------------------------------------------------------------------------------------------------------
_LEFT_RIGHT = re.compile(r"\\(?:left|right)(?![A-Za-z])")
_THIN_SPACES = re.compile(r"\\[!,;: ]")
_DEGREES = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|°")
_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|textrm|textit|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")
_PARENTHESISED_ATOM = re.compile(r"\((\w+)\)")  # "(C)" -> "C", "(113)" -> "113"
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")
_THOUSANDS = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")


def _normalize(answer: str) -> str:
    """Light, purely textual normalisation for the fast path: things that never change the value.

    >>> _normalize(r" \\left( 3, \\dfrac{\\pi}{2} \\right). ")
    '(3,\\\\frac{\\\\pi}{2})'
    >>> _normalize(r"\\text{(C)}"), _normalize(r"90^\\circ"), _normalize(r"\\$1,\\!000")
    ('C', '90', '1,000')
    """
    s = answer.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = _LEFT_RIGHT.sub("", s)
    s = _THIN_SPACES.sub("", s)
    s = _DEGREES.sub("", s)
    s = _TEXT_WRAPPER.sub(r"\1", s)
    s = s.replace("\\$", "").replace("$", "").replace("\\%", "").replace("%", "")
    s = "".join(s.split())  # all whitespace: "p - q" == "p-q"
    s = s.rstrip(".")
    s = _PARENTHESISED_ATOM.fullmatch(s).group(1) if _PARENTHESISED_ATOM.fullmatch(s) else s
    return s


def _as_number(s: str) -> Fraction | None:
    """A plain decimal literal as an exact number ("025" -> 25, "1,000" -> 1000, "0.50" -> 1/2), else None."""
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    if not _NUMBER.fullmatch(s):
        return None
    return Fraction(s)


def _quick_verdict(pred: str, gold: str) -> bool | None:
    """Decide without sympy when we can: equal after normalisation -> True; two plain numbers -> compare them.

    Returns None when only a symbolic check can tell ("\\frac12" vs "0.5", "3\\sqrt2" vs "\\sqrt{18}").
    """
    if len(_split_parts(pred)) != len(_split_parts(gold)):  # "32, 349" is a list, "32,349" a number: no shortcut
        return None
    p, g = _normalize(pred), _normalize(gold)
    if p == g:
        return True
    if g.isalpha() and p.casefold() == g.casefold():  # "\text{Evelyn}" vs "evelyn"
        return True
    p_num, g_num = _as_number(p), _as_number(g)
    if p_num is not None and g_num is not None:
        return p_num == g_num
    p_clock, g_clock = _clock_minutes(p), _clock_minutes(g)
    if p_clock is not None and g_clock is not None and (p_clock[1] or g_clock[1]):  # one of them says a.m./p.m.
        return p_clock[0] == g_clock[0]
    return None


_CLOCK = re.compile(r"(\d{1,2}):(\d{2})(?:([ap])\.?m\.?)?", re.IGNORECASE)


def _clock_minutes(s: str) -> tuple[int, bool] | None:
    """A time of day ("20:34", "8:34p.m.", normalised) as (minutes after midnight, whether it said a.m./p.m.), else
    None. "20:34" and "8:34 p.m." are one time (a MATH solution boxes both); a bare "8:34" is read on the 24-hour
    clock, so it is not "8:34 p.m.", and two bare times are left to the text ("1:20" may be a ratio).

    >>> _clock_minutes("20:34"), _clock_minutes("8:34p.m"), _clock_minutes("12:05a.m."), _clock_minutes("13:05pm")
    ((1234, False), (1234, True), (5, True), None)
    """
    clock = _CLOCK.fullmatch(s)
    if not clock:
        return None
    hours, minutes, half = int(clock.group(1)), int(clock.group(2)), clock.group(3)
    if minutes > 59 or hours > 23 or (half and not 1 <= hours <= 12):
        return None
    if half:
        hours = hours % 12 + (12 if half.lower() == "p" else 0)
    return hours * 60 + minutes, bool(half)


# sympy evaluates integer powers and factorials eagerly: "9^{9^{9^9}}" is a few characters and a computation that
# never ends (until the math_verify timeout in the main thread, forever in any other thread). A correct answer to a
# competition problem never looks like this, so such predictions are graded by the textual fast path only.
_EXPLOSIVE = re.compile(
    r"\^\s*\{[^{}]*[\^!]"  # power tower / factorial inside an exponent: a^{b^c}, a^{b!}
    r"|\^\s*\{?\s*\(?\s*\d{6,}"  # huge literal exponent: 999999^{999999} takes seconds
    r"|\d\s*\^\s*\d+\s*\^"  # chained powers without braces: 9^9^9
    r"|\*\*[^*]*\*\*"  # the same with Python's **
    r"|\d{6,}\s*!|[)}]\s*!|!\s*!"  # huge factorials: 1000000!, (10!)!, 5!!
)
_BINOMIAL = re.compile(r"\\binom|\\choose")
_BIG_ARGUMENT = re.compile(r"\d{5,}|\^")  # binomials are only slow with huge arguments: \binom{10^9}{...}
# Integer powers with 3-5 digit exponents are instant, but symbolic ones are expanded: (x+1)^{1000} takes 5 s.
_LONG_EXPONENT = re.compile(r"\^\s*\{?\s*\(?\s*\d{3,}")
_LETTER = re.compile(r"[A-Za-z]")


def _is_explosive(text: str) -> bool:
    """True for the (short) expressions that can keep sympy busy for seconds or forever."""
    if _EXPLOSIVE.search(text):
        return True
    if _BINOMIAL.search(text) and _BIG_ARGUMENT.search(text):
        return True
    return _LONG_EXPONENT.search(text) is not None and _LETTER.search(text) is not None


def _timeouts() -> tuple[int | None, int | None]:
    """math_verify's timeouts use SIGALRM, which Python only allows in the main thread. Anywhere else (a thread
    pool grading rewards, a data-loader worker thread) we disable them; the length caps and `_is_explosive` then
    bound the time instead."""
    if threading.current_thread() is threading.main_thread():
        return PARSE_TIMEOUT_S, VERIFY_TIMEOUT_S
    return None, None


def _without_dollars(answer: str) -> str:
    """Currency signs ("\\$3.54") and math delimiters would break the "$\\boxed{...}$" we hand to math_verify."""
    return answer.replace("\\$", "").replace("$", "")


@lru_cache(maxsize=4096)
def _parse_gold(gold: str, parsing_timeout: int | None) -> tuple:
    """Parse a gold answer once (the G completions of a prompt share it). Gold answers are bare LaTeX
    ("\\frac{14}{3}"), so we wrap them in a box for math_verify's LaTeX extractor; if that finds nothing we let it
    try the plain string (e.g. expressions it reads without LaTeX)."""
    parsed = parse("$\\boxed{" + _without_dollars(gold) + "}$", parsing_timeout=parsing_timeout)
    if not parsed:
        parsed = parse(gold, parsing_timeout=parsing_timeout)
    return tuple(parsed)


def _symbolically_equal(gold: str, pred_text: str) -> bool:
    """math_verify: parse both sides with sympy and compare (numbers, sets, intervals, equations, matrices...)."""
    parsing_timeout, verify_timeout = _timeouts()
    gold_parsed = _parse_gold(gold, parsing_timeout)
    pred_parsed = parse(pred_text, parsing_timeout=parsing_timeout)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(list(gold_parsed), pred_parsed, timeout_seconds=verify_timeout))


# ---- one answer in several parts ----------------------------------------------------------------------------
# A separator written as text inside an answer: "2, 3, \text{ and } 4", "6, 8\text{, and }10".
_WRAPPED_SEPARATOR = re.compile(
    r"\\(?:text|textbf|textrm|textit|mathrm|mbox)\s{0,3}\{\s{0,5}(?:,\s{0,5}(?:and|or)?|and|or)\s{0,5}\}", re.IGNORECASE
)
_CONJUNCTION = re.compile(r"(?:and|or)(?![A-Za-z])", re.IGNORECASE)
# Digit grouping is one number, not a list: "10,455", "1,\!000", "1{,}008{,}016", "14 {, }916" (math-verify's
# convention too, which also reads "32, 349", with a space after the comma, as two numbers).
_GROUPING_MARK = re.compile(r"\{\s{0,3},\s{0,3}\}|\\!\s{0,3}")
_GROUPED_NUMBER = re.compile(r"\s*(?:\\?\$)?\s*[+-]?\d{1,3}(?: ?,\d{3})+(?:\.\d+)?\s*")
_EDGE_SPACING = re.compile(r"^(?:\s|\\q?quad(?![A-Za-z])|\\[,;:! ]|\$)+|(?:\s|\\q?quad(?![A-Za-z])|\\[,;:! ]|\$)+$")
# A hedge inside one part, "3 (or maybe 4)": math-verify would read the last number. Never an answer of ours,
# unless the gold itself says "or".
_HEDGE_WORD = re.compile(r"(?<![A-Za-z\\])(?:or|maybe|perhaps|possibly)(?![A-Za-z])", re.IGNORECASE)
# A single gold that is itself a collection: "\pm 2", "\{1, 2\}".
_GOLD_COLLECTION = re.compile(r"\\pm|\\mp|\\\{")
# "k = 45", "x_2 = 3", "AB=9": a part that names what it is.
_LABEL = re.compile(r"\s*(?:[A-Za-z]{1,2}|\\[A-Za-z]{2,6})(?:_\{?\w{1,3}\}?)?\s{0,3}=(?!=)")


def _split_parts(answer: str) -> list[str]:
    r"""The parts of one answer: split at top-level commas, semicolons, "and" and "or" (not inside (), [], {}).

    A bare comma list is a collection, as in math-verify (which reads "\boxed{1, 2, 3}" as a set). An ordered
    answer is written inside brackets ("(2, 2)", "[0, 1)"), and stays one part.

    >>> _split_parts(r"(2, 2), (6, 2)"), _split_parts(r"2, 3, \text{ and } 4"), _split_parts(r"x = 1 or x = -1")
    (['(2, 2)', '(6, 2)'], ['2', '3', '4'], ['x = 1', 'x = -1'])
    >>> _split_parts(r"10,\!455"), _split_parts(r"[0, 1) \cup (2, 3]"), _split_parts(r"\{1, 2\}")
    (['10,\\!455'], ['[0, 1) \\cup (2, 3]'], ['\\{1, 2\\}'])
    """
    text = _WRAPPED_SEPARATOR.sub(",", answer)
    if _GROUPED_NUMBER.fullmatch(_GROUPING_MARK.sub(lambda m: "," if "," in m.group() else "", text)):
        return [answer.strip()]
    parts, depth, start, i = [], 0, 0, 0
    while i < len(text):  # one pass; a depth counter, not a recursive parser
        char = text[i]
        if char == "\\":  # a command ("\cup", skipped whole so its letters are never "or") or an escape ("\{")
            j = i + 1
            while j < len(text) and text[j].isalpha():
                j += 1
            if j == i + 1 and j < len(text):  # an escaped character: "\{" and "\}" group like braces
                depth = depth + 1 if text[j] == "{" else max(0, depth - 1) if text[j] == "}" else depth
                j += 1
            i = j
            continue
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth = max(0, depth - 1)  # "[0, 1)": any closing bracket closes
        elif depth == 0 and char in ",;":
            parts.append(text[start:i])
            start = i + 1
        elif depth == 0 and char.isalpha() and (i == 0 or not text[i - 1].isalpha()):
            conjunction = _CONJUNCTION.match(text, i)
            if conjunction:
                parts.append(text[start:i])
                start = i = conjunction.end()
                continue
        i += 1
    parts.append(text[start:])
    parts = [_EDGE_SPACING.sub("", part).rstrip(".") for part in parts]
    return [part for part in parts if part]


_SET_LITERAL = re.compile(r"\s*(?:\\left\s*)?\\?\{(.*?)(?:\\right\s*)?\\?\}\s*", re.DOTALL)


def _set_elements(answer: str) -> list[str] | None:
    r"""The elements of an answer written as one set literal ("\{1, 2\}", "\left\{ 1, 2 \right\}", "{1,2}"),
    else None. The outer braces must be one pair: "\{1\} \cup \{2\}" is not a set literal.

    >>> _set_elements(r"\left\{ 1, 2 \right\}"), _set_elements(r"\{1\} \cup \{2\}"), _set_elements("{1,2,3}")
    (['1', '2'], None, ['1', '2', '3'])
    """
    literal = _SET_LITERAL.fullmatch(answer)
    if not literal:
        return None
    depth = 0
    for brace in re.findall(r"[{}]", literal.group(1)):  # "\{" and "\}" count too: they nest the same way
        depth += 1 if brace == "{" else -1
        if depth < 0:
            return None
    parts = _split_parts(literal.group(1)) if depth == 0 else []
    return parts if len(parts) > 1 else None


_TUPLE_LITERAL = re.compile(r"\s*(?:\\left\s*)?\((.*?)(?:\\right\s*)?\)\s*", re.DOTALL)


def _tuple_elements(answer: str) -> list[str] | None:
    r"""The elements of an answer written as one tuple ("(12, 9)", "\left( 3, \frac{\pi}{2} \right)"), else None:
    an ordered gold, whose parts must come in its order. The outer parentheses must be one pair: "(1, 2), (3, 4)" is
    a list of two tuples, not a tuple.

    >>> _tuple_elements("(12, 9)"), _tuple_elements("(1, 2), (3, 4)"), _tuple_elements("((-2,18), (8,38))")
    (['12', '9'], None, ['(-2,18)', '(8,38)'])
    """
    literal = _TUPLE_LITERAL.fullmatch(answer)
    if not literal:
        return None
    depth = 0
    for char in literal.group(1):  # "[0, 1)" inside: any closing bracket closes, as in `_split_parts`
        depth += 1 if char in "([" else -1 if char in ")]" else 0
        if depth < 0:
            return None
    parts = _split_parts(literal.group(1)) if depth == 0 else []
    return parts if len(parts) > 1 else None


def _same(pred: str, gold: str) -> bool:
    """One answer against one gold answer: the textual fast path, else sympy through math_verify."""
    pred = pred.strip()
    if not pred or len(pred) > MAX_ANSWER_CHARS:
        return False
    verdict = _quick_verdict(pred, gold)
    if verdict is not None:
        return verdict
    if _is_explosive(pred):
        return False
    return _symbolically_equal(gold, "$\\boxed{" + _without_dollars(pred) + "}$")


def _answer_matches(answers: list[str], gold: str) -> bool:
    r"""Is the final answer (one string per box or math span, see `_final_answers`) equivalent to `gold`?

    * One box, as always: the whole content against the whole gold (math-verify compares "\pm 2" with "2, -2").
    * Parts (several boxes, or one box holding a list) against the gold's parts, as collections: each part must
      equal some gold part and each gold part some part, in any order (a gold list is a set of solutions, as in
      math-verify). A part that names a variable ("k = 45") may sit anywhere; a bare value against a named gold
      part ("45" for "k = 45") only at that part's own position, since nothing else says which value is which.
    * A single-valued gold accepts several parts only when every one of them equals it: the same answer boxed
      twice, or in two forms ("-b+2, or 2 - b"). Two different candidates ("\boxed{3} or \boxed{4}" for 3) are a
      hedge, wrong exactly as "\boxed{3, 4}" is. (math-verify agrees: {3, 4} is not 3.)
    * A gold written as a tuple ("(12, 9)") is ordered: several parts must match its elements one to one, in its
      order, and not as alternatives ("\boxed{12} or \boxed{9}"). A bare list gold ("12, 9") is a set; data.py
      writes the gold of a problem that fixes the order ("first write BP, then QT") as a tuple.
    * A gold that repeats a part ("-1, 3, 3": a double root entered twice, as the problem asks) is a multiset:
      the parts must match one to one. math-verify's sets would accept "-1, 3" here; we do not.
    """
    # "or" between boxes ("\boxed{1} or \boxed{2}") or inside one ("1 \text{ or } 2") names alternatives, not a tuple.
    alternatives = getattr(answers, "alternatives", False) or any(_OR_WORD.search(answer) for answer in answers)
    answers = [answer.strip() for answer in answers]
    if not answers or sum(map(len, answers)) > MAX_ANSWER_CHARS:
        return False
    parts = [part for answer in answers for part in _split_parts(answer)]
    if not parts or len(parts) > MAX_PARTS:
        return False
    if not _HEDGE_WORD.search(gold) and any(_HEDGE_WORD.search(part) for part in parts):
        return False
    gold_parts = _split_parts(gold) or [gold]
    if len(gold_parts) == 1:  # a gold written as a set, "\{1, 2, 3\}": its elements are its parts
        gold_parts = _set_elements(gold) or gold_parts
    repeated = len({_normalize(part) for part in gold_parts}) < len(gold_parts)
    ordered = _tuple_elements(gold) if len(gold_parts) == 1 else None  # "(12, 9)": its elements, in order
    # One box of alternatives for an ordered gold, "\boxed{1 \text{ or } 2}" for (1, 2): math-verify would read it
    # as the pair; only the part-by-part comparisons below may accept it (restatements).
    whole = not (ordered and alternatives and len(parts) > 1)
    if whole and not repeated and (len(answers) == 1 or len(parts) == 1):
        if _same(answers[0] if len(answers) == 1 else parts[0], gold):
            return True
    if len(parts) == 1 and len(gold_parts) == 1:
        return False
    deadline = time.monotonic() + GRADE_BUDGET_S  # a bound on all the comparisons below together
    if len(gold_parts) == 1:  # restatements only
        if all(time.monotonic() < deadline and _same(part, gold) for part in parts):
            return True
        # An ordered gold, "(12, 9)" (a pair, a point, a list the problem asks for in order): the parts one to one,
        # in its order ("\boxed{12} and \boxed{9}", "BP = \boxed{12}, QT = \boxed{9}"; never "9, 12"), as
        # math-verify compares a tuple.
        if ordered is not None:
            return not alternatives and len(parts) == len(ordered) and all(
                time.monotonic() < deadline and _same(part, element) for part, element in zip(parts, ordered)
            )
        # "\boxed{2} or \boxed{-2}" for gold "\pm 2": the gold is itself a collection, compare as one.
        return bool(_GOLD_COLLECTION.search(gold)) and _same(", ".join(parts), gold)
    cache: dict[tuple[int, int], bool] = {}

    def equal(i: int, j: int) -> bool:
        if i != j and _LABEL.match(gold_parts[j]) and not _LABEL.match(parts[i]):
            return False
        if (i, j) not in cache:
            cache[i, j] = time.monotonic() < deadline and _same(parts[i], gold_parts[j])
        return cache[i, j]

    if repeated:  # one to one. Greedy is exact here: equivalence is transitive, so any free equal part will do.
        if len(parts) != len(gold_parts):
            return False
        free = set(range(len(gold_parts)))
        for i in range(len(parts)):
            j = next((j for j in sorted(free) if equal(i, j)), None)
            if j is None:
                return False
            free.remove(j)
        return True
    return all(any(equal(i, j) for j in range(len(gold_parts))) for i in range(len(parts))) and all(
        any(equal(i, j) for i in range(len(parts))) for j in range(len(gold_parts))
    )


def _without_delimiters(gold: str) -> str:
    r"""A gold written as one math span ("$$\{1,2,3\}$$", "$x \in [-2,7]$", "\(5\)") without its delimiters,
    which carry no value; "$5$ and $6$" (two spans) and "\$5" (a currency sign) are left alone.

    >>> _without_delimiters("$${1,2,3}$$"), _without_delimiters("$5$ and $6$"), _without_delimiters(r"\[ 7 \]")
    ('{1,2,3}', '$5$ and $6$', '7')
    """
    for opening, closing in (("$$", "$$"), ("$", "$"), ("\\[", "\\]"), ("\\(", "\\)")):
        inner = gold[len(opening) : -len(closing)]
        if gold.startswith(opening) and gold.endswith(closing) and len(gold) >= len(opening) + len(closing):
            if "$" not in inner and opening not in inner and closing not in inner:
                return inner.strip()
    return gold


def _is_correct(completion: str, answer: str) -> bool:
    if not isinstance(completion, str) or answer is None:
        return False
    gold = str(answer).strip()[:MAX_GOLD_CHARS]  # str(): a dataset may store AIME answers as ints
    # A sentence's period copied into the gold ("\begin{pmatrix} ... \end{pmatrix}.", 5 MATH train answers) is
    # not part of it, and would make math_verify fall back to reading a lone "-1" out of the matrix.
    gold = gold[:-1].rstrip() if gold.endswith(".") and not gold.endswith("..") else gold
    gold = _without_delimiters(gold)
    if _BOX_COMMAND.search(gold):  # a worked solution given as the gold: what it answers, read as a completion is
        stated = _final_answers(strip_thinking(gold))
        gold = ", ".join(stated) if stated else gold
    if not gold:
        return False  # nothing to compare with: never reward
    text = strip_thinking(completion)
    if not text.strip():
        return False
    answers = _final_answers(text)
    if answers is not None:  # the model committed to an answer: grade exactly that
        return _answer_matches(answers, gold)
    # No box, no answer sentence: let math_verify find "$x = 5$" near the end. The trailing period would be read
    # as a decimal point ("14/3." -> 14/3.0, which sympy refuses to equate with 14/3).
    tail = text[-FALLBACK_TAIL_CHARS:].rstrip().rstrip(".")
    if _is_explosive(tail):
        return False
    # math_verify would read the last number of "so it is 3 or 4": for a single-valued gold, a hedge in the
    # closing line is no answer.
    if _HEDGE_WORD.search(tail[tail.rfind("\n") + 1 :]) and len(_split_parts(gold)) == 1:
        return False
    return _symbolically_equal(gold, tail)


# ---------------------------------------------------------------------------------------------------------------
# Is the answer right? (multiple choice, GPQA-style A-D)
# ---------------------------------------------------------------------------------------------------------------
# "Answer: C", "**Answer:** (b)", "the answer is (D)". Quantifiers are bounded so the regex stays linear.
_ANSWER_PHRASE = re.compile(r"\banswer\s{0,3}(?:is\b|:)[\s*:$]{0,6}(?:\(\s{0,2})?([A-D])(?![A-Za-z0-9])", re.I)
_BOXED_LETTER = re.compile(r"\(?([A-D])\)?[.:]?", re.I)
_FOLLOWED_BY_WORD = re.compile(r"\s*[A-Za-z]")
# A second option right after the first, "Answer: A or B", "the answer is (B), (C)": a hedge. The second letter must
# be a capital or parenthesised, so that "Answer: A, a fine choice" stays the answer A.
_SECOND_LETTER = re.compile(
    r"\s{0,3}\)?\s{0,3}(?:,|/|&|(?i:\bor\b|\band\b))\s{0,3}(?:\(\s{0,2}[A-Da-d]\s{0,2}\)|[A-D](?![A-Za-z0-9]))"
)


def _boxed_letter(content: str) -> str | None:
    """"C", "\\text{C}", "(C)", "\\textbf{(c)}" -> "C"."""
    cleaned = "".join(_TEXT_WRAPPER.sub(r"\1", content).replace("$", "").split())
    match = _BOXED_LETTER.fullmatch(cleaned)
    return match.group(1).upper() if match else None


# ---------------------------------------------------------------------------------------------------------------
# How close is the completion to the reference solution? (ROUGE-L)
# ---------------------------------------------------------------------------------------------------------------
_MATH_TOKEN = re.compile(r"[a-z]+|\d+|\S")  # words, numbers, and every other non-space character on its own


class _MathTokenizer(tokenizers.Tokenizer):
    """rouge-score's default tokenizer keeps only [a-z0-9], so "x^2 + 1" and "x^2 - 1" would both become
    "x 2 1". Here each symbol (+ - = ^ ( ) / * \\ { } ...) is a token of its own.

    >>> _MathTokenizer().tokenize(r"X^2 − \\frac{1}{2}")
    ['x', '^', '2', '-', '\\\\', 'frac', '{', '1', '}', '{', '2', '}']
    """

    def tokenize(self, text: str) -> list[str]:
        text = text.lower().replace("\u2212", "-")  # unicode minus is the same symbol as "-"
        tokens = []
        for match in _MATH_TOKEN.finditer(text):  # lazily: stop at the cap without tokenizing a 1 MB tail
            if len(tokens) >= ROUGE_MAX_TOKENS:
                break
            tokens.append(match.group())
        return tokens


def lcs_length(a: list, b: list) -> int:
    """Length of the longest common subsequence of two token lists, bit-parallel (Allison & Dix 1986; Hyyrö 2004).

    The same number as rouge-score's O(n·m) table, in O(n · ⌈m / 64⌉) word operations on Python ints: bit i of
    the row vector V stands for position i of the longer list; each token of the shorter list updates all m
    positions at once with one AND, one add, one subtract and one OR. The LCS is the number of zero bits left.
    1,000 × 600 tokens take ~0.2 ms where the table takes ~0.1 s.

    >>> lcs_length(list("xmjyauz"), list("mzjawxu"))  # "mjau"
    4
    >>> lcs_length([], ["a"]), lcs_length(["a", "b"], ["a", "b"])
    (0, 2)
    """
    if len(a) < len(b):
        a, b = b, a                                      # bits over the longer list, one loop turn per shorter token
    return _lcs_with_masks(_match_masks(tuple(a)), len(a), b)


def _match_masks(tokens: tuple) -> dict:
    """token -> the int whose bit i is set where tokens[i] is that token."""
    masks: dict = {}
    for i, token in enumerate(tokens):
        masks[token] = masks.get(token, 0) | (1 << i)
    return masks


def _lcs_with_masks(masks: dict, m: int, b: list) -> int:
    """LCS of the m-token list behind `masks` and `b` (Hyyrö's recurrence V ← (V + U) | (V − U), U = V & M[t])."""
    all_ones = (1 << m) - 1
    row = all_ones                                       # V: every position still unmatched
    for token in b:
        matches = masks.get(token)
        if matches:                                      # a token absent from the other list changes nothing
            u = row & matches
            row = ((row + u) | (row - u)) & all_ones    # the carry of the add must not grow V past m bits
    return m - row.bit_count()


@lru_cache(maxsize=256)
def _reference_tokens(reference: str) -> tuple[tuple, dict]:
    """A reference's tokens and match masks: the G completions of a prompt share one reference."""
    tokens = tuple(_MathTokenizer().tokenize(reference))
    return tokens, _match_masks(tokens)


def _rouge_l_f(prediction: str, reference: str) -> float:
    """rouge-score's `RougeScorer(["rougeL"], tokenizer=_MathTokenizer()).score(reference, prediction)` F-measure,
    the same float (tested equal on random and real pairs), with the bit-parallel LCS."""
    target, target_masks = _reference_tokens(reference)
    predicted = _MathTokenizer().tokenize(prediction)
    if not target or not predicted:                      # rouge-score's convention: 0 for an empty side
        return 0.0
    if len(predicted) <= len(target):                    # bits over the longer list
        lcs = _lcs_with_masks(target_masks, len(target), predicted)
    else:
        lcs = lcs_length(predicted, list(target))
    precision, recall = lcs / len(predicted), lcs / len(target)     # as rouge_score.scoring.fmeasure computes it
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


# ---------------------------------------------------------------------------------------------------------------
# Grading a batch across processes (score_completions)
# ---------------------------------------------------------------------------------------------------------------
PARALLEL_MIN_COMPLETIONS = 64  # a smaller batch is graded in this process: the round trip would cost more
HARD_TIMEOUT_S = 4 * GRADE_BUDGET_S  # per completion; only a worker stuck where SIGALRM cannot reach ever waits it

_pool = None  # (worker count, multiprocessing.Pool), created on first use and reused


def _worker_count(workers: int | None, n: int) -> int:
    if workers is not None and workers < 0:
        raise ValueError(f"workers must be >= 0 (0 or None: every core), got {workers}")
    if workers:
        return min(workers, n)
    if n < PARALLEL_MIN_COMPLETIONS:
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(cores, n)


def _grade_chunk(items: list[tuple]) -> tuple[list[dict[str, float]], int]:
    """In a worker: the rewards of a few completions, and how many exceptions the catch-alls caught meanwhile."""
    before = grader_errors()
    return [reward(*item) for item in items], grader_errors() - before


def _process_pool(workers: int):
    """The worker pool, forked from this process (no re-import of the training script or of torch in every worker;
    the workers run only this module's pure-Python graders). Without fork (Windows) the workers are spawned."""
    global _pool
    if _pool is None or _pool[0] != workers:
        _close_pool()
        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
        with warnings.catch_warnings():   # Python >= 3.12 warns about fork in a threaded process; the workers use no thread
            warnings.simplefilter("ignore", DeprecationWarning)
            _pool = (workers, context.Pool(workers, initializer=_ignore_interrupts))
    return _pool[1]


def _ignore_interrupts() -> None:
    """In a worker: Ctrl-C reaches the whole process group, but only the training process decides what it means
    (train.py finishes the step): a worker killed by it mid-chunk would leave its chunk to the hard timeout."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _close_pool() -> None:
    global _pool
    if _pool is not None:
        _pool[1].terminate()
        _pool = None


atexit.register(_close_pool)


def _score_in_processes(items: list[tuple], workers: int) -> list[dict[str, float]]:
    """`reward(*item)` for every item, in order, over `workers` processes, each chunk waited for at most
    HARD_TIMEOUT_S per completion of the slowest worker's share."""
    global _errors
    size = max(1, -(-len(items) // (4 * workers)))             # ~4 chunks per worker: an even finish
    chunks = [items[i:i + size] for i in range(0, len(items), size)]
    pool = _process_pool(workers)
    pending = [pool.apply_async(_grade_chunk, (chunk,)) for chunk in chunks]
    deadline = time.monotonic() + HARD_TIMEOUT_S * -(-len(items) // workers)
    scored, stuck = [], False
    for chunk, result in zip(chunks, pending):
        try:
            values, errors = result.get(timeout=max(0.0, deadline - time.monotonic()))
        except multiprocessing.TimeoutError:
            values, errors, stuck = [{"reward": 0.0, "accuracy": 0.0, "rouge": 0.0} for _ in chunk], len(chunk), True
        scored.extend(values)
        with _errors_lock:
            _errors += errors
    if stuck:                                                  # a stuck worker would hold every later batch up
        _close_pool()
    return scored
