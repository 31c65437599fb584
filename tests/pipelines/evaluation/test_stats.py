"""stats.bootstrap on cases with a known answer; the fast Fréchet form and KID."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.evaluation.fid import frechet_distance, kernel_inception_distance
from pipelines.evaluation.stats import bootstrap, paired_difference, resamples


def test_bootstrap_interval_of_a_mean_matches_the_normal_theory_answer():
    x = np.random.default_rng(1).normal(3.0, 2.0, size=400)
    iv = bootstrap(lambda idx: float(x[idx].mean()), resamples(len(x), 2000, 0))
    half = 1.96 * x.std(ddof=1) / np.sqrt(len(x))  # ~0.196
    assert iv.value == pytest.approx(x.mean())
    assert iv.lo == pytest.approx(x.mean() - half, abs=0.03)
    assert iv.hi == pytest.approx(x.mean() + half, abs=0.03)


def test_a_statistic_that_resampling_biases_gets_an_interval_around_its_estimate():
    """Distinct images in a draw: n on the data, ~0.632 n in every resample (what repeated images
    do to FID). The raw percentile interval misses the estimate; the bias-shifted one holds it."""
    n = 200
    iv = bootstrap(lambda idx: float(len(np.unique(idx))), resamples(n, 500, 0))
    assert iv.value == n
    assert iv.lo < n < iv.hi and iv.hi - iv.lo < 0.15 * n  # ~0.632 n +- a few, shifted up to n
    x = np.random.default_rng(4).normal(size=(n, 3))  # a variance-like (set) statistic
    fid_like = bootstrap(lambda idx: float(np.var(x[idx], axis=0).sum()), resamples(n, 1000, 1))
    assert fid_like.lo < fid_like.value < fid_like.hi


def test_constant_data_has_a_zero_width_interval_and_paired_shift_is_exact():
    c = np.full(30, 5.0)
    draws = resamples(30, 200, 0)
    iv = bootstrap(lambda idx: float(c[idx].mean()), draws)
    assert (iv.value, iv.lo, iv.hi) == (5.0, 5.0, 5.0)
    x = np.random.default_rng(2).normal(size=30)
    d = paired_difference(lambda i: float((x[i] + 1).mean()), lambda i: float(x[i].mean()), draws)
    assert d.lo == pytest.approx(1.0) and d.hi == pytest.approx(1.0) and d.excludes_zero


def test_fast_frechet_equals_the_covariance_form():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(12, 40)), rng.normal(0.5, 1.3, size=(9, 40))  # fewer images than dims
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(sa)
    ra = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cov = np.sqrt(np.clip(np.linalg.eigvalsh(ra @ sb @ ra), 0, None)).sum()
    mu = a.mean(0) - b.mean(0)
    want = mu @ mu + np.trace(sa) + np.trace(sb) - 2 * cov
    assert frechet_distance(a, b) == pytest.approx(want, rel=1e-6)  # eig sqrt of ~0 modes: ~1e-8
    big = rng.normal(size=(200, 4))
    assert frechet_distance(big, big + 1.0) == pytest.approx(4.0, rel=1e-6)


def test_kid_is_unbiased_near_zero_for_the_same_distribution():
    rng = np.random.default_rng(3)
    same = [kernel_inception_distance(rng.normal(size=(20, 8)), rng.normal(size=(20, 8)))
            for _ in range(60)]
    assert abs(np.mean(same)) < 3 * np.std(same) / np.sqrt(len(same))  # mean ~0: no small-n bias
    assert kernel_inception_distance(rng.normal(size=(20, 8)), rng.normal(1.0, size=(20, 8))) > 0.05


def test_frechet_from_grams_equals_frechet_on_resampled_rows():
    from pipelines.evaluation.fid import frechet_from_grams

    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(15, 30)), rng.normal(0.3, 1.1, size=(15, 30))
    idx = rng.integers(0, 15, 15)
    ga, gb, gab = a @ a.T, b @ b.T, a @ b.T
    got = frechet_from_grams(ga[np.ix_(idx, idx)], gb[np.ix_(idx, idx)], gab[np.ix_(idx, idx)])
    assert got == pytest.approx(frechet_distance(a[idx], b[idx]), rel=1e-8)
