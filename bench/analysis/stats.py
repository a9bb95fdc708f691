"""Intervals for the leaderboard, method-vs-method comparisons, claims and `bench check`.

Every method sees the same eval samples and the same per-sample noise (noise seed = hash(run
seed, sample id), bench/api/sampler.py), so with per-sample scores in the store (schema 3) a run is a
matrix of scores over (seed, sample). Three interval methods, each named in `Interval.method`:

1. **Hierarchical bootstrap** (per-sample scores present). Davison & Hinkley (1997, *Bootstrap
   Methods and their Application*, §3.8), the two-stage bootstrap with adjusted components, for
   samples nested in seeds, ``x[s, i] = mu + a[s] + e[s, i]``:

   - split each seed's scores into its mean ``m[s]`` and residuals ``r[s, i] = x[s, i] - m[s]``;
   - estimate the within-seed variance of a seed mean, ``w = mean_s(var_i(r[s]) / n[s])``, and the
     seed-to-seed variance ``sa2 = max(0, var_s(m) - w)`` (one-way random-effects moments);
   - stage 1 resamples seeds with replacement from the seed means shrunk toward the grand mean
     so that their spread is ``sa2`` (a plain resample of ``m`` would count the within-seed
     noise twice, once inside ``m`` and again in stage 2), rescaled by sqrt(S/(S-1));
   - stage 2 resamples each drawn seed's residuals with replacement, rescaled by sqrt(n/(n-1));
   - the replicate is the mean over drawn seeds of (adjusted seed mean + mean of drawn residuals).

   The bootstrap variance of the grand mean is then ``sa2/S + w/S``, the unbiased moment estimate;
   the interval is the percentile interval of ``N_BOOT`` replicates from a fixed
   ``numpy.random.Generator`` seed (reports are reproducible). `scipy.stats.bootstrap` cannot
   nest two levels, hence numpy. A *paired* comparison applies it to the per-(seed, sample)
   difference of two methods over the pairs both have: the shared sample difficulty and the
   shared noise cancel, which is why it is far tighter than comparing two seed intervals.
   Limits: with one seed the seed-to-seed spread is unknown and taken as 0 (the method says
   so); with 2–3 seeds and a large seed-to-seed spread it under-covers, and only more seeds help.
2. **Seed Student-t** (no per-sample scores, e.g. pooled metrics such as FID or mIoU, compute
   figures, or stores from before schema 3): ``mean ± t(0.975, n-1) * sd / sqrt(n)`` over seeds,
   `scipy.stats.t`; with 2 seeds t(1) = 12.7, which is why per-sample scores matter.
3. **Single measurement**: one value, or values that are equal across seeds (a parameter count):
   the interval is the point.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as _sp

LEVEL = 0.95
N_BOOT = 2000
RNG_SEED = 20240  # fixed: the same store always gives the same intervals
_CHUNK = 4_000_000  # elements per vectorised bootstrap chunk (memory bound)

BOOTSTRAP = "hierarchical bootstrap"
SEED_T = "seed Student-t"
SINGLE = "single measurement"

# One line under each table, naming how its intervals were made.
METHOD_NOTES = {
    BOOTSTRAP: "95% interval: hierarchical bootstrap over seeds, then eval samples within seeds "
               "(per-sample scores; bench/analysis/stats.py)",
    SEED_T: "95% interval: Student t over seed means (no per-sample scores)",
    SINGLE: "single measurement: no interval",
}


@dataclass(frozen=True)
class Interval:
    """A point estimate with its interval and how it was made.

    ``method``: BOOTSTRAP, SEED_T or SINGLE; ``n_seeds`` and ``n_samples`` (per seed, 0 without
    per-sample scores) are the data it rests on; ``note`` says anything the reader must know
    (one seed, a fallback)."""

    estimate: float
    lo: float
    hi: float
    method: str
    n_seeds: int
    n_samples: int = 0
    note: str = ""

    @property
    def half(self) -> float:
        return (self.hi - self.lo) / 2 if math.isfinite(self.lo) and math.isfinite(self.hi) else math.nan

    @property
    def degenerate(self) -> bool:
        """No spread to speak of: a single measurement, or equal values."""
        return self.method == SINGLE or self.lo == self.hi

    def describe(self) -> str:
        units = f"{self.n_seeds} seed(s)" + (f" x {self.n_samples} samples" if self.n_samples else "")
        return f"{self.method}, {units}" + (f"; {self.note}" if self.note else "")


def _rng(seed: int | None) -> np.random.Generator:
    return np.random.default_rng(RNG_SEED if seed is None else seed)


# ---- seed level ------------------------------------------------------------------------------

def seed_t_interval(values: Sequence[float], level: float = LEVEL) -> Interval:
    """Student-t interval of the mean over seeds (scipy.stats.t); SINGLE for one finite value
    or values that are all equal."""
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if len(x) == 0:
        return Interval(math.nan, math.nan, math.nan, SINGLE, 0)
    mean = float(x.mean())
    if len(x) == 1 or np.all(x == x[0]):
        note = "one seed" if len(x) == 1 else f"equal over {len(x)} seeds"
        return Interval(mean, mean, mean, SINGLE, len(x), note=note)
    lo, hi = _sp.t.interval(level, len(x) - 1, loc=mean, scale=float(x.std(ddof=1)) / math.sqrt(len(x)))
    return Interval(mean, float(lo), float(hi), SEED_T, len(x))


# ---- (seed, sample) matrices -----------------------------------------------------------------

def score_matrix(per_seed: Mapping[object, Mapping[str, float]],
                 seeds: Sequence[object] | None = None, samples: Sequence[str] | None = None) -> np.ndarray:
    """{seed: {sample id: value}} -> float [S, N] over ``seeds`` x ``samples`` (default: all, sorted);
    NaN where a (seed, sample) has no value."""
    seeds = sorted(per_seed, key=str) if seeds is None else list(seeds)
    samples = sorted({i for s in seeds for i in per_seed[s]}) if samples is None else list(samples)
    out = np.full((len(seeds), len(samples)), np.nan)
    col = {sid: j for j, sid in enumerate(samples)}
    for r, s in enumerate(seeds):
        for sid, v in per_seed[s].items():
            if sid in col and v is not None:
                out[r, col[sid]] = float(v)
    return out


def _components(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Adjusted seed means [S] and adjusted residuals [S, N] (NaN kept) of the D&H two-stage
    bootstrap (see the module docstring), and the grand mean."""
    x = x[np.isfinite(x).any(axis=1)]
    n = np.isfinite(x).sum(axis=1)
    m = np.nanmean(x, axis=1)
    grand = float(m.mean())
    resid = x - m[:, None]
    var_within = np.array([np.nanvar(r, ddof=1) if k > 1 else 0.0 for r, k in zip(resid, n)])
    w = float(np.mean(var_within / n))
    S = len(m)
    if S > 1:
        vm = float(m.var(ddof=1))
        sa2 = max(0.0, vm - w)
        c = math.sqrt(S / (S - 1) * sa2 / vm) if vm > 0 else 0.0
    else:
        c = 0.0
    m_adj = grand + c * (m - grand)
    resid_adj = resid * np.sqrt(np.where(n > 1, n / np.maximum(n - 1, 1), 1.0))[:, None]
    return m_adj, resid_adj, grand


