"""The preflight: once per command, before any run starts, everything checkable without training.

`bench run` and `bench sweep` call `check(specs)` right after resolving their configs and before
they open the store, so bad input costs one line and exit 2 (a ConfigError), never a FAILED row
per run. What is checked, and where:

- registry names (methods, metrics, datasets, conditions, budgets), config keys, seeds, method
  recipe fields (`Method.check_hparams`), budget fields (`Budget.validate`: integers, lr,
  guidance, precision, sampler): while resolving, in bench/run/spec.py and bench/core/budget.py;
- external weights: present, while resolving; readable here (`bench.core.weights.check_readable`:
  safetensors headers parse and cover the file, torch checkpoints are zip or pickle);
- base models (here): the diffusers directory complete, every safetensors header readable and
  every tensor's shape the one its config.json builds (`bench.api.base_model.check_weights`);
- datasets (here): each (dataset, condition, split, size) a run will load, built as the runner
  builds it, then `verify()`: its root and index are readable and every listed image decodes.

Errors only a run can meet (a NaN loss, out of memory) stay per-run FAILED records.
"""
from __future__ import annotations

from typing import Iterable

from bench.run.spec import RunSpec


def check(specs: Iterable[RunSpec]) -> None:
    """Raise the first ConfigError among the checks above; return None when all pass."""
    specs = list(specs)
    check_weight_files(specs)
    check_base_models(sorted({s.base_model for s in specs}))
    check_datasets(specs)


def check_weight_files(specs: Iterable[RunSpec]) -> None:
    from bench.core.registry import CONDITIONS, METHODS, METRICS
    from bench.core.weights import needed_weights, preflight
    from bench.run.builtins import load_builtins

    load_builtins()
    by_base: dict[str, list] = {}
    for s in specs:
        components = by_base.setdefault(s.base_model, [])
        components += [METHODS.get(s.method), *(METRICS.get(m) for m in s.metrics)]
        components += [CONDITIONS.get(s.condition)] if s.condition else []
    for base_model, components in by_base.items():
        preflight(needed_weights(*components, base_model=base_model), contents=True)


def check_base_models(names: Iterable[str]) -> None:
    from bench.api.base_model import check_weights
    from bench.core.bases import ARCHS, resolve_base_path

    for name in names:
        if name not in ARCHS:  # architectures with random weights have no files to check
            check_weights(resolve_base_path(name))


def dataset_loads(specs: Iterable[RunSpec]) -> list[tuple[str, str | None, str, int, int]]:
    """(dataset, condition, split, size, resolution) of every split the runs load, without repeats:
    the eval split at eval_samples, and the train split at train_size when the budget trains (a
    `bench eval` re-scoring does not) or a metric generates training data (a run of an untrainable method may skip it; checking it anyway
    costs little and a broken train split is broken for the next method)."""
    from bench.core.registry import METRICS
    from bench.run.builtins import load_builtins

    load_builtins()
    out: list[tuple[str, str | None, str, int, int]] = []
    for s in specs:
        b = s.budget
        loads = [("eval", b.eval_samples)]
        if (b.train_steps > 0 and not s.source_run) or any(METRICS.get(m).synthesizes for m in s.metrics):
            loads.append(("train", b.train_size))
        for split, size in loads:
            key = (s.dataset, s.condition, split, size, b.resolution)
            if key not in out:
                out.append(key)
    return out


def check_datasets(specs: Iterable[RunSpec]) -> None:
    from bench.core.registry import DATASETS

    for name, condition, split, size, resolution in dataset_loads(specs):
        dataset = DATASETS.get(name)(split=split, size=size, resolution=resolution,
                                     conditions=(condition,) if condition else ())
        dataset.verify()
