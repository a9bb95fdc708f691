"""`bench check`: the regression gate over a store, against a checked-in baseline file.

Per (method, metric, dataset, budget key) a run fails when it is worse than the baseline by
more than max(abs_tol, k * stderr), stderr combining baseline and current seed spread. A
method with no baseline entry fails unless it beats `baseline` (the uncontrolled base model)
on its consistency metric: a control method that does not beat no control does not work.
"""
from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.errors import ConfigError
from bench.files import atomic_write
from bench.store import RunRecord

FORMAT = "controlbench-baseline/1"
DEFAULT_TOLERANCE = {"abs_tol": 0.02, "k": 3.0}
Key = tuple[str, str, str, str]  # (method, metric, dataset, budget_key)


@dataclass(frozen=True)
class Stat:
    mean: float
    stderr: float  # nan for one seed
    n: int
    higher_is_better: bool
    version: str


@dataclass(frozen=True)
class Failure:
    method: str
    metric: str
    dataset: str
    budget_key: str
    baseline: float
    current: float
    allowed: float
    why: str


def dataset_label(rec: RunRecord) -> str:
    return f"{rec.dataset}/{rec.condition}" if rec.condition else rec.dataset


def summarize(records: list[RunRecord]) -> dict[Key, Stat]:
    """Mean and standard error over seeds of every FINISHED record's metrics."""
    values: dict[Key, list[float]] = defaultdict(list)
    meta: dict[Key, dict] = {}
    for rec in records:
        if not rec.finished:
            continue
        for metric, value in rec.metrics.items():
            key = (rec.method, metric, dataset_label(rec), rec.budget_key)
            values[key].append(float(value))
            meta[key] = rec.metric_meta.get(metric, {})
    out = {}
    for key, xs in values.items():
        n, mean = len(xs), sum(xs) / len(xs)
        sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else math.nan
        out[key] = Stat(mean, sd / math.sqrt(n), n, bool(meta[key].get("higher_is_better", True)),
                        str(meta[key].get("version", "")))
    return out


def load_baseline(path: Path) -> tuple[dict[Key, Stat], dict[str, dict[str, float]]]:
    try:
        raw = json.loads(Path(path).read_text())
        entries = {(e["method"], e["metric"], e["dataset"], e["budget_key"]):
                   Stat(e["mean"], e["stderr"] if e["stderr"] is not None else math.nan, e["n"],
                        e["higher_is_better"], e["version"]) for e in raw["entries"]}
    except OSError as e:
        raise ConfigError(f"cannot read baseline {path}: {e.strerror}; create it with --update-baseline") from None
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"baseline {path} is not a {FORMAT} file ({type(e).__name__}: {e}); "
                          "regenerate it with --update-baseline") from None
    return entries, raw.get("tolerances") or {"default": DEFAULT_TOLERANCE}


def write_baseline(path: Path, stats: dict[Key, Stat], tolerances: dict[str, dict[str, float]]) -> None:
    """Atomic: CI never reads a half-written baseline."""
    entries = [{"method": k[0], "metric": k[1], "dataset": k[2], "budget_key": k[3],
                **{f: (None if isinstance(v, float) and math.isnan(v) else v) for f, v in asdict(s).items()}}
               for k, s in sorted(stats.items())]
    text = json.dumps({"format": FORMAT, "tolerances": tolerances, "entries": entries}, indent=1) + "\n"
    atomic_write(path, text)


def _nan0(x: float) -> float:
    return 0.0 if math.isnan(x) else x


def _regressions(base: dict[Key, Stat], cur: dict[Key, Stat], tolerances: dict) -> tuple[list[Failure], int]:
    failures, passed = [], 0
    for key, b in sorted(base.items()):
        c = cur.get(key)
        if c is None:
            continue  # not run this time; reported in the summary
        tol = {**DEFAULT_TOLERANCE, **tolerances.get("default", {}), **tolerances.get(key[1], {})}
        allowed = max(tol["abs_tol"], tol["k"] * math.hypot(_nan0(b.stderr), _nan0(c.stderr)))
        worse = (b.mean - c.mean) if b.higher_is_better else (c.mean - b.mean)
        if c.version != b.version:
            failures.append(Failure(*key, b.mean, c.mean, allowed, f"metric version {b.version} -> {c.version}; "
                                    "re-baseline with --update-baseline"))
        elif not worse <= allowed:  # `not <=` also catches nan
            failures.append(Failure(*key, b.mean, c.mean, allowed, "regressed"))
        else:
            passed += 1
    return failures, passed


