"""Tests of rewards.py (to be merged into test_lambdapo.py). Small hand-written fixtures only; fast (< 20 s)."""

import threading
import time

import pytest

from rewards import (
    accuracy_reward,
    extract_boxed,
    multiple_choice_reward,
    reward,
    rouge_l_reward,
    score_completions,
    strip_thinking,
)


# ---- where the answer is ------------------------------------------------------------------------------------
def test_rewards_strip_thinking():
    assert strip_thinking("<think>maybe 3</think>The answer is 4.") == "The answer is 4."
    assert strip_thinking("a</think>b</think>c") == "c"  # the last </think> counts
    assert strip_thinking("no tags at all") == "no tags at all"
    assert strip_thinking("<think>cut off mid-thought") == ""  # opened, never closed: no answer
    assert strip_thinking("<think>a</think>b<think>c") == ""  # reopened and never closed


def test_rewards_extract_boxed_keeps_nested_braces():
    assert extract_boxed(r"so $x = \boxed{\frac{1}{2}}$.") == r"\frac{1}{2}"
    assert extract_boxed(r"\boxed{\left\{ 1, 2 \right\}}") == r"\left\{ 1, 2 \right\}"  # escaped braces ignored
    assert extract_boxed(r"\boxed{}") == ""


def test_rewards_extract_boxed_last_box_wins():
    assert extract_boxed(r"first \boxed{1}, then \boxed{2}") == "2"
    assert extract_boxed(r"\boxed{1} and \boxed{2") == "1"  # the last *complete* box
    assert extract_boxed("no box here") is None


def test_rewards_extract_boxed_fbox_and_bare_token():
    assert extract_boxed(r"\fbox{42}") == "42"
    assert extract_boxed(r"$\framebox{204}$ minutes") == "204"
    assert extract_boxed(r"the answer is $\boxed 5$.") == "5"
    assert extract_boxed(r"\boxed 7.") == "7"
    assert extract_boxed(r"\boxedfoo{3}") is None  # another command, not a box


def test_rewards_extract_boxed_unbalanced_is_none():
    assert extract_boxed(r"\boxed{\frac{1}{2}") is None
    assert extract_boxed(r"\boxed{") is None
    assert extract_boxed("}}}}") is None


@pytest.mark.parametrize(
    "text",
    [
        "\\boxed{" + "{" * 1_000_000,  # 1 MB, never closed
        "\\boxed{" * 100_000,  # 100k unbalanced boxes (a per-box scan would be quadratic)
        "\\boxed{" + "{" * 100_000 + "7" + "}" * 100_000 + "}",  # deep nesting (a recursive parser would overflow)
        "x" * 1_000_000 + "\\boxed" + " " * 100_000,
    ],
)
def test_rewards_extract_boxed_hostile_input_is_fast(text):
    start = time.perf_counter()
    result = extract_boxed(text)
    assert time.perf_counter() - start < 1.0
    assert result is None or result.startswith("{")


# ---- is the answer right? -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "completion, answer",
    [
        (r"$\boxed{\frac12}$", "0.5"),
        (r"$\boxed{0.5}$", r"\dfrac{1}{2}"),
        (r"$\boxed{\dfrac{1}{2}}$", r"\frac{1}{2}"),
        (r"\boxed{25}", "025"),  # AIME answers: compare as integers
        (r"\boxed{(3,\frac{\pi}{2})}", r"\left( 3, \frac{\pi}{2} \right)"),
        (r"\boxed{\sqrt{18}}", r"3\sqrt{2}"),
        (r"\boxed{C}", r"\text{(C)}"),
        (r"\boxed{90}", r"90^\circ"),
        (r"\boxed{p-q}", "p - q"),
        (r"\boxed{\$70,000}", "70000"),
        (r"\boxed{x = 5}", "5"),
    ],
)
def test_rewards_accuracy_equivalent_forms(completion, answer):
    assert accuracy_reward(completion, answer) == 1.0


