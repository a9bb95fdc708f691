"""`bench profile`'s library entry point: methods measured (or estimated on fake tensors) per setting.

    from bench.profile import run_profile
    result = run_profile(["controlnet", "t2i_adapter"], arch="sd15", resolutions=[512], batches=[1, 4],
                         precisions=["bf16"], estimate=True, fit="24GiB")

Nothing here prints; the CLI formats the rows (bench.report.estimates, bench.profile.measure.format_table).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from bench.core.bases import ARCHS
from bench.core.errors import ConfigError
from bench.core.store import RunRecord, Store
from bench.profile.measure import ATTENTION, PRECISIONS, ProfileSetup, profile, split_variants, to_records


@dataclasses.dataclass
class ProfileResult:
    """Rows per setting: measured (`measured`: [(setup, rows)]) or estimated (`estimates`, `fits`), and their records."""

    base: str
    measured: list[tuple[ProfileSetup, list[dict]]] = dataclasses.field(default_factory=list)
    estimates: list[dict] = dataclasses.field(default_factory=list)
    fits: list[dict] = dataclasses.field(default_factory=list)
    records: list[RunRecord] = dataclasses.field(default_factory=list)


def setups_for(methods: str | Sequence[str], arch: str, resolutions: Sequence[int], batch: int,
               precisions: Sequence[str], steps: int, condition: str, checkpointing: bool,
               attention: str) -> tuple[list[str], list[ProfileSetup]]:
    """The method variants and one ProfileSetup per (resolution, precision), every name checked first."""
    from bench.core.registry import METHODS, UnknownNameError
    from bench.run.builtins import load_builtins

    load_builtins()
    variants = split_variants(methods if isinstance(methods, str) else ",".join(methods))
    try:
        for v in variants:
            METHODS.get(v.partition(":")[0])
    except UnknownNameError as e:
        raise ConfigError(str(e)) from None
    for p in precisions:
        if p not in PRECISIONS:
            raise ConfigError(f"unknown precision {p!r}; choose from {', '.join(PRECISIONS)} (comma-separated)")
    if attention not in ATTENTION:
        raise ConfigError(f"unknown --attention {attention!r}; choose one of {', '.join(ATTENTION)}")
    base = f"{arch}-arch" if f"{arch}-arch" in ARCHS else arch
    return variants, [ProfileSetup(base, res, batch, prec, steps, condition, checkpointing, attention)
                      for res in resolutions for prec in precisions]


def run_profile(methods: str | Sequence[str], *, arch: str = "sd15", resolutions: Sequence[int] = (256,),
                batches: Sequence[int] = (1,), precisions: Sequence[str] = ("fp32",), estimate: bool = False,
                fit: str | None = None, checkpointing: bool = False, attention: str = "default", steps: int = 3,
                condition: str = "canny", store: str | Path | None = None, progress: bool = True) -> ProfileResult:
    """Params, step time and peak memory per method variant, each in its own process (or, with
    `estimate`, peak memory and FLOPs counted on fake tensors; with `fit`, e.g. "24GiB,40GiB,80GiB",
    instead the budget options per card that fit: bench.profile.runplan); records go to `store` when given."""
    if fit and not estimate:
        raise ConfigError("--fit needs --estimate: the largest batch is searched on fake tensors")
    variants, setups = setups_for(methods, arch, resolutions, batches[0], precisions, steps, condition,
                                  checkpointing, attention)
    result = ProfileResult(setups[0].base_model)
    if estimate and fit:  # a budget per card (bench.profile.runplan): the batch list's largest is the effective batch
        from bench.profile.estimate import parse_bytes
        from bench.profile.runplan import plan_all

        cards = [parse_bytes(size) for size in fit.split(",") if size.strip()]
        for setup in setups:
            result.fits += plan_all(variants, setup, cards, max(batches), progress=progress)
    elif estimate:
        from bench.profile.estimate import estimate as estimate_rows

        for setup in setups:
            result.estimates += estimate_rows(variants, setup, list(batches), progress=progress)
        result.records = to_records([r for r in result.estimates if "error" not in r], setups[0], kind="estimate")
    else:
        for setup in setups:
            for batch in batches:
                at = dataclasses.replace(setup, batch=batch)
                rows = profile(variants, at, progress=progress)
                result.measured.append((at, rows))
                result.records += to_records(rows, at)
    if store:
        with Store(store) as s:
            for rec in result.records:
                s.put(rec)
    return result
