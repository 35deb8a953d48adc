from django.core.management.base import CommandError

from replication.models import VirtualMachine


def vm_named(name: str, hint: str = "") -> VirtualMachine:
    """The VM called `name`, or a CommandError that says there is none."""
    try:
        return VirtualMachine.objects.get(name=name)
    except VirtualMachine.DoesNotExist:
        raise CommandError(f"no VM named {name!r}{hint}") from None


def group_named(name: str):
    from replication.models import ProtectionGroup

    try:
        return ProtectionGroup.objects.get(name=name)
    except ProtectionGroup.DoesNotExist:
        raise CommandError(f"no protection group named {name!r}; create it with `group create {name}`") from None


_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


# Intervals, targets and back-offs beyond a year are typing mistakes (and
# would not fit the database's integer columns for long).
MAX_DURATION_S = 366 * 24 * 3600


def duration_s(text: str) -> int:
    """'90', '90s', '15m', '2h', '1d' -> seconds (argparse type)."""
    import argparse

    value = text.strip().lower()
    unit = value[-1:] if value[-1:] in _SECONDS else "s"
    number = value[:-1] if value[-1:] in _SECONDS else value
    try:
        seconds = int(float(number) * _SECONDS[unit])
    except (ValueError, OverflowError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration such as 90s, 15m, 2h or 1d") from None
    if seconds < 1:
        raise argparse.ArgumentTypeError(f"a duration must be at least 1 s, not {text!r}")
    if seconds > MAX_DURATION_S:
        raise argparse.ArgumentTypeError(f"a duration must be at most 366d, not {text!r}")
    return seconds
