"""Changing a running job's bandwidth limit. The OMA records the job's new
limit (its own fact) and tells the job's agent through the agent's API; the
agent's running copies read it from the agent's own store within a second
or two and report the limit they applied. Copies started later take it
from their order."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from django.db import transaction

from replication.choices import DiskStatus
from replication.models import ReplicationJob
from replication.services import orders
from vma_agent.units import MAX_RATE_BPS, iec_rate


class LimitError(Exception):
    """The limit cannot be changed; the message is the reason."""


@dataclass
class LimitChange:
    job: ReplicationJob
    bytes_per_s: int | None
    copying: list[str]  # the disks whose copies run now
    agent_error: str | None = None  # the agent could not be told: running copies keep their limit
    applied: dict[str, int | None] = field(default_factory=dict)  # per disk, as the agent last reported

    @property
    def label(self) -> str:
        return iec_rate(self.bytes_per_s) if self.bytes_per_s else "no limit"

    def pending(self) -> list[str]:
        """Running copies that have not yet applied the new limit."""
        return [disk for disk in self.copying if disk not in self.applied or self.applied[disk] != self.bytes_per_s]


def change_limit(job_id: str, bytes_per_s: int | None, actor: str = "operator") -> LimitChange:
    """Set the job's bandwidth limit per disk copy (None: none) and pass it
    to its agent. Refused, with the reason, for a job that has ended."""
    if bytes_per_s is not None and bytes_per_s <= 0:
        raise LimitError(f"a bandwidth limit must be a positive rate, not {bytes_per_s}")
    if bytes_per_s is not None and bytes_per_s > MAX_RATE_BPS:
        raise LimitError(f"a bandwidth limit must be at most {iec_rate(MAX_RATE_BPS)}, not {bytes_per_s} B/s")
    with transaction.atomic():
        try:
            job = ReplicationJob.objects.select_for_update().get(pk=job_id)
        except ReplicationJob.DoesNotExist:
            raise LimitError(f"no job {job_id}") from None
        if not job.change_limit(bytes_per_s, actor):
            raise LimitError(f"job {job.id} is {job.status}: it has no copies left to limit")
        copying = sorted(job.disks.filter(status=DiskStatus.COPYING).values_list("disk_key", flat=True))
    change = LimitChange(job, bytes_per_s, copying)
    try:
        change.applied = orders.agent_client(job).set_limit(job.id, bytes_per_s)["applied"]
    except Exception as exc:  # noqa: BLE001 - the job's record holds the limit; say what did not happen
        change.agent_error = str(exc)
    return change


def wait_applied(change: LimitChange, timeout_s: float, interval_s: float = 0.25) -> LimitChange:
    """Follow the agent's reports until every running copy applied the
    change or timeout_s passed; change.pending() says which did not."""
    deadline = time.monotonic() + timeout_s
    client = orders.agent_client(change.job)
    while change.agent_error is None and change.pending() and time.monotonic() < deadline:
        time.sleep(interval_s)  # the agent's copies report their applied limit about every second
        try:
            change.applied = client.job_limit(change.job.id)["applied"]
        except Exception as exc:  # noqa: BLE001 - reported as what it is
            change.agent_error = str(exc)
        change.copying = [disk for disk in change.copying
                          if change.job.disks.filter(disk_key=disk, status=DiskStatus.COPYING).exists()]
    return change
