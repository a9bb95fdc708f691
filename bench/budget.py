"""Budget: everything that must be equal across methods for a comparison to be fair."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import yaml

from bench.errors import ConfigError

BUDGETS_FILE = Path(__file__).resolve().parent.parent / "sweeps" / "budgets.yaml"


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
    seeds: tuple[int, ...] = (0, 1)

    def key(self) -> str:
        """Hash of every number-changing field; the name is a label and is left out."""
        d = asdict(self)
        d.pop("name")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]

    def with_overrides(self, overrides: dict) -> "Budget":
        known = {f.name: f.type for f in fields(self)}
        bad = sorted(set(overrides) - set(known))
        if bad:
            raise ConfigError(f"unknown budget field {bad[0]!r}; valid fields: {', '.join(sorted(known))}")
        values = {k: tuple(v) if k == "seeds" else v for k, v in overrides.items()}
        try:
            b = replace(self, **values)
            b.validate()
        except (TypeError, ValueError) as e:
            raise ConfigError(f"bad budget override {overrides}: {e}") from None
        return b

    def validate(self) -> None:
        for f in ("train_steps", "batch_size", "resolution", "inference_steps", "eval_samples", "train_size"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < (0 if f == "train_steps" else 1):
                raise ValueError(f"{f} must be a positive integer, got {v!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if not self.seeds or not all(isinstance(s, int) for s in self.seeds):
            raise ValueError(f"seeds must be a non-empty list of integers, got {self.seeds!r}")


def load_budgets(path: Path = BUDGETS_FILE) -> dict[str, Budget]:
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot read budgets file {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must map budget names to fields")
    out = {}
    for name, values in raw.items():
        try:
            b = Budget(name=name, **{k: tuple(v) if k == "seeds" else v for k, v in values.items()})
            b.validate()
        except (TypeError, ValueError) as e:
            raise ConfigError(f"budget {name!r} in {path}: {e}") from None
        out[name] = b
    return out
