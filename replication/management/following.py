"""Following a failover from a command: its steps as they end, then the
outcome, as text or as the JSON report."""

import json
import time

from django.core.management.base import CommandError

from replication.choices import FailoverKind, FailoverStatus
from replication.models import FailoverJob
from replication.serializers import failover_json

POLL_INTERVAL_S = 0.25
DONE = (FailoverStatus.SUCCEEDED, FailoverStatus.FAILED)


def follow(job: FailoverJob, out, *, as_json: bool, timeout: float) -> FailoverJob:
    """Wait until the failover succeeded or failed (printing each step as it
    ends, unless as_json); a CommandError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    seen = 0
    while True:
        job.refresh_from_db()
        steps = list(job.steps.all())
        if not as_json:
            for step in steps[seen:]:
                if step.ended_at is None:
                    break
                out.write(f"  {step.name:<32} {step.status:<7} {step.seconds:8.2f} s  {step.detail}")
                seen += 1
        if job.status in DONE and all(s.ended_at is not None for s in steps):
            return job
        if time.monotonic() > deadline:
            raise CommandError(f"{job.kind} {job.pk} still {job.status} after {timeout:.0f} s")
        time.sleep(POLL_INTERVAL_S)


def print_outcome(job: FailoverJob, out, as_json: bool) -> None:
    if as_json:
        out.write(json.dumps(failover_json(job), indent=2))
        return
    label = FailoverKind(job.kind).label.lower()
    if job.status == FailoverStatus.SUCCEEDED and job.kind == FailoverKind.ROLLBACK:
        out.write(f"{label} {job.pk} of {job.vm.name}: {job.destination_vm} gone, volumes back at the rollback "
                  "point, source powered on")
    elif job.status == FailoverStatus.SUCCEEDED:
        out.write(f"{label} {job.pk}: {job.destination_vm} booted; seen by {job.boot_probe or 'console'}: "
                  f"{job.console_match!r}")
        if job.kind == FailoverKind.LIVE:
            forecast = "no forecast" if job.forecast_downtime_s is None else f"forecast {job.forecast_downtime_s} s"
            out.write(f"downtime {job.downtime_s} s ({forecast}); roll back with: manage.py rollback "
                      f"{job.vm.name}, or keep it on the destination for good: manage.py failover_commit "
                      f"{job.vm.name}")
        else:
            out.write(f"end it with: manage.py failover_end {job.vm.name}")
    else:
        out.write(f"{label} {job.pk} of {job.vm.name}: {job.status}"
                  + (f": {job.error_message}" if job.error_message else ""))
        if job.console_tail:
            out.write("console (last lines):\n" + job.console_tail)
