"""Profiling: measured step time and memory (measure), fake-tensor estimates (estimate), benchmarks.

`run_profile` is `bench profile`'s library entry point (bench.profile.session)."""
from __future__ import annotations

from typing import Any

__all__ = ["run_profile", "ProfileResult"]


def __getattr__(name: str) -> Any:
    # lazy (PEP 562): `python -m bench.profile.benchmarks` and the estimate engine need not import the session
    if name in __all__:
        from bench.profile import session

        return getattr(session, name)
    raise AttributeError(f"module 'bench.profile' has no attribute {name!r}")
