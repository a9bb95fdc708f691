"""torchmetrics-style benchmark metrics; importing registers them in METRICS."""
from bench.metrics import consistency, fd, prompt_fidelity  # noqa: F401
