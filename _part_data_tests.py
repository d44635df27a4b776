# Tests of data.py: every loader on small invented fixtures (fixtures/*.jsonl), no network, no shared data.
import json
import os
import random
import sys
import types

import pytest

import data

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


def fixture(name: str) -> str:
    return os.path.join(FIXTURES, name)


def test_math500_fixture_records():
    recs = data.load_benchmark("math500", data_file=fixture("math500.jsonl"))
    assert len(recs) == 3
    r = recs[0]
    assert r["prompt"] == "What is $\\frac{3}{4} + \\frac{1}{8}$?\n" + data.MATH_INSTRUCTION
    assert r["answer"] == "\\frac{7}{8}"
    assert r["solution"].endswith("$\\boxed{\\frac{7}{8}}$.")
    assert r["task"] == "math" and r["id"] == "test/prealgebra/9001.json"
    assert [x["answer"] for x in recs] == ["\\frac{7}{8}", "6", "(2,2)"]


def test_aime_fixtures_keep_answer_strings_and_accept_question_field(tmp_path):
    a24 = data.load_benchmark("aime24", data_file=fixture("aime24.jsonl"))
    assert [r["answer"] for r in a24] == ["401", "025", "333"]  # leading zero kept: the grader compares as integers
    assert a24[1]["id"] == "902" and a24[1]["solution"].startswith("$100 = ")
    a25 = data.load_benchmark("aime25", data_file=fixture("aime25.jsonl"))
    assert [r["answer"] for r in a25] == ["12", "400", "120"] and all(r["solution"] is None for r in a25)
    assert a25[2]["prompt"].startswith("Find $\\binom{10}{3}$.\n")
    # opencompass/AIME2025 layout: "question" instead of "problem"
    f = tmp_path / "aime25_oc.jsonl"
    f.write_text(json.dumps({"question": "Compute $2+2$.", "answer": "4"}) + "\n")
    (r,) = data.load_benchmark("aime25", data_file=str(f))
    assert r["prompt"] == "Compute $2+2$.\n" + data.MATH_INSTRUCTION and r["answer"] == "4" and r["id"] == "aime25/0"


def test_gsm8k_split_strips_calc_and_commas():
    recs = data.load_benchmark("gsm8k", data_file=fixture("gsm8k.jsonl"))
    assert [r["answer"] for r in recs] == ["14", "1234", "49"]
    assert recs[1]["solution"] == "It has 1,000 + 234 = 1,234 pens."  # annotation gone, text commas kept
    assert all("<<" not in r["solution"] and "####" not in r["solution"] for r in recs)
    assert recs[0]["prompt"].startswith("Tom has 12 apples") and recs[0]["prompt"].endswith(data.MATH_INSTRUCTION)
    assert data.split_gsm8k_answer("a <<1+1=2>>2\n#### -3,000.5") == ("a 2", "-3000.5")
    train = data.load_train_dataset("gsm8k", data_file=fixture("gsm8k.jsonl"))
    assert [r["answer"] for r in train] == ["14", "1234", "49"]


def test_math_train_answer_is_last_boxed_with_nested_braces():
    recs = data.load_train_dataset("math", data_file=fixture("math_train.jsonl"))
    assert [r["answer"] for r in recs] == ["\\frac{1}{2}", "\\{1,2,3\\}", "120"]  # last box, nested braces, "\boxed 120"
    assert recs[0]["solution"].startswith("We have") and recs[0]["prompt"].startswith("Simplify")
    assert data.last_boxed("x \\boxed{a{b}c} y \\fbox{\\sqrt{2}} z") == "\\sqrt{2}"
    assert data.last_boxed("\\boxed{1} then \\boxed{2") == "1"  # an unfinished last box is skipped
    assert data.last_boxed("no box here") is None and data.last_boxed(None) is None


def test_gpqa_shuffle_deterministic_and_letter_points_at_correct_option():
    path = fixture("gpqa_diamond.jsonl")
    recs = data.load_benchmark("gpqa_diamond", data_file=path)
    rows = data.read_rows(path)
    for r, row in zip(recs, rows):
        assert r["task"] == "multiple_choice" and r["answer"] in "ABCD" and r["id"] == row["Record ID"]
        lines = r["prompt"].split("\n")
        assert lines[0] == row["Question"]
        options = {line[0]: line[3:] for line in lines if len(line) > 2 and line[1:3] == ") "}
        assert sorted(options) == ["A", "B", "C", "D"]
        assert options[r["answer"]] == row["Correct Answer"].strip()  # the letter names the correct text
        assert sorted(options.values()) == sorted(x.strip() for x in [row["Correct Answer"]] +
                                                  [row[f"Incorrect Answer {k}"] for k in (1, 2, 3)])
    random.seed(12345)  # the global RNG must not matter
    again = data.load_benchmark("gpqa_diamond", data_file=path)
    assert [r["prompt"] for r in again] == [r["prompt"] for r in recs]
    assert len({r["answer"] for r in recs}) > 1  # the correct option is not always in the same place
    other_seed = data.load_benchmark("gpqa_diamond", data_file=path, seed=1)
    assert [r["prompt"] for r in other_seed] != [r["prompt"] for r in recs]


