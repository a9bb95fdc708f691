"""W&B sweep files, run as a local grid when there is no W&B server.

A sweep file is W&B's format (program, method, metric, parameters, command); each parameter
is a `bench run` override key (methods, budget, budget.train_steps, hparams.controlnet.x, ...)
and `wandb agent` passes it on as `--key=value`. `bench sweep FILE --local` enumerates the same
configs itself (the grid, or N seeded random draws) and shares the work between processes
through the store's claims, so no config runs twice.
"""
from __future__ import annotations

import hashlib
import importlib.util
import itertools
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


from bench.core.errors import ConfigError
from bench.core.files import atomic_write
from bench.core.yamlio import load_file
from bench.run.spec import RunSpec, apply_overrides, load_config, resolve

SWEEP_METHODS = ("grid", "random")  # bayes needs W&B's controller (see _NOT_LOCAL)
SWEEP_KEYS = {"program", "method", "metric", "parameters", "command", "name", "description", "project", "entity",
              "run_cap", "early_terminate"}
# Valid W&B sweep keys (its schema) that a local sweep cannot honour: refused, one line each.
_NOT_LOCAL = {
    "scheduler": "a Launch scheduler", "controller": "a local or cloud controller", "job": "a Launch job",
    "image_uri": "a Launch image", "apiVersion": "the Launch API", "kind": "the Launch API",
    "metrics": "several metrics (W&B uses one, metric:)",
}
# W&B's distributions (sweeps' params.py), each with the fields its inverse CDF needs; local random
# draws push a uniform x through the same inverse CDF (see _ppf, tested against the sweeps package).
DISTRIBUTIONS: dict[str, tuple[str, ...]] = {
    "constant": ("value",), "categorical": ("values",), "int_uniform": ("min", "max"), "uniform": ("min", "max"),
    "q_uniform": ("min", "max", "q"), "log_uniform": ("min", "max"), "log_uniform_values": ("min", "max"),
    "q_log_uniform": ("min", "max", "q"), "q_log_uniform_values": ("min", "max", "q"),
    "inv_log_uniform": ("min", "max"), "inv_log_uniform_values": ("min", "max"), "normal": ("mu", "sigma"),
    "q_normal": ("mu", "sigma", "q"), "log_normal": ("mu", "sigma"), "q_log_normal": ("mu", "sigma", "q"),
    "beta": ("a", "b"), "q_beta": ("a", "b", "q"),
}
_GRID_DISTRIBUTIONS = ("constant", "categorical", "int_uniform")  # what a local grid enumerates
_PACKAGES = ("bench", "bench.methods", "bench.metrics", "bench.datasets")  # bench: with every sub-package (rglob)


@dataclass(frozen=True)
class Sweep:
    path: Path
    method: str
    parameters: dict[str, dict[str, Any]]
    run_cap: int | None
    warnings: tuple[str, ...] = ()  # W&B features a local sweep ignores, said once when it runs


def sweep_files(directory: Path) -> list[Path]:
    return sorted(Path(directory).glob("*.yaml"))


def _distribution(spec: dict[str, Any]) -> str:
    """W&B's rule: an explicit distribution, else constant (value), categorical (values), or from the
    min/max types (int_uniform for ints, uniform otherwise)."""
    if "distribution" in spec:
        return spec["distribution"]
    if "value" in spec:
        return "constant"
    if "values" in spec:
        return "categorical"
    both_int = all(isinstance(spec.get(k), int) and not isinstance(spec.get(k), bool) for k in ("min", "max"))
    return "int_uniform" if both_int else "uniform"


def _check_parameter(path: Path, name: str, spec: Any, method: str) -> None:
    if isinstance(spec, dict) and "parameters" in spec:
        raise ConfigError(f"{path}: parameter {name!r} nests parameters:, which local sweeps do not implement; "
                          "flatten it to dotted keys (e.g. hparams.controlnet.x)")
    if not isinstance(spec, dict) or not ({"value", "values", "distribution", "min", "max"} & set(spec)):
        raise ConfigError(f"{path}: parameter {name!r} needs value:, values: or distribution:")
    if "values" in spec and (not isinstance(spec["values"], list) or not spec["values"]):
        raise ConfigError(f"{path}: parameter {name!r} values: must be a non-empty list")
    dist = _distribution(spec)
    if dist not in DISTRIBUTIONS:
        raise ConfigError(f"{path}: parameter {name!r}: unknown distribution {dist!r} (W&B's: "
                          f"{', '.join(DISTRIBUTIONS)})")
    missing = [k for k in DISTRIBUTIONS[dist] if k not in spec]
    if missing:
        raise ConfigError(f"{path}: parameter {name!r}: distribution {dist} needs {', '.join(missing)}: "
                          "(local sweeps fill no defaults)")
    if "probabilities" in spec:
        probs = spec["probabilities"]
        if method == "grid":
            raise ConfigError(f"{path}: parameter {name!r}: probabilities: apply to random draws; W&B's grid refuses "
                              "them too")
        if (not isinstance(probs, list) or len(probs) != len(spec.get("values") or [])
                or abs(sum(probs) - 1.0) > 1e-6):
            raise ConfigError(f"{path}: parameter {name!r}: probabilities: must list one probability per value, "
                              "summing to 1")
    if method == "grid" and dist not in _GRID_DISTRIBUTIONS:
        raise ConfigError(f"{path}: parameter {name!r}: a local grid enumerates value:, values: and int_uniform "
                          f"only, not {dist}; use method: random or list the values")


