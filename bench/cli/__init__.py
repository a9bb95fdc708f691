"""The `bench` command: parsing and printing only; the work is done by the library it calls."""
from bench.cli.main import main

__all__ = ["main"]
