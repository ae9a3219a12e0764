"""Verifiable tasks and the `mipo-mlx eval` command: parsers on hand-written answers, accuracy, the command.

    .venv/bin/python -m pytest -q tests/test_eval.py
"""

import json

import pytest

from mipo_mlx.answers import (
    MATH_EXEMPLARS,
    formatted,
    is_correct,
    parse_choice,
    parse_number,
    task_of,
)
from mipo_mlx.cli import main
from mipo_mlx.compare import report_header, score
from mipo_mlx.report import format_report
from mipo_mlx.data import read_prompts
from mipo_mlx.generation import Answer
from mipo_mlx.loading import load_model
from mipo_mlx.lora import adapter_config, apply_lora, save_adapter
from mipo_mlx.recipe import EvalConfig, LoraConfig


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
    choices = [{"label": "1", "text": "wood"}, {"label": "2", "text": "iron"}]
    row = {"question": {"stem": "Which is a metal?", "choices": choices}, "answerKey": "2"}
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


@pytest.fixture(scope="module")
def tiny_adapter(tiny_model_dirs, tmp_path_factory):
    """An adapter for the tiny Llama whose lora_b is not zero, so adapter on and off answer differently."""
    from test_lora import move_adapter

    loaded = load_model(str(tiny_model_dirs[("llama", False)]))
    move_adapter(apply_lora(loaded.model, LoraConfig(rank=4)))
    directory = tmp_path_factory.mktemp("run") / "adapters"
    save_adapter(loaded.model, directory, adapter_config(loaded.model, LoraConfig(rank=4), loaded.source))
    return directory


@pytest.fixture
def loads(monkeypatch):
    """Every model load, counted."""
    import mipo_mlx.loading

    calls, real = [], mipo_mlx.loading.load_model
    monkeypatch.setattr(mipo_mlx.loading, "load_model", lambda spec, **kw: calls.append(spec) or real(spec, **kw))
    return calls


def test_eval_with_an_adapter_answers_before_and_after_from_one_loaded_model(tiny_model_dirs, tiny_adapter, tmp_path, loads):
    model_dir, out = tiny_model_dirs[("llama", False)], tmp_path / "report"
    # The adapter given as its run directory: eval finds adapters/ inside.
    assert main(["eval", str(model_dir), "--adapter", str(tiny_adapter.parent), "--data", "bundled:math/test",
                 "--out", str(out), "--max-prompts", "4", "--max-tokens", "8", "--bootstrap-samples", "100"]) == 0
    assert loads == [str(model_dir)]  # one model in memory: the adapter is switched off for the base answers
    rows = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all({"base", "adapted", "correct", "loop"} <= set(r) for r in rows)
    assert any(r["base"] != r["adapted"] for r in rows)
    assert len(rows[0]["prompt"]) == 17  # the paper's 8-shot chain of thought before the question
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["accuracy/math"]["n"] == 4 and {"before_ci", "after_ci", "p_value"} <= set(metrics["accuracy/math"])
    report = (out / "report.md").read_text()
    assert report.startswith("# Before and after") and f"**adapter**: {tiny_adapter}" in report
    assert "| accuracy/math | 4 |" in report and "| repetition_loop | 4 |" in report


def test_eval_without_an_adapter_reports_one_column_and_the_judge_end_to_end(tiny_model_dirs, tmp_path, loads, capsys):
    model_dir = tiny_model_dirs[("qwen2", False)]
    judge_dir = tiny_model_dirs[("llama", False)]
    assert main(["eval", str(model_dir), "--data", "bundled:personalization/test", "--out", str(tmp_path),
                 "--max-prompts", "2", "--max-tokens", "6", "--bootstrap-samples", "100",
                 "--judge-model", str(judge_dir)]) == 0
    assert loads == [str(model_dir), str(judge_dir)]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert "after" not in metrics["adherence/overall"] and metrics["adherence/overall"]["n"] == 2
    rows = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    preferences = sum(len(r["judge"]["preferences"]) for r in rows)
    assert metrics["judge/replies_without_score"]["n"] == preferences == 6  # three listed preferences each
    printed = capsys.readouterr().out
    assert printed.startswith("# Evaluation") and "| judge/replies_without_score | 6 |" in printed


@pytest.mark.parametrize("args, message", [
    (["--data", "nope.jsonl"], "mipo-mlx: error: --data: file not found: nope.jsonl; give a JSONL file or a bundled set"),
    (["--data", "bundled:nope"], "mipo-mlx: error: --data: no bundled set 'nope'; bundled sets: math/test"),
    (["--data", "bundled:math/test", "--adapter", "."], "mipo-mlx: error: --adapter: no adapter in .; give a directory"),
    (["--data", "bundled:math/test", "--judge-model", "./no-judge"], "mipo-mlx: error: --judge-model: not found: ./no-judge"),
])
def test_bad_paths_are_one_line_errors_naming_the_flag(args, message, tiny_model_dirs, capsys):
    assert main(["eval", str(tiny_model_dirs[("llama", False)]), *args]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith(message)


def test_bad_model_and_bad_values_are_one_line_errors(capsys):
    assert main(["eval", "./no-model", "--data", "bundled:math/test"]) == 2
    assert capsys.readouterr().err.startswith("mipo-mlx: error: MODEL: not found: ./no-model; give 'smollm2-135m'")
    for flag, value, expected in [("--top-p", "2", "argument --top-p: expected a value at most 1.0, got 2.0"),
                                  ("--max-prompts", "x", "argument --max-prompts: expected an integer, got 'x'"),
                                  ("--math-shots", "9", "argument --math-shots: expected a value at most 8, got 9"),
                                  ("--on-bad-line", "skp", "argument --on-bad-line: expected one of 'error', 'skip', "
                                                           "got 'skp'; did you mean 'skip'?")]:
        with pytest.raises(SystemExit) as exit_:
            main(["eval", "smollm2-135m", "--data", "bundled:math/test", flag, value])
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and expected in err


def test_a_bad_data_line_stops_eval_naming_the_flag_that_skips_it(tiny_model_dirs, tmp_path, capsys, caplog):
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"prompt": "What can I cook?"}\n{not json\n{"prompt": "How do I relax?"}\n')
    model_dir = tiny_model_dirs[("llama", False)]
    assert main(["eval", str(model_dir), "--data", str(data), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith(f"mipo-mlx: error: --data: {data}:2: ")
    assert err.strip().endswith("; fix the line or pass --on-bad-line skip")
    assert main(["eval", str(model_dir), "--data", str(data), "--on-bad-line", "skip", "--out", str(tmp_path / "out"),
                 "--max-tokens", "2", "--bootstrap-samples", "100"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "out" / "answers.jsonl").read_text().splitlines()]
    assert len(rows) == 2  # the good lines, the bad one skipped
    assert "skipped 1 malformed line(s) (first: line 2: " in caplog.text
