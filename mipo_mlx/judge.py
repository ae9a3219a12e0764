"""The local judge, as the paper scores personalization: 1 to 5 per stated preference, and win rates.

    judge = load_judge("mlx-community/Qwen2.5-7B-Instruct-4bit", policy=loaded, seed=0, key="eval.judge_model")
    judge_rows(judge, records, rows)           # adds row["judge"]: preferences, replies, scores, mean score
    metrics.update(judge_metrics(rows, samples=1000, seed=0))

Set `eval.judge_model` in a recipe (or `--judge-model` for `mipo-mlx eval`) to any model
mipo_mlx.loading.load_model accepts; naming the run's own model reuses it, adapter off.

Rubric (MIPO.md): for each preference the user stated (the bundled profiles list them
one by one; otherwise the whole context is one preference) the judge sees the question,
the preference and one answer, and replies with a number from 1 ("the response is
general") to 5 ("it sufficiently addresses the user's preference"). It samples as the
paper's judge does: temperature 0.1, top_p 0.9. An answer's score is the mean over its
preferences.

Replies are read by parse_score: "4", "Score: 4", "**4**", "4/5", "I'd give it a 4" are 4.
An explicit form ("N/5", then "Score: N", "Rating: N") wins over a bare number, and the
numbers of a numbered list ("1. ...", "2) ...", "(3) ..." at line starts, counting from 1)
are never read as the score: "1. The answer is in French." has none. A reply with no
number from 1 to 5, or with several numbers and no word saying which is the score, is
missing: it is counted and reported (judge/replies_without_score), never read as a number. An answer whose every reply is missing has no score.

Metrics: judge/score (mean score, before/after with intervals and the paired test, over
prompts where both answers have a score); judge/win_rate/adapted_vs_base, the share of
prompts where the adapted answer scores at least as high as the base answer (ties count
as wins, as the paper counts them; wins, ties and losses are also given apart); and, when
the data has a reference answer (a record's "reference" field), each side's win rate
over the reference, with judge/win_rate_vs_reference comparing them before/after.
"""

import logging
import re

from mipo_mlx.chat import encode_prompt
from mipo_mlx.errors import UserError, rekeyed
from mipo_mlx.generation import SamplerSettings, generate_answers
from mipo_mlx.lora import adapter_disabled
from mipo_mlx.metrics import per_side, whole_set, win_rate
from mipo_mlx.seeds import derived_seed

logger = logging.getLogger("mipo_mlx")
JUDGE_SETTINGS = SamplerSettings(temperature=0.1, top_p=0.9, max_tokens=24)  # the paper's judge sampler
RUBRIC = (
    "You are judging how well a response follows a preference its user stated.\n\n"
    "User's preference: {preference}\n\n"
    "User's question: {question}\n\n"
    "Response: {answer}\n\n"
    "Score the response from 1 to 5: 1 if the response is general, 5 if it sufficiently addresses "
    "the user's preference. Reply with the number only."
)
NUMBER = r"\d+(?:\.\d+)?"
OUT_OF_FIVE = re.compile(rf"({NUMBER})\s*(?:/|out of)\s*5\b", re.IGNORECASE)
NAMED_SCORE = re.compile(rf"\b(?:score|rating|rate|grade|give(?: it)?)\b[^\d\n]{{0,20}}?({NUMBER})", re.IGNORECASE)
ANY_NUMBER = re.compile(rf"(?<![\d.]){NUMBER}")
LIST_NUMBER = re.compile(r"\s*\(?(\d+)[.)][ \t]+(?=\S)")  # "1. text", "2) text", "(3) text"; not "5." alone


def without_list_numbers(reply: str) -> str:
    """The reply with the numbers of a numbered list taken out: line starts counting 1, 2, 3, ..."""
    lines, expected = [], 1
    for line in reply.splitlines():
        marker = LIST_NUMBER.match(line)
        # Only a count from 1: "4. It follows the preference." is a score, not the fourth item of a list.
        if marker and int(marker[1]) == expected:
            line, expected = line[marker.end():], expected + 1
        lines.append(line)
    return "\n".join(lines)


def parse_score(reply: str) -> float | None:
    """The judge's score from 1 to 5, or None when the reply does not give one."""
    reply = without_list_numbers(reply)
    for pattern in (OUT_OF_FIVE, NAMED_SCORE):
        # The last one: a judge that first echoes the rubric ("score it from 1 to 5") gives its score after.
        named = pattern.findall(reply)
        if named:
            value = float(named[-1])
            return value if 1 <= value <= 5 else None
    numbers = {float(n) for n in ANY_NUMBER.findall(reply)}
    if len(numbers) != 1:
        return None
    value = numbers.pop()
    return value if 1 <= value <= 5 else None


