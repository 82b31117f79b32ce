"""Quantiles read off bucketed histograms (pure).

Two readings of the same rank walk: :func:`bucket_quantile` interpolates
inside the bucket that holds the rank, as Prometheus' ``histogram_quantile``
does (the benches); :func:`bucket_upper_bound` answers that bucket's upper
bound, a figure the histogram guarantees (the status screen's lag p99).

``counts`` are per bucket (not cumulative), one more than ``bounds``: the
last is everything above the highest bound, and a rank that falls there is
reported as the highest bound.  An empty histogram has no quantile (None).
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["bucket_quantile", "bucket_upper_bound"]


def _rank_bucket(
    bounds: Sequence[float], counts: Sequence[int], q: float
) -> tuple[int, int, float] | None:
    """(bucket index, count below it, rank) of the ``q`` quantile; None: empty."""
    if len(counts) != len(bounds) + 1:
        raise ValueError(f"{len(counts)} counts for {len(bounds)} bounds (want bounds + 1)")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile {q} is not in [0, 1]")
    total = sum(counts)
    if total == 0:
        return None
    rank, below = q * total, 0
    for i, count in enumerate(counts):
        if count and below + count >= rank:
            return i, below, rank
        below += count
    return len(counts) - 1, below, rank


def bucket_quantile(bounds: Sequence[float], counts: Sequence[int], q: float) -> float | None:
    """The ``q`` quantile (0..1), linear within its bucket (the first starts at 0)."""
    found = _rank_bucket(bounds, counts, q)
    if found is None:
        return None
    i, below, rank = found
    if i == len(bounds):
        return bounds[-1]
    lower = bounds[i - 1] if i else 0.0
    return lower + (bounds[i] - lower) * (rank - below) / counts[i]


def bucket_upper_bound(bounds: Sequence[float], counts: Sequence[int], q: float) -> float | None:
    """The upper bound of the bucket holding the ``q`` quantile (0..1)."""
    found = _rank_bucket(bounds, counts, q)
    return None if found is None else bounds[min(found[0], len(bounds) - 1)]
