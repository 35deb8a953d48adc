"""One VM's page: who it is, what it will boot with and why, its protection,
disks, cycles, recovery points (with what retention keeps), failovers,
drills and lifecycle history. Each list shows its newest LIMIT rows with a
"show all" link (?show=cycles ...): the page's queries stay the same few
however long the VM has been protected."""

from django.db.models import F
from django.shortcuts import get_object_or_404
from django.urls import NoReverseMatch, reverse
from django.utils import timezone

from replication.choices import FAILOVER_OPEN
from replication.models import FailoverJob, RecoveryPoint, VirtualMachine, VMContext
from replication.roles import READ, page_permission
from replication.services import hardware, rpo
from replication.services import points as point_service
from replication.services.drills import last_drills
from replication.services.inventory import label_disks
from replication.views.common import render_page

LIMIT = 10
SECTIONS = ("cycles", "points", "failovers", "drills", "history")
HARDWARE_LABELS = {"firmware": "Firmware", "secure_boot": "Secure Boot", "tpm": "vTPM", "disk_bus": "Disk bus",
                   "scsi_model": "SCSI controller", "nic_model": "NIC model"}


def settings_url(vm) -> str | None:
    """The VM's settings page, once that page exists (None before)."""
    try:
        return reverse("vm-settings", args=[vm.pk])
    except NoReverseMatch:
        return None


def _bounded(queryset, section: str, shown: str) -> tuple[list, bool]:
    """The newest LIMIT rows (all of them when the operator asked for this
    section's), and whether more exist."""
    if shown == section:
        return list(queryset), False
    rows = list(queryset[:LIMIT + 1])
    return rows[:LIMIT], len(rows) > LIMIT


def _rate(job) -> int | None:
    """A cycle's rate: its average once ended (bytes over its run time),
    else its current throughput; None when unknown."""
    if job.completed_at and job.started_at:
        seconds = (job.completed_at - job.started_at).total_seconds()
        return int(job.bytes_transferred / seconds) if seconds > 0 else None
    return job.throughput_bps or None


def _points(vm, shown: str, now) -> tuple[list, bool, dict]:
    """The VM's recovery points, newest first, each with what retention
    does with it; and the policy in words."""
    points, more = _bounded(RecoveryPoint.objects.filter(vm=vm).select_related("job").order_by("-frozen_at", "-id"),
                            "points", shown)
    keep, hourly_h, daily_d = point_service.policy(vm)
    sealed = list(RecoveryPoint.sealed(vm).only("id", "frozen_at"))
    kept = point_service.to_keep(sealed, keep, hourly_h, daily_d, now)
    in_use = {}
    for failover in FailoverJob.objects.filter(recovery_point__in=[p.pk for p in points], status__in=FAILOVER_OPEN):
        in_use.setdefault(failover.recovery_point_id, []).append(failover)
    for point in points:
        point.age_s = (now - point.frozen_at).total_seconds()
        point.in_use = in_use.get(point.pk, [])
        if point.status != RecoveryPoint.Status.SEALED:
            point.retention = point.ended_reason or point.get_status_display()
        elif point.pk in kept:
            point.retention = "kept by the policy"
        else:
            point.retention = ("past the policy: kept while a failover boots it or a point above it, expires at the "
                               "next retention after")
    policy = {"keep": keep, "hourly_h": hourly_h, "daily_d": daily_d, "sealed": len(sealed),
              "group": vm.group.name if vm.group_id else None}
    return points, more, policy


@page_permission(READ)
def vm_detail(request, vm_id):
    vm = get_object_or_404(rpo.with_recovery_points(VirtualMachine.objects.select_related("vcenter", "group",
                                                                                          "context")), pk=vm_id)
    shown = request.GET.get("show", "")
    now = timezone.now()
    context = getattr(vm, "context", None)
    decision = hardware.for_vm(vm, context=context or VMContext(vm=vm))  # no context is made by reading
    disks = label_disks(vm.disks.select_related("target_volume"))
    cycles, more_cycles = _bounded(vm.jobs.order_by("-created_at"), "cycles", shown)
    for job in cycles:
        job.rate_bps = _rate(job)
    points, more_points, policy = _points(vm, shown, now)
    failovers, more_failovers = _bounded(vm.failovers.select_related("recovery_point").order_by("-created_at", "-id"),
                                         "failovers", shown)
    drills, more_drills = _bounded(vm.drills.select_related("group", "failover").order_by("-queued_at", "-id"),
                                   "drills", shown)
    history, more_history = ([], False) if context is None else _bounded(
        context.changes.order_by(F("at").desc(), F("id").desc()), "history", shown)
    # When it entered its state: its newest move there (none shown before its first move).
    since = next((change.at for change in history if change.to_state == vm.lifecycle_state), None)
    return render_page(request, "replication/vm_detail.html", {
        "since": since,
        "vm": vm, "context": context, "hardware": decision,
        "hardware_rows": [(HARDWARE_LABELS[key], decision.choices[key]) for key in hardware.KEYS],
        "hardware_warning": decision.warning or (context.hardware_warning if context else ""),
        "point": rpo.recovery_point(vm, now), "last_drill": last_drills([vm.pk]).get(vm.pk),
        "disks": disks, "cycles": cycles, "points": points, "policy": policy, "failovers": failovers,
        "drills": drills, "history": history, "shown": shown,
        "more": {"cycles": more_cycles, "points": more_points, "failovers": more_failovers, "drills": more_drills,
                 "history": more_history},
        "settings_url": settings_url(vm), "limit": LIMIT})
