"""bench.analysis.stats: coverage of the nominal 95% intervals on synthetic data with a known effect,
the seed-t fallback, pairing. Vectorised numpy only; no models."""
from __future__ import annotations

import math

import numpy as np
import pytest

from bench.analysis.stats import (
    BOOTSTRAP,
    SEED_T,
    SINGLE,
    bootstrap_interval,
    leaderboard_interval,
    paired_difference,
    seed_t_interval,
    seeds_needed,
    half_width_at,
)

EXPERIMENTS = 1000  # simulated experiments per coverage test
S, N = 4, 40        # seeds x eval samples per experiment


def _coverage(simulate, true: float) -> float:
    rng = np.random.default_rng(7)
    hits = 0
    for e in range(EXPERIMENTS):
        iv = bootstrap_interval([simulate(rng)], n_boot=400, seed=e)
        hits += iv.lo <= true <= iv.hi
    return hits / EXPERIMENTS


def test_leaderboard_interval_covers_the_true_mean_at_its_nominal_rate() -> None:
    """Samples nested in seeds: x = mu + a[seed] + e[seed, sample], a small seed effect
    (sd 0.01) and per-sample noise (sd 0.2); the true value is mu."""
    def simulate(rng):
        return 0.5 + rng.normal(0, 0.01, (S, 1)) + rng.normal(0, 0.2, (S, N))

    assert 0.93 <= _coverage(simulate, 0.5) <= 0.97


def test_paired_difference_interval_covers_the_true_effect_at_its_nominal_rate() -> None:
    """Two methods sharing the samples' difficulty and the per-(seed, sample) noise, each with its
    own small seed effect and residual noise; the true effect is +0.1."""
    def simulate(rng):
        difficulty, noise = rng.normal(0, 0.3, N), rng.normal(0, 0.2, (S, N))
        a = 0.6 + difficulty + noise + rng.normal(0, 0.005, (S, 1)) + rng.normal(0, 0.1, (S, N))
        b = 0.5 + difficulty + noise + rng.normal(0, 0.005, (S, 1)) + rng.normal(0, 0.1, (S, N))
        return a - b

    assert 0.93 <= _coverage(simulate, 0.1) <= 0.97


def _per_seed(rng, mean: float, seeds=(0, 1), n: int = 60, shared=None) -> dict:
    shared = rng.normal(0, 0.2, (len(seeds), n)) if shared is None else shared
    return {s: {f"s{i}": float(mean + shared[k, i] + rng.normal(0, 0.02)) for i in range(n)}
            for k, s in enumerate(seeds)}


def test_paired_difference_is_far_tighter_than_seed_intervals() -> None:
    rng = np.random.default_rng(0)
    # per-(seed, sample) noise both methods share, plus a per-seed offset they share (seed 1's noise is easier)
    shared = rng.normal(0, 0.2, (2, 60)) + np.array([[0.0], [0.05]])
    a, b = _per_seed(rng, 0.53, shared=shared), _per_seed(rng, 0.50, shared=shared)
    d = paired_difference(a, b)
    assert d.method == BOOTSTRAP and d.n_seeds == 2 and d.n_samples == 60
    assert d.lo > 0 and abs(d.estimate - 0.03) < 0.01  # the +0.03 gain is resolved
    seed_a, seed_b = (seed_t_interval([np.mean(list(v.values())) for v in x.values()]) for x in (a, b))
    assert seed_a.method == SEED_T and seed_a.lo < seed_b.hi  # the unpaired seed intervals overlap
    assert seed_a.half > 10 * d.half  # t(1) = 12.7 over 2 seeds


def test_fallback_and_single_measurement() -> None:
    iv = leaderboard_interval(None, [0.5, 0.6, 0.7])
    assert iv.method == SEED_T and iv.estimate == pytest.approx(0.6)
    from scipy import stats
    assert iv.half == pytest.approx(stats.t.ppf(0.975, 2) * 0.1 / math.sqrt(3))
    one = seed_t_interval([3.0])
    assert one.method == SINGLE and one.lo == one.hi == 3.0 and "one seed" in one.note
    same = seed_t_interval([7.0, 7.0])
    assert same.method == SINGLE and same.degenerate and "equal" in same.note
    assert leaderboard_interval({0: {"a": 1.0, "b": 0.0}}, [0.5]).method == BOOTSTRAP


def test_bootstrap_is_reproducible_and_handles_missing_values() -> None:
    x = np.random.default_rng(1).normal(0, 1, (3, 30))
    x[0, 3] = np.nan
    a, b = bootstrap_interval([x]), bootstrap_interval([x])
    assert (a.lo, a.hi) == (b.lo, b.hi) and a.lo < a.estimate < a.hi
    assert a.estimate == pytest.approx(np.mean(np.nanmean(x, axis=1)))


def test_no_common_seed_pairs_over_samples() -> None:
    rng = np.random.default_rng(3)
    a, b = _per_seed(rng, 0.6, seeds=(0, 1)), _per_seed(rng, 0.5, seeds=(2, 3))
    d = paired_difference(a, b)
    assert "no common seed" in d.note and d.n_seeds == 1


def test_seeds_needed_follows_the_variance() -> None:
    iv = seed_t_interval([0.0, 0.2, 0.1])
    assert seeds_needed(iv, iv.half / 2) == 12  # half-width must halve: 4x the 3 seeds
    assert seeds_needed(iv, 0.0) is None


def test_half_width_at_the_cap_inverts_seeds_needed() -> None:
    iv = seed_t_interval([0.0, 0.2, 0.1])
    assert half_width_at(iv, 12) == pytest.approx(iv.half / 2)  # 4x the seeds: half the width
    assert seeds_needed(iv, half_width_at(iv, 12) * 1.0001) == 12


def test_the_bootstrap_draws_every_sample_and_every_seed() -> None:
    """An off-by-one draw (rng.integers(0, N - 1)) never picks the last sample or seed; put all the
    signal there and the interval would sit below the point estimate."""
    last_sample = np.array([[0.0, 0.0, 0.0, 0.0, 100.0]])  # one seed: the bootstrap resamples samples
    iv = bootstrap_interval([last_sample], seed=0)
    assert iv.estimate == pytest.approx(20.0) and iv.lo < iv.estimate < iv.hi
    last_seed = np.zeros((5, 3))
    last_seed[4] = 100.0  # five seeds, the last one far off: the seed stage must draw it
    iv = bootstrap_interval([last_seed], seed=0)
    assert iv.estimate == pytest.approx(20.0) and iv.lo < iv.estimate < iv.hi


def test_the_bootstrap_replicates_are_centred_on_the_grand_mean() -> None:
    """Resampling is unbiased: the replicates' mean is the grand mean, to its Monte-Carlo error."""
    from bench.analysis.stats import _replicates

    x = np.random.default_rng(3).normal(size=(4, 9)) + np.arange(9)  # the later samples are larger
    reps = _replicates([x], 20000, np.random.default_rng(0))[:, 0]
    assert abs(reps.mean() - x.mean()) < 4 * reps.std() / math.sqrt(len(reps))
