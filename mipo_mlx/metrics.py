"""Statistics for before/after reports: bootstrap intervals, a paired test and win rates.

    low, high = bootstrap_interval(values, samples=1000, seed=0)      # 95% interval of the mean
    p = paired_permutation_p(before, after, samples=1000, seed=0)     # two-sided, paired
    summarize(before, after, 1000, 0)     # n, both means with intervals, the difference, p
    describe(values, 1000, 0)             # one side alone: n, mean, interval
    win_rate([1, 0, -1, 1], 1000, 0)      # wins, ties and losses; ties count as wins (the paper's way)
"""

import numpy as np


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
    if len(diffs) == 0 or not diffs.any():
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
    return {"n": int(len(values)), "mean": mean, "ci": bootstrap_interval(values, samples, seed)}


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


def win_rate(outcomes, samples: int, seed: int) -> dict:
    """Outcomes are 1 (win), 0 (tie), -1 (loss); the rate counts ties as wins, and each share is shown apart."""
    outcomes = np.asarray(outcomes)
    wins_or_ties = describe(outcomes >= 0, samples, seed)
    share = lambda value: float((outcomes == value).mean()) if len(outcomes) else float("nan")
    return {"n": wins_or_ties["n"], "value": wins_or_ties["mean"], "ci": wins_or_ties["ci"],
            "wins": share(1), "ties": share(0), "losses": share(-1)}
