"""Asking before a production action a command cannot undo: --yes, or
"yes" typed on its standard input (a script pipes it, a terminal types it);
anything else, end of input included, and nothing is done."""

import sys

from django.core.management.base import CommandError


def confirmed(out, question: str, yes: bool, stdin=None) -> None:
    """Return when the operator agreed (--yes, or "yes" answered); else a
    CommandError saying nothing was done."""
    if yes:
        return
    stdin = stdin or sys.stdin
    out.write(f"{question} Type yes to go on (or pass --yes): ", ending="")
    out.flush()
    answer = stdin.readline().strip().lower()
    if answer != "yes":
        raise CommandError(f"not confirmed ({'no answer' if not answer else repr(answer)}): nothing was done")
