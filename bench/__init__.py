"""controlbench: compare controllable-generation methods under identical data and budgets."""
__version__ = "0.1.0"
