"""torchmetrics-style benchmark metrics; importing registers them in METRICS."""
from bench.metrics import (  # noqa: F401  # noqa: F401  # noqa: F401
    clip_score,
    consistency,
    detector,
    face,  # noqa: F401
    fd,
    fid,
    fid_clean,  # noqa: F401
    layout,
    pose,
    prompt_fidelity,
    protocol,  # noqa: F401
    softedge,
)

# Metrics from other installed packages (entry point group `controlbench.metrics`), after the builtins.
from bench.core.registry import load_entry_points  # noqa: E402

load_entry_points("controlbench.metrics")
