"""`bench`: run, report, list, pretrain. Bad input exits 2 with one line, never a traceback."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from bench.errors import ConfigError
from bench.store import StoreError

EPILOG = """examples:
  bench run                                  # the quickstart: baseline/controlnet/t2i_adapter on shapes/canny
  bench run budget=smoke methods=baseline,controlnet
  bench run my.yaml --seeds 0,1,2 budget.train_steps=900 hparams.controlnet.conditioning_scale=0.8
  bench report --store runs/quickstart/store.sqlite --out runs/quickstart/report
  bench eval --store runs/spatial/store.sqlite --method controlnet metrics=canny_f1_cnpp   # re-score, no retraining
  bench list                                 # with where each entry comes from (builtin, entry point, --plugin)
  bench run methods=my_method,baseline budget=smoke --plugin my_pkg.methods   # a method outside this repo
  bench test-method my_method --plugin my_pkg.methods                         # the method contract tests on it
  bench sweep sweeps/spatial.yaml --local      # the W&B sweep file as a local grid (resumable, shareable)
  bench check --baseline sweeps/regression/baseline.json --store runs/regression/store.sqlite
  bench store merge all.sqlite machine1.sqlite machine2.sqlite
  bench profile --arch sd15 --methods finetune,frozen,controlnet,t2i_adapter,controlnext --resolution 256
  bench profile --estimate --arch sd15 --resolution 512 --batch 1,4,8 --precision bf16 --fit 24GiB