def load_sweep(path: Path) -> Sweep:
    path = Path(path)
    raw = load_file(path, "sweep file", "fix the file (W&B sweep format)")
    if not isinstance(raw, dict) or not isinstance(raw.get("parameters"), dict) or not raw["parameters"]:
        raise ConfigError(f"sweep file {path} must be a W&B sweep mapping with parameters:")
    for key in raw:
        if key in _NOT_LOCAL:
            raise ConfigError(f"{path}: {key}: ({_NOT_LOCAL[key]}) is not implemented by local sweeps; run this file "
                              "with `wandb sweep` and `wandb agent`, or remove the key")
    unknown = sorted(set(raw) - SWEEP_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown sweep key {unknown[0]!r} (W&B keys: {', '.join(sorted(SWEEP_KEYS))})")
    if raw.get("method") == "bayes":
        raise ConfigError(f"{path}: method bayes needs W&B's controller (a model of earlier results), which local "
                          "sweeps do not implement; run it with `wandb sweep` and `wandb agent`, or use method: random")
    if raw.get("method") not in SWEEP_METHODS:
        raise ConfigError(f"{path}: method must be one of {', '.join(SWEEP_METHODS)}, got {raw.get('method')!r}")
    for name, spec in raw["parameters"].items():
        _check_parameter(path, name, spec, raw["method"])
    cap = raw.get("run_cap")
    if cap is not None and (not isinstance(cap, int) or isinstance(cap, bool) or cap < 1):
        raise ConfigError(f"{path}: run_cap must be a positive integer, got {cap!r}")
    if cap is not None and raw["method"] == "grid":
        raise ConfigError(f"{path}: run_cap with method grid (W&B stops after that many grid points, in its own "
                          "order) is not implemented by local sweeps; remove it to run the whole grid")
    warnings = []
    if raw.get("early_terminate"):
        warnings.append(f"{path}: early_terminate is not implemented by local sweeps: every run trains its full "
                        "budget (W&B's hyperband stops runs only under `wandb agent`)")
    metric = raw.get("metric")
    if isinstance(metric, dict) and "target" in metric:
        warnings.append(f"{path}: metric target is not implemented by local sweeps: every config runs (W&B stops "
                        "the sweep when a run reaches it)")
    return Sweep(path=path, method=raw["method"], parameters=raw["parameters"], run_cap=cap,
                 warnings=tuple(warnings))


def _choices(spec: dict[str, Any]) -> list[Any]:
    if "value" in spec:
        return [spec["value"]]
    if "values" in spec:
        return list(spec["values"])
    return list(range(int(spec["min"]), int(spec["max"]) + 1))  # int_uniform, as W&B's grid expands it


def _q(value: float, spec: dict[str, Any]) -> Any:
    out = round(value / spec["q"]) * spec["q"]
    return int(out) if isinstance(spec["q"], int) else float(out)


def _ppf(spec: dict[str, Any], x: float) -> Any:
    """The value at percentile ``x`` of a W&B parameter spec: W&B's inverse CDFs (sweeps' params.py)."""
    from scipy import stats

    dist = _distribution(spec)
    lo, hi = spec.get("min"), spec.get("max")
    if dist == "constant":
        return spec["value"]
    if dist == "categorical":
        values = spec["values"]
        if "probabilities" in spec:
            cdf = list(itertools.accumulate(spec["probabilities"]))
            return values[next((i for i, c in enumerate(cdf) if not x >= c), 0)]
        return values[int(stats.randint.ppf(x, 0, len(values)))]
    if dist == "int_uniform":
        return int(stats.randint.ppf(x, lo, hi + 1))
    if dist in ("uniform", "q_uniform"):
        r = float(stats.uniform.ppf(x, lo, hi - lo))
        return _q(r, spec) if dist == "q_uniform" else r
    if dist in ("log_uniform", "log_uniform_values", "q_log_uniform", "q_log_uniform_values"):
        a, b = (math.log(lo), math.log(hi)) if dist.endswith("_values") else (lo, hi)
        r = math.exp(float(stats.uniform.ppf(x, a, b - a)))
        return _q(r, spec) if dist.startswith("q_") else r
    if dist in ("inv_log_uniform", "inv_log_uniform_values"):
        a, b = (-math.log(hi), -math.log(lo)) if dist.endswith("_values") else (lo, hi)
        return math.exp(-float(stats.uniform.ppf(1 - x, a, b - a)))
    if dist in ("normal", "q_normal"):
        r = float(stats.norm.ppf(x, loc=spec["mu"], scale=spec["sigma"]))
        return _q(r, spec) if dist == "q_normal" else r
    if dist in ("log_normal", "q_log_normal"):
        r = float(stats.lognorm.ppf(x, s=spec["sigma"], scale=math.exp(spec["mu"])))
        return _q(r, spec) if dist == "q_log_normal" else r
    r = float(stats.beta.ppf(x, a=spec["a"], b=spec["b"]))  # beta, q_beta
    return _q(r, spec) if dist == "q_beta" else r


def _draw(spec: dict[str, Any], rng: random.Random) -> Any:
    """One seeded draw. The distributions local sweeps had first draw as they always did, so an
    existing random sweep keeps its configs (and run ids); the rest go through W&B's inverse CDF."""
    dist = _distribution(spec)
    if dist in ("constant", "categorical") and "probabilities" not in spec:
        return rng.choice(_choices(spec))
    if dist == "int_uniform":
        return rng.randint(int(spec["min"]), int(spec["max"]))
    if dist == "uniform":
        return rng.uniform(spec["min"], spec["max"])
    if dist == "log_uniform_values":
        return math.exp(rng.uniform(math.log(spec["min"]), math.log(spec["max"])))
    return _ppf(spec, rng.random())


def configs(sweep: Sweep, count: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """The grid, or `count` (default run_cap) seeded random draws (W&B's distributions, see _ppf)."""
    names = sorted(sweep.parameters)
    if sweep.method == "grid":
        grid = itertools.product(*(_choices(sweep.parameters[n]) for n in names))
        return [dict(zip(names, combo)) for combo in grid]
    n = count or sweep.run_cap
    if not n:
        raise ConfigError(f"{sweep.path}: a {sweep.method} sweep needs run_cap: in the file or --count N")
    rng = random.Random(seed)
    return [{name: _draw(sweep.parameters[name], rng) for name in names} for _ in range(n)]


def overrides(config: dict[str, Any]) -> list[tuple[str, Any]]:
    """`bench run` overrides for one config; `budget` before `budget.x`, so refinements apply last."""
    return sorted(((k.replace("-", "_"), v) for k, v in config.items()), key=lambda kv: (kv[0].count("."), kv[0]))


def fit_metrics(cfg: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """A sweep with condition as a grid parameter lists the roster's metrics for every config;
    each config keeps those that score its condition (or any condition). Returns the config and
    the metrics dropped. Nothing is dropped when none would remain (resolve then names the problem)."""
    from bench.core.registry import METRICS
    from bench.run.builtins import load_builtins

    conds, metrics = cfg.get("condition"), cfg.get("metrics")
    if not isinstance(metrics, list) or conds in (None, "", []):
        return cfg, []
    conds = conds if isinstance(conds, list) else [conds]
    load_builtins()
    drop = [m for m in metrics if m in METRICS and not any(METRICS.get(m).scores(c) for c in conds)]
    if not drop or len(drop) == len(metrics):
        return cfg, []
    return {**cfg, "metrics": [m for m in metrics if m not in drop]}, drop


def resolve_sweep(sweep: Sweep, count: int | None = None, seed: int = 0) -> tuple[list[RunSpec], Path]:
    """Every distinct run spec of the sweep (the quickstart config plus each config's overrides)."""
    base = load_config(None)
    specs: dict[str, RunSpec] = {}
    out_dir = None
    for cfg in configs(sweep, count, seed):
        try:
            run_specs, cfg_out = resolve(fit_metrics(apply_overrides(base, overrides(cfg)))[0])
        except ConfigError as e:
            raise ConfigError(f"{sweep.path}: config {cfg}: {e}") from None
        out_dir = out_dir or cfg_out
        specs.update((s.run_id, s) for s in run_specs)
    return list(specs.values()), out_dir


def _plan_key(sweep: Sweep, count: int | None, seed: int) -> str:
    """Hash of everything run ids are resolved from: the sweep, default config, budgets and the
    package sources (versions live in code). Equal key => equal run ids, without importing torch."""
    from bench.core.budget import BUDGETS_FILE
    from bench.run.spec import DEFAULT_CONFIG

    h = hashlib.sha256(json.dumps([count, seed]).encode())
    files = [sweep.path, DEFAULT_CONFIG, BUDGETS_FILE]
    files += [Path(v) for c in configs(sweep, count, seed) for k, v in c.items() if k == "budgets_file"]
    for pkg in _PACKAGES:
        for loc in importlib.util.find_spec(pkg).submodule_search_locations:
            # every sub-package (bench/run, bench/core, ...) and the proxy's shipped model configs
            files += sorted(Path(loc).rglob("*.py")) + sorted(Path(loc).glob("**/assets/**/*.json"))
    # plugins define methods and metrics too: their distributions' versions and --plugin modules' sources
    from bench.core.provenance import plugin_versions
    from bench.core.registry import plugin_modules

    h.update(json.dumps(plugin_versions(), sort_keys=True).encode())
    for module in plugin_modules():
        found = importlib.util.find_spec(module)
        files.append(Path(found.origin) if found is not None and found.origin else Path(f"<plugin {module}>"))
    for f in files:
        h.update(str(f).encode() + (f.read_bytes() if f.is_file() else b"<missing>"))
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class SweepOutcome:
    total: int
    ran: int
    failed: int
    already_finished: int
    claimed_elsewhere: int
    seconds: float

    def __str__(self) -> str:
        return (f"{self.total} runs: {self.ran} ran here ({self.failed} failed), {self.already_finished} already "
                f"finished, {self.claimed_elsewhere} claimed by another process; {self.seconds:.2f}s")


def _write_plan(path: Path, run_ids: list[str]) -> None:
    atomic_write(path, json.dumps(run_ids))


def _noop(plan: Path, store_path: Path, t0: float) -> SweepOutcome | None:
    """The fast path: every run id of a known plan is FINISHED, so nothing is imported or run."""
    from bench.core.store import Store

    if not plan.is_file() or not store_path.is_file():
        return None
    try:
        ids = json.loads(plan.read_text())
    except ValueError:  # a damaged cache only costs the slow path
        return None
    with Store(store_path) as store:
        if not all(store.is_finished(i) for i in ids):
            return None
    return SweepOutcome(len(ids), 0, 0, len(ids), 0, time.perf_counter() - t0)


def run_local(sweep_path: Path, store_path: Path | None, out_dir: Path | None, count: int | None = None,
              seed: int = 0, progress: bool = True) -> SweepOutcome:
    """Run every config not FINISHED and not claimed by a live process; FAILED runs don't stop it."""
    t0 = time.perf_counter()
    sweep = load_sweep(sweep_path)
    for warning in sweep.warnings:  # said, never silently dropped
        print(f"warning: {warning}", file=sys.stderr)
    if out_dir is None:  # the first config's out_dir, as `bench run` would use (no torch import)
        first = apply_overrides(load_config(None), overrides(configs(sweep, count, seed)[0]))
        out_dir = Path(first.get("out_dir") or "runs/default")
    store_path = store_path or out_dir / "store.sqlite"
    plan = store_path.parent / ".sweep-plans" / f"{_plan_key(sweep, count, seed)}.json"
    done = _noop(plan, store_path, t0)
    if done is not None:
        return done

    from bench.core.store import Store
    from bench.run.preflight import check, check_paths
    from bench.run.process import Launcher

    specs, _ = resolve_sweep(sweep, count, seed)
    check(specs)  # once for the whole sweep, before the plan or any claim is written
    check_paths(out_dir, store_path)
    _write_plan(plan, [s.run_id for s in specs])
    ran = failed = finished = elsewhere = 0
    with Store(store_path) as store, Launcher() as launcher:
        for spec in specs:
            if store.is_finished(spec.run_id):
                finished += 1
            elif not store.claim(spec.run_id):  # finished meanwhile, or a live process runs it
                if store.is_finished(spec.run_id):
                    finished += 1
                else:
                    elsewhere += 1
            else:
                record = _run_claimed(store, spec, out_dir, progress, launcher)
                ran, failed = ran + 1, failed + (not record.finished)
    return SweepOutcome(len(specs), ran, failed, finished, elsewhere, time.perf_counter() - t0)


def _run_claimed(store, spec: RunSpec, out_dir: Path, progress: bool, launcher):
    from bench.run.process import run_isolated

    try:
        record = run_isolated(spec, out_dir, progress, launcher=launcher)
        store.put(record)
    finally:
        store.release(spec.run_id)
    if not record.finished:
        print(f"run {spec.run_id} ({spec.method}, seed {spec.seed}) FAILED: {record.reason}", file=sys.stderr)
    return record
