"""An equal tuning budget per method (issue 14): one sweeps/tune_<method>.yaml per trainable
control method, all with the same run_cap, sweep method, budget, seeds and search-space shape:
the method's main inference scale over [0.5x, 1.5x] of its recipe default, and its training
prompt dropout over the same absolute [0, 0.5]. Budget fields (lr, steps, batch) are never tuned.

The checks are functions returning problems, so the tests below also show each one failing."""
from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path
from typing import Any

import pytest

from bench.core.budget import load_budgets
from bench.core.errors import ConfigError
from bench.core.registry import METHODS, METRICS
from bench.core.yamlio import safe_load
from bench.run.builtins import load_builtins
from bench.run.sweep import load_sweep, resolve_sweep

load_builtins()

SWEEPS = Path(__file__).resolve().parents[1] / "sweeps"
# Registered names that are not control methods, so they get no tuning sweep.
NOT_CONTROL = {
    "baseline": "the base model without control: nothing to train",
    "frozen": "a profiling reference (one scalar through the frozen UNet)",
    "finetune": "the cost reference of ControlNet's compute claims (full UNet fine-tuning)",
    "odgen_stage1": "ODGEN's first stage: every odgen trial plans and trains its own stage-1 run",
}
PROMPT_DROPOUT = ("empty_prompt_prob", "text_drop_prob")  # the recipe field that drops the training prompt
EXPECTED_SHAPE = (("dropout", "uniform", 0.0, 0.5), ("scale", "uniform", 0.5, 1.5))
FIXED = {"methods", "dataset", "condition", "budget", "base_model", "seeds", "metrics", "out_dir"}
SHARED = ("base_model", "seeds", "out_dir")  # equal in every tune sweep
# Each tune sweep runs at its track's roster budget; the tracks' budgets differ only in the base lr
# (bench/configs/budgets.yaml `identity`: the proxy's base per track, issue 29).
TRACK_BUDGET = {"identity": "identity"}  # dataset -> budget; every other dataset: "quick"
# condition -> (the metric to run, the key its score is recorded and mirrored to W&B under)
OWN_METRIC = {"canny": ("canny_f1", "canny_f1"), "seg": ("seg_miou", "seg_miou"),
              "layout": ("layout_map", "layout_map"), "keypoints": ("id_sim_proxy", "id_sim_proxy_mean")}


def trainable_methods() -> list[str]:
    return sorted(set(METHODS.names()) - set(NOT_CONTROL))


def tune_files() -> dict[str, Path]:
    return {p.stem.removeprefix("tune_"): p for p in sorted(SWEEPS.glob("tune_*.yaml"))}


def load_raw(path: Path) -> dict[str, Any]:
    load_sweep(path)  # bench sweep's own validation first
    return safe_load(path.read_text())


def recipe_default(method: str, name: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(METHODS.get(method).Recipe)}
    return fields[name].default if name in fields else None


