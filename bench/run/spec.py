"""Config -> resolved run specs. A run's id is the hash of its resolved spec."""
from __future__ import annotations

import itertools
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bench.core.artifacts import run_paths
from bench.core.budget import BUDGETS_FILE, Budget, load_budgets
from bench.core.errors import ConfigError
from bench.core.paths import CONFIGS_DIR
from bench.core.registry import CONDITIONS, DATASETS, METHODS, METRICS, UnknownNameError
from bench.core.store import RunRecord, spec_hash
from bench.core.yamlio import load_file, safe_load
from bench.run.builtins import load_builtins
from bench.run.options import RunOptions

DEFAULT_CONFIG = CONFIGS_DIR / "quickstart.yaml"
TOP_KEYS = {"methods", "dataset", "condition", "budget", "base_model", "metrics", "out_dir", "hparams",
            "seeds", "budgets_file", "strategy", "devices", "checkpoint_every", "options"}
TRAINER_KEYS = ("strategy", "devices")  # passed to Lightning's Trainer for multi-GPU runs
LIST_KEYS = {"methods", "metrics", "seeds", "condition", "dataset"}
DEFAULT_SEEDS = (0,)  # when a config lists none
@dataclass(frozen=True)
class RunSpec:
    method: str
    method_version: str
    dataset: str
    dataset_version: str
    condition: str | None
    budget: Budget
    seed: int
    base_model: str
    metrics: tuple[str, ...]
    metric_versions: tuple[tuple[str, str], ...]
    hparams: tuple[tuple[str, Any], ...] = field(default=())  # the fields the user set
    recipe: tuple[tuple[str, Any], ...] = field(default=())  # the method's resolved recipe (defaults + hparams)
    trainer: tuple[tuple[str, Any], ...] = field(default=())  # strategy/devices; empty = one device
    weights: str = ""  # the checkpoint the method starts from (hparams.<method>.weights); empty: built fresh
    # `bench eval`: the run whose trained weights (`weights`) this run re-scores without training
    source_run: str = ""
    # the finished run whose checkpoint this run starts from (ControlNet++ from its ControlNet: `init_from`)
    init_run: str = ""
    # steps between resume checkpoints (0: none); changes no number, so it is not in the run id
    checkpoint_every: int = 0
    options: RunOptions = field(default_factory=RunOptions)  # memory and speed (RunOptions)

    def to_dict(self) -> dict:
        d = dict(method=self.method, method_version=self.method_version, dataset=self.dataset,
                    dataset_version=self.dataset_version, condition=self.condition, budget=self.budget.name,
                    budget_key=self.budget.key(), budget_fields=self.budget.as_dict(),
                    seed=self.seed, base_model=self.base_model, metrics=list(self.metrics),
                    metric_versions=dict(self.metric_versions), hparams=dict(self.hparams),
                    recipe=dict(self.recipe))
        if self.trainer:  # only when set, so single-device run ids stay what they were
            d["trainer"] = dict(self.trainer)
        if self.weights:  # likewise: runs built fresh keep their ids
            d["weights"] = self.weights
        if self.source_run:
            d["source_run"] = self.source_run
        if self.init_run:
            d["init_run"] = self.init_run
        if self.checkpoint_every:
            d["checkpoint_every"] = self.checkpoint_every
        if self.options.changed() or self.budget.precision.endswith("-mixed"):
            d["options"] = asdict(self.options)  # all of them where the frozen dtype follows the precision
        return d

    @property
    def run_id(self) -> str:
        return spec_hash({k: v for k, v in self.to_dict().items() if k != "checkpoint_every"})

    @classmethod
    def from_dict(cls, d: dict) -> "RunSpec":
        budget = Budget.from_fields(d["budget"], d["budget_fields"])
        return cls(method=d["method"], method_version=d["method_version"], dataset=d["dataset"],
                   dataset_version=d["dataset_version"], condition=d["condition"], budget=budget, seed=d["seed"],
                   base_model=d["base_model"], metrics=tuple(d["metrics"]),
                   metric_versions=tuple(sorted(d["metric_versions"].items())),
                   hparams=tuple(sorted(d["hparams"].items())),
                   recipe=tuple(sorted(d.get("recipe", {}).items())),
                   trainer=tuple(sorted(d.get("trainer", {}).items())), weights=d.get("weights", ""),
                   source_run=d.get("source_run", ""), init_run=d.get("init_run", ""),
                   checkpoint_every=d.get("checkpoint_every", 0), options=RunOptions.from_config(d.get("options")))


