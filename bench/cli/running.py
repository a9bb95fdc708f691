"""`bench run`, `bench eval` and `bench sweep`: planning and running, through bench.run.session."""
from __future__ import annotations

import argparse
from pathlib import Path

from bench.core.errors import ConfigError


def _run(args) -> int:
    from bench.run.session import run_config

    overrides = _own_flags(args, list(args.overrides))
    config = overrides.pop(0) if overrides and "=" not in overrides[0] and not overrides[0].startswith("--") else None
    summary = run_config(config, overrides, out=args.out, store=args.store, jobs=args.jobs, progress=not args.quiet)
    return print_summary(summary)


def print_summary(summary) -> int:
    """What `bench run` / `bench eval` print: runs finished, and where the store, images and reports are."""
    records, done = summary.records, summary.finished
    print(f"{done}/{len(records)} runs finished in {summary.seconds:.0f}s ({summary.ran} ran here)"
          + (f"; {len(summary.elsewhere)} skipped: claimed by another live process, which will store them "
             "(run again when it is done to report them)" if summary.elsewhere else ""))
    print(f"store:       {summary.store_path}")
    print(f"images:      {summary.out_dir / 'images'}")
    print(f"leaderboard: {summary.report}")
    print(f"html report: {summary.report.with_suffix('.html')}")
    return 0 if done == len(records) else 1


def _eval(args) -> int:
    """Re-score stored runs: new records from their saved checkpoints, through the normal run process."""
    from bench.run.session import rescore
    from bench.run.spec import parse_overrides

    metrics = None
    for key, value in parse_overrides(list(args.overrides)):
        if key != "metrics":
            raise ConfigError(f"bench eval takes metrics=NAME,... only, got {key}=; the rest is the stored run's spec")
        metrics = [str(v) for v in (value.split(",") if isinstance(value, str) else value) if str(v)]
    summary = rescore(args.store, metrics, runs=args.runs, method=args.method, out=args.out, progress=not args.quiet)
    return print_summary(summary)


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


def _sweep(args) -> int:
    from bench.run.sweep import run_local

    if not args.local:
        raise ConfigError("bench sweep runs sweeps locally: add --local (with a W&B server, use "
                          f"`wandb sweep {args.file}` then `wandb agent SWEEP_ID`)")
    outcome = run_local(Path(args.file), Path(args.store) if args.store else None,
                        Path(args.out) if args.out else None, args.count, args.seed, progress=not args.quiet)
    print(f"sweep {args.file}: {outcome}")
    return 1 if outcome.failed else 0


def add_commands(sub) -> None:
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
