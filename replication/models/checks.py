"""A comparison of a VM's sources with its replicas (sha256 of each image
file disk and its local target volume), run as a task from the VM's
settings page or at once by `manage.py checksums`."""

from django.db import models
from django.utils import timezone

from replication.choices import CHECKSUM_TRANSITIONS, ChecksumStatus
from replication.models.base import StateMachine


class ChecksumRun(StateMachine):
    Status = ChecksumStatus
    transitions = CHECKSUM_TRANSITIONS

    vm = models.ForeignKey("replication.VirtualMachine", on_delete=models.CASCADE, related_name="checksum_runs")
    actor = models.CharField(max_length=100)
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.RUNNING)
    started_at = models.DateTimeField(default=timezone.now)
    ended_at = models.DateTimeField(null=True, blank=True)
    disks = models.JSONField(default=list, blank=True,
                             help_text="[{disk, source, target, verdict}]: verdict match, mismatch or not comparable")
    error = models.TextField(blank=True)

    class Meta:
        db_table = "checksum_runs"
        ordering = ["-started_at", "-id"]

    def __str__(self):
        return f"checksums of {self.vm} {self.status}"

    def finish(self, disks: list[dict] | None = None, error: str = "") -> None:
        if error:
            status = self.Status.FAILED
        elif any(d["verdict"] == "mismatch" for d in disks or []):
            status = self.Status.MISMATCH
        else:
            status = self.Status.MATCH
        self.transition(status, disks=disks or [], error=error, ended_at=timezone.now())