def load_config(path: Path | None) -> dict:
    path = Path(path) if path else DEFAULT_CONFIG
    cfg = load_file(path, "config", "fix the file or pass another CONFIG")
    if not isinstance(cfg, dict):
        raise ConfigError(f"config {path} must be a YAML mapping of keys like methods:, dataset:, budget:")
    return cfg


def parse_overrides(args: list[str]) -> list[tuple[str, Any]]:
    """Accept `key=value`, `--key=value` and `--key value` (the forms W&B agents emit)."""
    out, i = [], 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--") and "=" not in arg:
            if i + 1 >= len(args):
                raise ConfigError(f"override {arg} has no value; write {arg[2:]}=VALUE")
            key, value, i = arg[2:], args[i + 1], i + 2
        elif "=" in arg:
            key, value = arg.lstrip("-").split("=", 1)
            i += 1
        else:
            raise ConfigError(f"bad override {arg!r}; write key=value (e.g. budget=smoke)")
        try:
            parsed = safe_load(value) if value else ""
        except yaml.YAMLError:
            parsed = value
        out.append((key.replace("-", "_"), parsed))
    return out


def apply_overrides(cfg: dict, overrides: list[tuple[str, Any]]) -> dict:
    cfg = json.loads(json.dumps(cfg))  # deep copy; never mutate the caller's dict
    for key, value in overrides:
        head, _, rest = key.partition(".")
        if head not in TOP_KEYS:
            close = [k for k in sorted(TOP_KEYS) if k.startswith(head[:3])]
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown config key {head!r}{hint} (known: {', '.join(sorted(TOP_KEYS))})")
        if head in LIST_KEYS and isinstance(value, str):
            value = [safe_load(v) for v in value.split(",") if v]
        if head in LIST_KEYS and not isinstance(value, list):
            value = [value]
        if not rest:
            cfg[head] = value
            continue
        if head == "budget" and isinstance(cfg.get("budget"), str):
            cfg["budget"] = {"name": cfg["budget"]}  # `budget.train_steps=9` refines the named budget
        node = cfg.setdefault(head, {})
        parts = rest.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set {key}: {head} is not a mapping")
        node[parts[-1]] = value
    return cfg


def _need(cfg: dict, key: str):
    if key not in cfg or cfg[key] in (None, "", []):
        raise ConfigError(f"config is missing {key!r}; add it to the YAML or pass {key}=...")
    return cfg[key]


def _conditions(value) -> tuple[str | None, ...]:
    """`condition: canny` or `condition: [canny, seg]`: each method runs on every listed
    condition it supports; metrics run on the condition they score (or on all, if none)."""
    if value in (None, "", []):
        return (None,)
    values = value if isinstance(value, list) else [value]
    try:
        for c in values:
            CONDITIONS.get(c)
    except UnknownNameError as e:
        raise ConfigError(str(e)) from None
    return tuple(values)


def _seeds(value) -> tuple[int, ...]:
    """`seeds: [0, 1, 2]` (or one integer); one run per seed. Not a budget field, so adding a
    seed runs only the new seed."""
    if value in (None, "", []):
        return DEFAULT_SEEDS
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in values):
        raise ConfigError(f"seeds must be non-negative integers, got {values!r}; write seeds=0,1,2")
    if len(set(values)) != len(values):
        raise ConfigError(f"seeds {values!r} repeat a seed; list each seed once")
    return tuple(values)


