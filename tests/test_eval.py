"""Verifiable tasks and the `mipo-mlx eval` command: parsers on hand-written answers, accuracy, the command.

    .venv/bin/python -m pytest -q tests/test_eval.py
"""

import json

import pytest

from mipo_mlx.answers import MATH_EXEMPLARS, formatted, is_correct, parse_choice, parse_number, task_of
from mipo_mlx.compare import format_report, report_header, score
from mipo_mlx.data import read_prompts
from mipo_mlx.generation import Answer
from mipo_mlx.recipe import EvalConfig


@pytest.mark.parametrize("answer, number", [
    ("Natalia sold 48 + 24 = 72 clips, so the answer is 42.", 42),
    ("She pays 1,000 + 234.\n#### 1,234", 1234),
    ("The temperature fell to -3.50", -3.5),
    ("The answer is $1,234.00.", 1234),
    ("First 3 apples, then 5 more: 3 + 5 = 8", 8),
    ("21 - 15 = 6. The answer is 6.\n\nQ: Tom has 7 cats", 6),  # the stated answer, not a number after it
    ("Counting 3, 4 and 5", 5),
    ("I do not know how to solve this.", None),
    ("", None),
])
def test_math_parser_finds_the_final_number(answer, number):
    assert parse_number(answer) == number


@pytest.mark.parametrize("answer, letter", [
    ("The answer is (B).", "B"),
    ("Answer: c", "C"),
    ("Plants take in carbon dioxide. The answer is: D", "D"),
    ("B. carbon dioxide", "B"),
    ("(A) oxygen", "A"),
    ("The correct answer is option C because copper conducts.", "C"),
    ("I think the answer is a cat.", None),  # an article, not a choice
    ("The answer is E", None),  # not one of the choices
    ("Plants need sunlight to grow.", None),
    ("", None),
])
def test_choice_parser_finds_the_answer_letter(answer, letter):
    assert parse_choice(answer, "ABCD") == letter


def test_bundled_sets_have_their_task_and_gold_answers():
    math, mc = read_prompts("bundled:math/test"), read_prompts("bundled:mc/test")
    assert {task_of(r) for r in math} == {"math"} and {task_of(r) for r in mc} == {"mc"}
    assert task_of(read_prompts("bundled:personalization/test")[0]) is None
    assert is_correct(math[0], "55 - 2 * 22 = 11. The answer is 11.")  # gold 11
    assert not is_correct(math[0], "The answer is 12.")
    assert not is_correct(math[0], "There are many apples left.")  # no number: wrong, not skipped
    assert is_correct(mc[0], "The Sun lights the Earth. The answer is: B")
    assert not is_correct(mc[0], "The Moon.")


def test_arc_records_with_numbered_choices_are_multiple_choice(tmp_path):
    row = {"question": {"stem": "Which is a metal?", "choices": [{"label": "1", "text": "wood"}, {"label": "2", "text": "iron"}]},
           "answerKey": "2"}
    (tmp_path / "arc.jsonl").write_text(json.dumps(row) + "\n")
    record = read_prompts(str(tmp_path / "arc.jsonl"))[0]
    assert task_of(record) == "mc"
    assert is_correct(record, "The answer is: 2") and not is_correct(record, "The answer is: 1")


def test_math_questions_get_the_papers_eight_shot_chain_of_thought():
    record = read_prompts("bundled:math/test")[0]
    messages = formatted(record, 8).messages()
    assert len(messages) == 17 and messages[-1] == {"role": "user", "content": record.question}
    assert [m["role"] for m in messages[:2]] == ["user", "assistant"]
    assert all(m["content"].endswith(f"The answer is {parse_number(m['content']):g}.") for m in messages[1:16:2])
    assert len(MATH_EXEMPLARS) == 8
    zero_shot = formatted(record, 0).messages()
    assert len(zero_shot) == 1 and zero_shot[0]["content"].endswith('end with "The answer is N." where N is the number.')
    personal = read_prompts("bundled:personalization/test")[0]
    assert formatted(personal, 8) is personal


def answers_of(*texts):
    return [Answer(text=t, token_ids=list(range(len(t.split()))), finish_reason="stop") for t in texts]


def test_accuracy_before_and_after_with_interval_and_paired_test():
    records = read_prompts("bundled:math/test")[:4]  # gold 11, 71, 139, 150
    base = answers_of("The answer is 11.", "I am not sure.", "The answer is 100.", "#### 7")
    adapted = answers_of("The answer is 11.", "4 * 16 + 7 = 71. The answer is 71.", "The answer is 139.", "So 150.")
    rows, metrics = score(records, {"base": base, "adapted": adapted}, samples=200, seed=0)
    accuracy = metrics["accuracy/math"]
    assert (accuracy["n"], accuracy["before"], accuracy["after"]) == (4, 0.25, 1.0)
    assert 0 < accuracy["p_value"] <= 1 and accuracy["difference_ci"][1] <= 1.0
    assert [r["correct"] for r in rows][1] == {"base": False, "adapted": True}
    header = report_header("tiny", "adapters", "bundled:math/test", records, EvalConfig(), 0)
    report = format_report(metrics, rows, header)
    assert "| accuracy/math | 4 | 0.25 " in report
    assert "**math prompt**: 8-shot chain of thought" in report


def test_one_side_reports_means_without_a_paired_test():
    records = read_prompts("bundled:mc/test")[:2]  # gold B, C
    rows, metrics = score(records, {"base": answers_of("The answer is: B", "Answer: a")}, samples=200, seed=0)
    assert metrics["accuracy/mc"]["mean"] == 0.5 and "p_value" not in metrics["accuracy/mc"]
    report = format_report(metrics, rows, {})
    assert report.startswith("# Evaluation") and "| accuracy/mc | 2 | 0.5 [" in report and "- answer: Answer: a" in report