def test_rewards_accuracy_wrong_answer_is_zero():
    assert accuracy_reward(r"\boxed{24}", "025") == 0.0
    assert accuracy_reward(r"\boxed{\frac{1}{3}}", "0.5") == 0.0
    assert accuracy_reward(r"\boxed{2\sqrt{3}}", r"3\sqrt{2}") == 0.0
    assert accuracy_reward(r"\boxed{(3, \pi)}", r"\left( 3, \frac{\pi}{2} \right)") == 0.0


def test_rewards_accuracy_grades_only_after_think():
    assert accuracy_reward(r"<think>it is \boxed{5}</think> I am not sure.", "5") == 0.0
    assert accuracy_reward(r"<think>it is \boxed{5}</think> \boxed{6}", "5") == 0.0
    assert accuracy_reward(r"<think>it is \boxed{5}", "5") == 0.0  # never finished thinking
    assert accuracy_reward(r"<think>maybe 6?</think> So the answer is $\boxed{5}$.", "5") == 1.0


def test_rewards_accuracy_falls_back_to_plain_answer_without_box():
    assert accuracy_reward("... so the answer is 14/3.", r"\frac{14}{3}") == 1.0
    assert accuracy_reward("Therefore the final answer is 42.", "42") == 1.0
    assert accuracy_reward("Therefore the final answer is 41.", "42") == 0.0


@pytest.mark.parametrize(
    "completion, answer",
    [
        (None, "5"),
        (r"\boxed{5}", None),
        (r"\boxed{5}", ""),  # empty gold: never rewarded
        (r"\boxed{}", "5"),
        ("", "5"),
        (12345, "5"),
        (r"\boxed{\frac{}{}\sqrt[}{\left(}", "5"),
        (r"\boxed{\begin{pmatrix} 1 & \\ \end{matrix}}", r"\frac{1}{2}"),
        ("\\boxed{" + "\\frac{1}{" * 40 + "2" + "}" * 40 + "}", "5"),
        (r"\boxed{9^{9^{9^{9}}}}", "3"),  # sympy would evaluate this power tower forever
        ("so it is $9^{9^{9^{9}}}$", "3"),
        (r"\boxed{999999^{999999}}", "3"),
        (r"\boxed{(x+1)^{3000}}", "x^{3000}+1"),  # symbolic expansion of a huge power
        (r"\boxed{(10!)!}", "3"),
        ("\\boxed{" + "1+" * 400_000 + "1}", "5"),  # a huge boxed answer
        ("garbage " * 100_000, "5"),
    ],
)
def test_rewards_accuracy_never_raises_and_is_fast(completion, answer):
    start = time.perf_counter()
    assert accuracy_reward(completion, answer) == 0.0
    assert time.perf_counter() - start < 3.0


def test_rewards_accuracy_works_in_a_thread():
    # math_verify's timeouts use SIGALRM, which only the main thread may use; graders often run in pools.
    results = []
    worker = threading.Thread(
        target=lambda: results.extend(
            [
                accuracy_reward(r"\boxed{\frac12}", "0.5"),
                accuracy_reward(r"\boxed{\sqrt{18}}", r"3\sqrt{2}"),
                accuracy_reward("the answer is 14/3.", r"\frac{14}{3}"),
                accuracy_reward(r"\boxed{7}", "0.5"),
                accuracy_reward(r"\boxed{9^{9^{9^{9}}}}", "3"),
            ]
        )
    )
    worker.start()
    worker.join(timeout=20)
    assert not worker.is_alive()
    assert results == [1.0, 1.0, 1.0, 0.0, 0.0]


