"""Answer metrics and the statistics of before/after reports: intervals, a paired test, win rates.

    low, high = bootstrap_interval(values, samples=1000, seed=0)      # 95% interval of the mean
    p = paired_permutation_p(before, after, samples=1000, seed=0)     # two-sided, paired
    summarize(before, after, 1000, 0)     # n, both means with intervals, the difference, p
    describe(values, 1000, 0)             # one side alone: n, mean, interval
    per_side({"base": [...], "adapted": [...]}, 1000, 0)    # summarize, or describe when base only
    win_rate([1, 0, -1, 1], 1000, 0)      # wins, ties and losses; ties count as wins (the paper's way)
    self_bleu(answers)                    # similarity of the answers to each other (lower: more diverse)
    repetition_loop(answer)               # True when the answer fell into a repetition loop
    echoed_words(answer, context)         # the longest run of the context's words the answer repeats
    copies_context(answer, context)       # True when that run is ECHO_WORDS or longer (compare's context_echo)
    json_ready(metrics)                   # undefined values (NaN) as None, for metrics.json

A statistic of no values (the mean of an empty sample, its interval, the p-value of no
pairs, Self-BLEU of fewer than two answers) is NaN here and null in metrics.json.
"""

import math
import re
from collections import Counter

import numpy as np

# Words and single punctuation marks: a loop of "no, no, no," has the period ("no", ",").
LOOP_TOKEN = re.compile(r"\w+|[^\w\s]")
# Marks that lay out text and repeat by design: table pipes, and runs such as "|---|---|",
# "-----", "=====", dot leaders or "**". They are left out before looking for a loop; a
# sentence's own "." or a hyphen stays, and so does a run of "!" (an answer that loops on it).
LAYOUT = re.compile(r"\||[-=_*~.:#+]{2,}")
# Calibrated on the quickstart's answers: an answer cut by max_tokens after two and a half
# rounds of the same sentence is a loop; no answer that did not loop repeats that much.
LOOP_MAX_PERIOD = 30  # longest repeated unit looked for at the end, in tokens
LOOP_MIN_REPEATS = 2.5
LOOP_MIN_SPAN = 12  # a loop covers at least this many tokens (12 times one word, 3 times a 4-token phrase)
LOOP_REPEATED_4GRAMS = 0.5  # or at least half of the answer's 4-grams repeat an earlier one