def _trainer(cfg: dict) -> tuple[tuple[str, Any], ...]:
    """`strategy` and `devices` for Lightning's Trainer, checked here so a typo is not one FAILED run each."""
    opts = {k: cfg[k] for k in TRAINER_KEYS if cfg.get(k) not in (None, "")}
    if "strategy" in opts:
        from lightning.pytorch.strategies import StrategyRegistry

        allowed = ["auto", *StrategyRegistry.available_strategies()]
        if opts["strategy"] not in allowed:
            raise ConfigError(f"strategy must be one of {', '.join(allowed)}, got {opts['strategy']!r}")
    if "devices" in opts:
        d = opts["devices"]
        ok = (d == "auto" or (isinstance(d, int) and not isinstance(d, bool) and (d >= 1 or d == -1))
              or (isinstance(d, list) and d and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in d)))
        if not ok:
            raise ConfigError(f"devices must be a count >= 1, -1 (all), auto, or a list of device indices "
                              f"(e.g. devices=2 or devices=[0,1]), got {d!r}")
    return tuple(sorted(opts.items()))


def _checkpoint_every(value) -> int:
    """`checkpoint_every: 500`: a resume checkpoint every 500 optimizer steps; absent or 0: none."""
    if value in (None, ""):
        return 0
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ConfigError(f"checkpoint_every must be a number of steps >= 0 (0: no resume checkpoints), got {value!r}")
    return value


def _refuse_self_grading(method: str, cls, condition, hparams: dict, metrics: dict) -> None:
    rewards = set(cls.reward_model_ids(condition, hparams))
    for name, metric in metrics.items():
        shared = rewards & set(getattr(metric, "evaluator_ids", ()))
        if shared:
            raise ConfigError(f"{method} trains against {sorted(shared)[0]}, the model that scores {name}; "
                              f"choose another reward_model in hparams.{method} or another metric")


WEIGHTS_KEY = "weights"  # hparams.<method>.weights: a released or saved checkpoint, not a recipe field


def _weights(method: str, cls, value) -> str:
    """The absolute path of ``hparams.<method>.weights``, or "" when unset; a one-line ConfigError
    when the method loads no checkpoints or the path does not exist (its layout is checked when
    the run builds the method, by `Method.load_weights`)."""
    if value in (None, ""):
        return ""
    if not cls.weights_layout:
        raise ConfigError(f"method {method} loads no checkpoint (hparams.{method}.weights); drop the override")
    path = Path(str(value)).expanduser()
    if not path.exists():
        raise ConfigError(f"hparams.{method}.weights: {path} not found; expected {cls.weights_layout}")
    return str(path.resolve())


def _budget(cfg: dict) -> Budget:
    """The config's budget: a name in the budgets file, or {name: ..., field: value, ...} overriding one."""
    budget_cfg = _need(cfg, "budget")
    budgets = load_budgets(Path(cfg.get("budgets_file") or BUDGETS_FILE))
    if isinstance(budget_cfg, dict):  # budget: {name: quick, train_steps: 100}
        budget_cfg = dict(budget_cfg)
        name = budget_cfg.pop("name", None)
        if name is None:
            raise ConfigError("budget mapping needs a name: of a budget in bench/configs/budgets.yaml to start from")
    else:
        name, budget_cfg = budget_cfg, {}
    if name not in budgets:
        raise ConfigError(str(UnknownNameError(f"unknown budget {name!r} (known: {', '.join(budgets)})")))
    return budgets[name].with_overrides(budget_cfg) if budget_cfg else budgets[name]


def _options(cfg: dict, budget: Budget) -> RunOptions:
    """`options:` (bench.run.options.RunOptions); its accumulation must split the budget's batch."""
    options = RunOptions.from_config(cfg.get("options"))
    if budget.batch_size % options.accumulate:
        raise ConfigError(f"budget batch_size {budget.batch_size} does not split into options.accumulate="
                          f"{options.accumulate} micro-batches; choose an accumulate that divides it")
    return options


