"""The library entry point: a config and overrides in, runs executed, stored and reported, a summary out.

`bench run` and `bench eval` call these, and so can Python users (lm-evaluation-harness's
`simple_evaluate` is the model):

    import bench
    summary = bench.run_config("bench/configs/quickstart.yaml", ["budget=smoke", "methods=baseline,controlnet"])
    print(summary.finished, summary.report)

Nothing here prints; the CLI prints what the summary holds.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from bench.core.errors import ConfigError
from bench.core.store import RunRecord, Store
from bench.run.runner import RunSummary
from bench.run.spec import RunSpec

# The spec fields one W&B agent run must hold to a single value, and the sweep parameter of each.
AGENT_AXES = (("method", "methods"), ("seed", "seeds"), ("condition", "condition"), ("dataset", "dataset"))


def as_override_list(overrides: Sequence[str] | Mapping[str, object]) -> list[str]:
    """`key=value` strings, from strings or a {key: value} mapping (lists become comma-separated)."""
    if isinstance(overrides, Mapping):
        return [f"{k}={','.join(map(str, v)) if isinstance(v, (list, tuple)) else v}" for k, v in overrides.items()]
    return [str(o) for o in overrides]


def plan(config: str | Path | None = None, overrides: Sequence[str] | Mapping[str, object] = ()) -> tuple[list[RunSpec], Path]:
    """The run specs a config makes (after overrides), preflight-checked, and the config's out dir.
    Bad input raises ConfigError (one line naming the fix) before anything is written."""
    from bench.run.preflight import check
    from bench.run.spec import apply_overrides, load_config, parse_overrides, resolve
    from bench.run.wandb_mirror import agent_mode

    cfg = apply_overrides(load_config(Path(config) if config else None), parse_overrides(as_override_list(overrides)))
    if agent_mode():  # a sweep's config: its metrics that score this run's condition, as `bench sweep --local`
        from bench.run.sweep import fit_metrics

        cfg = fit_metrics(cfg)[0]
    specs, out_dir = resolve(cfg)
    if agent_mode():
        one_record_per_agent_run(specs)
    check(specs)  # before the store opens: bad input is one line, exit 2, no FAILED rows
    return specs, out_dir


def run_config(config: str | Path | None = None, overrides: Sequence[str] | Mapping[str, object] = (), *,
               out: str | Path | None = None, store: str | Path | None = None, jobs: int = 1,
               progress: bool = True) -> RunSummary:
    """Plan, run (skipping runs FINISHED in the store), record and report a config: what `bench run` does.
    `out` defaults to the config's out_dir, `store` to OUT/store.sqlite; `jobs` runs at once."""
    if not isinstance(jobs, int) or jobs < 1:
        raise ConfigError(f"--jobs needs a whole number >= 1, got {jobs}")
    from bench.run.runner import gpu_slots

    gpu_slots(jobs)  # before the store opens: more jobs than GPUs is one line, exit 2
    specs, config_out = plan(config, overrides)
    out_dir = Path(out or config_out)
    return run_and_report(specs, Path(store) if store else out_dir / "store.sqlite", out_dir, progress, jobs)


def rescore(store: str | Path, metrics: Sequence[str] | None = None, *, runs: str | None = None,
            method: str | None = None, out: str | Path | None = None, progress: bool = True) -> RunSummary:
    """`bench eval`: re-score a store's FINISHED runs (all, or those `runs`/`method` select) with
    `metrics` (default: each run's own), from their saved checkpoints, without retraining."""
    from bench.run.preflight import check
    from bench.run.spec import rescore_specs

    store_path = Path(store)
    if not store_path.is_file():
        raise ConfigError(f"store {store_path} does not exist; pass the --store that `bench run` wrote")
    with Store(store_path, read_only=True) as s:
        records = [r for r in s.records() if r.finished and "budget_fields" in r.spec]
    specs = rescore_specs(select_records(records, runs, method), list(metrics) if metrics else None)
    check(specs)
    return run_and_report(specs, store_path, Path(out) if out else store_path.parent, progress)


def run_and_report(specs: list[RunSpec], store_path: Path, out_dir: Path, progress: bool = True,
                   jobs: int = 1) -> RunSummary:
    """Run the specs into the store, mirror to W&B under an agent, and write the report of the whole store."""
    from bench.core.provenance import git_sha
    from bench.report.write import write_report
    from bench.run.runner import run_all
    from bench.run.preflight import check_paths
    from bench.run.wandb_mirror import agent_mode

    check_paths(out_dir, store_path)  # before the store opens: an unwritable path leaves no claim behind
    t0 = time.time()
    with Store(store_path) as s:
        summary = run_all(specs, s, out_dir, progress=progress, jobs=jobs)
        if agent_mode() and summary.ran == 0 and summary.records:
            # already FINISHED in the store: the agent's run still gets its record and the sweep its metric
            from bench.run.wandb_mirror import mirror

            mirror(summary.records[0], out_dir)
        report = write_report(s.records(), out_dir / "report", {"git_sha": git_sha()}, plots=True, html=True)
    return dataclasses.replace(summary, store_path=store_path, out_dir=out_dir, report=report,
                               seconds=time.time() - t0)


def select_records(records: list[RunRecord], runs: str | None, method: str | None) -> list[RunRecord]:
    """The records named by `runs` (comma-separated run ids or their prefixes, as the report prints them)
    and `method`."""
    if method:
        records = [r for r in records if r.method == method]
    if runs:
        wanted = [w for w in runs.split(",") if w]
        for w in wanted:
            if not any(r.run_id.startswith(w) for r in records):
                raise ConfigError(f"no FINISHED run {w!r}{f' of method {method}' if method else ''} in the store; "
                                  "run ids are in the report's tables and `bench report --scores-csv`")
        records = [r for r in records if any(r.run_id.startswith(w) for w in wanted)]
    if not records:
        raise ConfigError(f"the store holds no FINISHED run{f' of method {method}' if method else ''} to re-score")
    return records


def one_record_per_agent_run(specs: list[RunSpec]) -> None:
    """Under a W&B agent one `bench run` is one W&B run, so it must make exactly one record: a
    config that expands to several names the parameter to make a grid parameter of the sweep."""
    if len(specs) == 1:
        return
    needs = next((s for s in specs if s.init_run), None)
    if needs is not None:  # ControlNet++ (init_from): its ControlNet run would share this agent's W&B run
        init = next(s.method for s in specs if s.run_id == needs.init_run)
        raise ConfigError(f"under a W&B agent one bench run is one record, but {needs.method} starts from a finished "
                          f"{init} run (its recipe's init_from), which this run would have to train first; run the "
                          f"sweep with `bench sweep FILE --local` (it runs the {init} runs first), or set "
                          f"hparams.{needs.method}.init_from to \"\" to start it fresh")
    for field, param in AGENT_AXES:
        values = sorted({str(getattr(s, field)) for s in specs})
        if len(values) > 1:
            raise ConfigError(f"under a W&B agent one bench run is one record, but this config makes {len(specs)} "
                              f"({param}: {', '.join(values)}); make {param} a grid parameter of the sweep "
                              f"({param}: {{values: [{', '.join(values)}]}}) with one value per run")
    raise ConfigError(f"under a W&B agent one bench run is one record, but this config makes {len(specs)}; "
                      "give each sweep parameter one value per run")
