"""The base model with no control: the floor every consistency metric must beat."""
from bench.method import Method
from bench.registry import METHODS


@METHODS.register("baseline")
class Baseline(Method):
    version = "baseline-v1"
