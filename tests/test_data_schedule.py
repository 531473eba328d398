"""Japanese-ratio schedules (values, exact integrals, checks) and the sequence-length warmup."""

import math

import pytest
from data_fixtures import SCHEDULES

from xlt.config import DataArguments, XltError, validate_data_args
from xlt.data.schedule import (
    cumulative_ja_share,
    cumulative_ja_target,
    ja_ratio,
    parse_points,
    seq_len_at,
)


def _args(**kw) -> DataArguments:
    return DataArguments(sources=[{"name": "x", "lang": "ja", "embedded": "hironsan"}], **kw)


def test_values_at_key_points():
    total = 1000.0
    lin = _args(**SCHEDULES["linear"])
    assert ja_ratio(0, total, lin) == pytest.approx(0.2)
    assert ja_ratio(300, total, lin) == pytest.approx(0.2 + 0.7 * 0.5)
    assert ja_ratio(800, total, lin) == pytest.approx(0.9)
    step = _args(**SCHEDULES["step"])  # PolyLM: 30 % then 60 % for the last 20 %
    assert ja_ratio(799.9, total, step) == pytest.approx(0.3)
    assert ja_ratio(800, total, step) == pytest.approx(0.6)
    cos = _args(**SCHEDULES["cosine"])
    assert ja_ratio(350, total, cos) == pytest.approx(0.1 + 0.7 * 0.5)
    assert ja_ratio(999, total, cos) == pytest.approx(0.8)
    pw = _args(**SCHEDULES["piecewise"])
    assert ja_ratio(125, total, pw) == pytest.approx(0.3)
    assert ja_ratio(499, total, pw) == pytest.approx(0.5)
    assert ja_ratio(500, total, pw) == pytest.approx(0.9)
    assert ja_ratio(750, total, pw) == pytest.approx(0.65)
    assert ja_ratio(5000, total, pw) == pytest.approx(0.4)  # held at r(1) beyond the plan


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_cumulative_target_is_the_exact_integral(name):
    args = _args(**SCHEDULES[name])
    total, n = 1000.0, 200_000
    for end in (1.0, 137.5, 500.0, 799.0, 1000.0, 1300.0):
        h = end / n
        numeric = sum(ja_ratio((i + 0.5) * h, total, args) for i in range(n)) * h
        assert cumulative_ja_target(end, total, args) == pytest.approx(numeric, rel=2e-4, abs=1e-3)
    assert cumulative_ja_share(1000.0, total, args) == pytest.approx(cumulative_ja_target(1000.0, total, args) / 1000)


def test_bad_schedules_raise_one_clear_line():
    with pytest.raises(XltError, match="ja_ratio_end=1.5 is outside"):
        validate_data_args(_args(ja_ratio_end=1.5))
    with pytest.raises(XltError, match="fractions must increase"):
        parse_points("0:0.3,0.6:0.5,0.4:0.6,1:0.6")
    with pytest.raises(XltError, match="ratio 1.2"):
        parse_points("0:0.3,1:1.2")
    with pytest.raises(XltError, match="first point must be at fraction 0"):
        parse_points("0.1:0.3,1:0.5")
    with pytest.raises(XltError, match="not 'fraction:ratio'"):
        parse_points("0:0.3,oops")
    with pytest.raises(XltError, match="ja_points"):
        validate_data_args(_args(ja_schedule="piecewise", ja_points=None))
    with pytest.raises(XltError, match="slw_fraction"):
        validate_data_args(_args(slw_min_len=64, seq_len=256, slw_fraction=0.0))


@pytest.mark.parametrize("kind", ["linear", "root"])
def test_seq_len_warmup(kind):
    args = _args(seq_len=2048, slw_min_len=64, slw_fraction=0.2, slw_schedule=kind)
    total = 1_000_000
    lens = [seq_len_at(t, total, args) for t in range(0, total, 997)]
    assert lens[0] == 64 and lens[-1] == 2048
    assert all(x % 8 == 0 and 64 <= x <= 2048 for x in lens)
    assert all(a <= b for a, b in zip(lens, lens[1:], strict=False))
    assert seq_len_at(0.2 * total, total, args) == 2048
    assert seq_len_at(0.2 * total - 1000, total, args) < 2048
    mid = seq_len_at(0.05 * total, total, args)  # a quarter of the warmup
    expect = 64 + 1984 * (math.sqrt(0.25) if kind == "root" else 0.25)
    assert expect - 8 < mid <= expect
    assert seq_len_at(0, total, _args(seq_len=512)) == 512  # warmup off
