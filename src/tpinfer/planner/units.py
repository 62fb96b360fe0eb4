"""Human formatting of bytes, times and counts for the planner's sentences and tables."""

from __future__ import annotations

GIB = 1024**3
GB = 1000**3


def gib(n: float) -> str:
    """Bytes as GiB (the unit GPU memory is sold and reported in); small amounts in MiB or KiB."""
    return f"{n / GIB:.1f} GiB" if abs(n) >= GIB / 10 else size(n)


def gb(n: float) -> str:
    """Bytes as decimal GB (the unit model sizes are quoted in); small amounts in MB."""
    return f"{n / GB:.1f} GB" if abs(n) >= GB / 10 else f"{n / 1e6:.1f} MB"


def size(n: float) -> str:
    """Bytes in the largest binary unit that keeps the number readable."""
    for unit, scale in (("GiB", GIB), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def seconds(t: float) -> str:
    if t >= 1:
        return f"{t:.2f} s"
    if t >= 1e-3:
        return f"{t * 1e3:.2f} ms"
    return f"{t * 1e6:.1f} us"


def count(n: int) -> str:
    """A parameter count as billions or millions: 70.55 B, 124.4 M."""
    if n >= 10**9:
        return f"{n / 1e9:.2f} B"
    return f"{n / 1e6:.1f} M"


def percent(x: float) -> str:
    return f"{100 * x:.0f}%"


def rate(x: float) -> str:
    """Tokens per second, to three significant figures."""
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"
