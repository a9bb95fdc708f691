"""Datasets and condition extractors; importing registers them."""
from bench.datasets import conditions, layouts, shapes  # noqa: F401