def resolve(cfg: dict) -> tuple[list[RunSpec], Path]:
    """Resolve names against the registries; returns the run specs and the output directory."""
    load_builtins()

    budget = _budget(cfg)
    seeds = _seeds(cfg.get("seeds"))
    conditions = _conditions(cfg.get("condition"))
    try:
        # `dataset: [identity, identity_multi]` runs every method on each (e.g. one table per track)
        dataset_names = _need(cfg, "dataset")
        dataset_names = dataset_names if isinstance(dataset_names, list) else [dataset_names]
        dataset_versions = {d: DATASETS.get(d)(split="eval", size=1, resolution=budget.resolution, conditions=()).version
                            for d in dataset_names}
        metric_classes = {m: METRICS.get(m) for m in _need(cfg, "metrics")}
        method_names = list(_need(cfg, "methods"))
        classes = {m: METHODS.get(m) for m in method_names}
    except UnknownNameError as e:
        raise ConfigError(str(e)) from None
    hparams = cfg.get("hparams") or {}
    if not isinstance(hparams, dict):
        raise ConfigError("hparams must map method names to {name: value}")
    for m in hparams:
        if m not in classes:
            raise ConfigError(f"hparams given for {m!r}, which is not in methods {method_names}")
    for m, cls in metric_classes.items():
        if not any(cls.scores(c) for c in conditions):
            kinds = " or ".join(repr(k) for k in (cls.condition, *cls.also_scores))
            raise ConfigError(f"metric {m} scores condition {kinds}, which is not in condition: "
                              f"{list(conditions)}; add it or drop the metric")
    from bench.core.bases import base_family
    from bench.core.weights import needed_weights, preflight

    # Before any compute: every weight the run needs, with the first missing one named.
    preflight(needed_weights(*metric_classes.values(), *classes.values(),
                             *(CONDITIONS.get(c) for c in conditions if c), base_model=str(_need(cfg, "base_model"))))
    trainer = _trainer(cfg)
    every = _checkpoint_every(cfg.get("checkpoint_every"))
    options = _options(cfg, budget)
    family = base_family(str(_need(cfg, "base_model")))  # which official recipe (Method.Recipe.SDXL)
    specs = []
    for m in method_names:
        hp = dict(hparams.get(m) or {})
        weights = _weights(m, classes[m], hp.pop(WEIGHTS_KEY, None))
        recipe = tuple(sorted(classes[m].make_recipe(hp, family).as_dict().items()))  # also checks hp
        usable = [c for c in conditions if not classes[m].conditions or c in classes[m].conditions]
        if not usable:
            raise ConfigError(f"method {m} needs condition in {classes[m].conditions}, the config has "
                              f"{list(conditions)}")
        for condition in usable:
            metric_names = tuple(n for n, c in metric_classes.items() if c.scores(condition))
            _refuse_self_grading(m, classes[m], condition, hp, {n: metric_classes[n] for n in metric_names})
            metric_versions = tuple(sorted((n, metric_classes[n].version) for n in metric_names))
            for dataset_name, seed in itertools.product(dataset_names, seeds):
                specs.append(RunSpec(method=m, method_version=classes[m].version, dataset=dataset_name,
                                     dataset_version=dataset_versions[dataset_name], condition=condition, budget=budget,
                                     seed=int(seed), base_model=str(_need(cfg, "base_model")), metrics=metric_names,
                                     metric_versions=metric_versions, hparams=tuple(sorted(hp.items())),
                                     recipe=recipe, trainer=trainer, weights=weights, checkpoint_every=every,
                                     options=options))
    return with_init_runs(specs, hparams, family), Path(cfg.get("out_dir") or "runs/default")


def with_init_runs(specs: list[RunSpec], hparams: dict, family: str) -> list[RunSpec]:
    """Each spec whose recipe starts from another method's finished run (`Method.init_method`: ControlNet++
    from a converged ControlNet) names that run as `init_run`, and the init run's spec comes first: the
    same seed, budget, data, condition and metrics, with the config's settings for that method, built fresh.
    Training from it (no `weights`, train_steps > 0) is what the init is for; otherwise nothing is added."""
    import dataclasses

    out: dict[str, RunSpec] = {}
    for spec in specs:
        cls = METHODS.get(spec.method)
        init = cls.init_method(cls.make_recipe(dict(spec.hparams), family)) if not spec.weights else ""
        if init and spec.budget.train_steps > 0:
            first = _init_spec(spec, init, dict(hparams.get(init) or {}), family)
            out.setdefault(first.run_id, first)
            spec = dataclasses.replace(spec, init_run=first.run_id)
        out.setdefault(spec.run_id, spec)
    return list(out.values())


