"""How a failed-over VM's boot is seen (probes, what the console or screen
must show, how long to wait): one set of rules for `manage.py
set_boot_check` and the VM's settings page."""

from __future__ import annotations

import re
from collections.abc import Sequence

from replication.models import VMContext
from replication.platforms.base import parse_boot_probes

DEFAULT = "default"  # the probes' choice that sets the default probes back
MIN_TIMEOUT_S, MAX_TIMEOUT_S = 1, 3600


class BootCheckError(ValueError):
    """Some settings are refused: errors maps probe, regex or timeout to why; nothing was stored."""

    def __init__(self, errors: dict[str, str]):
        self.errors = errors
        super().__init__("; ".join(f"{key}: {why}" for key, why in errors.items()))


def set_boot_check(vm, *, probes: Sequence[str] | None = None, regex: str | None = None,
                   timeout_s: int | None = None) -> VMContext:
    """Set what is given (None: unchanged). probes: names from BOOT_PROBES,
    or [DEFAULT] / [] for the default ones; regex '' for the default one."""
    errors, parsed = {}, None
    if probes is not None:
        if list(probes) in ([DEFAULT], []):
            parsed = ""
        else:
            try:
                parsed = ",".join(parse_boot_probes(list(probes)))
            except ValueError as exc:
                errors["probe"] = str(exc)
    if regex is not None:
        try:
            re.compile(regex)
        except re.error as exc:
            errors["regex"] = f"{regex!r} is not a regular expression: {exc}"
    if timeout_s is not None and not MIN_TIMEOUT_S <= timeout_s <= MAX_TIMEOUT_S:
        errors["timeout"] = f"must be {MIN_TIMEOUT_S}..{MAX_TIMEOUT_S} seconds, not {timeout_s}"
    if errors:
        raise BootCheckError(errors)
    context = VMContext.of(vm)
    if parsed is not None:
        context.boot_probes = parsed
    if regex is not None:
        context.boot_check_regex = regex
    if timeout_s is not None:
        context.boot_check_timeout_s = timeout_s
    context.save(update_fields=["boot_probes", "boot_check_regex", "boot_check_timeout_s", "updated_at"])
    return context