@pytest.mark.parametrize(
    "completion, letter, expected",
    [
        (r"\boxed{B}", "B", 1.0),
        (r"\boxed{\text{b}}", "B", 1.0),
        (r"$\boxed{(C)}$", "c", 1.0),
        ("Answer: D", "D", 1.0),
        ("**Answer:** (a)", "A", 1.0),
        ("so the answer is (B).", "B", 1.0),
        (r"Answer: B. On reflection, \boxed{D}", "B", 0.0),  # the last one counts
        (r"\boxed{D}. Final answer: B", "B", 1.0),
        ("<think>Answer: A</think> I cannot decide.", "A", 0.0),  # only after </think>
        ("The answer is a prime number.", "A", 0.0),  # English "a", not option (a)
        (r"\boxed{E}", "E", 0.0),  # only A-D exist
        ("Answer: C", "B", 0.0),
        (None, "A", 0.0),
    ],
)
def test_rewards_multiple_choice(completion, letter, expected):
    assert multiple_choice_reward(completion, letter) == expected


# ---- ROUGE-L ------------------------------------------------------------------------------------------------
def test_rewards_rouge_identical_and_symbols_matter():
    assert rouge_l_reward("x^2 + 1", "x^2 + 1") == pytest.approx(1.0)
    assert rouge_l_reward("x^2 + 1", "x^2 - 1") < 1.0  # the stock tokenizer would call these identical
    assert rouge_l_reward("x^2 \u2212 1", "x^2 - 1") == pytest.approx(1.0)  # unicode minus is a minus
    assert rouge_l_reward("<think>scratch</think>So x = 2.", "So x = 2.") == pytest.approx(1.0)


def test_rewards_rouge_empty_bounds_and_never_raises():
    assert rouge_l_reward("", "x = 1") == 0.0
    assert rouge_l_reward("x = 1", "") == 0.0
    assert rouge_l_reward("x = 1", None) == 0.0
    assert rouge_l_reward(None, "x = 1") == 0.0
    assert rouge_l_reward("<think>x = 1", "x = 1") == 0.0  # unfinished thinking is not graded
    for a, b in [("a b c", "c b a"), ("1 + 1 = 2", "so 1 + 1 is 2"), ("\\frac{1}{2}", "one half")]:
        assert 0.0 <= rouge_l_reward(a, b) <= 1.0


def test_rewards_rouge_long_inputs_are_capped():
    long_text = "x + y = z, so z - x = y. " * 20_000  # ~260k tokens each
    start = time.perf_counter()
    score = rouge_l_reward(long_text, long_text[::-1])
    assert time.perf_counter() - start < 3.0
    assert 0.0 <= score <= 1.0


# ---- the reward ---------------------------------------------------------------------------------------------
def test_rewards_reward_combines_accuracy_and_rouge():
    completion, reference = r"so 1 + 1 = 2, \boxed{2}", r"1 + 1 = 2, so \boxed{2}"
    rouge = rouge_l_reward(completion, reference)
    assert 0.0 < rouge < 1.0
    out = reward(completion, "2", reference=reference, rouge_weight=0.1)
    assert out["accuracy"] == 1.0 and out["rouge"] == pytest.approx(rouge)
    assert out["reward"] == pytest.approx(1.0 + 0.1 * rouge)
    wrong = reward(r"so 1 + 1 = 3, \boxed{3}", "2", reference=reference, rouge_weight=0.1)
    assert wrong["accuracy"] == 0.0 and 0.0 < wrong["reward"] < 0.1  # ROUGE breaks ties, never beats a right answer
    assert reward(completion, "2", reference=reference) == {"reward": 1.0, "accuracy": 1.0, "rouge": 0.0}
    assert reward(completion, "2", reference=None, rouge_weight=0.5)["rouge"] == 0.0  # no reference, no ROUGE


def test_rewards_reward_tasks_and_batch():
    assert reward("Answer: C", "C", task="multiple_choice")["reward"] == 1.0
    with pytest.raises(ValueError):
        reward(r"\boxed{1}", "1", task="poetry")
    outs = score_completions([r"\boxed{1}", r"\boxed{2}"], ["1", "1"], [None, "x"], rouge_weight=0.5)
    assert [o["accuracy"] for o in outs] == [1.0, 0.0]
    assert outs[0]["rouge"] == 0.0