def _init_spec(spec: RunSpec, method: str, hp: dict, family: str) -> RunSpec:
    import dataclasses

    cls = METHODS.get(method)
    hp = {k: v for k, v in hp.items() if k not in (WEIGHTS_KEY, "init_from")}  # built fresh, from nothing
    recipe = tuple(sorted(cls.make_recipe(hp, family).as_dict().items()))
    return dataclasses.replace(spec, method=method, method_version=cls.version, hparams=tuple(sorted(hp.items())),
                               recipe=recipe, weights="", init_run="")


def rescore_specs(records: list[RunRecord], metrics: list[str] | None = None) -> list[RunSpec]:
    """`bench eval`: the specs that re-score FINISHED runs without training them, one per run
    (without repeats), with `metrics` (default: each run's own, at today's versions) that score its
    condition; runs none of them scores are left out. Each spec is its source run's with the
    checkpoint the source generated with as `weights`, and `source_run` naming the run that trained
    it; the budget stays the source's, so the new record lands in the source run's table. A run
    that trained but saved no checkpoint is refused (one-line ConfigError)."""
    from bench.run.builtins import load_builtins

    load_builtins()
    specs: dict[str, RunSpec] = {}
    for rec in records:
        spec = _rescore_spec(rec, metrics)
        if spec is not None:
            specs.setdefault(spec.run_id, spec)
    if not specs:
        raise ConfigError(f"no selected run has a condition that metrics {', '.join(metrics or [])} score; "
                          "choose metrics of the runs' conditions")
    return list(specs.values())


def _rescore_spec(rec: RunRecord, metrics: list[str] | None) -> RunSpec | None:
    import dataclasses

    from bench.core.bases import base_family
    from bench.core.registry import METHODS, METRICS, UnknownNameError

    spec = RunSpec.from_dict(rec.spec)
    who = f"run {rec.run_id} ({spec.method}, seed {spec.seed})"
    try:
        method_cls = METHODS.get(spec.method)
        classes = {n: METRICS.get(n) for n in (metrics or spec.metrics)}
    except UnknownNameError as e:
        raise ConfigError(str(e)) from None
    recipe = method_cls.make_recipe(dict(spec.hparams), base_family(spec.base_model)).as_dict()
    if method_cls.version != spec.method_version or (spec.recipe and recipe != dict(spec.recipe)):
        raise ConfigError(f"{who} was trained by {spec.method_version} code whose recipe or version has changed "
                          f"(now {method_cls.version}); retrain it with bench run")
    usable = {n: c for n, c in classes.items() if c.scores(spec.condition)}
    if not usable:
        return None
    _refuse_self_grading(spec.method, method_cls, spec.condition, dict(spec.hparams), usable)
    checkpoint = rec.artifacts.get("checkpoint", "")
    # unknown trainable count (older records): assume it trained, so it is never rebuilt untrained
    trained = not spec.source_run and spec.budget.train_steps > 0 and rec.compute.get("params_trainable", 1) > 0
    if trained and not checkpoint:
        raise ConfigError(f"{who} has no saved checkpoint (it trained before runs saved one, or {spec.method} has "
                          "no weights_layout); re-run it with bench run, or leave it out with --runs/--method")
    if checkpoint and not Path(checkpoint).exists():
        raise ConfigError(f"{who}: its checkpoint {checkpoint} is gone; restore it or re-run the run")
    return dataclasses.replace(spec, metrics=tuple(usable), weights=checkpoint or spec.weights,
                               metric_versions=tuple(sorted((n, c.version) for n, c in usable.items())),
                               source_run=spec.source_run or rec.run_id, checkpoint_every=0)


def init_checkpoint(spec: RunSpec, out_dir: Path | None) -> str:
    """The checkpoint of the finished run this one starts from (`spec.init_run`), or "" when it has none
    or re-scores a trained run; a one-line ConfigError when that run has not finished under ``out_dir``."""
    if not spec.init_run or spec.source_run:
        return ""
    path = run_paths(out_dir, spec.init_run)["checkpoint"] if out_dir is not None else None
    if path is None or not path.is_dir():
        raise ConfigError(f"run {spec.run_id} ({spec.method}, seed {spec.seed}) starts from run {spec.init_run}, "
                          f"which has no checkpoint ({path or 'no out_dir given'}); run the config again: it runs "
                          "that run first")
    return str(path)
