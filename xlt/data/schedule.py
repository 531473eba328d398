"""Curricula over tokens trained: the Japanese share and the sequence-length warmup.

Pure functions of (tokens so far, planned total, DataArguments). Everything is expressed in
tokens, not steps, so a change of batch size or world size does not change the curriculum.

The Japanese share r(x) is defined on the run fraction x = tokens / total and held at r(1)
beyond the planned end. ``cumulative_ja_target`` is its exact integral (in tokens), which the
mixer realises step by step (see ``xlt.data.mixture``).
"""

from __future__ import annotations

import math
from typing import Any

from xlt.errors import XltError
from xlt.validate import CHOICES, parse_points

SCHEDULES = CHOICES["ja_schedule"]


def ratio_range(args: Any) -> tuple[float, float]:
    """The smallest and largest Japanese share the schedule ever asks for."""
    if args.ja_schedule == "piecewise":
        rs = [r for _, r in parse_points(args.ja_points)]
    elif args.ja_schedule == "constant":
        rs = [float(args.ja_ratio_start)]
    else:
        rs = [float(args.ja_ratio_start), float(args.ja_ratio_end)]
    return min(rs), max(rs)


# ---------------------------------------------------------------------------------------------
# The Japanese share and its integral, on the run fraction x in [0, 1]
# ---------------------------------------------------------------------------------------------
def _knots(args: Any) -> list[tuple[float, float]]:
    """Piecewise-linear schedules as knots (constant, linear, step and piecewise are all of this form)."""
    a, b, ramp = float(args.ja_ratio_start), float(args.ja_ratio_end), float(args.ja_ramp_fraction)
    kind = args.ja_schedule
    if kind == "constant":
        return [(0.0, a), (1.0, a)]
    if kind == "linear":
        return [(0.0, a), (ramp, b), (1.0, b)] if ramp < 1.0 else [(0.0, a), (1.0, b)]
    if kind == "step":  # PolyLM-style stages: `start` until `ramp_fraction`, then `end`
        return [(0.0, a), (ramp, a), (ramp, b), (1.0, b)]
    if kind == "piecewise":
        return parse_points(args.ja_points)
    raise XltError(f"ja_schedule={kind!r} is not piecewise linear")


def _ratio_x(x: float, args: Any) -> float:
    x = min(max(x, 0.0), 1.0)
    if args.ja_schedule == "cosine":
        a, b, ramp = float(args.ja_ratio_start), float(args.ja_ratio_end), float(args.ja_ramp_fraction)
        u = min(x / ramp, 1.0)
        return a + (b - a) * (1.0 - math.cos(math.pi * u)) / 2.0
    knots = _knots(args)
    for (x0, r0), (x1, r1) in zip(knots, knots[1:], strict=False):
        if x < x1 or (x1 == 1.0 and x <= 1.0):
            if x1 == x0:
                continue
            return r0 + (r1 - r0) * (x - x0) / (x1 - x0) if x >= x0 else r0
    return knots[-1][1]


def _integral_x(x: float, args: Any) -> float:
    """Exact integral of r over [0, x] in run fractions; r(1) continues beyond x = 1."""
    tail = max(x - 1.0, 0.0) * _ratio_x(1.0, args)
    x = min(max(x, 0.0), 1.0)
    if args.ja_schedule == "cosine":
        a, b, ramp = float(args.ja_ratio_start), float(args.ja_ratio_end), float(args.ja_ramp_fraction)
        u = min(x / ramp, 1.0)
        # ∫ (1 - cos(pi u))/2 du = u/2 - sin(pi u) / (2 pi), scaled back by the ramp length
        ramp_part = ramp * (a * u + (b - a) * (u / 2.0 - math.sin(math.pi * u) / (2.0 * math.pi)))
        return ramp_part + max(x - ramp, 0.0) * b + tail
    total = 0.0
    knots = _knots(args)
    for (x0, r0), (x1, r1) in zip(knots, knots[1:], strict=False):
        if x <= x0:
            break
        if x1 == x0:
            continue
        hi = min(x, x1)
        r_hi = r0 + (r1 - r0) * (hi - x0) / (x1 - x0)
        total += (hi - x0) * (r0 + r_hi) / 2.0  # trapezoid: exact for a linear piece
    return total + tail


def ja_ratio(tokens: float, total: float, args: Any) -> float:
    """The schedule's Japanese share at `tokens` trained out of a planned `total`."""
    return _ratio_x(tokens / total if total > 0 else 1.0, args)


def cumulative_ja_target(tokens: float, total: float, args: Any) -> float:
    """Japanese tokens the first `tokens` tokens should hold: the exact integral of ``ja_ratio``."""
    if total <= 0:
        return tokens * _ratio_x(1.0, args)
    return total * _integral_x(tokens / total, args)


def cumulative_ja_share(tokens: float, total: float, args: Any) -> float:
    """The target Japanese share of all tokens so far (cumulative target / tokens)."""
    if tokens <= 0:
        return ja_ratio(0.0, total, args)
    return cumulative_ja_target(tokens, total, args) / tokens


# ---------------------------------------------------------------------------------------------
# Sequence-length warmup
# ---------------------------------------------------------------------------------------------
def seq_len_at(tokens: float, total: float, args: Any) -> int:
    """Row (segment) length at `tokens` trained: grows from ``slw_min_len`` to ``seq_len``.

    'linear' or 'root' (sqrt) growth over ``slw_fraction`` of the run, rounded down to a
    multiple of 8 (tensor-core friendly); ``seq_len`` when SLW is off.
    """
    lo, hi = args.slw_min_len, int(args.seq_len)
    if lo is None:
        return hi
    span = float(args.slw_fraction) * total
    u = 1.0 if span <= 0 else min(max(tokens / span, 0.0), 1.0)
    if args.slw_schedule == "root":
        u = math.sqrt(u)
    length = int(lo + (hi - lo) * u) // 8 * 8
    return min(max(length, int(lo)), hi)
