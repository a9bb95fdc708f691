"""Registering the built-in datasets, methods and metrics: an app-level step.

The registry itself (bench/core/registry.py) is core and imports none of the packages above it;
commands call `load_builtins()` before they look names up.
"""
from __future__ import annotations


def load_builtins() -> None:
    """Import the built-in datasets, methods and metrics so their decorators register them, with
    the installed entry-point plugins (bench.methods / bench.metrics load those) and the
    `--plugin` modules (CONTROLBENCH_PLUGINS)."""
    import bench.datasets  # noqa: F401
    import bench.methods  # noqa: F401
    import bench.metrics  # noqa: F401
    from bench.core.registry import load_plugin_modules

    load_plugin_modules()
