"""Datasets and condition extractors, registered in DATASETS and CONDITIONS.

Importing this package imports none of them: a lookup imports a built-in's module on first use
(bench/configs/catalog.json says which); `bench.run.builtins.load_builtins` imports them all.
"""
