"""One unit convention everywhere: sizes in IEC binary units, labelled as
such (KiB, MiB, GiB, TiB), on the pages, the terminals and in the logs."""

from __future__ import annotations

_UNITS = ("KiB", "MiB", "GiB", "TiB", "PiB")


def iec(nbytes: float | None) -> str:
    """1536 -> '1.5 KiB', 12_582_912 -> '12.0 MiB', 1 GiB -> '1.0 GiB': one
    decimal in every unit, so sizes side by side read alike."""
    if nbytes is None:
        return "—"
    value = float(nbytes)
    if abs(value) < 1024:
        return f"{int(value)} B"
    for unit in _UNITS:
        value /= 1024
        if abs(value) < 1024 or unit == _UNITS[-1]:
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")


def iec_rate(bytes_per_s: float | None) -> str:
    return f"{iec(bytes_per_s or 0)}/s"


_RATE_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}
# Far above any link a copy runs over; a larger "limit" is a typing mistake
# (1e99 would not even fit the database's integer column).
MAX_RATE_BPS = 1024**4


def parse_rate(text: str) -> int:
    """'50M', '50MiB/s', '1.5G' or '1048576' -> bytes per second (K, M, G are
    powers of 1024); ValueError with the reason otherwise."""
    value = text.strip().upper().removesuffix("/S").removesuffix("B").removesuffix("I")
    unit = value[-1:] if value[-1:] in _RATE_UNITS else ""
    try:
        rate = float(value[: len(value) - len(unit)]) * _RATE_UNITS[unit]
    except ValueError:
        raise ValueError(f"{text!r} is not a rate such as 50M, 50MiB/s or 1048576") from None
    if not rate > 0:
        raise ValueError(f"the rate must be positive, not {text!r}")
    if not rate <= MAX_RATE_BPS:
        raise ValueError(f"the rate must be at most {iec_rate(MAX_RATE_BPS)}, not {text!r}")
    return int(rate)