def test_seed_from_is_stable_across_processes():
    # a hard-coded value: Python's hash() would change with PYTHONHASHSEED, sha256 does not
    assert data.seed_from("recFIXTURE000001", 0) == int.from_bytes(
        __import__("hashlib").sha256(b"0:recFIXTURE000001").digest()[:8], "big")
    assert data.seed_from("q", 0) != data.seed_from("q", 1)


def test_missing_field_error_names_existing_fields(tmp_path):
    f = tmp_path / "custom.jsonl"
    f.write_text(json.dumps({"question": "What is 1+1?", "response": "2"}) + "\n")
    with pytest.raises(data.DatasetFieldError) as e:
        data.load_train_dataset(str(f), answer_field="answer")
    msg = str(e.value)
    assert "'answer'" in msg and "question" in msg and "response" in msg
    assert isinstance(e.value, ValueError)
    g = tmp_path / "nofields.jsonl"
    g.write_text(json.dumps({"text": "hello", "label": "1"}) + "\n")
    with pytest.raises(data.DatasetFieldError, match="text, label"):
        data.load_train_dataset(str(g))
    with pytest.raises(data.DatasetFieldError, match="Question.*id, problem, answer"):
        data.load_benchmark("gpqa_diamond", data_file=fixture("aime25.jsonl"))


def test_field_mapping_flags_and_boxed_derivation(tmp_path):
    rows = [{"q": "Add 2 and 3.", "gt": "5", "why": "2+3=5"},
            {"q": "Halve 1.", "gt": "\\frac12", "why": "It is \\frac12."}]
    f = tmp_path / "custom.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recs = data.load_train_dataset(str(f), problem_field="q", answer_field="gt", solution_field="why")
    assert recs[0] == {"prompt": "Add 2 and 3.\n" + data.MATH_INSTRUCTION, "answer": "5", "solution": "2+3=5",
                       "task": "math", "id": "custom.jsonl/0"}
    # no answer field: derived from the solution's last \boxed{}
    g = tmp_path / "derive.json"
    g.write_text(json.dumps([{"question": "Square 3.", "reasoning": "\\boxed{6} no, \\boxed{9}"}]))
    (r,) = data.load_train_dataset("ignored-name", data_file=str(g))
    assert r["answer"] == "9" and r["solution"] == "\\boxed{6} no, \\boxed{9}"


def test_parquet_file(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    pa = pytest.importorskip("pyarrow")
    f = tmp_path / "custom.parquet"
    pq.write_table(pa.table({"problem": ["One plus one?", "Two times two?"], "answer": ["2", "4"]}), str(f))
    recs = data.load_train_dataset(str(f))
    assert [r["answer"] for r in recs] == ["2", "4"] and recs[1]["prompt"].startswith("Two times two?")
    assert [r["answer"] for r in data.load_benchmark("math500", data_file=str(f))] == ["2", "4"]


def test_unknown_benchmark_lists_valid_names():
    with pytest.raises(ValueError) as e:
        data.load_benchmark("mmlu")
    for name in ("math500", "aime24", "aime25", "gpqa_diamond", "gsm8k", "toy"):
        assert name in str(e.value) and name in data.BENCHMARKS


def test_limit_takes_first_n():
    recs = data.load_benchmark("gsm8k", data_file=fixture("gsm8k.jsonl"), limit=2)
    assert [r["answer"] for r in recs] == ["14", "1234"]
    assert len(data.load_train_dataset("math", data_file=fixture("math_train.jsonl"), limit=1)) == 1
    assert data.load_benchmark("aime24", data_file=fixture("aime24.jsonl"), limit=0) == []


def test_hub_errors_are_clear(monkeypatch):
    # a fake `datasets` module that fails like an offline / gated Hub, so no network is touched
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hub")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    with pytest.raises(data.DatasetLoadError) as e:
        data.load_benchmark("math500")
    assert "HuggingFaceH4/MATH-500" in str(e.value) and "--data_file" in str(e.value)
    with pytest.raises(data.DatasetLoadError) as e:
        data.load_benchmark("gpqa_diamond")
    msg = str(e.value)
    assert "https://huggingface.co/datasets/Idavidrein/gpqa" in msg and "HF_TOKEN" in msg and "--data_file" in msg
    with pytest.raises(data.DatasetLoadError, match="not found"):
        data.load_benchmark("math500", data_file="/nonexistent/file.jsonl")


def test_hub_rows_go_through_the_same_builders(monkeypatch):
    calls = []

    def fake_load(dataset_id, config=None, split=None):
        calls.append((dataset_id, config, split))
        return [{"question": "Q?", "answer": "x = <<1+1=2>>2\n#### 2"}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=fake_load))
    (r,) = data.load_benchmark("gsm8k")
    assert calls == [("openai/gsm8k", "main", "test")] and r["answer"] == "2" and r["solution"] == "x = 2"
    data.load_train_dataset("owner/some_set:cfg", split="validation")
    assert calls[-1] == ("owner/some_set", "cfg", "validation")


def test_toy_records():
    toy = pytest.importorskip("toy")
    train = data.load_train_dataset("toy", limit=5, seed=0)
    held = data.load_benchmark("toy", limit=4)
    assert len(train) == 5 and len(held) == 4
    for r in train + held:
        assert isinstance(r["prompt"], str) and isinstance(r["answer"], str) and r["task"] == "math"
    assert [r["prompt"] for r in train] == [r["prompt"] for r in data.load_train_dataset("toy", limit=5, seed=0)]
    assert toy is not None