def bootstrap_interval(values, samples: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(samples, len(values)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def paired_permutation_p(before, after, samples: int = 1000, seed: int = 0) -> float:
    """Two-sided p-value that after - before has mean 0, by random sign flips of the paired differences."""
    diffs = np.asarray(after, dtype=np.float64) - np.asarray(before, dtype=np.float64)
    if len(diffs) == 0:
        return float("nan")
    if not diffs.any():
        return 1.0
    observed = abs(diffs.mean())
    rng = np.random.default_rng(seed)
    signs = rng.choice([-1.0, 1.0], size=(samples, len(diffs)))
    flipped = np.abs((signs * diffs).mean(axis=1))
    # Count the observed arrangement too, so p is never 0.
    return float((1 + (flipped >= observed - 1e-12).sum()) / (samples + 1))


def describe(values, samples: int, seed: int) -> dict:
    """n, mean and its 95% interval."""
    values = np.asarray(values, dtype=np.float64)
    mean = float(values.mean()) if len(values) else float("nan")
    return {"n": len(values), "mean": mean, "ci": bootstrap_interval(values, samples, seed)}


def summarize(before, after, samples: int, seed: int) -> dict:
    """n, means with 95% intervals, the paired difference with its interval, and p."""
    before, after = np.asarray(before, dtype=np.float64), np.asarray(after, dtype=np.float64)
    first, second = describe(before, samples, seed), describe(after, samples, seed)
    return {
        "n": first["n"],
        "before": first["mean"],
        "before_ci": first["ci"],
        "after": second["mean"],
        "after_ci": second["ci"],
        "difference_ci": bootstrap_interval(after - before, samples, seed),
        "p_value": paired_permutation_p(before, after, samples, seed),
    }


def per_side(values: dict, samples: int, seed: int) -> dict:
    """Before/after with the paired test for two sides; n, mean and interval for one."""
    if "adapted" in values:
        return summarize(values["base"], values["adapted"], samples, seed)
    return describe(values["base"], samples, seed)


def whole_set(n: int, values: dict) -> dict:
    """A statistic of the whole set per side (no interval): before/after, or the one value."""
    if "adapted" in values:
        return {"n": n, "before": values["base"], "after": values["adapted"]}
    return {"n": n, "mean": values["base"]}


def win_rate(outcomes, samples: int, seed: int) -> dict:
    """Outcomes are 1 (win), 0 (tie), -1 (loss); the rate counts ties as wins, and each share is shown apart."""
    outcomes = np.asarray(outcomes)
    wins_or_ties = describe(outcomes >= 0, samples, seed)
    share = lambda value: float((outcomes == value).mean()) if len(outcomes) else float("nan")
    return {"n": wins_or_ties["n"], "value": wins_or_ties["mean"], "ci": wins_or_ties["ci"],
            "wins": share(1), "ties": share(0), "losses": share(-1)}


def json_ready(value):
    """`value` with every NaN or infinite number replaced by None: JSON has no NaN, strict readers refuse it."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value


def self_bleu(texts: list[str], max_n: int = 4) -> float:
    """Mean BLEU of each answer against all the others as references (uniform n-gram weights)."""
    tokenized = [t.split() for t in texts if t.split()]
    if len(tokenized) < 2:
        return float("nan")
    scores = []
    for i, hypothesis in enumerate(tokenized):
        references = tokenized[:i] + tokenized[i + 1 :]
        log_precisions = []
        for n in range(1, max_n + 1):
            grams = Counter(tuple(hypothesis[k : k + n]) for k in range(len(hypothesis) - n + 1))
            best = Counter()
            for reference in references:
                best |= Counter(tuple(reference[k : k + n]) for k in range(len(reference) - n + 1))
            matched = sum(min(c, best[g]) for g, c in grams.items())
            # A small count for no match (Chen & Cherry's method 1) keeps the log finite.
            total = max(sum(grams.values()), 1)
            log_precisions.append(math.log((matched or 0.1) / total))
        closest = min((abs(len(r) - len(hypothesis)), len(r)) for r in references)[1]
        brevity = min(1.0, math.exp(1 - closest / len(hypothesis)))
        scores.append(brevity * math.exp(sum(log_precisions) / max_n))
    return float(np.mean(scores))


# An answer that repeats this many consecutive words of its context copies it (compare's
# context_echo): a name, a city or a required phrase ("Take care", "Hi Dmitri") is shorter; the
# bundled preferences need at most 3 words, and "a carpenter living in Osaka" is 5.
ECHO_WORDS = 5
WORD = re.compile(r"\w+")


def _periodic_tail(tokens: list[str], period: int) -> int:
    """Length of the longest suffix of `tokens` that repeats with this period."""
    run = 0
    while len(tokens) - 1 - run - period >= 0 and tokens[-1 - run] == tokens[-1 - run - period]:
        run += 1
    return run + period


def repetition_loop(text: str) -> bool:
    """True when the answer ends in one unit repeated (a word, a phrase, a sentence) or mostly repeats itself.

    The end of the answer is checked twice, with and without its last token, since an answer
    cut by max_tokens often stops inside the unit ("... à Paris. Je suis à Pa"). Layout marks
    (LAYOUT) are left out first: a wide table's "|---|---|---|" or a rule of dashes is no loop.
    """
    tokens = LOOP_TOKEN.findall(LAYOUT.sub(" ", text.lower()))
    for end in (len(tokens), len(tokens) - 1):
        for period in range(1, min(LOOP_MAX_PERIOD, int(end / LOOP_MIN_REPEATS)) + 1):
            span = _periodic_tail(tokens[:end], period)
            # The unit must hold a word: marks alone repeat as table cells ("| ✓ | ✓ | ✓ |").
            has_word = any(t[0].isalnum() for t in tokens[end - period : end])
            if has_word and span >= max(LOOP_MIN_REPEATS * period, LOOP_MIN_SPAN):
                return True
    grams = [tuple(tokens[i : i + 4]) for i in range(len(tokens) - 3)]
    return len(grams) >= 16 and 1 - len(set(grams)) / len(grams) >= LOOP_REPEATED_4GRAMS


def echoed_words(text: str, context: str) -> int:
    """The longest run of consecutive words of `context` that `text` repeats, case-insensitive.

    MIPO's swap_context and drop_context pairs reward answers that only the context explains,
    and copying the context is the cheapest such answer: a small model learns to echo it.
    """
    answer, source = WORD.findall(text.lower()), WORD.findall(context.lower())
    longest, previous = 0, [0] * (len(source) + 1)
    for word in answer:  # longest common run of words: previous[j] ends at source[j - 1]
        current = [0] * (len(source) + 1)
        for j, other in enumerate(source, 1):
            if word == other:
                current[j] = previous[j - 1] + 1
                longest = max(longest, current[j])
        previous = current
    return longest


def copies_context(text: str, context: str) -> bool:
    """Whether the answer repeats ECHO_WORDS or more consecutive words of its context (compare's context_echo)."""
    return bool(context) and echoed_words(text, context) >= ECHO_WORDS