def tuned(raw: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {k: v for k, v in raw["parameters"].items() if "value" not in v}


def shape(method: str, raw: dict[str, Any]) -> tuple:
    """The search space without names: per tuned field its role, distribution and range, the
    scale's range relative to its recipe default."""
    out = []
    for key, spec in tuned(raw).items():
        name = key.rsplit(".", 1)[-1]
        lo, hi = spec.get("min"), spec.get("max")
        if name in PROMPT_DROPOUT:
            out.append(("dropout", spec.get("distribution"), lo, hi))
        else:
            d = recipe_default(method, name)
            ok = isinstance(d, float) and d > 0 and lo is not None and hi is not None
            out.append(("scale", spec.get("distribution"), round(lo / d, 6) if ok else None,
                        round(hi / d, 6) if ok else None))
    return tuple(sorted(out, key=str))


def sweep_problems(method: str, raw: dict[str, Any]) -> list[str]:
    """One tune sweep on its own: it runs its method, tunes only that method's recipe fields
    (each one existing, valid at both ends of its range), and optimises the method's own metric."""
    params = raw["parameters"]
    problems = []
    if params.get("methods", {}).get("value") != method:
        problems.append(f"methods: {params.get('methods')} is not {{value: {method}}}")
    fixed = {k for k, v in params.items() if "value" in v}
    if fixed != FIXED:
        problems.append(f"fixed parameters {sorted(fixed)} differ from {sorted(FIXED)}")
    outside = [k for k in tuned(raw) if not k.startswith(f"hparams.{method}.")]
    if outside:  # lr, steps, batch and the rest of the budget are held equal, never tuned
        problems.append(f"tunes {outside}, which are not {method}'s recipe fields")
    fields = {k.rsplit(".", 1)[-1]: v for k, v in tuned(raw).items() if k.startswith(f"hparams.{method}.")}
    for end in ("min", "max"):
        try:
            METHODS.get(method).check_hparams({f: spec.get(end) for f, spec in fields.items()})
        except ConfigError as e:
            problems.append(f"{end} of the search space: {e}")
    condition = params.get("condition", {}).get("value")
    want, key = OWN_METRIC.get(condition, (None, None))
    metric = raw.get("metric", {})
    if metric.get("name") != f"metrics/{key}" or want not in params.get("metrics", {}).get("value", []):
        problems.append(f"metric {metric.get('name')!r}: the {condition} tune sweeps run {want} and "
                        f"optimise metrics/{key}")
    else:
        m = METRICS.get(want)
        part = key.removeprefix(want).lstrip("_")
        higher = m.part_higher_is_better.get(part, m.higher_is_better) if part else m.higher_is_better
        if metric.get("goal") != ("maximize" if higher else "minimize"):
            problems.append(f"goal {metric.get('goal')!r} contradicts {key}'s higher_is_better")
    return problems


def budget_problems(sweeps: dict[str, dict[str, Any]]) -> list[str]:
    """Across the tune sweeps: the same trial count, sweep method, budget, seeds and search shape."""
    problems = []
    for what, get in (("run_cap", lambda r: r.get("run_cap")), ("sweep method", lambda r: r.get("method")),
                      *((k, lambda r, k=k: r["parameters"].get(k)) for k in SHARED)):
        values = {m: get(r) for m, r in sweeps.items()}
        if len({repr(v) for v in values.values()}) > 1:
            problems.append(f"{what} differs: {values}")
    budgets = load_budgets()
    for m, r in sweeps.items():
        name = r["parameters"]["budget"].get("value")
        track = TRACK_BUDGET.get(r["parameters"]["dataset"].get("value"), "quick")
        if name != track:
            problems.append(f"{m}: budget {name!r} is not its track's ({track!r})")
    fields = {m: dataclasses.replace(budgets[r["parameters"]["budget"]["value"]], name="", lr=0.0)
              for m, r in sweeps.items() if r["parameters"]["budget"].get("value") in budgets}
    if len({repr(f) for f in fields.values()}) > 1:
        problems.append(f"the tune sweeps' budgets differ in more than the base lr: {fields}")
    caps = [r.get("run_cap") for r in sweeps.values()]
    if any(not isinstance(c, int) or c < 2 for c in caps):
        problems.append(f"run_cap must be a trial count >= 2 in every sweep, got {caps}")
    for m, r in sweeps.items():
        if shape(m, r) != EXPECTED_SHAPE:
            problems.append(f"{m}: search space {shape(m, r)} is not {EXPECTED_SHAPE}")
    return problems


@pytest.fixture(scope="module")
def sweeps() -> dict[str, dict[str, Any]]:
    return {m: load_raw(p) for m, p in tune_files().items()}


@pytest.mark.parametrize("method", trainable_methods())
def test_every_trainable_method_has_a_tune_sweep(method: str) -> None:
    assert method in tune_files(), f"no sweeps/tune_{method}.yaml: every control method gets equal tuning"


def test_every_tune_sweep_is_a_trainable_method() -> None:
    assert set(NOT_CONTROL) <= set(METHODS.names())  # the exclusions name real methods
    assert sorted(tune_files()) == trainable_methods()


@pytest.mark.parametrize("method", sorted(tune_files()))
def test_tune_sweep_tunes_its_own_recipe(method: str, sweeps) -> None:
    assert sweep_problems(method, sweeps[method]) == []


def test_equal_tuning_budget(sweeps) -> None:
    assert budget_problems(sweeps) == []


def _controlnet(sweeps) -> dict[str, Any]:
    return copy.deepcopy(sweeps["controlnet"])


def test_checks_catch_an_unknown_field_a_budget_field_and_another_metric(sweeps) -> None:
    raw = _controlnet(sweeps)
    p = raw["parameters"]
    p["hparams.controlnet.no_such_field"] = p.pop("hparams.controlnet.conditioning_scale")
    p["budget.lr"] = {"distribution": "log_uniform_values", "min": 1e-5, "max": 1e-3}
    raw["metric"] = {"name": "metrics/prompt_fidelity", "goal": "maximize"}
    found = "\n".join(sweep_problems("controlnet", raw))
    assert "unknown hparam 'no_such_field'" in found
    assert "tunes ['budget.lr']" in found
    assert "optimise metrics/canny_f1" in found
    ident = copy.deepcopy(sweeps["ip_adapter"])
    ident["metric"]["name"] = "metrics/id_sim_proxy"  # not a recorded key: the part is id_sim_proxy_mean
    assert any("optimise metrics/id_sim_proxy_mean" in p for p in sweep_problems("ip_adapter", ident))
    ident["metric"] = {"name": "metrics/id_sim_proxy_mean", "goal": "minimize"}
    assert any("contradicts" in p for p in sweep_problems("ip_adapter", ident))


def test_checks_catch_unequal_trials_and_shapes(sweeps) -> None:
    other = copy.deepcopy(sweeps["t2i_adapter"])
    other["run_cap"] += 1
    assert budget_problems(sweeps) == []
    assert any(p.startswith("run_cap differs") for p in budget_problems({**sweeps, "t2i_adapter": other}))
    for name, problem in (("identity", "t2i_adapter: budget 'identity' is not its track's"),
                          ("spatial", "budgets differ in more than the base lr")):
        moved = copy.deepcopy(sweeps["t2i_adapter"])
        moved["parameters"]["budget"]["value"] = name
        assert any(problem in p for p in budget_problems({**sweeps, "t2i_adapter": moved})), name
    for change in ({"min": 0.4}, {"distribution": "log_uniform_values"}):
        wider = _controlnet(sweeps)
        wider["parameters"]["hparams.controlnet.conditioning_scale"].update(change)
        assert any(p.startswith("controlnet: search space") for p in budget_problems({"controlnet": wider}))
    extra = _controlnet(sweeps)
    extra["parameters"]["hparams.controlnet.timesteps"] = {"values": ["uniform", "cubic"]}
    assert budget_problems({"controlnet": extra}) != []


@pytest.mark.parametrize("method", sorted(tune_files()))
def test_bench_sweep_local_expands_it(method: str) -> None:
    """What `bench sweep FILE --local` runs: run_cap seeded random draws, each a valid run spec
    of the method with the tuned fields in range and nothing else overridden."""
    path = tune_files()[method]
    raw = load_raw(path)
    planned, out = resolve_sweep(load_sweep(path))
    specs = [s for s in planned if s.method == method]
    # the rest are runs a trial starts from (ControlNet++'s converged ControlNet, `init_run`), planned first
    assert {s.run_id for s in planned if s.method != method} == {s.init_run for s in specs} - {""}
    assert len(specs) == raw["run_cap"] and out == Path(raw["parameters"]["out_dir"]["value"])
    for spec in specs:
        assert spec.method == method and spec.budget.name == raw["parameters"]["budget"]["value"]
        hp = dict(spec.hparams)
        assert set(hp) == {k.rsplit(".", 1)[-1] for k in tuned(raw)}
        for key, s in tuned(raw).items():
            assert s["min"] <= hp[key.rsplit(".", 1)[-1]] <= s["max"]
        assert all(math.isfinite(v) for v in hp.values())
