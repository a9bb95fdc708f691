"""Datasets and condition extractors; importing registers them."""
from bench.datasets import conditions, layouts, shapes  # noqa: F401
from bench.datasets import aux_extractors, folders, identity, pose  # noqa: F401