def stated_preferences(record) -> list[str]:
    """The preferences to judge against: each listed one, else the user's whole context, else none."""
    listed = [p["text"] for p in record.extras.get("preferences") or [] if p.get("text")]
    return listed or ([record.context] if record.context else [])


def judge_prompt(preference: str, question: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": RUBRIC.format(preference=preference, question=question, answer=answer.strip())}]


class ModelJudge:
    """A chat model that replies to judge prompts; LoRA layers, if any, are switched off while it judges."""

    def __init__(self, loaded, seed: int):
        self.loaded, self.seed = loaded, seed

    def __call__(self, conversations: list[list[dict]]) -> list[str]:
        tokenizer = self.loaded.tokenizer
        prompts = [encode_prompt(tokenizer, messages) for messages in conversations]
        with adapter_disabled(self.loaded.model):
            answers = generate_answers(self.loaded.model, tokenizer, prompts, JUDGE_SETTINGS,
                                       derived_seed(self.seed, "judge"))
        return [a.text for a in answers]


def load_named(spec: str, key: str, **options):
    """load_model, with a mistake reported under `key` (the recipe key or flag that named the model)."""
    from mipo_mlx.loading import load_model

    try:
        return load_model(spec, **options)
    except UserError as error:
        raise rekeyed(error, key) from None


def load_judge(spec: str, policy, seed: int, key: str) -> ModelJudge:
    """The judge model: the policy itself (adapter off) when `spec` names it, else loaded apart."""
    return ModelJudge(policy if spec == policy.source else load_named(spec, key), seed)


def judge_rows(judge, records, rows: list[dict]) -> None:
    """Ask the judge about every answer (and reference) of every row with stated preferences."""
    sides = [side for side in ("base", "adapted") if side in rows[0]] if rows else []
    asked, conversations = [], []
    for record, row in zip(records, rows):
        preferences = stated_preferences(record)
        if not preferences:
            continue
        row["judge"] = {"preferences": preferences, "replies": {}, "scores": {}, "score": {}}
        answers = {side: row[side] for side in sides}
        if row.get("reference"):
            answers["reference"] = row["reference"]
        for side, answer in answers.items():
            for preference in preferences:
                asked.append((row, side))
                conversations.append(judge_prompt(preference, record.question, answer))
    if not conversations:
        return
    logger.info(f"judge: scoring {len(conversations)} (answer, preference) pairs")
    for (row, side), reply in zip(asked, judge(conversations)):
        row["judge"]["replies"].setdefault(side, []).append(reply)
        row["judge"]["scores"].setdefault(side, []).append(parse_score(reply))
    for row in rows:
        if "judge" in row:
            for side, scores in row["judge"]["scores"].items():
                found = [s for s in scores if s is not None]
                row["judge"]["score"][side] = sum(found) / len(found) if found else None


def _sign(x: float) -> int:
    return (x > 0) - (x < 0)


def judge_metrics(rows: list[dict], samples: int, seed: int) -> dict:
    """Mean score per side, replies without a score, and win rates (ties as wins, and apart)."""
    judged = [r for r in rows if "judge" in r]
    if not judged:
        return {}
    sides = [side for side in ("base", "adapted") if side in judged[0]["judge"]["scores"]]
    score = lambda row, side: row["judge"]["score"].get(side)
    scored = [r for r in judged if all(score(r, side) is not None for side in sides)]
    replies = sum(len(r["judge"]["replies"][sides[0]]) for r in judged)
    missing = {side: sum(s is None for r in judged for s in r["judge"]["scores"][side]) for side in sides}
    metrics = {
        "judge/score": per_side({side: [score(r, side) for r in scored] for side in sides}, samples, seed),
        "judge/replies_without_score": whole_set(replies, missing),
    }
    if len(sides) == 2:
        outcomes = [_sign(score(r, "adapted") - score(r, "base")) for r in scored]
        metrics["judge/win_rate/adapted_vs_base"] = win_rate(outcomes, samples, seed)
    with_reference = [r for r in scored if score(r, "reference") is not None]
    if with_reference:
        outcomes = {side: [_sign(score(r, side) - score(r, "reference")) for r in with_reference] for side in sides}
        metrics["judge/win_rate_vs_reference"] = per_side(
            {side: [o >= 0 for o in outcomes[side]] for side in sides}, samples, seed)
        for side in sides:
            metrics[f"judge/win_rate/{side}_vs_reference"] = win_rate(outcomes[side], samples, seed)
    return metrics
