"""Uncertainty for evaluation numbers: bootstrap intervals, Wilson intervals, paired tests.

A score measured on a few hundred test examples is an estimate; two methods a point apart may
well swap places on another sample of the same size. These helpers attach that uncertainty.

Usage:
    from ftnb import stats
    stats.macro_f1_interval(y_true, y_pred, labels)           # bootstrap 95% interval
    stats.wilson_interval(55, 60)                             # a pass rate, 55 of 60
    stats.mcnemar_exact(pred_a == y_true, pred_b == y_true)   # same examples, A vs B
    stats.paired_bootstrap_difference(metric, y_true, pred_a, pred_b)

The resampling and the distributions are scipy's (`scipy.stats.bootstrap`, `binomtest`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np
from scipy.stats import binomtest, bootstrap

CONFIDENCE = 0.95
RESAMPLES = 2000  # enough for the 2.5% and 97.5% percentiles to settle to about a point of macro-F1


@dataclass(frozen=True)
class Interval:
    """A point estimate and its confidence interval."""

    estimate: float
    low: float
    high: float
    confidence: float = CONFIDENCE
    method: str = ""

    def __str__(self) -> str:
        return f"{self.estimate:.3f} [{self.low:.3f}, {self.high:.3f}]"

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class McNemarResult:
    """Exact McNemar test on paired right/wrong outcomes of two methods on the same examples."""

    only_a_right: int  # examples A gets right and B gets wrong
    only_b_right: int  # examples B gets right and A gets wrong
    both_right: int
    both_wrong: int
    p_value: float  # two-sided unless `alternative` said otherwise
    alternative: str

    @property
    def discordant(self) -> int:
        return self.only_a_right + self.only_b_right

    def __str__(self) -> str:
        return (f"McNemar exact: A right where B wrong {self.only_a_right}, B right where A wrong "
                f"{self.only_b_right}, p = {self.p_value:.3g} ({self.alternative})")

    def as_dict(self) -> dict:
        return {**asdict(self), "discordant": self.discordant}


def _check_confidence(confidence: float) -> None:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be between 0 and 1 (e.g. 0.95), not {confidence}")


def _check_paired(arrays: Sequence[Sequence]) -> None:
    lengths = {len(a) for a in arrays}
    if len(lengths) != 1:
        raise ValueError(f"the arrays must be paired, one entry per example; got lengths {sorted(lengths)}")
    if lengths.pop() < 2:
        raise ValueError("a bootstrap needs at least 2 examples")


def bootstrap_interval(metric: Callable[..., float], *arrays: Sequence, confidence: float = CONFIDENCE,
                       n_resamples: int = RESAMPLES, seed: int = 0, method: str = "percentile") -> Interval:
    """Bootstrap interval for any metric of paired arrays (resampling whole examples).

    Each resample draws len(arrays[0]) examples with replacement, keeping the entries of one
    example together across arrays, and recomputes `metric(*resampled_arrays)`. A metric with an
    `axis` keyword (numpy style, like `macro_f1(labels)`) gets all resamples in one call, which
    is what makes thousands of resamples take a second. The percentile method is the default
    because it stays defined when every resample gives the same value (a perfect score on a
    small test set), where BCa returns NaN; pass method="BCa" for its better coverage on skewed
    metrics.

    Usage: bootstrap_interval(lambda t, p: f1_score(t, p, average="macro"), y_true, y_pred)
    """
    _check_confidence(confidence)
    _check_paired(arrays)
    data = tuple(np.asarray(a) for a in arrays)
    result = bootstrap(data, metric, paired=True, n_resamples=n_resamples, confidence_level=confidence,
                       method=method, rng=np.random.default_rng(seed))  # vectorized if metric has `axis`
    low, high = result.confidence_interval
    return Interval(float(metric(*data)), float(low), float(high), confidence,
                    f"bootstrap {method}, {n_resamples} resamples")


def macro_f1(labels: Sequence[str]) -> Callable[..., np.ndarray]:
    """Macro-F1 over a fixed label list, as a numpy-style metric with an `axis`.

    Every class in `labels` counts, also one missing from a resample (it then scores 0, as
    scikit-learn's f1_score(labels=..., average="macro", zero_division=0) does; the tests check
    that the two agree). It is computed from per-class counts so that `bootstrap_interval` can
    score all resamples at once: scikit-learn's version costs about 2 ms a call, 4 s or more
    for one interval.

    Usage: score = macro_f1(labels)(y_true, y_pred)
    """
    ordered = np.array(sorted(labels))
    position = np.array([list(labels).index(label) for label in ordered])

    def codes(values: np.ndarray) -> np.ndarray:
        found = np.clip(np.searchsorted(ordered, values), 0, len(ordered) - 1)
        unknown = ordered[found] != values
        if unknown.any():
            raise ValueError(f"labels {sorted(set(np.asarray(values)[unknown].tolist()))} are not in "
                             f"the label list {list(labels)}")
        return position[found]

    def score(y_true: Sequence[str], y_pred: Sequence[str], axis: int = -1) -> np.ndarray:
        classes = np.arange(len(ordered))
        truth = np.moveaxis(codes(np.asarray(y_true)), axis, -1)[..., None] == classes
        pred = np.moveaxis(codes(np.asarray(y_pred)), axis, -1)[..., None] == classes
        both = 2 * (truth & pred).sum(-2)
        either = truth.sum(-2) + pred.sum(-2)  # 2 TP + FP + FN per class
        return np.divide(both, either, out=np.zeros(either.shape), where=either > 0).mean(-1)

    return score


def macro_f1_interval(y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str],
                      **bootstrap_kwargs) -> Interval:
    """Macro-F1 with its bootstrap interval (95% unless `confidence` says otherwise).

    Usage: print(macro_f1_interval(test["category"], predictions, labels))  # 0.916 [0.884, 0.943]
    """
    return bootstrap_interval(macro_f1(labels), y_true, y_pred, **bootstrap_kwargs)


def paired_bootstrap_difference(metric: Callable[..., np.ndarray], y_true: Sequence,
                                pred_a: Sequence, pred_b: Sequence, **bootstrap_kwargs) -> Interval:
    """Interval for metric(A) - metric(B) when both methods predicted the same examples.

    Both methods are scored on the same resample each time, so the interval reflects only
    how the methods differ, not how hard the drawn examples happen to be. An interval above 0
    says A is better at this confidence; one that straddles 0 does not separate them.
    `metric` takes (y_true, y_pred, axis=...) like `macro_f1(labels)`.

    Usage: paired_bootstrap_difference(macro_f1(labels), y_test, qlora_pred, tfidf_pred)
    """
    def difference(truth, a, b, axis=-1):
        return metric(truth, a, axis=axis) - metric(truth, b, axis=axis)

    return bootstrap_interval(difference, y_true, pred_a, pred_b, **bootstrap_kwargs)


def mcnemar_exact(correct_a: Sequence[bool], correct_b: Sequence[bool],
                  alternative: str = "two-sided") -> McNemarResult:
    """Exact McNemar test: do A and B err on the same examples at different rates?

    Only the discordant examples (one right, the other wrong) carry information. Under "no
    difference" each of them is equally likely to favour A or B, so the count favouring A is
    Binomial(discordant, 1/2), tested exactly with scipy's binomtest. alternative="greater"
    tests "A is right more often than B".

    Usage: mcnemar_exact(np.equal(qlora_pred, y_test), np.equal(tfidf_pred, y_test)).p_value
    """
    if alternative not in ("two-sided", "greater", "less"):
        raise ValueError(f"alternative must be 'two-sided', 'greater' or 'less', not {alternative!r}")
    a, b = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"correct_a and correct_b must be flat and paired, one entry per example; "
                         f"got shapes {a.shape} and {b.shape}")
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
    # with no discordant pair the data say nothing against equality
    p_value = binomtest(only_a, only_a + only_b, 0.5, alternative=alternative).pvalue if only_a + only_b else 1.0
    return McNemarResult(only_a, only_b, int(np.sum(a & b)), int(np.sum(~a & ~b)), float(p_value), alternative)


def holm(p_values: dict[str, float]) -> dict[str, float]:
    """Holm's step-down adjustment for several tests read together: each adjusted p-value can be
    compared with 0.05 and the chance of any false "significant" stays under 5%.

    Usage: holm({"QLoRA": 0.01, "MiniLM": 0.04})  # {"QLoRA": 0.02, "MiniLM": 0.04}
    """
    ordered = sorted(p_values, key=p_values.get)
    adjusted, running = {}, 0.0
    for rank, name in enumerate(ordered):
        running = max(running, min(1.0, (len(ordered) - rank) * p_values[name]))  # never below a smaller p's
        adjusted[name] = running
    return {name: adjusted[name] for name in p_values}


def wilson_interval(successes: int, n: int, confidence: float = CONFIDENCE) -> Interval:
    """Wilson score interval for a proportion (a pass rate, an accuracy).

    Unlike the textbook p ± 1.96·sqrt(p(1-p)/n), it stays inside [0, 1] and does not collapse
    to zero width at 0% or 100%, which matters for 20 answers per domain.

    Usage: wilson_interval(55, 60)  # 0.917 [0.819, 0.964]
    """
    _check_confidence(confidence)
    if n < 1 or not 0 <= successes <= n or int(successes) != successes:
        raise ValueError(f"need a whole number of successes between 0 and n >= 1; got {successes} of {n}")
    ci = binomtest(int(successes), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return Interval(successes / n, float(ci.low), float(ci.high), confidence, "Wilson")

