"""torchmetrics-style benchmark metrics; importing registers them in METRICS."""
from bench.metrics import consistency, detector, fd, layout, prompt_fidelity  # noqa: F401
from bench.metrics import clip_score, fid  # noqa: F401
from bench.metrics import pose, softedge  # noqa: F401
from bench.metrics import face  # noqa: F401
from bench.metrics import protocol  # noqa: F401
from bench.metrics import fid_clean  # noqa: F401

# Metrics from other installed packages (entry point group `controlbench.metrics`), after the builtins.
from bench.registry import load_entry_points  # noqa: E402

load_entry_points("controlbench.metrics")
