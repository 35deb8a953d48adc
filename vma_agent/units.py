"""One unit convention everywhere: sizes in IEC binary units, labelled as
such (KiB, MiB, GiB, TiB), on the pages, the terminals and in the logs."""

from __future__ import annotations

_UNITS = ("KiB", "MiB", "GiB", "TiB", "PiB")


def iec(nbytes: float | None) -> str:
    """1536 -> '1.5 KiB', 12_582_912 -> '12.0 MiB', 1 GiB -> '1.00 GiB'."""
    if nbytes is None:
        return "—"
    value = float(nbytes)
    if abs(value) < 1024:
        return f"{int(value)} B"
    for unit in _UNITS:
        value /= 1024
        if abs(value) < 1024 or unit == _UNITS[-1]:
            return f"{value:.2f} {unit}" if unit in ("GiB", "TiB", "PiB") else f"{value:.1f} {unit}"
    raise AssertionError("unreachable")


def iec_rate(bytes_per_s: float | None) -> str:
    return f"{iec(bytes_per_s or 0)}/s"
