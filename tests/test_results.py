"""The interval helpers every results table uses (tiny_hf.results)."""

import math

import pytest

from tiny_hf.results import beyond_noise, bootstrap_interval, interval_cell, wilson_interval


def test_wilson_interval_matches_the_textbook_values():
    # 50/100: 0.404-0.596 (Wilson, z = 1.96); 0/10 keeps a non-zero upper bound; 10/10 a lower one below 1
    half = wilson_interval(50, 100)
    assert math.isclose(half["low"], 0.4038, abs_tol=1e-4) and math.isclose(half["high"], 0.5962, abs_tol=1e-4)
    none = wilson_interval(0, 10)
    assert none["low"] == 0.0 and math.isclose(none["high"], 0.2775, abs_tol=1e-4)
    assert wilson_interval(10, 10)["high"] == 1.0 and wilson_interval(10, 10)["low"] < 0.75


def test_more_trials_give_a_narrower_interval():
    small, large = wilson_interval(20, 50), wilson_interval(200, 500)
    assert large["high"] - large["low"] < small["high"] - small["low"]


def test_bootstrap_interval_brackets_the_mean_and_is_deterministic():
    values = [0.1, 0.5, 0.3, 0.9, 0.2] * 20
    a, b = bootstrap_interval(values), bootstrap_interval(values)
    assert a == b and a["low"] < a["mean"] < a["high"] and a["n"] == 100
    assert bootstrap_interval([0.7] * 30)["low"] == bootstrap_interval([0.7] * 30)["high"] == pytest.approx(0.7)


def test_beyond_noise_only_when_intervals_are_apart():
    assert beyond_noise(wilson_interval(100, 500), wilson_interval(250, 500))
    assert not beyond_noise(wilson_interval(100, 500), wilson_interval(110, 500))


def test_interval_cell_formats_rates_and_means():
    assert interval_cell(wilson_interval(50, 100), percent=True) == "50.0% (40.4–59.6)"
    assert interval_cell({"mean": 0.5, "low": 0.25, "high": 0.75}) == "0.500 (0.250–0.750)"


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: wilson_interval(0, 0), "at least one trial"),
        (lambda: wilson_interval(5, 3), "not between 0 and n=3"),
        (lambda: bootstrap_interval([]), "at least one value"),
        (lambda: bootstrap_interval([1.0, float("nan")]), "NaN"),
    ],
)
def test_bad_input_is_refused(call, message):
    with pytest.raises(ValueError, match=message):
        call()
