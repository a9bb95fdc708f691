"""Budget: everything that must be equal across methods for a comparison to be fair.

Seeds are not in it: a seed belongs to the run spec, so adding a seed never changes the key
(or the run ids) of the seeds already run.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import yaml

from bench.core.errors import ConfigError
from bench.core.paths import CONFIGS_DIR
from bench.core.yamlio import safe_load

TUPLE_FIELDS = ("curve_steps",)
INT_FIELDS = ("train_steps", "batch_size", "resolution", "lr_warmup_steps", "train_size", "inference_steps",
              "eval_samples", "eval_batch_size")
# Memory knobs: they change no number's meaning (per-sample noise makes a sample's image independent of
# its batch), so they are not in the budget key and two runs differing only in them are comparable.
MEMORY_FIELDS = ("eval_batch_size",)
EVAL_BATCH_SIZE = 64  # the default: what evaluation generated at once before the field existed


@dataclass(frozen=True)
class Precision:
    """One training precision: the one table the budget, `bench profile` and the estimate read."""

    lightning: str  # the Trainer's string, the Budget's one spelling (legacy "32"/"16"/"bf16" are not accepted)
    short: str | None  # its `bench profile --precision` name; None where profiling does not offer it
    autocast: str | None  # torch dtype name autocast runs in over fp32 master weights
    weights: str | None  # torch dtype name the whole method is cast to (pure low precision)


PRECISIONS = {p.lightning: p for p in (
    Precision("32-true", "fp32", None, None), Precision("16-mixed", "fp16", "float16", None),
    Precision("bf16-mixed", "bf16", "bfloat16", None), Precision("16-true", None, None, "float16"),
    Precision("bf16-true", "bf16-true", None, "bfloat16"), Precision("64-true", None, None, "float64"))}
PROFILE_PRECISIONS = {p.short: p for p in PRECISIONS.values() if p.short}  # --precision name -> Precision
# The shared sampler's names (bench.api.sampler.SCHEDULERS; a test keeps the two equal). Listed here so
# that checking a budget never imports torch or diffusers.
SAMPLERS = ("ddim", "unipc", "euler", "dpmpp")
BUDGETS_FILE = CONFIGS_DIR / "budgets.yaml"


@dataclass(frozen=True)
class Budget:
    name: str
    train_steps: int
    batch_size: int
    resolution: int
    lr: float
    lr_warmup_steps: int = 0
    precision: str = "32-true"
    train_size: int = 8000
    sampler: str = "ddim"
    inference_steps: int = 20
    guidance_scale: float = 3.0
    eval_samples: int = 64
    curve_steps: tuple[int, ...] = ()  # training steps at which consistency is also measured
    curve_samples: int = 16  # the first N eval samples, the same subset at every step
    negative_prompt: str = ""  # CFG's unconditional prompt (ControlNet++'s eval: "worst quality, low quality")
    eval_batch_size: int = EVAL_BATCH_SIZE  # samples generated at once (CFG doubles the UNet batch); memory only

    def as_dict(self) -> dict:
        """All fields; without a curve its two fields are left out: the sample count then changes
        no number, and keys and run ids from before curves existed stay valid."""
        d = asdict(self)
        if not self.curve_steps:
            d.pop("curve_steps")
            d.pop("curve_samples")
        if not self.negative_prompt:  # likewise: keys from before negative prompts stay valid
            d.pop("negative_prompt")
        if self.eval_batch_size == EVAL_BATCH_SIZE:  # and run ids from before the field
            d.pop("eval_batch_size")
        return d

    def key(self) -> str:
        """Hash of every number-changing field; the name is a label and memory knobs (MEMORY_FIELDS) are left out."""
        d = self.as_dict()
        for f in ("name", *MEMORY_FIELDS):
            d.pop(f, None)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]

    @classmethod
    def from_fields(cls, name: str, values: dict) -> "Budget":
        """From a stored or YAML field mapping (lists for tuple fields; a `name` entry is ignored)."""
        return cls(name=name, **{k: tuple(v) if k in TUPLE_FIELDS else v for k, v in values.items() if k != "name"})

    def with_overrides(self, overrides: dict) -> "Budget":
        known = {f.name: f.type for f in fields(self)}
        bad = sorted(set(overrides) - set(known))
        if bad:
            raise ConfigError(f"unknown budget field {bad[0]!r}; valid fields: {', '.join(sorted(known))}")
        for k in TUPLE_FIELDS:
            if k in overrides and not isinstance(overrides[k], (list, tuple)):
                raise ConfigError(f"budget.{k} must be a list of integers (e.g. budget.{k}=[0,50,100]), got {overrides[k]!r}")
        values = {k: tuple(v) if k in TUPLE_FIELDS else v for k, v in overrides.items()}
        try:
            b = replace(self, **values)
            b.validate()
        except (TypeError, ValueError) as e:
            raise ConfigError(f"bad budget override: budget.{e}") from None
        return b

    def validate(self) -> None:
        """Every field's type and range; the message names the field, what is allowed and the value."""
        for f in INT_FIELDS:
            v = getattr(self, f)
            low = 0 if f in ("train_steps", "lr_warmup_steps") else 1
            if not _is_int(v) or v < low:
                raise ValueError(f"{f} must be an integer >= {low}, got {v!r}")
        for f, low, example in (("lr", "> 0", "1e-4"), ("guidance_scale", ">= 0", "7.5")):
            v = getattr(self, f)
            if not _is_number(v) or not math.isfinite(v) or not (v > 0 if low == "> 0" else v >= 0):
                raise ValueError(f"{f} must be a finite number {low} (e.g. {example}), got {v!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if not isinstance(self.negative_prompt, str):
            raise ValueError(f"negative_prompt must be a string, got {self.negative_prompt!r}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        if not all(_is_int(s) and 0 <= s <= self.train_steps for s in self.curve_steps):
            raise ValueError(f"curve_steps must be integers in [0, train_steps={self.train_steps}], "
                             f"got {list(self.curve_steps)!r}")
        if self.curve_steps and not (_is_int(self.curve_samples) and 1 <= self.curve_samples <= self.eval_samples):
            raise ValueError(f"curve_samples must be an integer in [1, eval_samples={self.eval_samples}], "
                             f"got {self.curve_samples!r}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def load_budgets(path: Path = BUDGETS_FILE) -> dict[str, Budget]:
    try:
        raw = safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot read budgets file {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must map budget names to fields")
    out = {}
    for name, values in raw.items():
        try:
            b = Budget.from_fields(name, values)
            b.validate()
        except (TypeError, ValueError) as e:
            raise ConfigError(f"budget {name!r} in {path}: {e}") from None
        out[name] = b
    return out
