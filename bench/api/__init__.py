"""The plugin contract: what a method, metric or dataset outside this repo imports.

    from bench.api import METHODS, Method, Batch      # a method
    from bench.api import METRICS, CONDITIONS, Batch  # a metric (subclassing bench.metrics.base.BenchMetric)

Importing this package imports torch (the contract's types hold tensors); `bench list` and
`bench report` never import it.
"""
from bench.api.method import Method
from bench.api.types import Batch, PromptEmbeds
from bench.core.registry import CONDITIONS, DATASETS, METHODS, METRICS

__all__ = ["Batch", "CONDITIONS", "DATASETS", "METHODS", "METRICS", "Method", "PromptEmbeds"]
