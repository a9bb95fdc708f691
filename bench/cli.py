"""`bench`: run, report, list, pretrain. Bad input exits 2 with one line, never a traceback."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from bench.errors import ConfigError

EPILOG = """examples:
  bench run                                  # the quickstart: baseline/controlnet/t2i_adapter on shapes/canny
  bench run budget=smoke methods=baseline,controlnet
  bench run my.yaml --seeds 0,1,2 budget.train_steps=900 hparams.controlnet.conditioning_scale=0.8
  bench report --store runs/quickstart/store.sqlite --out runs/quickstart/report
  bench list
"""


def _run(args) -> int:
    from bench.report import write_report
    from bench.runner import git_sha, run_specs
    from bench.spec import apply_overrides, load_config, parse_overrides, resolve
    from bench.store import Store

    cfg_path = None
    overrides = _own_flags(args, list(args.overrides))
    if overrides and "=" not in overrides[0] and not overrides[0].startswith("--"):
        cfg_path = Path(overrides.pop(0))
    cfg = apply_overrides(load_config(cfg_path), parse_overrides(overrides))
    specs, out_dir = resolve(cfg)
    from bench.base_model import preflight, resolve_base_path

    preflight(resolve_base_path(specs[0].base_model))
    out_dir = Path(args.out or out_dir)
    store_path = Path(args.store) if args.store else out_dir / "store.sqlite"
    t0 = time.time()
    with Store(store_path) as store:
        records = run_specs(specs, store, out_dir, progress=not args.quiet)
        report = write_report(store.records(), out_dir / "report", {"git_sha": git_sha()})
    done = sum(r.status == "FINISHED" for r in records)
    print(f"{done}/{len(records)} runs finished in {time.time() - t0:.0f}s")
    print(f"store:       {store_path}")
    print(f"images:      {out_dir / 'images'}")
    print(f"leaderboard: {report}")
    return 0 if done == len(records) else 1


def _own_flags(args, rest: list[str]) -> list[str]:
    """REMAINDER swallows flags given after the first override; take ours back out."""
    out, i = [], 0
    while i < len(rest):
        flag, _, inline = rest[i].partition("=")
        if flag == "--quiet":
            args.quiet, i = True, i + 1
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

    if not Path(args.store).exists():
        raise ConfigError(f"store {args.store} does not exist; run `bench run` first or pass --store PATH")
    with Store(args.store, read_only=True) as store:
        path = write_report(store.records(), Path(args.out), {"git_sha": git_sha()})
    print(f"leaderboard: {path}")
    return 0


def _list(args) -> int:
    from bench.budget import load_budgets
    from bench.registry import CONDITIONS, DATASETS, METHODS, METRICS, load_builtins

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
            print(f"  {name}{extra}")
    print("budgets:")
    for name, b in load_budgets().items():
        print(f"  {name}  key={b.key()}  steps={b.train_steps} bs={b.batch_size} res={b.resolution} seeds={list(b.seeds)}")
    return 0


def _pretrain(args) -> int:
    from bench.proxy import PROXY_BASE_DIR, pretrain

    if not args.analyzers_only:
        print(f"proxy base: {pretrain(PROXY_BASE_DIR, steps=args.steps)}")
    if args.analyzers or args.analyzers_only:
        from bench.metrics.analyzers import train_segnet

        print(f"segnet: {train_segnet()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench", description="controlbench: compare controllable-generation methods "
                                "under identical data and budgets.", epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="train, generate and score runs; skips runs already FINISHED in the store",
                       description="Run CONFIG (default: the quickstart) with key=value overrides. Forms accepted: "
                       "key=value, --key=value, --key value. Keys: methods, dataset, condition, budget, base_model, "
                       "metrics, seeds, out_dir, hparams.<method>.<name>, budget.<field>.")
    r.add_argument("overrides", nargs=argparse.REMAINDER, help="[CONFIG.yaml] key=value ...")
    r.add_argument("--store", help="SQLite store path (default: OUT_DIR/store.sqlite)")
    r.add_argument("--out", help="output directory (default: the config's out_dir)")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    r.set_defaults(func=_run)
    rep = sub.add_parser("report", help="write the Markdown leaderboard from a store")
    rep.add_argument("--store", required=True, help="SQLite store written by `bench run`")
    rep.add_argument("--out", required=True, help="directory for leaderboard.md")
    rep.set_defaults(func=_report)
    ls = sub.add_parser("list", help="print registered methods, metrics, datasets, conditions and budgets")
    ls.set_defaults(func=_list)
    pt = sub.add_parser("pretrain", help="retrain the shipped proxy base model (and analyzers) from their seeds")
    pt.add_argument("--steps", type=int, help="override the recipe's step count (the result no longer matches "
                    "the shipped hash)")
    pt.add_argument("--analyzers", action="store_true", help="also retrain the proxy analyzers (segnet)")
    pt.add_argument("--analyzers-only", action="store_true", help="only retrain the proxy analyzers")
    pt.set_defaults(func=_pretrain)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "offline")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "run":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "run":  # W&B agents put `--key=value` first; those land in `extra`
        args.overrides = extra + args.overrides
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"bench: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench: interrupted; finished runs are kept in the store, re-run to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
