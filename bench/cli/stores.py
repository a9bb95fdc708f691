"""`bench report`, `bench check` and `bench store merge`: reading stores (torch-free)."""
from __future__ import annotations

from pathlib import Path

from bench.core.errors import ConfigError


def _report(args) -> int:
    from bench.core.provenance import git_sha
    from bench.core.store import Store
    from bench.report.write import write_report

    if args.from_wandb:
        from bench.run.wandb_mirror import fetch_records

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
        from bench.report.write import write_scores_csv

        n = write_scores_csv(records, Path(args.scores_csv))
        print(f"per-sample scores: {args.scores_csv} ({n} rows)")
    return 0


def _check(args) -> int:
    from bench.analysis.check import check
    from bench.core.store import Store

    if not Path(args.store).is_file():
        raise ConfigError(f"store {args.store} does not exist; run `bench sweep`/`bench run` first or pass --store")
    with Store(args.store, read_only=True) as store:
        records = store.records()
    return check(records, Path(args.baseline), args.update_baseline)


def _store_merge(args) -> int:
    from bench.core.store import merge_stores

    merged, total = merge_stores(args.into, args.sources)  # every source checked before the destination is made
    for src, n in merged:
        print(f"{src}: {n} records merged into {args.into}")
    print(f"{args.into}: {total} records")
    return 0


def add_commands(sub) -> None:
    rep = sub.add_parser("report", help="write the Markdown leaderboard from a store")
    rep.add_argument("--store", help="SQLite store written by `bench run`")
    rep.add_argument("--from-wandb", metavar="ENTITY/PROJECT", help="build the leaderboard from W&B runs "
                     "mirrored by controlbench instead of a store (needs W&B access)")
    rep.add_argument("--out", required=True, help="directory for leaderboard.md")
    rep.add_argument("--html", action="store_true", help="also write a self-contained leaderboard.html")
    rep.add_argument("--scores-csv", metavar="PATH", help="also export the per-sample scores as CSV "
                     "(run_id, method, seed, sample_id, metric, value)")
    rep.set_defaults(func=_report)
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
