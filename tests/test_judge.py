"""The local judge: reading scores from replies, the win-rate arithmetic with a stub judge, a real tiny judge.

    .venv/bin/python -m pytest -q tests/test_judge.py
"""

import json

import pytest

from mipo_mlx.compare import score
from mipo_mlx.report import format_report
from mipo_mlx.data import PromptRecord
from mipo_mlx.errors import UserError
from mipo_mlx.generation import Answer
from mipo_mlx.judge import (
    ModelJudge,
    judge_metrics,
    judge_rows,
    load_judge,
    parse_score,
    stated_preferences,
)
from mipo_mlx.loading import load_model
from mipo_mlx.recipe import parse_recipe


@pytest.mark.parametrize("reply, expected", [
    ("4", 4), ("5.", 5), ("**3**", 3), ("Score: 2", 2), ("4/5", 4), ("Rating: 4.5", 4.5),
    ("I would give it a 2 out of 5.", 2),
    ("I'd give it a 3 because it answers in Italian.", 3),
    ("You asked me to score it from 1 to 5. Score: 4", 4),  # the rubric echoed, then the score
    ("The response follows the preference well.", None),
    ("Between 2 and 4, depending on taste.", None),  # two numbers, none named the score
    ("0", None), ("7", None), ("Score: 9/10", None), ("", None),
])
def test_judge_replies_are_read_robustly_and_no_score_stays_missing(reply, expected):
    assert parse_score(reply) == expected


@pytest.mark.parametrize("reply, expected", [
    ("1. The answer is in French and mentions Paris. Score: 4", 4),
    ("1) The answer is in French.\n2) It mentions Paris.\nRating: 5", 5),
    ("1. The answer is in French.\n2. It mentions Paris.\n4/5", 4),
    ("1. The answer is in French, so 4", 4),  # the list number taken out, one number is left
    ("(1) It answers in French.\n(2) It is short.\n3", 3),
    ("1. The answer is in French.", None),  # a list number alone is no score
    ("1) It follows the preference.\n2) It is short.", None),
    ("4. It follows the preference well.", 4),  # no list starts at 4: the number is the score
    ("1.", 1), ("1", 1),
])
def test_a_leading_list_number_is_never_read_as_the_score(reply, expected):
    assert parse_score(reply) == expected


class StubJudge:
    """Replies by the answer being judged: the reply text for the first key found in the prompt."""

    def __init__(self, replies: dict):
        self.replies, self.prompts = replies, []

    def __call__(self, conversations):
        self.prompts += conversations
        return [next(reply for key, reply in self.replies.items() if f"Response: {key}" in c[0]["content"])
                for c in conversations]


def records_and_rows(base: list[str], adapted: list[str], references=None):
    records = [PromptRecord(f"p{i}", f"Question {i}?", "I live in Rome. Answer in Italian.", extras={
        "preferences": [{"kind": "language", "value": "it", "text": "Answer in Italian."},
                        {"kind": "mention", "value": "Rome", "text": "Mention Rome."}],
        "reference": references[i] if references else None}) for i in range(len(base))]
    answer = lambda text: Answer(text, [1, 2], "stop")
    rows, _ = score(records, {"base": [answer(t) for t in base], "adapted": [answer(t) for t in adapted]}, 100, 0)
    return records, rows


