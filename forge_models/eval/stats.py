"""Intervals for the harness' accuracies: seeded percentile bootstrap, single and paired.

One example is one Bernoulli outcome, so with a few hundred examples an accuracy moves by several points
between equally good models. Every accuracy the harness reports comes with a 95% interval, and every
before/after (or winner/parent) comparison on the *same* examples with an interval of the paired
difference: resampling example indices once and applying them to both outcome vectors keeps the pairing,
so what two models share (easy and hard examples) cancels out. An interval that covers 0 is "within noise".

The percentile bootstrap (Efron & Tibshirani 1993, ch. 13) is used for its simplicity; for accuracies near 0
or 1 with few examples it under-covers slightly (see tests/unit/test_eval.py for the measured coverage).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from forge_models.runtime import ConfigError

CONFIDENCE = 0.95


def _resample_means(values: np.ndarray, n_resamples: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = len(values)
    # Chunks bound memory at ~2M indices whatever n_resamples * n is.
    chunk = max(1, 2_000_000 // max(1, n))
    means = []
    for start in range(0, n_resamples, chunk):
        idx = rng.integers(0, n, size=(min(chunk, n_resamples - start), n))
        means.append(values[idx].mean(axis=1))
    return np.concatenate(means)


def bootstrap_interval(
    values: Sequence[float], n_resamples: int = 2000, seed: int = 0, confidence: float = CONFIDENCE
) -> tuple[float, float]:
    """(low, high) percentile-bootstrap interval of the mean of ``values`` (e.g. 0/1 outcomes)."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1 or len(arr) == 0:
        raise ConfigError("bootstrap_interval needs a non-empty 1-D sequence of values")
    if not 0 < confidence < 1:
        raise ConfigError(f"confidence must be in (0, 1), got {confidence}")
    means = _resample_means(arr, n_resamples, seed)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(low), float(high)


def paired_difference(
    after: Sequence[float], before: Sequence[float], n_resamples: int = 2000, seed: int = 0,
    confidence: float = CONFIDENCE,
) -> tuple[float, float, float]:
    """(mean(after - before), low, high): the paired bootstrap interval over the same examples."""
    a = np.asarray(after, dtype=np.float64)
    b = np.asarray(before, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ConfigError(
            f"paired_difference needs two outcome vectors over the same examples, got shapes {a.shape} and {b.shape}"
        )
    diff = a - b
    low, high = bootstrap_interval(diff, n_resamples, seed, confidence)
    return float(diff.mean()), low, high


def within_noise(low: float, high: float) -> bool:
    """True when an interval of a difference covers 0: the data cannot tell the two apart."""
    return low <= 0.0 <= high


def describe_difference(name: str, diff: float, low: float, high: float) -> str:
    """One report line: the difference, its interval, and whether it is real or within noise."""
    verdict = "within noise" if within_noise(low, high) else ("better" if diff > 0 else "worse")
    return f"{name}: {diff:+.3f} [{low:+.3f}, {high:+.3f}] ({verdict})"


def paired_metrics(
    after: dict[str, Sequence[float]], before: dict[str, Sequence[float]], n_resamples: int = 2000, seed: int = 0
) -> dict[str, float]:
    """``d_<metric>``, ``d_<metric>_lo``, ``d_<metric>_hi`` for every outcome vector both evaluations share.

    ``after`` / ``before`` are the ``outcomes`` dicts :func:`forge_models.eval.evaluate` fills; a metric
    whose vectors differ in length (different examples) is an error, not silently skipped.
    """
    out: dict[str, float] = {}
    for name in sorted(set(after) & set(before)):
        diff, low, high = paired_difference(after[name], before[name], n_resamples, seed)
        out.update({f"d_{name}": diff, f"d_{name}_lo": low, f"d_{name}_hi": high})
    return out


def difference_lines(evaluation: dict[str, float], label: str) -> list[str]:
    """Report lines for every paired difference (``d_<metric>`` keys) in one evaluation's metrics."""
    names = sorted(k[2:] for k in evaluation if k.startswith("d_") and not k.endswith(("_lo", "_hi")))
    if not names:
        return []
    lines = [f"Paired differences, {label}, same examples, 95% bootstrap intervals:"]
    for name in names:
        d, lo, hi = evaluation[f"d_{name}"], evaluation[f"d_{name}_lo"], evaluation[f"d_{name}_hi"]
        lines.append("- " + describe_difference(name, d, lo, hi))
    return lines


def bootstrap_median_interval(
    values: Sequence[float], n_resamples: int = 2000, seed: int = 0, confidence: float = CONFIDENCE
) -> tuple[float, float, float]:
    """(median, low, high) of the bootstrap means: ADAS' "95% Bootstrap Confidence Interval: (lo, hi), Median: m".

    The same resamples as :func:`bootstrap_interval` with the same seed, so (low, high) equal its interval.
    """
    low, high = bootstrap_interval(values, n_resamples, seed, confidence)
    means = _resample_means(np.asarray(values, dtype=np.float64), n_resamples, seed)
    return float(np.median(means)), low, high
