"""Deprecated home of the registries, kept for one release: import them from `bench.api`."""
from bench.core.registry import *  # noqa: F401,F403
from bench.core.registry import (  # noqa: F401
    CONDITIONS,
    DATASETS,
    METHODS,
    METRICS,
    Registry,
    UnknownNameError,
)
