"""Essential sparsity on curves small enough to check by eye (accuracies are fractions: 0.01 = 1 point)."""

import json

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from llm_prune.study.knee import (KNEE, KNEE_AT_FIRST_LEVEL, NO_KNEE, Metric, find_knee,
                                  parse_levels)

ACC = Metric.accuracy()  # ε = 1 point = 0.01
PPL = Metric.perplexity()  # ε = +5% of dense
LEVELS = [0.1, 0.2, 0.3, 0.4, 0.5]


def test_accuracy_metric_convention():
    assert ACC.epsilon == 0.01 and ACC.epsilon_kind == "absolute" and ACC.higher_is_better
    assert ACC.describe_epsilon().startswith("ε = 1 point (0.01 absolute")
    assert Metric.accuracy(points=2.5).epsilon == 0.025
    assert PPL.epsilon == 0.05 and PPL.epsilon_kind == "relative" and not PPL.higher_is_better


def test_monotone_curve_with_a_clear_knee():
    # drops from dense 0.80: 0, 0.002, 0.008, 0.030, 0.100 → 40% is the first over 1 point
    k = find_knee(LEVELS, [0.800, 0.798, 0.792, 0.770, 0.700], 0.80, ACC)
    assert k.status == KNEE
    assert k.essential_sparsity == 0.3 and k.first_failing == 0.4
    assert k.drops == pytest.approx((0.0, 0.002, 0.008, 0.030, 0.100))
    assert not k.lower_bound and k.recovered == () and k.in_noise is None
    assert "essential sparsity 30%" in k.summary()


def test_a_drop_of_exactly_epsilon_passes():
    # 0.50 − 0.49 is 0.010000000000000009 in floats: still exactly 1 point, so it must pass
    k = find_knee([0.1, 0.2], [0.49, 0.48], 0.50, ACC)
    assert k.essential_sparsity == 0.1 and k.first_failing == 0.2


def test_noisy_knee_is_inside_the_noise():
    # SE of a drop = sqrt(0.005² + 0.005²) = 0.00707; z·SE = 0.01386. At 40% the drop is
    # 0.015, only 0.005 over ε: it could pass within noise, so the knee is not firm.
    k = find_knee([0.2, 0.3, 0.4], [0.80, 0.80, 0.785], 0.80, ACC, stderr=[0.005] * 3, dense_stderr=0.005)
    assert k.essential_sparsity == 0.3
    assert k.drop_stderr == pytest.approx((0.0070711,) * 3, rel=1e-4)
    assert 0.4 in k.ambiguous and k.in_noise is True
    assert "1.96·SE" in k.rule and "inside the noise" in k.summary()


def test_clear_knee_is_outside_the_noise():
    # SE = sqrt(0.003² + 0.003²) = 0.00424, z·SE = 0.00832; drops 0, 0, 0.05 are 0.01 and 0.04 from ε
    k = find_knee([0.2, 0.3, 0.4], [0.80, 0.80, 0.75], 0.80, ACC, stderr=[0.003] * 3, dense_stderr=0.003)
    assert k.essential_sparsity == 0.3 and k.ambiguous == () and k.in_noise is False


def test_dense_stderr_alone_gives_a_verdict():
    k = find_knee([0.2], [0.79], 0.80, ACC, dense_stderr=0.001)
    assert k.drop_stderr == pytest.approx((0.001,)) and k.in_noise is True  # drop 0.01 sits on ε


def test_no_knee_within_the_sweep_is_a_lower_bound():
    k = find_knee(LEVELS, [0.80, 0.80, 0.799, 0.795, 0.791], 0.80, ACC)
    assert k.status == NO_KNEE and k.essential_sparsity == 0.5 and k.lower_bound
    assert k.first_failing is None
    assert "no knee within the sweep" in k.summary() and ">= 50%" in k.summary()


def test_knee_at_the_first_level():
    k = find_knee(LEVELS, [0.70, 0.60, 0.50, 0.40, 0.30], 0.80, ACC)
    assert k.status == KNEE_AT_FIRST_LEVEL
    assert k.essential_sparsity is None and k.first_failing == 0.1 and not k.lower_bound
    assert "knee at the first level" in k.summary()


def test_perplexity_uses_a_relative_epsilon():
    # dense 10: fails above 10.5. Drops are fractions of dense: 0.02, 0.05 (passes), 0.06
    k = find_knee([0.3, 0.4, 0.5], [10.2, 10.5, 10.6], 10.0, PPL)
    assert k.drops == pytest.approx((0.02, 0.05, 0.06))
    assert k.essential_sparsity == 0.4 and k.first_failing == 0.5
    assert k.threshold == pytest.approx(10.5)
    # the relative SE of value/dense: sqrt(0.1² + (10.6/10)²·0.1²) / 10
    k = find_knee([0.5], [10.6], 10.0, PPL, stderr=[0.1], dense_stderr=0.1)
    assert k.drop_stderr[0] == pytest.approx((0.01 + 1.06**2 * 0.01) ** 0.5 / 10)