"""


def _run(args) -> int:
    from bench.spec import apply_overrides, load_config, parse_overrides, resolve

    cfg_path = None
    overrides = _own_flags(args, list(args.overrides))
    if overrides and "=" not in overrides[0] and not overrides[0].startswith("--"):
        cfg_path = Path(overrides.pop(0))
    cfg = apply_overrides(load_config(cfg_path), parse_overrides(overrides))
    from bench.wandb_mirror import agent_mode

    if agent_mode():  # a sweep's config: its metrics that score this run's condition, as `bench sweep --local`
        from bench.sweep import fit_metrics

        cfg = fit_metrics(cfg)[0]
    specs, out_dir = resolve(cfg)
    from bench.preflight import check

    if agent_mode():
        _one_record_per_agent_run(specs)
    check(specs)  # before the store opens: bad input is one line, exit 2, no FAILED rows
    out_dir = Path(args.out or out_dir)
    store_path = Path(args.store) if args.store else out_dir / "store.sqlite"
    if args.jobs < 1:
        raise ConfigError(f"--jobs needs a whole number >= 1, got {args.jobs}")
    return _run_and_report(specs, store_path, out_dir, args.quiet, args.jobs)


def _run_and_report(specs, store_path: Path, out_dir: Path, quiet: bool, jobs: int = 1) -> int:
    """Run the specs (skipping those FINISHED in the store), write the report, print where things are."""
    from bench.report import write_report
    from bench.runner import git_sha, run_all
    from bench.store import Store
    from bench.wandb_mirror import agent_mode

    t0 = time.time()
    with Store(store_path) as store:
        summary = run_all(specs, store, out_dir, progress=not quiet, jobs=jobs)
        if agent_mode() and summary.ran == 0 and summary.records:
            # already FINISHED in the store: the agent's run still gets its record and the sweep its metric
            from bench.wandb_mirror import mirror

            mirror(summary.records[0], out_dir)
        report = write_report(store.records(), out_dir / "report", {"git_sha": git_sha()}, plots=True, html=True)
    records, done = summary.records, summary.finished
    print(f"{done}/{len(records)} runs finished in {time.time() - t0:.0f}s ({summary.ran} ran here)"
          + (f"; {len(summary.elsewhere)} skipped: claimed by another live process, which will store them "
             "(run again when it is done to report them)" if summary.elsewhere else ""))
    print(f"store:       {store_path}")
    print(f"images:      {out_dir / 'images'}")
    print(f"leaderboard: {report}")
    print(f"html report: {report.with_suffix('.html')}")
    return 0 if done == len(records) else 1


def _eval(args) -> int:
    """Re-score stored runs: new records from their saved checkpoints, through the normal run process."""
    from bench.preflight import check
    from bench.runner import rescore_specs
    from bench.spec import parse_overrides
    from bench.store import Store

    metrics = None
    for key, value in parse_overrides(list(args.overrides)):
        if key != "metrics":
            raise ConfigError(f"bench eval takes metrics=NAME,... only, got {key}=; the rest is the stored run's spec")
        metrics = [str(v) for v in (value.split(",") if isinstance(value, str) else value) if str(v)]
    store_path = Path(args.store)
    if not store_path.is_file():
        raise ConfigError(f"store {store_path} does not exist; pass the --store that `bench run` wrote")
    with Store(store_path, read_only=True) as store:
        records = [r for r in store.records() if r.finished and "budget_fields" in r.spec]
    records = _select(records, args.runs, args.method)
    specs = rescore_specs(records, metrics)
    check(specs)
    return _run_and_report(specs, store_path, Path(args.out) if args.out else store_path.parent, args.quiet)


def _select(records, runs: str | None, method: str | None):
    """The records named by --runs (run ids or their prefixes, as the report prints them) and --method."""
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


# The spec fields one W&B agent run must hold to a single value, and the sweep parameter of each.
AGENT_AXES = (("method", "methods"), ("seed", "seeds"), ("condition", "condition"), ("dataset", "dataset"))


def _one_record_per_agent_run(specs) -> None:
    """Under a W&B agent one `bench run` is one W&B run, so it must make exactly one record: a
    config that expands to several names the parameter to make a grid parameter of the sweep."""
    if len(specs) == 1:
        return
    for field, param in AGENT_AXES:
        values = sorted({str(getattr(s, field)) for s in specs})
        if len(values) > 1:
            raise ConfigError(f"under a W&B agent one bench run is one record, but this config makes {len(specs)} "
                              f"({param}: {', '.join(values)}); make {param} a grid parameter of the sweep "
                              f"({param}: {{values: [{', '.join(values)}]}}) with one value per run")
    raise ConfigError(f"under a W&B agent one bench run is one record, but this config makes {len(specs)}; "
                      "give each sweep parameter one value per run")


def _own_flags(args, rest: list[str]) -> list[str]:
    """REMAINDER swallows flags given after the first override; take ours back out."""
    out, i = [], 0
    while i < len(rest):
        flag, _, inline = rest[i].partition("=")
        if flag == "--quiet":
            args.quiet, i = True, i + 1
        elif flag == "--jobs":
            value = inline or (rest[i + 1] if i + 1 < len(rest) else "")
            if not value.isdigit() or int(value) < 1:
                raise ConfigError(f"--jobs needs a whole number >= 1, got {value!r}")
            args.jobs = int(value)
            i += 1 if inline else 2
        elif flag in ("--store", "--out"):
            value = inline or (rest[i + 1] if i + 1 < len(rest) else "")
            if not value:
                raise ConfigError(f"{flag} needs a path")
            setattr(args, flag[2:], value)
            i += 1 if inline else 2
        else:
            out.append(rest[i])
            i += 1
    return out


def _report(args) -> int:
    from bench.report import write_report
    from bench.runner import git_sha
    from bench.store import Store

    if args.from_wandb:
        from bench.wandb_mirror import fetch_records

        records = fetch_records(args.from_wandb)
    elif not args.store:
        raise ConfigError("bench report needs --store PATH or --from-wandb ENTITY/PROJECT")
    elif not Path(args.store).exists():
        raise ConfigError(f"store {args.store} does not exist; run `bench run` first or pass --store PATH")
    else:
        with Store(args.store, read_only=True) as store:
            records = store.records()
    path = write_report(records, Path(args.out), {"git_sha": git_sha()}, plots=True, html=args.html)
    print(f"leaderboard: {path}" + (f"\nhtml:        {path.with_suffix('.html')}" if args.html else ""))
    if args.scores_csv:
        from bench.report import write_scores_csv

        n = write_scores_csv(records, Path(args.scores_csv))
        print(f"per-sample scores: {args.scores_csv} ({n} rows)")
    return 0


def _list(args) -> int:
    from bench.budget import load_budgets
    from bench.builtins import load_builtins
    from bench.registry import CONDITIONS, DATASETS, METHODS, METRICS

    load_builtins()

    for title, reg in (("methods", METHODS), ("metrics", METRICS), ("datasets", DATASETS), ("conditions", CONDITIONS)):
        print(f"{title}:")
        for name in reg.names():
            obj = reg.get(name)
            extra = ""
            if title == "methods":
                extra = f"  conditions={','.join(obj.conditions) or 'any'}  version={obj.version}"
            elif title == "metrics":
                extra = f"  {'higher' if obj.higher_is_better else 'lower'} is better  version={obj.version}"
            print(f"  {name}{extra}  from={reg.origin(name)}")
    print("budgets:")
    for name, b in load_budgets().items():
        print(f"  {name}  key={b.key()}  steps={b.train_steps} bs={b.batch_size} res={b.resolution}")
    return 0


class _OnlyMethod:
    """pytest plugin: keep the tests parametrized over the method registry (parameter `name`) for one method."""

    def __init__(self, name: str):
        self.name, self.kept = name, 0

    def pytest_collection_modifyitems(self, config, items) -> None:
        keep = [i for i in items if getattr(i, "callspec", None) and i.callspec.params.get("name") == self.name]
        config.hook.pytest_deselected(items=[i for i in items if i not in keep])
        items[:] = keep
        self.kept = len(keep)


def _test_method(args) -> int:
    """The method contract tests (tests/test_method_contract.py, parametrized over METHODS) on one
    method, in this process, so the plugins loaded here are in the registry the tests read."""
    from bench.builtins import load_builtins
    from bench.registry import METHODS, UnknownNameError

    load_builtins()
    try:
        METHODS.get(args.name)
    except UnknownNameError as e:
        raise ConfigError(str(e)) from None
    tests = Path(args.tests) if args.tests else Path(__file__).resolve().parents[1] / "tests" / "test_method_contract.py"
    if not tests.is_file():
        raise ConfigError(f"no contract tests at {tests}: they ship with the controlbench source tree; pass "
                          "--tests PATH/tests/test_method_contract.py from a checkout")
    try:
        import pytest
    except ImportError:
        raise ConfigError("bench test-method needs pytest: pip install 'controlbench[test]'") from None
    only = _OnlyMethod(args.name)
    code = pytest.main([str(tests), "-q", "-p", "no:cacheprovider", "--rootdir", str(tests.parents[1]),
                        *(["-x"] if args.exitfirst else [])], plugins=[only])
    if only.kept == 0:
        print(f"bench: error: no contract test collected for method {args.name!r}", file=sys.stderr)
        return 2
    return int(code)


def _pretrain(args) -> int:
    from bench.base_model import PROXY_BASE_DIR
    from bench.proxy.base import pretrain

    if not args.analyzers_only:
        print(f"proxy base: {pretrain(PROXY_BASE_DIR, steps=args.steps)}")
    if args.analyzers or args.analyzers_only:
        from bench.proxy.analyzers import ANALYZERS
        from bench.proxy.recognizers import RECOGNIZERS

        for analyzer in (*ANALYZERS, *RECOGNIZERS):  # one after another: each uses the CPU fully
            print(f"{analyzer.name}: {analyzer.train()}", flush=True)
    return 0


def _sweep(args) -> int:
    from bench.sweep import run_local

    if not args.local:
        raise ConfigError("bench sweep runs sweeps locally: add --local (with a W&B server, use "
                          f"`wandb sweep {args.file}` then `wandb agent SWEEP_ID`)")
    outcome = run_local(Path(args.file), Path(args.store) if args.store else None,
                        Path(args.out) if args.out else None, args.count, args.seed, progress=not args.quiet)
    print(f"sweep {args.file}: {outcome}")
    return 1 if outcome.failed else 0


def _check(args) -> int:
    from bench.check import check
    from bench.store import Store

    if not Path(args.store).is_file():
        raise ConfigError(f"store {args.store} does not exist; run `bench sweep`/`bench run` first or pass --store")
    with Store(args.store, read_only=True) as store:
        records = store.records()
    return check(records, Path(args.baseline), args.update_baseline)


def _store_merge(args) -> int:
    from bench.store import Store

    with Store(args.into) as dest:
        for src in args.sources:
            if not Path(src).is_file():
                raise ConfigError(f"store {src} does not exist")
            print(f"{src}: {dest.merge_from(src)} records merged into {args.into}")
        print(f"{args.into}: {len(dest)} records")
    return 0


def _int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise ConfigError(f"{flag} {text!r} must be positive integers separated by commas, e.g. {flag} 1,4,8")
    return values


def _profile(args) -> int:
    import dataclasses

    from bench.arch import ARCHS
    from bench.profile import (ATTENTION, PRECISIONS, ProfileSetup, format_table, profile, split_variants,
                               to_records)
    from bench.builtins import load_builtins
    from bench.registry import METHODS, UnknownNameError
    from bench.store import Store

    load_builtins()
    variants = split_variants(args.methods)
    try:
        for v in variants:
            METHODS.get(v.partition(":")[0])
    except UnknownNameError as e:
        raise ConfigError(str(e)) from None
    precisions = [p for p in args.precision.split(",") if p]
    for p in precisions or [args.precision]:
        if p not in PRECISIONS:
            raise ConfigError(f"unknown precision {p!r}; choose from {', '.join(PRECISIONS)} (comma-separated)")
    if args.attention not in ATTENTION:
        raise ConfigError(f"unknown --attention {args.attention!r}; choose one of {', '.join(ATTENTION)}")
    resolutions, batches = _int_list(args.resolution, "--resolution"), _int_list(args.batch, "--batch")
    if args.fit and not args.estimate:
        raise ConfigError("--fit needs --estimate: the largest batch is searched on fake tensors")
    base = f"{args.arch}-arch" if f"{args.arch}-arch" in ARCHS else args.arch
    setups = [ProfileSetup(base, res, batches[0], prec, args.steps, args.condition, args.checkpointing, args.attention)
              for res in resolutions for prec in precisions]
    records = []
    if args.estimate:
        from bench.estimate import (claim_verdicts, estimate, fit_all, format_claims, format_curves,
                                    format_estimate, format_fit, parse_bytes)

        budget_bytes = parse_bytes(args.fit) if args.fit else None
        rows, fits = [], []
        for setup in setups:
            rows += estimate(variants, setup, batches, progress=not args.quiet)
            if budget_bytes:
                fits += fit_all(variants, setup, budget_bytes, progress=not args.quiet)
        print(format_estimate(rows))
        if len(batches) > 1:
            print("\n" + format_curves(rows))
        if fits:
            print("\n" + format_fit(fits))
        records = to_records([r for r in rows if "error" not in r], setups[0], kind="estimate")
        verdicts = claim_verdicts(records)
        if verdicts:
            print("\n" + format_claims(verdicts))
    else:
        for setup in setups:
            for batch in batches:
                at = dataclasses.replace(setup, batch=batch)
                rows = profile(variants, at, progress=not args.quiet)
                print(f"{base}, {at.resolution}px, batch {batch}, {at.precision}:")
                print(format_table(rows))
                records += to_records(rows, at)
    if args.store:
        with Store(args.store) as store:
            for rec in records:
                store.put(rec)
        print(f"records: {args.store}")
    return 0


def _method_weight_rows(methods: list[str], given: dict) -> list[tuple[str, str, str, str]]:
    """One row per method that loads checkpoints (or is given one): the file `hparams.<m>.weights`
    names, whether it is there, and the layout its loader reads; "-" where none is set (optional:
    the method is then built fresh)."""
    from bench.registry import METHODS

    rows = []
    for m in methods:
        layout, path = METHODS.get(m).weights_layout, given.get(m)
        if path in (None, ""):
            if layout:
                rows.append((f"{m} weights", f"(hparams.{m}.weights: none, built fresh)", "-", f"optional: {layout}"))
        elif not layout:
            rows.append((f"{m} weights", str(path), "no", f"{m} loads no checkpoint: drop hparams.{m}.weights"))
        else:
            present = Path(str(path)).expanduser().exists()
            rows.append((f"{m} weights", str(path), "yes" if present else "no", "" if present else f"expected {layout}"))
    return rows


def _doctor(args) -> int:
    """The preflight as a table: every weight the config needs, where it must be, and how to get it,
    then each method's checkpoint (hparams.<method>.weights) and the layout it must have."""
    from bench.base_model import preflight, resolve_base_path
    from bench.builtins import load_builtins
    from bench.registry import CONDITIONS, METHODS, METRICS
    from bench.spec import apply_overrides, load_config, parse_overrides, resolve
    from bench.weights import WEIGHTS, needed_weights, weight_status

    load_builtins()
    rows, method_rows = [], []
    if args.all:
        names = WEIGHTS.names()
        method_rows = _method_weight_rows(METHODS.names(), {})
    else:
        overrides = list(args.overrides)
        cfg_path = Path(overrides.pop(0)) if overrides and "=" not in overrides[0] else None
        cfg = apply_overrides(load_config(cfg_path), parse_overrides(overrides))
        hparams = cfg.get("hparams") if isinstance(cfg.get("hparams"), dict) else {}
        given = {m: hp.pop("weights") for m, hp in hparams.items() if isinstance(hp, dict) and "weights" in hp}
        try:
            resolve(cfg)  # every other config error still surfaces here (the checkpoints are listed below)
        except ConfigError as e:
            if not str(e).startswith("missing weight"):
                raise
        method_rows = _method_weight_rows(list(cfg["methods"]), given)
        conds = cfg.get("condition") or []
        names = needed_weights(*(METRICS.get(m) for m in cfg["metrics"]), *(METHODS.get(m) for m in cfg["methods"]),
                               *(CONDITIONS.get(c) for c in (conds if isinstance(conds, list) else [conds])),
                               base_model=str(cfg["base_model"]))
        base = resolve_base_path(str(cfg["base_model"]))
        try:
            preflight(base)
            rows.append(("base_model", str(base), "yes", ""))
        except ConfigError as e:
            rows.append(("base_model", str(base), "no", str(e).split("; ", 1)[-1]))
    for name in names:
        spec, path, present = weight_status(name)
        rows.append((name, str(path), "yes" if present else "no", "" if present else spec.how))
    rows += method_rows
    if not rows:
        print("this config needs no external weights")
        return 0
    rows.insert(0, ("weight", "path", "present", "how to get it"))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[3])
    missing = sum(r[2] == "no" for r in rows)
    print(f"{missing} missing" if missing else "all present")
    return 1 if missing else 0


