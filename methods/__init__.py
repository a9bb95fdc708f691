"""Control methods, one file each, registered in METHODS by decorator.

Importing this package imports none of them: `METHODS.get(name)` imports a built-in's module on
first use (bench/configs/catalog.json says which), and `bench.run.builtins.load_builtins` imports
them all, with the entry-point plugins of `controlbench.methods`.
"""
