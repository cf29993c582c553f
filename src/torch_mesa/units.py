"""Human-readable sizes, one formatter for every report."""

from __future__ import annotations

from typing import Optional

__all__ = ["format_bytes"]


def format_bytes(n: Optional[float]) -> str:
    """``1536`` -> ``'1.50 KiB'``; ``None`` -> ``'n/a'``."""
    if n is None:
        return "n/a"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"