def add_scale_out_commands(sub) -> None:
    """sweep, check and store merge: the commands for sweeps, CI gates and several machines."""
    sw = sub.add_parser("sweep", help="run a W&B sweep file as a local grid; processes sharing a store split the "
                        "work and never run a config twice")
    sw.add_argument("file", help="W&B sweep YAML (sweeps/*.yaml)")
    sw.add_argument("--local", action="store_true", help="enumerate and run the configs here (no W&B server)")
    sw.add_argument("--count", type=int, help="random: number of draws (default: the file's run_cap)")
    sw.add_argument("--seed", type=int, default=0, help="random: seed of the draws")
    sw.add_argument("--store", help="SQLite store (default: OUT_DIR/store.sqlite)")
    sw.add_argument("--out", help="output directory (default: the configs' out_dir)")
    sw.add_argument("--quiet", action="store_true", help="no progress bars")
    sw.set_defaults(func=_sweep)
    ck = sub.add_parser("check", help="regression gate: compare a store with a baseline file; exit 1 on regression")
    ck.add_argument("--baseline", required=True, help="baseline JSON (e.g. sweeps/regression/baseline.json)")
    ck.add_argument("--store", default="runs/default/store.sqlite", help="SQLite store to check")
    ck.add_argument("--update-baseline", action="store_true", help="write the store's results as the new baseline")
    ck.set_defaults(func=_check)
    st = sub.add_parser("store", help="store maintenance")
    st_sub = st.add_subparsers(dest="store_command", required=True)
    mg = st_sub.add_parser("merge", help="merge stores (e.g. one per machine) into the first; idempotent by run id")
    mg.add_argument("into", help="destination store (created if missing)")
    mg.add_argument("sources", nargs="+", help="stores to merge in")
    mg.set_defaults(func=_store_merge)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench", description="controlbench: compare controllable-generation methods "
                                "under identical data and budgets.", epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="train, generate and score runs; skips runs already FINISHED in the store",
                       description="Run CONFIG (default: the quickstart) with key=value overrides. Forms accepted: "
                       "key=value, --key=value, --key value. Keys: methods, dataset, condition, budget, base_model, "
                       "metrics, seeds, out_dir, hparams.<method>.<name> (hparams.<method>.weights=PATH: start from a "
                       "checkpoint), budget.<field>, checkpoint_every (steps between resume checkpoints: a killed "
                       "run started again continues from its last one).")
    r.add_argument("overrides", nargs=argparse.REMAINDER, help="[CONFIG.yaml] key=value ...")
    r.add_argument("--store", help="SQLite store path (default: OUT_DIR/store.sqlite)")
    r.add_argument("--out", help="output directory (default: the config's out_dir)")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    r.add_argument("--jobs", type=int, default=1, help="runs at once, each with an equal share of the CPU cores "
                   "(default 1; records say how many shared the machine, and reports never compare their step "
                   "times with runs that had it alone)")
    r.set_defaults(func=_run)
    ev = sub.add_parser("eval", help="re-score stored runs with new or changed metrics, without retraining",
                        description="Re-score FINISHED runs of a store: each run's saved checkpoint (or, for a "
                        "method that trains nothing, the same model rebuilt) generates the eval set again through "
                        "the normal run process, under the run's own budget, seed and sampler, and is scored with "
                        "METRICS (default: the run's own, at today's versions). Each re-scoring is a new record, "
                        "with its own run id, whose spec names the source run (source_run) and the checkpoint "
                        "(weights; also artifacts.checkpoint); repeating the command skips those already done. A "
                        "run that trained but saved no checkpoint is refused.")
    ev.add_argument("overrides", nargs="*", help="metrics=NAME,... (metrics that score no selected run's condition "
                    "leave that run out)")
    ev.add_argument("--store", required=True, help="SQLite store written by `bench run`; the new records go there too")
    ev.add_argument("--runs", help="comma-separated run ids (or prefixes) to re-score (default: every FINISHED run)")
    ev.add_argument("--method", help="only the runs of this method")
    ev.add_argument("--out", help="output directory for images and the report (default: the store's directory)")
    ev.add_argument("--quiet", action="store_true", help="no progress bars")
    ev.set_defaults(func=_eval)
    rep = sub.add_parser("report", help="write the Markdown leaderboard from a store")
    rep.add_argument("--store", help="SQLite store written by `bench run`")
    rep.add_argument("--from-wandb", metavar="ENTITY/PROJECT", help="build the leaderboard from W&B runs "
                     "mirrored by controlbench instead of a store (needs W&B access)")
    rep.add_argument("--out", required=True, help="directory for leaderboard.md")
    rep.add_argument("--html", action="store_true", help="also write a self-contained leaderboard.html")
    rep.add_argument("--scores-csv", metavar="PATH", help="also export the per-sample scores as CSV "
                     "(run_id, method, seed, sample_id, metric, value)")
    rep.set_defaults(func=_report)
    ls = sub.add_parser("list", help="print registered methods, metrics, datasets, conditions and budgets")
    ls.set_defaults(func=_list)
    tm = sub.add_parser("test-method", help="run the method contract tests on one registered method (e.g. a plugin)",
                        description="Runs tests/test_method_contract.py on METHOD only. Equivalent pytest call: "
                        "CONTROLBENCH_PLUGINS=my_pkg.methods pytest tests/test_method_contract.py -k my_method "
                        "(entry-point plugins need no variable; -k matches substrings, this command matches the "
                        "exact name).")
    tm.add_argument("name", help="method name, as `bench list` shows it")
    tm.add_argument("--tests", help="path of test_method_contract.py (default: the source tree's tests/)")
    tm.add_argument("-x", "--exitfirst", action="store_true", help="stop at the first failure")
    tm.set_defaults(func=_test_method)
    pt = sub.add_parser("pretrain", help="retrain the shipped proxy base model (and analyzers) from their seeds")
    pt.add_argument("--steps", type=int, help="override the recipe's step count (the result no longer matches "
                    "the shipped hash)")
    pt.add_argument("--analyzers", action="store_true", help="also retrain the proxy analyzers (evaluators, reward models, identity recognizers)")
    pt.add_argument("--analyzers-only", action="store_true", help="only retrain the proxy analyzers")
    pt.set_defaults(func=_pretrain)
    pf = sub.add_parser("profile", help="params, train step time and peak memory per method, each in its own process",
                        description="Profile methods on a base model or a full-scale architecture with random "
                        "weights (sd15). Prints time/memory ratios against finetune (whole UNet trained) and frozen "
                        "(backward through the locked UNet) when they are among --methods.")
    pf.add_argument("--arch", default="sd15", help="sd15 or sdxl (random-weight SD1.5 / SDXL architecture), proxy, or a local "
                    "diffusers directory")
    pf.add_argument("--methods", default="finetune,frozen,controlnet,t2i_adapter,controlnext",
                    help="comma-separated method variants, name or name:key=value,...")
    pf.add_argument("--resolution", default="256", help="image resolution in pixels (comma-separated list)")
    pf.add_argument("--batch", default="1", help="batch size (comma-separated list, e.g. 1,4,8)")
    pf.add_argument("--precision", default="fp32", help="fp32, bf16 or fp16 (autocast over fp32 weights), bf16-true "
                    "(pure bf16 weights and optimizer state); comma-separated list")
    pf.add_argument("--estimate", action="store_true", help="no timing: peak memory (weights, gradients, AdamW state, "
                    "activations) and FLOPs per training step, counted on fake tensors (no GPU, no real memory); "
                    "records are kind 'estimate'")
    pf.add_argument("--fit", metavar="SIZE", help="with --estimate: the largest batch per method whose peak fits in "
                    "SIZE (e.g. 24GiB, 80GB), and its FLOPs per step")
    pf.add_argument("--checkpointing", action="store_true", help="gradient checkpointing in every diffusers model")
    pf.add_argument("--attention", default="default", help="SDPA kernel: default, math, or efficient (CUDA's "
                    "memory-efficient kernel; the CPU's flash kernel on the CPU)")
    pf.add_argument("--steps", type=int, default=3, help="timed steps after 2 warm-up steps (not used by --estimate, "
                    "which counts one steady-state step)")
    pf.add_argument("--condition", default="canny", help="control condition for the methods that need one")
    pf.add_argument("--store", help="also write one record per method to this SQLite store")
    pf.add_argument("--quiet", action="store_true", help="no progress bar")
    pf.set_defaults(func=_profile)
    dr = sub.add_parser("doctor", help="list the weights a config needs, whether each is present and how to get "
                        "it; exit 1 if any is missing")
    dr.add_argument("overrides", nargs="*", help="[CONFIG.yaml] key=value ...")
    dr.add_argument("--all", action="store_true", help="list every registered weight instead")
    dr.set_defaults(func=_doctor)
    add_scale_out_commands(sub)
    return p


