"""xlt plan: compute budget, Chinchilla optima (closed form vs numerical), data-constrained epochs, bad input."""

from __future__ import annotations

import json
import math

import pytest

from xlt.cli import main
from xlt.plan import EPOCH_AI, HOFFMANN, compute_budget, effective_data_ratio, parse_number, plan


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(["plan", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_budget_8xh100_30_days_40pct():
    # 8 * 989e12 FLOP/s * 86400 s * 30 * 0.4 by hand: 8.2031616e21
    assert compute_budget(8, "h100", 30, 0.4) == pytest.approx(8.2031616e21, rel=1e-12)
    assert compute_budget(8, "H100-SXM", 30, 0.4) == compute_budget(8, "h200", 30, 0.4)
    assert compute_budget(1, "a100", 1, 1.0) == pytest.approx(312e12 * 86400)


def _numerical_optimum(fit, flops: float) -> float:
    """Golden-section search of L(N, C / 6N) over log N (the loss is unimodal in log N)."""
    lo, hi = math.log(1e3), math.log(1e16)
    g = (math.sqrt(5) - 1) / 2
    f = lambda x: fit.loss(math.exp(x), flops / (6 * math.exp(x)))  # noqa: E731
    for _ in range(200):
        a, b = hi - g * (hi - lo), lo + g * (hi - lo)
        if f(a) < f(b):
            hi = b
        else:
            lo = a
    return math.exp((lo + hi) / 2)


@pytest.mark.parametrize("fit", [HOFFMANN, EPOCH_AI], ids=lambda f: f.name)
@pytest.mark.parametrize("flops", [1e19, 8.2031616e21, 1e24])
def test_closed_form_equals_numerical_minimum(fit, flops):
    n, d = fit.optimum(flops)
    assert 6 * n * d == pytest.approx(flops, rel=1e-12)
    assert n == pytest.approx(_numerical_optimum(fit, flops), rel=1e-6)
    # and it is a minimum: moving N either way along the budget raises the loss
    for k in (0.9, 1.1):
        assert fit.loss(n * k, flops / (6 * n * k)) > fit.loss(n, d)


def test_hand_computed_optimum_hoffmann():
    # G = (0.34*406.4 / (0.28*410.7)) ** (1/0.62); N = G * (C/6) ** (0.28/0.62)
    c = 1e21
    g = (0.34 * 406.4 / (0.28 * 410.7)) ** (1 / 0.62)
    n, d = HOFFMANN.optimum(c)
    assert n == pytest.approx(g * (c / 6) ** (0.28 / 0.62), rel=1e-12)
    assert d == pytest.approx(c / 6 / n, rel=1e-12)


def test_effective_data_ratio():
    # 4 epochs: R = 3 repeats, D'/U = 1 + 15.39 * (1 - exp(-3/15.39)) = 3.7257..., / 4 = 0.9314
    assert effective_data_ratio(4) == pytest.approx((1 + 15.39 * (1 - math.exp(-3 / 15.39))) / 4, rel=1e-12)
    assert effective_data_ratio(4) == pytest.approx(0.93, abs=0.005)
    assert effective_data_ratio(1) == 1.0 and effective_data_ratio(0.3) == 1.0
    assert effective_data_ratio(40) < effective_data_ratio(10) < effective_data_ratio(2) < 1


def test_cli_json_fixed_model_and_japanese(capsys):
    rc, out, _ = _run(capsys, "--gpus", "8", "--gpu", "h100", "--days", "30", "--mfu", "0.4", "--params", "1.7B",
                      "--ja-chars", "100e9", "--chars-per-token", "1.25", "--ja-share", "0.5", "--json")
    assert rc == 0
    r = json.loads(out)
    c = 8 * 989e12 * 86400 * 30 * 0.4
    assert r["compute_flops"] == pytest.approx(c)
    for key in ("hoffmann", "epoch_ai"):
        assert r[key]["params"] * r[key]["tokens"] * 6 == pytest.approx(c)
    assert r["hoffmann"]["params"] == pytest.approx(HOFFMANN.optimum(c)[0])
    assert r["epoch_ai"]["params"] == pytest.approx(EPOCH_AI.optimum(c)[0])
    tokens = c / (6 * 1.7e9)
    assert r["fixed_model"] == pytest.approx({"params": 1.7e9, "tokens": tokens, "tokens_per_param": tokens / 1.7e9})
    epochs = tokens * 0.5 / (100e9 / 1.25)
    assert r["ja_epochs"] == pytest.approx(epochs)
    assert r["effective_data_ratio"] == pytest.approx(effective_data_ratio(epochs))
    assert r["japanese"]["basis"] == "fixed_model"


def test_cli_ja_epochs_at_4_is_093(capsys):
    # Choose a corpus so the fixed model sees exactly 4 epochs: chars = tokens / 4 at 1 char per token.
    c = 8 * 989e12 * 86400 * 30 * 0.4
    chars = c / (6 * 1e9) / 4
    rc, out, _ = _run(capsys, "--gpus", "8", "--days", "30", "--mfu", "0.4", "--params", "1e9",
                      "--ja-chars", repr(chars), "--json")
    r = json.loads(out)
    assert rc == 0 and r["ja_epochs"] == pytest.approx(4.0) and r["effective_data_ratio"] == pytest.approx(0.9314, abs=1e-4)


def test_cli_text_output(capsys):
    rc, out, _ = _run(capsys, "--gpus", "8", "--days", "30", "--mfu", "0.4")
    assert rc == 0 and "8.2e+21 FLOPs" in out and "Hoffmann" in out and "Epoch AI" in out


@pytest.mark.parametrize("argv, key", [
    (["--gpus", "0", "--days", "30", "--mfu", "0.4"], "--gpus"),
    (["--gpus", "-8", "--days", "30", "--mfu", "0.4"], "--gpus"),
    (["--gpus", "8", "--days", "0", "--mfu", "0.4"], "--days"),
    (["--gpus", "8", "--days", "-1", "--mfu", "0.4"], "--days"),
    (["--gpus", "8", "--days", "30", "--mfu", "0"], "--mfu"),
    (["--gpus", "8", "--days", "30", "--mfu", "40"], "--mfu"),
    (["--gpus", "8", "--days", "30", "--mfu", "abc"], "--mfu"),
    (["--gpus", "8", "--gpu", "v100", "--days", "30", "--mfu", "0.4"], "h100, h100-sxm, h200, a100"),
    (["--gpus", "8", "--days", "30", "--mfu", "0.4", "--params", "0"], "--params"),
    (["--gpus", "8", "--days", "30", "--mfu", "0.4", "--ja-chars", "-5"], "--ja-chars"),
    (["--gpus", "8", "--days", "30", "--mfu", "0.4", "--ja-chars", "1e9", "--chars-per-token", "0"],
     "--chars-per-token"),
    (["--gpus", "8", "--days", "30", "--mfu", "0.4", "--ja-chars", "1e9", "--ja-share", "1.5"], "--ja-share"),
])
def test_bad_input_one_line_exit_2(capsys, argv, key):
    rc, out, err = _run(capsys, *argv, "--json")
    assert rc == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("xlt: error: ") and key in err


def test_parse_number_suffixes():
    assert parse_number("1.7B", "--params") == 1.7e9
    assert parse_number("135M", "--params") == 135e6
    assert parse_number("2e12", "--ja-chars") == 2e12
    with pytest.raises(Exception, match="--params"):
        plan(8, "h100", 30, 0.4, params=-1)
