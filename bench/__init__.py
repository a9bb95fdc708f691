"""controlbench: compare controllable-generation methods under identical data and budgets.

`bench.run_config(config, overrides)` is the library entry point that `bench run` calls too
(bench.run.session); `bench.profile.run_profile` is `bench profile`'s.
"""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["run_config", "rescore"]


def __getattr__(name: str) -> Any:
    # lazy (PEP 562): `import bench.core...` must stay torch-free for `bench report` / `bench check` / `bench list`
    if name in __all__:
        from bench.run import session

        return getattr(session, name)
    raise AttributeError(f"module 'bench' has no attribute {name!r}")