def _take_plugins(argv: list[str]) -> list[str]:
    """`--plugin MODULE` / `--plugin=MODULE` (repeatable, comma-separated), anywhere on the command
    line, for every command; the modules go to CONTROLBENCH_PLUGINS, which run processes inherit."""
    from bench.registry import PLUGINS_ENV, plugin_modules

    rest, mods, i = [], [], 0
    while i < len(argv):
        flag, eq, value = argv[i].partition("=")
        if flag == "--plugin":
            if not eq:
                value = argv[i + 1] if i + 1 < len(argv) else ""
                i += 1
            if not value or value.startswith("-"):
                raise ConfigError("--plugin needs a module path, e.g. --plugin my_pkg.methods")
            mods += [m for m in value.split(",") if m]
        else:
            rest.append(argv[i])
        i += 1
    if mods:
        os.environ[PLUGINS_ENV] = ",".join(dict.fromkeys(plugin_modules() + mods))
    return rest


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not os.environ.get("WANDB_SWEEP_ID"):  # under an agent wandb's own default (online) holds
        os.environ.setdefault("WANDB_MODE", "offline")
    try:
        argv = _take_plugins(list(sys.argv[1:] if argv is None else argv))
    except ConfigError as e:
        print(f"bench: error: {e}", file=sys.stderr)
        return 2
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "run":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "run":  # W&B agents put `--key=value` first; those land in `extra`
        args.overrides = extra + args.overrides
    try:
        from bench.registry import load_plugin_modules, plugin_modules

        if plugin_modules():  # an unimportable --plugin is one line before any work
            from bench.builtins import load_builtins

            load_builtins()
            load_plugin_modules()
        return args.func(args)
    except (ConfigError, StoreError) as e:
        print(f"bench: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench: interrupted; finished runs are kept in the store, re-run to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
