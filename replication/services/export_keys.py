"""Each enrolled agent's own TLS-PSK identity at the NBD export server.

With OMA_EXPORT_TLS_PSK_FILE set, the export server requires TLS with a
pre-shared key from that file ("username:hexkey" lines, mode 0600), and
reads the file at every handshake. Approval adds the agent's own line,
`vma-<name>:<64 hex>`, and hands the key to the agent once with its other
credentials; revocation removes the line, so its next connection is
refused without restarting the server (or touching anyone else's key). An
agent's copies then present its own identity (vma_agent.export_tls), and
the export can be reached directly over TLS instead of through its tunnel."""

from __future__ import annotations

import fcntl
import os
import re
import secrets
import tempfile
from contextlib import contextmanager
from pathlib import Path

from django.conf import settings


class ExportKeyError(RuntimeError):
    """The PSK file cannot be changed as asked; str() says why."""


def enabled() -> bool:
    return bool(settings.OMA_EXPORT_TLS_PSK_FILE)


def identity_of(name: str) -> str:
    return f"vma-{name}"


def _path() -> Path:
    return Path(settings.OMA_EXPORT_TLS_PSK_FILE)


@contextmanager
def _locked_lines():
    """The PSK file's lines, to change; written back whole (the server never
    reads half a file) with mode 0600, under a lock."""
    path = _path()
    try:
        with open(path.with_name(path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            lines = path.read_text().splitlines() if path.exists() else []
            yield lines
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
            with os.fdopen(fd, "w") as out:  # mkstemp: 0600 from the first byte
                out.write("".join(line + "\n" for line in lines))
            os.replace(tmp, path)
    except OSError as exc:
        raise ExportKeyError(f"OMA_EXPORT_TLS_PSK_FILE {path}: {exc.strerror or exc}") from None


def _without(lines: list[str], name: str) -> list[str]:
    prefix = f"{identity_of(name)}:"
    return [line for line in lines if not line.startswith(prefix)]


def issue(name: str) -> str:
    """A new key for agent `name`'s identity (any earlier one replaced); its hex."""
    key = secrets.token_hex(32)
    with _locked_lines() as lines:
        lines[:] = _without(lines, name) + [f"{identity_of(name)}:{key}"]
    return key


def withdraw(name: str) -> bool:
    """Remove agent `name`'s line; whether there was one."""
    if not enabled():
        return False
    with _locked_lines() as lines:
        kept = _without(lines, name)
        removed = len(kept) != len(lines)
        lines[:] = kept
    return removed


def key_of(name: str) -> str:
    """The agent's key as the file holds it ("" when it has none)."""
    if not enabled():
        return ""
    try:
        text = _path().read_text()
    except OSError as exc:
        raise ExportKeyError(f"OMA_EXPORT_TLS_PSK_FILE {_path()}: {exc.strerror}") from None
    match = re.search(rf"^{re.escape(identity_of(name))}:([0-9a-fA-F]+)$", text, re.MULTILINE)
    return match.group(1) if match else ""


__all__ = ["ExportKeyError", "enabled", "identity_of", "issue", "key_of", "withdraw"]
