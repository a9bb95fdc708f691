"""The proxy's base lr, per track (issue 29): one rule, applied to a probe's runs.

Each recipe's lr is a ratio to the budget's base (ControlNet 1x, IP-Adapter 10x, ...). At full scale the
base is ControlNet's official 1e-5; on the proxy it is this harness's choice, and a base that suits the 1x
methods can starve the 10x ones. The probe: the track's roster, one run per (method, base lr) with
`budget.lr=...` and nothing else changed. The rule, so no method's taste picks the base:

1. each method's score on the track's metric at each base, as a fraction of its own best over the probe;
2. the base where the worst-off method's fraction is highest (max-min);
3. bases whose worst fractions differ by less than the noise tie (noise: the worst-off cell's bootstrap
   half-width over that method's best, the larger of the two bases'); a tie goes to the base with the
   higher mean ``tie_metric`` (prompt fidelity) over the methods.

`python -m bench.analysis.base_lr --store S [--store S2] --metric id_sim_proxy_mean` prints the table and the
choice. Torch-free: it only reads stores.
"""
from __future__ import annotations

import argparse
import math
import sys
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from bench.analysis import stats
from bench.core.errors import ConfigError
from bench.core.store import RunRecord, Store


@dataclass(frozen=True)
class ProbeCell:
    """One method at one base lr: the metric's mean over seeds, its bootstrap half-width, the tie metric."""

    method: str
    lr: float
    value: float
    half: float
    tie_value: float
    seeds: int


@dataclass(frozen=True)
class BaseLrChoice:
    lr: float
    worst: dict[float, tuple[str, float, float]]  # base -> (worst-off method, its fraction, noise)
    tied: tuple[float, ...]  # the bases within noise of the best worst-fraction, the chosen one included
    tie_means: dict[float, float]


def probe_cells(records: list[RunRecord], metric: str, tie_metric: str = "prompt_fidelity",
                seeds: set[int] | None = None) -> list[ProbeCell]:
    """The probe's cells from FINISHED runs without hparams overrides (an override is another arm),
    of ``seeds`` only when given."""
    runs: dict[tuple[str, float], list[RunRecord]] = defaultdict(list)
    for rec in records:
        if (rec.finished and not rec.spec.get("hparams") and metric in rec.metrics
                and (seeds is None or rec.seed in seeds)):
            runs[rec.method, float(rec.spec["budget_fields"]["lr"])].append(rec)
    if not runs:
        raise ConfigError(f"no FINISHED run without hparams overrides records {metric!r}: run the probe first "
                          f"(README \"Learning rates\")")
    others = {tuple(sorted((k, repr(v)) for k, v in r.spec["budget_fields"].items() if k != "lr"))
              for recs in runs.values() for r in recs}
    if len(others) > 1:
        raise ConfigError("the probe's runs differ in budget fields other than lr: pass one budget's stores "
                          "(or --seeds to leave a roster's other runs out)")
    cells = []
    for (method, lr), recs in sorted(runs.items()):
        per_seed = {r.seed: r.sample_scores[metric] for r in recs if r.sample_scores.get(metric)}
        iv = stats.leaderboard_interval(per_seed if len(per_seed) == len(recs) else None,
                                        [r.metrics[metric] for r in recs])
        half = math.nan if iv.method == stats.SINGLE else iv.half  # one pooled number: its noise is unknown
        cells.append(ProbeCell(method, lr, float(np.mean([r.metrics[metric] for r in recs])), half,
                               _finite_mean([r.metrics.get(tie_metric, math.nan) for r in recs]), len(recs)))
    return cells


def _finite_mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


