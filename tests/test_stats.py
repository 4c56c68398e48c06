import math

import numpy as np
import pytest
from sklearn.metrics import f1_score

from ftnb import stats

LABELS = ["billing", "refund", "shipping", "feedback"]


def _predictions(n: int, accuracy: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Balanced true labels; a prediction is right with probability `accuracy`, else another label."""
    rng = np.random.default_rng(seed)
    truth = np.array(LABELS * (n // len(LABELS)))
    wrong = np.array([LABELS[(LABELS.index(t) + rng.integers(1, len(LABELS))) % len(LABELS)] for t in truth])
    return truth, np.where(rng.random(len(truth)) < accuracy, truth, wrong)


# Newcombe (1998), "Two-sided confidence intervals for the single proportion", Table I, method 3
# (Wilson score interval without continuity correction).
@pytest.mark.parametrize("successes, n, low, high", [
    (81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0, 0.1611), (1, 29, 0.0061, 0.1718)])
def test_wilson_matches_published_values(successes, n, low, high):
    interval = stats.wilson_interval(successes, n)
    assert interval.estimate == pytest.approx(successes / n)
    assert (interval.low, interval.high) == pytest.approx((low, high), abs=1e-4)


def test_wilson_for_55_of_60_and_its_width_at_100_percent():
    interval = stats.wilson_interval(55, 60)
    # Wilson's closed form, written out: (p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)
    z, p, n = 1.959963984540054, 55 / 60, 60
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert (interval.low, interval.high) == pytest.approx(((centre - half) / (1 + z * z / n),
                                                           (centre + half) / (1 + z * z / n)), abs=1e-9)
    assert str(interval) == "0.917 [0.819, 0.964]"
    perfect = stats.wilson_interval(20, 20)  # the normal approximation would say [1, 1]
    assert perfect.high == 1.0 and perfect.low == pytest.approx(0.8389, abs=1e-4)


@pytest.mark.parametrize("successes, n", [(5, 0), (7, 6), (-1, 10), (2.5, 10)])
def test_wilson_rejects_impossible_counts(successes, n):
    with pytest.raises(ValueError, match="successes"):
        stats.wilson_interval(successes, n)


def test_mcnemar_exact_matches_the_binomial_by_hand():
    # 2x2 table of a classic example: both right 59, only A right 6, only B right 16, both wrong 80.
    a = [True] * 59 + [True] * 6 + [False] * 16 + [False] * 80
    b = [True] * 59 + [False] * 6 + [True] * 16 + [False] * 80
    result = stats.mcnemar_exact(a, b)
    assert (result.both_right, result.only_a_right, result.only_b_right, result.both_wrong) == (59, 6, 16, 80)
    assert result.discordant == 22
    one_sided = sum(math.comb(22, k) for k in range(7)) / 2 ** 22  # P(X <= 6), X ~ Binomial(22, 1/2)
    assert result.p_value == pytest.approx(2 * one_sided, rel=1e-12)
    assert result.p_value == pytest.approx(0.0525, abs=1e-4)
    # directional: "B is right more often than A" is the one-sided half of it
    assert stats.mcnemar_exact(b, a, alternative="greater").p_value == pytest.approx(one_sided, rel=1e-12)


def test_mcnemar_ignores_agreement_and_handles_no_discordant_pairs():
    same = [True, False, True, True]
    assert stats.mcnemar_exact(same, same).p_value == 1.0
    # many shared successes do not change the test: only discordant pairs count
    few = stats.mcnemar_exact([True, False] * 5, [False, True] * 5)
    many = stats.mcnemar_exact([True, False] * 5 + [True] * 500, [False, True] * 5 + [True] * 500)
    assert few.p_value == many.p_value == 1.0
    with pytest.raises(ValueError, match="paired"):
        stats.mcnemar_exact([True, False], [True])
    with pytest.raises(ValueError, match="alternative"):
        stats.mcnemar_exact([True], [False], alternative="bigger")


def test_bootstrap_of_an_accuracy_agrees_with_the_normal_approximation():
    truth, pred = _predictions(1600, 0.9)
    correct = (truth == pred).astype(float)
    interval = stats.bootstrap_interval(np.mean, correct)
    half_width = 1.96 * math.sqrt(correct.mean() * (1 - correct.mean()) / len(correct))
    assert interval.estimate == pytest.approx(correct.mean())
    assert (interval.high - interval.low) / 2 == pytest.approx(half_width, rel=0.1)


def test_macro_f1_interval_contains_the_estimate_and_narrows_with_n():
    widths = {}
    for n in (100, 900):
        truth, pred = _predictions(n, 0.85)
        interval = stats.macro_f1_interval(truth, pred, LABELS)
        assert interval.estimate == pytest.approx(f1_score(truth, pred, labels=LABELS, average="macro"))
        assert interval.low < interval.estimate < interval.high
        widths[n] = interval.high - interval.low
    # the standard error shrinks like 1/sqrt(n): 9x the data, about a third of the width
    assert widths[900] / widths[100] == pytest.approx(1 / 3, abs=0.08)


def test_bootstrap_is_reproducible_and_keeps_examples_paired():
    truth, pred = _predictions(200, 0.8)
    assert stats.macro_f1_interval(truth, pred, LABELS, seed=3) == stats.macro_f1_interval(truth, pred, LABELS, seed=3)
    # if the arrays were resampled independently, a perfect classifier would not stay perfect
    perfect = stats.macro_f1_interval(truth, truth, LABELS)
    assert (perfect.estimate, perfect.low, perfect.high) == (1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="paired"):
        stats.macro_f1_interval(truth, pred[:-1], LABELS)


def test_macro_f1_agrees_with_scikit_learn_also_per_resample():
    rng = np.random.default_rng(0)
    metric = stats.macro_f1(LABELS)
    # few examples, so classes go missing from the truth, the predictions or both
    truth, pred = rng.choice(LABELS[:3], (50, 6)), rng.choice(LABELS, (50, 6))
    expected = [f1_score(t, p, labels=LABELS, average="macro", zero_division=0) for t, p in zip(truth, pred)]
    assert metric(truth, pred, axis=-1) == pytest.approx(expected, abs=1e-12)
    assert metric(truth.T, pred.T, axis=0) == pytest.approx(expected, abs=1e-12)
    # 'feedback' never occurs nor is predicted: it still counts, with F1 0
    assert metric(["billing", "refund"], ["billing", "refund"]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="'invoice'.*not in the label list"):
        metric(["billing", "invoice"], ["billing", "refund"])


def test_paired_difference_separates_a_better_method_only_when_it_is():
    truth, good = _predictions(400, 0.9, seed=1)
    _, weak = _predictions(400, 0.6, seed=2)
    _, similar = _predictions(400, 0.9, seed=3)
    metric = stats.macro_f1(LABELS)
    better = stats.paired_bootstrap_difference(metric, truth, good, weak)
    assert better.estimate == pytest.approx(metric(truth, good) - metric(truth, weak))
    assert better.low > 0
    tie = stats.paired_bootstrap_difference(metric, truth, good, similar)
    assert tie.low < 0 < tie.high
    assert stats.paired_bootstrap_difference(metric, truth, good, good).as_dict()["high"] == 0.0


def test_holm_adjusts_step_down_and_keeps_the_order():
    adjusted = stats.holm({"a": 0.01, "b": 0.04, "c": 0.03})
    assert adjusted == pytest.approx({"a": 0.03, "b": 0.06, "c": 0.06})  # 3 x 0.01, then 2 x 0.03, then max(0.04, 0.06)
    assert stats.holm({"only": 0.2}) == {"only": 0.2} and stats.holm({"x": 0.6, "y": 0.7})["x"] == 1.0
