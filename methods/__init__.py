"""Control methods, one file each; importing registers them in METHODS."""
from bench.methods import baseline, controlnet, controlnet_pp, controlnext, finetune, frozen, odgen, t2i_adapter  # noqa: F401
from bench.methods import instantid, ip_adapter, photomaker  # noqa: F401

# Methods from other installed packages (entry point group `controlbench.methods`), after the
# builtins so a plugin can subclass one; see bench.registry.load_entry_points.
from bench.registry import load_entry_points  # noqa: E402

load_entry_points("controlbench.methods")
