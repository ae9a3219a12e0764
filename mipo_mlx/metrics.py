"""Statistics for before/after reports: bootstrap intervals and a paired test.

    low, high = bootstrap_interval(values, samples=1000, seed=0)      # 95% interval of the mean
    p = paired_permutation_p(before, after, samples=1000, seed=0)     # two-sided, paired
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


def summarize(before, after, samples: int, seed: int) -> dict:
    """n, means with 95% intervals, the paired difference with its interval, and p."""
    before, after = np.asarray(before, dtype=np.float64), np.asarray(after, dtype=np.float64)
    return {
        "n": int(len(before)),
        "before": float(before.mean()) if len(before) else float("nan"),
        "before_ci": bootstrap_interval(before, samples, seed),
        "after": float(after.mean()) if len(after) else float("nan"),
        "after_ci": bootstrap_interval(after, samples, seed),
        "difference_ci": bootstrap_interval(after - before, samples, seed),
        "p_value": paired_permutation_p(before, after, samples, seed),
    }