def choose_base_lr(cells: list[ProbeCell], higher_is_better: bool = True) -> BaseLrChoice:
    """The rule of the module docstring. Every method must have been probed at every base."""
    methods, bases = sorted({c.method for c in cells}), sorted({c.lr for c in cells})
    at = {(c.method, c.lr): c for c in cells}
    missing = [f"{m}@{lr:g}" for m in methods for lr in bases if (m, lr) not in at]
    if missing:
        raise ConfigError(f"the probe lacks {', '.join(missing)}: run every method at every base lr")
    best = {m: (max if higher_is_better else min)(at[m, lr].value for lr in bases) for m in methods}
    if any(not v > 0 for v in best.values()):
        raise ConfigError(f"a fraction of the best needs positive scores; best per method: {best}")
    worst = {}
    for lr in bases:
        fractions = {m: (at[m, lr].value / best[m] if higher_is_better else best[m] / at[m, lr].value)
                     for m in methods}
        m = min(fractions, key=fractions.get)
        worst[lr] = (m, fractions[m], at[m, lr].half / best[m])  # nan: unknown, so it ties nothing
    top = max(bases, key=lambda lr: worst[lr][1])
    tied = tuple(lr for lr in bases
                 if lr == top or worst[top][1] - worst[lr][1] < np.nanmax([worst[top][2], worst[lr][2], 0.0]))
    tie_means = {lr: _finite_mean([at[m, lr].tie_value for m in methods]) for lr in bases}
    chosen = max(tied, key=lambda lr: (tie_means[lr], worst[lr][1])) if len(tied) > 1 else top
    return BaseLrChoice(chosen, worst, tied, tie_means)


def _pm(half: float, spec: str) -> str:
    return "" if math.isnan(half) else f" ± {half:{spec}}"


def format_choice(cells: list[ProbeCell], choice: BaseLrChoice, metric: str, tie_metric: str) -> str:
    methods, bases = sorted({c.method for c in cells}), sorted({c.lr for c in cells}, reverse=True)
    at = {(c.method, c.lr): c for c in cells}
    lines = [f"| base lr | {' | '.join(methods)} | worst-off (fraction of its best ± noise) | {tie_metric} (mean) |",
             "|---" * (len(methods) + 3) + "|"]
    for lr in bases:
        m, frac, noise = choice.worst[lr]
        cells_text = " | ".join(f"{at[x, lr].value:.3g}{_pm(at[x, lr].half, '.2g')}" for x in methods)
        lines.append(f"| {lr:g} | {cells_text} | {m} {frac:.2f}{_pm(noise, '.2f')} | {choice.tie_means[lr]:.3f} |")
    tie = (f"; {', '.join(f'{lr:g}' for lr in choice.tied)} tie within noise, split by {tie_metric}"
           if len(choice.tied) > 1 else "")
    seeds = sorted({c.seeds for c in cells})
    unknown = " No ± where a cell is one pooled number (no per-sample scores, one seed)." if any(
        math.isnan(c.half) for c in cells) else ""
    return "\n".join(lines) + (f"\n\n{metric} over {'/'.join(map(str, seeds))} seed(s) per cell. Chosen base lr: "
                               f"**{choice.lr:g}** (max-min of each method's fraction of its own best{tie}).{unknown}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.analysis.base_lr", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", action="append", required=True, help="a probe store (repeat to pool several)")
    p.add_argument("--metric", required=True, help="the track's metric, e.g. canny_f1 or id_sim_proxy_mean")
    p.add_argument("--tie-metric", default="prompt_fidelity", help="splits bases that tie within noise")
    p.add_argument("--seeds", help="only these seeds, comma-separated (e.g. 0, when a store also holds a roster)")
    p.add_argument("--lower-is-better", action="store_true", help="for a metric where lower is better")
    args = p.parse_args(argv)
    try:
        records = []
        for path in args.store:
            with Store(path, read_only=True) as store:
                records += store.records("FINISHED")
        seeds = {int(x) for x in args.seeds.split(",")} if args.seeds else None
        cells = probe_cells(records, args.metric, args.tie_metric, seeds)
        print(format_choice(cells, choose_base_lr(cells, not args.lower_is_better), args.metric, args.tie_metric))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
