"""Datasets and condition extractors; importing registers them."""
from bench.datasets import (  # noqa: F401  # noqa: F401
    aux_extractors,
    conditions,
    folders,
    identity,
    layouts,
    pose,
    shapes,
)