def test_recovery_after_the_first_failure_is_reported_not_used():
    k = find_knee(LEVELS, [0.80, 0.79, 0.77, 0.795, 0.60], 0.80, ACC)
    assert k.essential_sparsity == 0.2 and k.first_failing == 0.3
    assert k.recovered == (0.4,)
    assert any("non-monotone" in n and "40%" in n for n in k.notes)


def test_json_is_unambiguous_about_units():
    d = json.loads(find_knee([0.1, 0.2], [0.8, 0.7], 0.8, ACC).to_json())
    assert d["epsilon"] == 0.01 and d["epsilon_kind"] == "absolute"
    assert "1 point" in d["epsilon_text"] and "0.01 = 1 point" in d["drop_units"]
    assert d["rule"] and d["essential_sparsity"] == 0.1 and d["first_failing"] == 0.2


@pytest.mark.parametrize("levels, values, message", [
    ([], [], "no sparsity levels"),
    ([0.2, 0.1], [0.8, 0.8], "ascending"),
    ([0.1, 0.1], [0.8, 0.8], "twice"),
    ([0.1, 0.2], [0.8], "pair up"),
    ([0.1, 1.0], [0.8, 0.8], r"\[0, 1\)"),
    ([0.1], [80.0], "fractions, not percentages"),
])
def test_bad_curves_raise(levels, values, message):
    with pytest.raises(ValueError, match=message):
        find_knee(levels, values, 0.8, ACC)


def test_bad_stderr_raises():
    with pytest.raises(ValueError, match="pair up"):
        find_knee([0.1, 0.2], [0.8, 0.8], 0.8, ACC, stderr=[0.01])
    with pytest.raises(ValueError, match=">= 0"):
        find_knee([0.1], [0.8], 0.8, ACC, stderr=[-0.01])


@pytest.mark.parametrize("text, expected", [
    ("0.1:0.7:0.05", [0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7]),
    ("0.1:0.35:0.1", [0.1, 0.2, 0.3]),  # the end is included only when the steps land on it
    ("0:0.3:0.1", [0.0, 0.1, 0.2, 0.3]),
    ("0.5:0.5:0.1", [0.5]),
    ("0.1,0.2,0.5", [0.1, 0.2, 0.5]),
    (" 0.4 ", [0.4]),
])
def test_parse_levels(text, expected):
    assert parse_levels(text) == expected  # exact floats: no 0.15000000000000002


@pytest.mark.parametrize("text, message", [
    ("0.7:0.1:0.05", "empty"),
    ("0.1:0.5:0", "positive"),
    ("0.1:0.5", "start:stop:step"),
    ("0.5:1.0:0.25", r"\[0, 1\)"),
    ("1.2", r"\[0, 1\)"),
    ("-0.1", r"\[0, 1\)"),
    ("0.2,0.1", "ascending"),
    ("0.1,abc", "not a number"),
    ("nan", "finite"),
    ("", "not a number"),
])
def test_parse_levels_rejects(text, message):
    with pytest.raises(ValueError, match=message):
        parse_levels(text)


# Accuracies on a 1/1000 grid (whole "milli" counts) keep every drop at least 0.001 away from
# ε = 0.01, far beyond float rounding, so the properties test the definition, not the tolerance.
@st.composite
def worsening_curves(draw):
    """(levels, accuracies in thousandths, dense in thousandths), never improving with sparsity."""
    steps = draw(st.lists(st.integers(0, 40), min_size=1, max_size=12))
    dense = draw(st.integers(500, 1000))
    values, worse = [], 0
    for s in steps:
        worse += s
        values.append(max(dense - worse, 0))
    levels = [round(0.05 * (i + 1), 2) for i in range(len(steps))]
    return levels, values, dense


def milli(xs):
    return [x / 1000 for x in xs]


@settings(max_examples=200, deadline=None)
@given(worsening_curves())
def test_monotone_curve_property(curve):
    levels, values, dense = curve
    k = find_knee(levels, milli(values), dense / 1000, ACC)
    for lv, d in zip(levels, k.drops):
        if k.essential_sparsity is not None and lv <= k.essential_sparsity:
            assert d <= 0.01 + 1e-12
    if k.first_failing is not None:
        assert k.drops[levels.index(k.first_failing)] > 0.01
        assert k.recovered == ()  # a worsening curve never recovers
    else:
        assert k.essential_sparsity == levels[-1] and k.lower_bound


@settings(max_examples=200, deadline=None)
@given(worsening_curves(), st.integers(-500, 0))
def test_shifting_accuracy_keeps_the_knee(curve, shift):
    levels, values, dense = curve
    assume(min(values) + shift >= 0)  # accuracies stay fractions in [0, 1]
    a = find_knee(levels, milli(values), dense / 1000, ACC)
    b = find_knee(levels, milli(v + shift for v in values), (dense + shift) / 1000, ACC)
    assert (a.status, a.essential_sparsity, a.first_failing) == (b.status, b.essential_sparsity, b.first_failing)
