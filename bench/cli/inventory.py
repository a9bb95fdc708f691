"""`bench list`, `bench doctor`, `bench test-method` and `bench pretrain`: what is registered and what it needs."""
from __future__ import annotations

import sys
from pathlib import Path

from bench.core.errors import ConfigError

from bench.core.optional import require
from bench.core.paths import PACKAGE_DIR


def _list(args) -> int:
    """Built-ins from the catalog (no torch import); entry-point and --plugin entries are imported."""
    from bench.core.budget import load_budgets
    from bench.core.registry import CONDITIONS, DATASETS, METHODS, METRICS, ENTRY_POINT_GROUPS, load_entry_points

    for group in ENTRY_POINT_GROUPS:  # plugins must be imported to be listed; the --plugin ones main() loaded
        load_entry_points(group)
    for title, reg in (("methods", METHODS), ("metrics", METRICS), ("datasets", DATASETS), ("conditions", CONDITIONS)):
        print(f"{title}:")
        for name in reg.names():
            d, extra = reg.details(name), ""
            if title == "methods":
                extra = f"  conditions={','.join(d['conditions']) or 'any'}  version={d['version']}"
            elif title == "metrics":
                extra = f"  {'higher' if d['higher_is_better'] else 'lower'} is better  version={d['version']}"
            print(f"  {name}{extra}  from={reg.origin(name)}")
    print("budgets:")
    for name, b in load_budgets().items():
        print(f"  {name}  key={b.key()}  steps={b.train_steps} bs={b.batch_size} res={b.resolution} lr={b.lr:g}")
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
    from bench.core.registry import METHODS, UnknownNameError
    from bench.run.builtins import load_builtins

    load_builtins()
    try:
        METHODS.get(args.name)
    except UnknownNameError as e:
        raise ConfigError(str(e)) from None
    tests = Path(args.tests) if args.tests else PACKAGE_DIR.parent / "tests" / "test_method_contract.py"
    if not tests.is_file():
        raise ConfigError(f"no contract tests at {tests}: they ship with the controlbench source tree; pass "
                          "--tests PATH/tests/test_method_contract.py from a checkout")
    pytest = require("pytest")
    only = _OnlyMethod(args.name)
    code = pytest.main([str(tests), "-q", "-p", "no:cacheprovider", "--rootdir", str(tests.parents[1]),
                        *(["-x"] if args.exitfirst else [])], plugins=[only])
    if only.kept == 0:
        print(f"bench: error: no contract test collected for method {args.name!r}", file=sys.stderr)
        return 2
    return int(code)


def _pretrain(args) -> int:
    from bench.core.bases import PROXY_BASE_DIR
    from bench.proxy.base import pretrain

    if not args.analyzers_only:
        print(f"proxy base: {pretrain(PROXY_BASE_DIR, steps=args.steps)}")
    if args.analyzers or args.analyzers_only:
        from bench.proxy.analyzers import ANALYZERS
        from bench.proxy.recognizers import RECOGNIZERS

        for analyzer in (*ANALYZERS, *RECOGNIZERS):  # one after another: each uses the CPU fully
            print(f"{analyzer.name}: {analyzer.train()}", flush=True)
    return 0


def _method_weight_rows(methods: list[str], given: dict) -> list[tuple[str, str, str, str]]:
    """One row per method that loads checkpoints (or is given one): the file `hparams.<m>.weights`
    names, whether it is there, and the layout its loader reads; "-" where none is set (optional:
    the method is then built fresh)."""
    from bench.core.registry import METHODS

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
    from bench.core.bases import preflight, resolve_base_path
    from bench.core.registry import CONDITIONS, METHODS, METRICS
    from bench.core.weights import WEIGHTS, needed_weights, weight_status
    from bench.run.builtins import load_builtins
    from bench.run.spec import apply_overrides, load_config, parse_overrides, resolve

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


def add_commands(sub) -> None:
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
    dr = sub.add_parser("doctor", help="list the weights a config needs, whether each is present and how to get "
                        "it; exit 1 if any is missing")
    dr.add_argument("overrides", nargs="*", help="[CONFIG.yaml] key=value ...")
    dr.add_argument("--all", action="store_true", help="list every registered weight instead")
    dr.set_defaults(func=_doctor)
