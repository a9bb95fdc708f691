"""`bench`: parses the command line and hands each command to its module; bad input exits 2 with one line.

Each command group adds its own arguments (`add_commands`): running (run, eval, sweep), stores
(report, check, store merge), inventory (list, doctor, test-method, pretrain) and profiling (profile).
"""
from __future__ import annotations

import argparse
import os
import sys

from bench.core.errors import ConfigError
from bench.core.store import StoreError

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


COMMAND_GROUPS = ("running", "stores", "inventory", "profiling")  # bench/cli/<group>.py, in `bench --help` order


def build_parser() -> argparse.ArgumentParser:
    import importlib

    p = argparse.ArgumentParser(prog="bench", description="controlbench: compare controllable-generation methods "
                                "under identical data and budgets.", epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for group in COMMAND_GROUPS:
        importlib.import_module(f"bench.cli.{group}").add_commands(sub)
    return p


def _take_plugins(argv: list[str]) -> list[str]:
    """`--plugin MODULE` / `--plugin=MODULE` (repeatable, comma-separated), anywhere on the command
    line, for every command; the modules go to CONTROLBENCH_PLUGINS, which run processes inherit."""
    from bench.core.registry import PLUGINS_ENV, plugin_modules

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
        from bench.core.registry import load_plugin_modules, plugin_modules

        if plugin_modules():  # an unimportable --plugin is one line before any work
            from bench.run.builtins import load_builtins

            load_builtins()
            load_plugin_modules()
        return args.func(args)
    except (ConfigError, StoreError) as e:
        print(f"bench: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a user's path (out dir, store, cache, dataset) the preflight could not foresee
        from bench.core.files import os_error_line

        print(f"bench: error: {os_error_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench: interrupted; finished runs are kept in the store, re-run to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
