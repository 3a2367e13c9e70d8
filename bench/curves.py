"""The convergence study's rules, on learning curves: when a run has flattened, when it
reaches a target, and intervals over seeds. Pure functions of {x: WER} dicts, where x is
a round or a compute count; bench/convergence.py applies them, tests check them on
synthetic curves.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Optional, Sequence

Curve = dict  # {round or compute: WER}, ascending keys; WER as a fraction


def best_so_far(curve: Curve, upto: float) -> float:
    """The lowest WER among the points with x <= upto (inf when there is none)."""
    return min((wer for x, wer in curve.items() if x <= upto), default=math.inf)


def flattened(curve: Curve, rel_tol: float = 0.03, window: float = 0.25, min_points: int = 4,
              min_gain: float = 0.2) -> bool:
    """True when the best WER improved by less than `rel_tol` (relative) over the last
    `window` of the run: best(x <= (1 - window) * x_last) against best(all).

    A curve with fewer than `min_points` points has not shown it has flattened, and one whose
    best is not `min_gain` (relative) below its first point has not started learning: a run
    stuck near 100 % WER is flat, not converged."""
    if len(curve) < min_points:
        return False
    first = curve[min(curve)]
    best = best_so_far(curve, max(curve))
    if not best <= (1.0 - min_gain) * first:
        return False
    earlier = best_so_far(curve, (1.0 - window) * max(curve))
    if not math.isfinite(earlier) or earlier <= 0.0:
        return earlier <= 0.0  # nothing left to improve
    return (earlier - best) / earlier < rel_tol


def first_reach(curve: Curve, target: float) -> Optional[float]:
    """Where the curve first reaches `target` (None: never), interpolated linearly between the
    last point above it and the first at or below it, so that runs validated every N rounds
    do not all tie on multiples of N. At or below the target from its first point: that point."""
    points = sorted(curve.items())
    for i, (x, wer) in enumerate(points):
        if wer <= target + 1e-12:
            if i == 0:
                return x
            x0, w0 = points[i - 1]
            return x0 + (w0 - target) / (w0 - wer) * (x - x0)
    return None


def at(curve: Curve, x: float) -> float:
    """The curve's value at x, interpolated linearly between its points (x within its range)."""
    points = sorted(curve.items())
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1:
            return y0 + (x - x0) / (x1 - x0) * (y1 - y0)
    if points and x == points[0][0]:
        return points[0][1]
    raise ValueError(f"{x} is outside the curve's range {points[0][0]}..{points[-1][0]}")


def plateau_point(dev: Curve) -> float:
    """The x of the best dev WER (the earliest on ties): the model a run delivers, chosen on dev."""
    best = min(dev.values())
    return min(x for x, wer in dev.items() if wer == best)


def t_quantile(level: float, df: int) -> float:
    """Two-sided Student-t quantile for a `level` interval with `df` degrees of freedom."""
    from scipy.stats import t

    return float(t.ppf(0.5 + level / 2, df))


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float
    n: int

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def excludes(self, value: float) -> bool:
        return not self.low <= value <= self.high


def mean_interval(values: Sequence[float], level: float = 0.95) -> Interval:
    """Mean and Student-t interval of independent values (one per seed); n = 1 gives an infinite interval."""
    n = len(values)
    if n == 0:
        raise ValueError("no values")
    mean = statistics.fmean(values)
    if n == 1:
        return Interval(mean, -math.inf, math.inf, 1)
    half = t_quantile(level, n - 1) * statistics.stdev(values) / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n)


def ratio_interval(ratios: Sequence[float], level: float = 0.95) -> Interval:
    """Geometric mean and interval of ratios (speed-ups), from a t interval on their logs."""
    logs = mean_interval([math.log(r) for r in ratios], level)
    return Interval(math.exp(logs.mean), math.exp(logs.low), math.exp(logs.high), logs.n)
