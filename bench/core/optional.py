"""Optional dependencies in one table (torchmetrics' `imports.py` is the model): what needs each, how
to install it, and one message form when it is missing:

    "<feature> needs <package>: <install command>"

`require(name)` imports the module or raises that one-line ConfigError; `available(name)` only looks
(importlib.util.find_spec), so listing what is installed imports nothing.
"""
from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from types import ModuleType

from bench.core.errors import ConfigError

POSE_EXTRA = "pip install -e '.[pose]' && pip install --no-deps"  # see pyproject: these skip their declared deps


@dataclass(frozen=True)
class OptionalDependency:
    module: str  # what is imported
    package: str  # what is installed
    feature: str  # what needs it
    install: str  # the command that installs it


OPTIONAL = {d.module: d for d in (
    OptionalDependency("dlib", "dlib", "the dlib face backend (id_sim)", "pip install 'controlbench[face]'"),
    OptionalDependency("face_recognition_models", "face-recognition-models", "the dlib face backend's models",
                       "pip install 'controlbench[face]'"),
    OptionalDependency("onnxruntime", "onnxruntime", "the insightface/antelopev2 face models and rtmlib pose",
                       "pip install onnxruntime"),
    OptionalDependency("mediapipe", "mediapipe", "the mediapipe pose backend",
                       f"{POSE_EXTRA} mediapipe==0.10.14"),
    OptionalDependency("rtmlib", "rtmlib", "the rtmpose pose backend", f"{POSE_EXTRA} rtmlib"),
    OptionalDependency("mmpose.apis", "mmpose", "the mmpose pose backend",
                       "mim install mmcv mmpose (mmpose needs the full mmcv)"),
    OptionalDependency("bitsandbytes", "bitsandbytes", "8-bit AdamW (budget.optimizer=adamw8bit)",
                       "pip install bitsandbytes (CUDA only)"),
    OptionalDependency("pytest", "pytest", "bench test-method", "pip install 'controlbench[test]'"),
)}


def missing_message(module: str, detail: str = "") -> str:
    d = OPTIONAL[module]
    return f"{d.feature} needs {d.package}: {d.install}" + (f" ({detail})" if detail else "")


def available(module: str) -> bool:
    """Whether ``module`` can be imported, without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a missing parent package (mmpose for mmpose.apis)
        return False


def require(module: str) -> ModuleType:
    """Import an optional dependency, or raise the table's one-line ConfigError naming the install."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        detail = "" if getattr(e, "name", None) == module.split(".")[0] else f"import failed: {e}"
        raise ConfigError(missing_message(module, detail)) from None
