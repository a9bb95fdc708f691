"""The base model with no control: the floor every consistency metric must beat."""
from bench.api.method import Method
from bench.core.registry import METHODS


@METHODS.register("baseline")
class Baseline(Method):
    version = "baseline-v1"
    no_checkpoint = "trains nothing"
