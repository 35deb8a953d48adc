"""How long a live failover would take the VM down, forecast from what its
cycles and failovers measured: the source's shutdown, a final incremental
cycle, and the boot on the destination.

- Final incremental: the VM's change rate (bytes its recent incrementals
  copied over the time since the cycle before each) times the time since
  its last cycle started, at the rate its recent cycles copied, plus the
  fixed cost of a cycle (the shortest recent incremental: snapshot, plan,
  finalize). With no incremental history (an image source copies whole),
  the median of its recent cycles.
- Boot: the last verified failover of the VM (test or live), from
  protecting the volumes to the console's proof.
- Shutdown: the last live failover's; never measured, the shutdown timeout
  (FAILOVER_SHUTDOWN_TIMEOUT_S) for a VMware source, 0 for an image.

Every part says what it rests on, so an operator can judge the figure."""

from __future__ import annotations

import statistics

from django.conf import settings
from django.utils import timezone

from replication.choices import FAILOVER_BOOT_STEPS, FailoverKind, JobStatus, SourceKind, SyncType

RECENT_CYCLES = 6


def _seconds(a, b) -> float:
    return max((b - a).total_seconds(), 0.0)


def final_cycle(vm, now=None) -> tuple[float | None, str]:
    now = now or timezone.now()
    cycles = list(vm.jobs.filter(status=JobStatus.COMPLETED, completed_at__isnull=False)
                  .order_by("-created_at")[:RECENT_CYCLES])
    if not cycles:
        return None, "no completed cycle"
    cycles.reverse()  # oldest first
    durations = [_seconds(c.created_at, c.completed_at) for c in cycles]
    copied = sum(c.bytes_transferred for c in cycles)
    copy_rate = copied / sum(durations) if sum(durations) > 0 else 0.0
    incrementals = [(previous, c) for previous, c in zip(cycles, cycles[1:], strict=False)
                    if c.sync_type == SyncType.INCREMENTAL]
    if not incrementals or copy_rate <= 0:
        median = statistics.median(durations)
        return median, f"median of {len(cycles)} recent cycle(s) ({median:.1f} s)"
    changed = sum(c.bytes_transferred for _, c in incrementals)
    over = sum(_seconds(previous.created_at, c.created_at) for previous, c in incrementals)
    change_rate = changed / over if over > 0 else 0.0
    fixed = min(_seconds(c.created_at, c.completed_at) for _, c in incrementals)
    pending = change_rate * _seconds(cycles[-1].created_at, now)
    estimate = fixed + pending / copy_rate
    return estimate, (f"{change_rate / 2**20:.2f} MiB/s changing, ~{pending / 2**20:.1f} MiB since the last cycle, "
                      f"copied at {copy_rate / 2**20:.1f} MiB/s, plus {fixed:.1f} s per cycle")


def boot(vm) -> tuple[float | None, str]:
    last = (vm.failovers.filter(kind__in=[FailoverKind.TEST, FailoverKind.LIVE], boot_verified=True)
            .order_by("-completed_at").first())
    if last is None:
        return None, "no verified boot yet: run a test failover"
    seconds = sum(s.seconds or 0.0 for s in last.steps.filter(name__in=FAILOVER_BOOT_STEPS))
    return seconds, f"{last.kind} failover {last.pk}"


def shutdown(vm) -> tuple[float, str]:
    last = (vm.failovers.filter(kind=FailoverKind.LIVE, steps__name="shut down source",
                                steps__status="done").order_by("-created_at").first())
    if last is not None:
        step = last.steps.filter(name="shut down source").first()
        return step.seconds or 0.0, f"live failover {last.pk}"
    if vm.source_kind == SourceKind.VMWARE:
        return settings.FAILOVER_SHUTDOWN_TIMEOUT_S, "never measured: the shutdown timeout"
    return 0.0, "a disk image has no shutdown"


def downtime(vm, now=None) -> dict:
    """{"shutdown_s", "final_cycle_s", "boot_s", "total_s", "basis": {part: why}};
    total_s is None while a part cannot be forecast."""
    shutdown_s, shutdown_why = shutdown(vm)
    cycle_s, cycle_why = final_cycle(vm, now)
    boot_s, boot_why = boot(vm)
    parts = (shutdown_s, cycle_s, boot_s)
    total = None if any(p is None for p in parts) else round(sum(parts), 1)
    return {"shutdown_s": round(shutdown_s, 1), "final_cycle_s": None if cycle_s is None else round(cycle_s, 1),
            "boot_s": None if boot_s is None else round(boot_s, 1), "total_s": total,
            "basis": {"shutdown": shutdown_why, "final_cycle": cycle_why, "boot": boot_why}}
