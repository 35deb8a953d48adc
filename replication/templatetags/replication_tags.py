from django import template

from vma_agent.units import iec as iec_size
from vma_agent.units import iec_rate

register = template.Library()


@register.filter
def duration(seconds):
    """1h 02m, 3m 07s, 42s; an em dash when unknown."""
    if seconds is None:
        return "—"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


@register.filter
def iec(nbytes):
    """Bytes in IEC units: 12.0 MiB, 1.0 GiB (the one convention of the pages)."""
    return iec_size(nbytes)


@register.filter
def rate(bytes_per_s):
    return iec_rate(bytes_per_s)


@register.inclusion_tag("replication/_bar.html")
def progress_bar(percent, label):
    percent = max(0.0, min(100.0, float(percent or 0)))
    return {"percent": percent, "label": label}
