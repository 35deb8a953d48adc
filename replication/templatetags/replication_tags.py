from django import template
from django.utils import formats, timezone
from django.utils.html import escape
from django.utils.safestring import mark_safe

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


@register.filter(expects_localtime=False)
def when(moment, default="—"):
    """A time as every page and the admin write it: 2026-12-07 17:20:33 UTC,
    in the operators' zone (settings.TIME_ZONE_DISPLAY, active per request)."""
    if moment is None or moment == "":
        return default
    if timezone.is_aware(moment):
        moment = timezone.localtime(moment)
    return formats.date_format(moment, "DATETIME_FORMAT")


@register.filter
def path_breaks(path):
    """A file path or URL that may wrap after each / (a <wbr>), never inside a name."""
    return mark_safe(escape(path).replace("/", "/<wbr>"))


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


@register.inclusion_tag("replication/_nav_link.html", takes_context=True)
def nav_link(context, url_name, label):
    """A navbar entry, marked as the current page (aria-current) when the
    request is for it or a page under it."""
    from django.urls import reverse

    href = reverse(url_name)
    path = context["request"].path
    current = path == href or (href != "/" and path.startswith(href))
    return {"href": href, "label": label, "current": current}


TONES = {
    "success": {"completed", "succeeded", "passed", "done", "ok", "protected", "ready_for_failover", "active",
                "committed", "started"},
    "danger": {"failed", "blocked", "cleanup_required", "rejected", "revoked", "dropped"},
    "warning": {"cancelled", "paused", "draining", "failed_over_test", "failed_over_live", "retry", "waiting"},
    "primary": {"replicating", "copying", "running", "preparing", "finalizing", "scheduled", "queued"},
}


@register.filter
def tone(state):
    """The Bootstrap colour of a state's badge: text-bg-{{ state|tone }}."""
    state = str(state)
    for name, states in TONES.items():
        if state in states:
            return name
    return "secondary"