def _consistency_metric(condition: str, measured: set[str]) -> str | None:
    from bench.registry import METRICS, load_builtins

    load_builtins()
    found = [m for m in sorted(measured) if m in METRICS.names() and METRICS.get(m).condition == condition]
    return found[0] if found else None


def _new_methods(base: dict[Key, Stat], cur: dict[Key, Stat]) -> list[Failure]:
    """A method with no baseline entry in its (dataset, budget) must beat `baseline` on consistency."""
    known = {(k[0], k[2], k[3]) for k in base}
    new = sorted({(k[0], k[2], k[3]) for k in cur} - known)
    failures = []
    for method, dataset, budget_key in new:
        if method == "baseline":
            continue
        measured = {k[1] for k in cur if k[0] == method and k[2:] == (dataset, budget_key)}
        metric = _consistency_metric(dataset.partition("/")[2], measured)
        mine = cur.get((method, metric, dataset, budget_key)) if metric else None
        ref = cur.get(("baseline", metric, dataset, budget_key)) if metric else None
        if mine is None or ref is None:
            why = "no consistency metric measured" if mine is None else "no `baseline` run to compare with"
            failures.append(Failure(method, metric or "-", dataset, budget_key, math.nan,
                                    mine.mean if mine else math.nan, math.nan, f"new method: {why}"))
        elif not ((mine.mean > ref.mean) if mine.higher_is_better else (mine.mean < ref.mean)):
            failures.append(Failure(method, metric, dataset, budget_key, ref.mean, mine.mean, 0.0,
                                    "new method does not beat `baseline`"))
    return failures


def _failed_runs(base: dict[Key, Stat], records: list[RunRecord]) -> list[Failure]:
    """Baseline methods whose runs all FAILED this time: a crash is a regression too."""
    finished = {(r.method, dataset_label(r), r.budget_key) for r in records if r.finished}
    expected = {(k[0], k[2], k[3]) for k in base}
    out = {}
    for r in records:
        key = (r.method, dataset_label(r), r.budget_key)
        if not r.finished and key in expected and key not in finished:
            out[key] = Failure(key[0], "-", key[1], key[2], math.nan, math.nan, math.nan, f"{r.status}: {r.reason}")
    return list(out.values())


def _fmt(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.4g}"


def render(failures: list[Failure]) -> str:
    rows = [("method", "metric", "dataset", "budget", "baseline", "current", "allowed", "why")]
    rows += [(f.method, f.metric, f.dataset, f.budget_key[:12], _fmt(f.baseline), _fmt(f.current), _fmt(f.allowed),
              f.why) for f in failures]
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)


def check(records: list[RunRecord], baseline_path: Path, update: bool) -> int:
    """Print the verdict; returns the exit code (0 pass, 1 regression)."""
    current = summarize(records)
    if not current:
        raise ConfigError("the store has no FINISHED runs to check; run `bench sweep` or `bench run` first")
    if update:
        tolerances = load_baseline(baseline_path)[1] if Path(baseline_path).is_file() else {
            "default": DEFAULT_TOLERANCE}
        write_baseline(baseline_path, current, tolerances)
        print(f"bench check: wrote {len(current)} baseline entries to {baseline_path}")
        return 0
    base, tolerances = load_baseline(baseline_path)
    failures, passed = _regressions(base, current, tolerances)
    failures += _new_methods(base, current) + _failed_runs(base, records)
    if failures:
        print(f"bench check: {len(failures)} regression(s) against {baseline_path}")
        print(render(failures))
        return 1
    missing = sum(k not in current for k in base)
    print(f"bench check: OK, {passed} (method, metric) comparisons within tolerance"
          f"{f'; {missing} baseline entries not run' if missing else ''}")
    return 0
