"""Scheduled protection on the pages and for scripts: the Protection page
(groups, each with its recent drills and, for operators, a button running
one now; the admission queue with each VM's place, recent decisions, flagged
VMs), recovery points as JSON (/api/rpo/), and the Prometheus metrics."""

from django.db.models import Prefetch
from django.http import HttpResponse, JsonResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from replication.choices import AdmissionStatus
from replication.metrics import REGISTRY
from replication.models import Admission, DrillRun, ProtectionGroup
from replication.roles import READ, page_permission
from replication.services import rpo, scheduler
from replication.views.api import api_view
from replication.views.common import render_page

RECENT_DECISIONS = 30
RECENT_DRILL_RUNS = 10  # per group: a drill of a small group, and the one before


def protection_context() -> dict:
    # Each group's latest drill runs, newest first (queued, running, passed
    # or failed): one query for every group (a sliced prefetch).
    groups = list(ProtectionGroup.objects.prefetch_related(Prefetch(
        "drills", DrillRun.objects.select_related("vm", "failover")[:RECENT_DRILL_RUNS], to_attr="recent_drills")))
    points = rpo.with_drills(rpo.recovery_points(rpo_vms()))
    by_group: dict[int, list] = {group.pk: [] for group in groups}
    for point in points:
        by_group[point.vm.group_id].append(point)
    queue = list(scheduler.waiting_queue())
    return {
        "groups": [(group, by_group[group.pk], group.recent_drills) for group in groups],
        "queue": [(place, entry) for place, entry in enumerate(queue, start=1)],
        "decisions": Admission.objects.exclude(status=AdmissionStatus.WAITING).select_related("vm", "group", "job")
        [:RECENT_DECISIONS],
        "over_target": [point for point in points if point.over_target],
        "flagged": [point for point in points if point.vm.protection_flag],
    }


def rpo_vms():
    from replication.models import VirtualMachine

    return VirtualMachine.objects.filter(group__isnull=False)


@page_permission(READ)
def protection(request):
    return render_page(request, "replication/protection.html", protection_context())


@api_view
def rpo_list(request):
    """Every VM's recovery point and its age; those in a group against its target."""
    points = rpo.with_drills(rpo.recovery_points())
    return JsonResponse({"vms": [point.as_dict() for point in points],
                         "over_target": [point.vm.name for point in points if point.over_target]})


@api_view
def metrics(request):
    return HttpResponse(generate_latest(REGISTRY), content_type=CONTENT_TYPE_LATEST)
