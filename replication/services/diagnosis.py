"""Operator-level messages for the raw failures an operator can act on: the
one table that maps a raw error (nbdkit's, pyvmomi's, the kernel's) to what
happened and what to do. The raw text is never lost: it follows the message
as its details, and the log keeps it."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Known:
    name: str
    pattern: re.Pattern
    message: str  # what happened and what to do, in the operator's words


# First match wins: a changed certificate is also a failed connection.
KNOWN = (
    Known("no-vddk", re.compile(r"cannot open plugin ['\"]?vddk|nbdkit-vddk-plugin", re.I),
          "The agent cannot read VMware disks: VMware's VDDK is not installed on it (nbdkit has no vddk plugin). "
          "Install the VDDK and nbdkit's vddk plugin on the agent (its library directory: VMA_VDDK_LIBDIR), "
          "then retry the job."),
    Known("certificate-changed", re.compile(r"presented certificate thumbprint \S+,? not the pinned", re.I),
          "vCenter's certificate has changed since its thumbprint was recorded, so the connection was refused. "
          "Check with the vCenter's administrator that the new certificate is genuine, then record its "
          "thumbprint (the vCenter's admin page, or add_vcenter --thumbprint) and retry."),
    Known("vcenter-unreachable",
          re.compile(r"cannot reach vCenter|vCenter \S+ did not (answer|present its certificate)", re.I),
          "vCenter cannot be reached. Check that it is running and that its host and port are right and "
          "reachable from the agent (DNS, routing, firewall), then retry."),
    Known("volume-dir-full", re.compile(r"No space left on device|\bENOSPC\b|\[Errno 28\]", re.I),
          "The filesystem holding the replica volumes is full. Free space there or grow it "
          "(OMA_VOLUME_DIR, or the volumes' storage), then retry the job."),
)


def diagnose(raw: str) -> Known | None:
    return next((known for known in KNOWN if known.pattern.search(raw or "")), None)


def operator_text(raw: str, context: str = "") -> str:
    """The operator's message for a raw error, its raw text kept as the
    details; the raw text unchanged when the table does not know it."""
    known = diagnose(raw)
    if known is None:
        return raw
    log.warning("%s%s: %s", f"{context}: " if context else "", known.name, raw)
    return f"{known.message} Details: {raw}"