def _replicates(mats: Sequence[np.ndarray], n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """[n_boot, k] bootstrap replicates of the grand mean of each [S, N] matrix in ``mats``, with
    the *same* seed and sample draws for every matrix (they must be aligned: a paired design)."""
    comps = [_components(x) for x in mats]
    S, N = comps[0][1].shape
    if any(c[1].shape != (S, N) for c in comps):
        raise ValueError("paired matrices must have the same (seed, sample) shape")
    out = np.empty((n_boot, len(comps)))
    step = max(1, _CHUNK // max(1, S * N))
    for start in range(0, n_boot, step):
        b = min(step, n_boot - start)
        si = rng.integers(0, S, size=(b, S))
        ii = rng.integers(0, N, size=(b, S, N))
        for k, (m_adj, resid, _) in enumerate(comps):
            drawn = resid[si[:, :, None], ii]  # [b, S, N]
            finite = np.isfinite(drawn)
            within = np.where(finite, drawn, 0.0).sum(axis=2) / np.maximum(finite.sum(axis=2), 1)
            out[start:start + b, k] = (m_adj[si] + within).mean(axis=1)
    return out


def _percentile(values: np.ndarray, level: float) -> tuple[float, float]:
    v = values[np.isfinite(values)]
    if len(v) == 0:
        return math.nan, math.nan
    a = (1 - level) / 2
    lo, hi = np.quantile(v, [a, 1 - a])
    return float(lo), float(hi)


def bootstrap_interval(mats: Sequence[np.ndarray], statistic: Callable[[np.ndarray], np.ndarray] | None = None,
                       level: float = LEVEL, n_boot: int = N_BOOT, seed: int | None = None) -> Interval:
    """Hierarchical-bootstrap interval of ``statistic(means)`` where ``means`` [..., k] are the
    grand means of the aligned matrices ``mats`` (default: the first matrix's mean)."""
    statistic = statistic or (lambda means: means[..., 0])
    mats = [np.asarray(x, dtype=float) for x in mats]
    kept = np.isfinite(mats[0]).any(axis=1)
    for x in mats[1:]:
        kept &= np.isfinite(x).any(axis=1)
    mats = [x[kept] for x in mats]
    if not len(mats[0]) or not np.isfinite(mats[0]).any():
        return Interval(math.nan, math.nan, math.nan, SINGLE, 0)
    point = np.array([_components(x)[2] for x in mats])
    reps = _replicates(mats, n_boot, _rng(seed))
    lo, hi = _percentile(statistic(reps), level)
    S, N = mats[0].shape
    note = "one seed: seed-to-seed spread unknown, interval covers sample noise only" if S == 1 else ""
    return Interval(float(statistic(point)), lo, hi, BOOTSTRAP, S, N, note)


def leaderboard_interval(per_seed: Mapping[object, Mapping[str, float]] | None,
                         seed_values: Sequence[float], level: float = LEVEL, seed: int | None = None) -> Interval:
    """One arm's metric: the hierarchical bootstrap when per-sample scores exist for every seed
    (``per_seed`` {seed: {sample id: value}}), else the seed Student-t over ``seed_values``."""
    if per_seed and all(per_seed.values()):
        return bootstrap_interval([score_matrix(per_seed)], level=level, seed=seed)
    return seed_t_interval(seed_values, level)


def paired_matrices(a: Mapping[object, Mapping[str, float]], b: Mapping[object, Mapping[str, float]]
                    ) -> tuple[np.ndarray, np.ndarray, str]:
    """Aligned [S, N] matrices of two arms over the (seed, sample) pairs both have; when they
    share no seed, over the samples both have with each arm's seed-mean per sample (a 1 x N
    matrix: paired by sample only). The str says which."""
    seeds = sorted(set(a) & set(b), key=str)
    samples = sorted({i for s in seeds for i in a[s]} & {i for s in seeds for i in b[s]})
    if seeds and samples:
        return score_matrix(a, seeds, samples), score_matrix(b, seeds, samples), "paired over (seed, sample)"
    common = sorted({i for s in a for i in a[s]} & {i for s in b for i in b[s]})
    ma = np.nanmean(score_matrix(a, samples=common), axis=0, keepdims=True) if common else np.empty((0, 0))
    mb = np.nanmean(score_matrix(b, samples=common), axis=0, keepdims=True) if common else np.empty((0, 0))
    return ma, mb, "no common seed: paired over samples (seed-averaged)"


def paired_difference(a: Mapping[object, Mapping[str, float]], b: Mapping[object, Mapping[str, float]],
                      level: float = LEVEL, seed: int | None = None) -> Interval:
    """Interval of mean(a) - mean(b), paired over the (seed, sample) pairs both arms have
    (hierarchical bootstrap of the per-pair difference)."""
    ma, mb, how = paired_matrices(a, b)
    if ma.size == 0:
        return Interval(math.nan, math.nan, math.nan, SINGLE, 0, note="no common samples")
    iv = bootstrap_interval([ma - mb], level=level, seed=seed)
    return Interval(iv.estimate, iv.lo, iv.hi, iv.method, iv.n_seeds, iv.n_samples,
                    "; ".join(x for x in (how, iv.note) if x))


def seeds_needed(iv: Interval, margin: float, z: float | None = None) -> int | None:
    """How many seeds in all would make an interval like ``iv`` narrower than ``margin`` (the
    distance from the estimate to the boundary that decides): the half-width shrinks like
    1/sqrt(seeds) at a fixed number of samples per seed (both variance components of the
    bootstrap, and the seed-t's, are divided by S), so n_needed ≈ n * (half / |margin|)^2, i.e.
    n * (z * se / |margin|)^2. None when it cannot be estimated (no spread, margin 0)."""
    del z  # the half-width already is z * se at the interval's level
    if not math.isfinite(iv.half) or iv.half <= 0 or not margin or not math.isfinite(margin):
        return None
    n = max(iv.n_seeds, 1)
    return max(n + 1, math.ceil(n * (iv.half / abs(margin)) ** 2))


def half_width_at(iv: Interval, seeds: int) -> float:
    """The half-width an interval like ``iv`` would have at ``seeds`` seeds (same samples per
    seed): half * sqrt(n / seeds), the scaling ``seeds_needed`` inverts. An effect further than
    this from a claim's boundary would be decided at that many seeds."""
    return iv.half * math.sqrt(max(iv.n_seeds, 1) / seeds)


def ci95(values: Iterable[float]) -> tuple[float, float]:
    """(mean, half-width of the 95% Student-t interval); the half-width is nan for n < 2,
    because one seed says nothing about seed variance."""
    x = np.asarray(list(values), dtype=float)
    n = x.size
    if n == 0:
        return math.nan, math.nan
    mean = float(x.mean())
    if n < 2:
        return mean, math.nan
    half = float(_sp.t.ppf(0.975, n - 1) * x.std(ddof=1) / math.sqrt(n))
    return mean, half
