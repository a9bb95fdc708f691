"""Numbers as report text: the decimals an interval needs, and a mean with its 95% half-width."""
from __future__ import annotations

import math


def decimals_for(x: float) -> int:
    """Decimals giving three significant digits, without scientific notation."""
    if x == 0 or not math.isfinite(x):
        return 3
    return min(max(0, 2 - math.floor(math.log10(abs(x)))), 8)


def format_number(x: float) -> str:
    if math.isnan(x):
        return "–"
    return f"{x:.{decimals_for(x)}f}" if math.isfinite(x) else str(x)


def format_mean_ci(mean: float, half: float) -> str:
    if not math.isfinite(mean):
        return format_number(mean)
    d = decimals_for(mean)
    ci = f"{half:.{d}f}" if math.isfinite(half) else "–"
    return f"{mean:.{d}f} ± {ci}"
