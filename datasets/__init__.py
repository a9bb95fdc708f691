"""Datasets and condition extractors; importing registers them."""
from bench.datasets import conditions, shapes  # noqa: F401