def test_mean_scores_missing_replies_and_win_rates_with_ties():
    records, rows = records_and_rows(["b-low", "b-mid", "b-high"], ["a-high", "a-mid", "a-low"])
    judge = StubJudge({"b-low": "Score: 1", "b-mid": "3", "b-high": "5", "a-high": "5", "a-mid": "3",
                       "a-low": "I cannot tell."})  # no score: this answer's two replies are missing
    judge_rows(judge, records, rows)
    assert len(judge.prompts) == 12  # 3 prompts x 2 answers x 2 stated preferences
    assert "User's preference: Mention Rome." in judge.prompts[1][0]["content"]
    assert "5 if it sufficiently addresses the user's preference" in judge.prompts[0][0]["content"]
    assert rows[2]["judge"]["score"] == {"base": 5.0, "adapted": None}
    assert rows[2]["judge"]["replies"]["adapted"] == ["I cannot tell.", "I cannot tell."]
    metrics = judge_metrics(rows, samples=200, seed=0)
    # Only prompts scored on both sides count: p0 (1 -> 5, a win) and p1 (3 -> 3, a tie).
    assert (metrics["judge/score"]["n"], metrics["judge/score"]["before"], metrics["judge/score"]["after"]) == (2, 2.0, 4.0)
    assert metrics["judge/replies_without_score"] == {"n": 6, "before": 0, "after": 2}
    wins = metrics["judge/win_rate/adapted_vs_base"]
    assert (wins["n"], wins["value"], wins["wins"], wins["ties"], wins["losses"]) == (2, 1.0, 0.5, 0.5, 0.0)
    report = format_report(metrics, rows, {})
    assert "| judge/replies_without_score | 6 | 0 | 2 | +2 | |" in report
    assert "| adapted_vs_base | 2 | 1 [1, 1] | 0.5 | 0.5 | 0 |" in report


def test_win_rate_over_a_reference_answer_counts_ties_as_wins():
    records, rows = records_and_rows(["b1", "b2", "b3", "b4"], ["a1", "a2", "a3", "a4"], references=["r"] * 4)
    judge = StubJudge({"b1": "2", "b2": "3", "b3": "2", "b4": "4", "a1": "3", "a2": "4", "a3": "3", "a4": "1", "r": "3"})
    judge_rows(judge, records, rows)
    metrics = judge_metrics(rows, samples=200, seed=0)
    base, adapted = metrics["judge/win_rate/base_vs_reference"], metrics["judge/win_rate/adapted_vs_reference"]
    assert (base["value"], base["wins"], base["ties"], base["losses"]) == (0.5, 0.25, 0.25, 0.5)
    assert (adapted["value"], adapted["wins"], adapted["ties"], adapted["losses"]) == (0.75, 0.25, 0.5, 0.25)
    paired = metrics["judge/win_rate_vs_reference"]
    assert (paired["before"], paired["after"]) == (0.5, 0.75) and 0 < paired["p_value"] <= 1


def test_preferences_to_judge_are_the_listed_ones_or_the_whole_context():
    assert stated_preferences(PromptRecord("p", "Q?", "Answer in French.")) == ["Answer in French."]
    assert stated_preferences(PromptRecord("p", "Q?")) == []


def test_a_real_tiny_judge_end_to_end(tiny_model_dirs):
    loaded = load_model(str(tiny_model_dirs[("qwen2", False)]))
    records, rows = records_and_rows(["Ciao da Roma.", "Hello."], ["Roma è bella.", "Ciao!"])
    judge_rows(ModelJudge(loaded, seed=0), records, rows)
    replies = [r for row in rows for side in ("base", "adapted") for r in row["judge"]["replies"][side]]
    assert len(replies) == 8 and all(isinstance(r, str) for r in replies)
    metrics = judge_metrics(rows, samples=100, seed=0)
    missing = metrics["judge/replies_without_score"]
    # A random model rarely says a number: whatever it said is accounted for, scored or missing.
    scored = sum(s is not None for row in rows for side in ("base", "adapted") for s in row["judge"]["scores"][side])
    assert missing["n"] == 4 and missing["before"] + missing["after"] + scored == 8
    json.dumps(rows)  # what answers.jsonl will hold


def test_the_policy_model_is_reused_as_judge_and_a_missing_judge_names_its_key(tiny_model_dirs):
    loaded = load_model(str(tiny_model_dirs[("llama", False)]))
    assert load_judge(loaded.source, loaded, seed=0, key="eval.judge_model").loaded is loaded
    with pytest.raises(UserError, match=r"^eval\.judge_model: not found: nope/judge"):
        load_judge("nope/judge/x", loaded, seed=0, key="eval.judge_model")
    with pytest.raises(UserError, match=r"eval\.judge_model: not found: \./no-such-judge"):
        parse_recipe("eval: {judge_model: ./no-such-judge}", "r.yaml")
