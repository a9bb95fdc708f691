"""Control methods, one file each; importing registers them in METHODS."""
from bench.methods import (  # noqa: F401  # noqa: F401
    baseline,
    controlnet,
    controlnet_pp,
    controlnext,
    finetune,
    frozen,
    instantid,
    ip_adapter,
    odgen,
    photomaker,
    t2i_adapter,
)

# Methods from other installed packages (entry point group `controlbench.methods`), after the
# builtins so a plugin can subclass one; see bench.core.registry.load_entry_points.
from bench.core.registry import load_entry_points  # noqa: E402

load_entry_points("controlbench.methods")
