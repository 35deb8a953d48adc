"""The VM pages: the VM list (last cycle, last failover, its recovery
points), start a cycle, the replica volumes; start a test or live failover
from a chosen recovery point (live also with the source site lost), a
rollback or a commit, follow its steps live, end a test."""

from collections import defaultdict

from django.contrib import messages
from django.core.paginator import Paginator
from django.db.models import F, OuterRef, Q, Subquery, Sum, Value
from django.db.models.functions import Coalesce
from django.shortcuts import get_object_or_404, redirect, render
from django.utils import timezone
from django.views.decorators.http import require_POST

from replication.choices import FailoverKind, VMState, VolumeProvider
from replication.models import FailoverJob, RecoveryPoint, ReplicationJob, TargetVolume, VirtualMachine, VMContext
from replication.platforms import on_cloudstack
from replication.roles import ADMINISTER, OPERATE, READ, actor_of, log_admin, page_permission
from replication.services import failover as failover_service
from replication.services import failover_checks, forecast, hardware, rpo
from replication.services import jobs as job_service
from replication.services.inventory import label_disks
from replication.services.points import PointError
from replication.views.common import render_page

# What the Replicate button offers; the first is the default.

FAILOVER_FROM = (VMState.READY_FOR_FAILOVER, VMState.REPLICATING, VMState.FAILED)


# The VMs table's columns an operator may sort by (?sort=NAME, ?sort=-NAME descending).
SORTS = {"name": "name", "state": "state_key", "agent": "agent", "source": "source_kind",
         "last": "last_job_at", "point": "recovery_point"}
VMS_PER_PAGE = 50


def _vm_rows(request):
    """The VMs the table shows, searched (?q= name or agent, ?state=) and
    sorted (?sort=), unevaluated: one query whatever the number of VMs."""
    newest = ReplicationJob.objects.filter(vm=OuterRef("pk")).order_by("-created_at")
    newest_failover = FailoverJob.objects.filter(vm=OuterRef("pk")).order_by("-created_at").values("id")[:1]
    state = request.GET.get("state", "")
    # Decommissioned VMs are hidden unless asked for (?state=decommissioned).
    shown = VirtualMachine.objects if state == VMState.DECOMMISSIONED else VirtualMachine.objects.in_service()
    vms = rpo.with_recovery_points(
        shown.select_related("context", "group")
        .annotate(last_job_id=Subquery(newest.values("id")[:1]), last_job_at=Subquery(newest.values("created_at")[:1]),
                  last_failover_id=Subquery(newest_failover),
                  state_key=Coalesce("context__state", Value(VMState.DISCOVERED.value))))
    query = request.GET.get("q", "").strip()
    if query:
        vms = vms.filter(Q(name__icontains=query) | Q(agent__icontains=query))
    if state in VMState.values:
        vms = vms.filter(state_key=state)
    sort = request.GET.get("sort", "name")
    field = SORTS.get(sort.removeprefix("-"), "name")
    order = F(field).desc(nulls_last=True) if sort.startswith("-") else F(field).asc(nulls_first=True)
    return vms.order_by(order, "name", "pk"), {"q": query, "state": state if state in VMState.values else "",
                                              "sort": sort if sort.removeprefix("-") in SORTS else "name"}


@page_permission(READ)
def vm_list(request):
    """The VMs table, 50 a page: its queries are the same few for 5 or 5,000
    VMs (the page's VMs, then their disks, jobs, failovers and points)."""
    vms, search = _vm_rows(request)
    page = Paginator(vms, VMS_PER_PAGE).get_page(request.GET.get("page"))
    vms = list(page.object_list.prefetch_related("disks__target_volume"))
    last_jobs = ReplicationJob.objects.in_bulk([vm.last_job_id for vm in vms if vm.last_job_id])
    failovers = FailoverJob.objects.in_bulk([vm.last_failover_id for vm in vms if vm.last_failover_id])
    sealed = defaultdict(list)
    for point in RecoveryPoint.objects.filter(vm__in=vms, status=RecoveryPoint.Status.SEALED).order_by(
            "-frozen_at", "-id"):
        sealed[point.vm_id].append(point)
    now = timezone.now()
    for vm in vms:
        vm.points_summary = _summary(sealed[vm.pk], now)
        vm.points = _bootable(sealed[vm.pk], _volumes_on_cloudstack(vm))
        vm.labelled_disks = label_disks(vm.disks.all())
        # A cycle running or failed leaves every point as it was: a test failover may boot one beside it.
        vm.may_fail_over = bool(vm.points) and vm.lifecycle_state in FAILOVER_FROM
        context = getattr(vm, "context", None)
        # What its next failover boots with (a VM never moved has no context yet: the defaults, no query).
        vm.hardware = hardware.for_vm(vm, context=context or VMContext(vm=vm))
        # The decision's own warning, else what its last failover recorded.
        vm.hardware_warning = vm.hardware.warning or (context.hardware_warning if context else "")
    rows = [(vm, last_jobs.get(vm.last_job_id), failovers.get(vm.last_failover_id), rpo.recovery_point(vm, now))
            for vm in vms]
    searching = bool(search["q"] or search["state"])
    return render_page(request, "replication/vm_list.html", {
        "rows": rows, "page": page, "search": search, "searching": searching, "states": VMState.choices,
        "headers": _headers(search["sort"]),
        "any_vm": bool(rows) or (searching and VirtualMachine.objects.exists()),
        "sync_types": job_service.SYNC_TYPE_CHOICES})


COLUMNS = [("name", "VM"), ("state", "State"), ("source", "Source"), ("agent", "Agent"), (None, "CBT"),
           (None, "Disks"), ("last", "Last replication"), ("point", "Recovery point"), (None, "Recovery points"),
           (None, "Replicate now"), (None, "Failover")]


def _headers(sort: str) -> list[dict]:
    """The table's column headers: a sortable one links to sorting by it
    (ascending, or descending when already sorted ascending by it)."""
    headers = []
    for key, label in COLUMNS:
        current = None if key is None else ("ascending" if sort == key else
                                            "descending" if sort == f"-{key}" else None)
        headers.append({"key": key, "label": label, "current": current,
                        "next": f"-{key}" if current == "ascending" else key})
    return headers


def _summary(sealed: list, now) -> dict:
    """The VM's points as services.points.summary counts them, from a list
    read for every VM at once (newest first)."""
    for point in sealed:
        point.age_s = (now - point.frozen_at).total_seconds()
    return {"count": len(sealed), "newest_age_s": sealed[0].age_s if sealed else None,
            "oldest_age_s": sealed[-1].age_s if sealed else None}


def _volumes_on_cloudstack(vm) -> bool:
    """on_cloudstack from the VM's prefetched disks and volumes (no query)."""
    volumes = [getattr(disk, "target_volume", None) for disk in vm.disks.all()]
    return any(v is not None and v.provider == VolumeProvider.CLOUDSTACK for v in volumes)


def _bootable(sealed: list, in_place: bool) -> list:
    """The points a failover form offers, newest first (it is chosen): all of
    them, or only the newest where failovers boot the volumes in place."""
    return sealed[:1] if in_place else sealed


class BadPoint(ValueError):
    """A form's recovery point is not a point id; the message says so."""


def _point_id(data) -> int | None:
    """The recovery point a failover form chose (None: the newest)."""
    value = (data.get("point") or "").strip()
    if not value:
        return None
    if not (value.isascii() and value.isdigit()):
        raise BadPoint(f"recovery point {value!r} is not a point id")
    return int(value)


@require_POST
@page_permission(OPERATE)
def vm_replicate(request, vm_id):
    vm = get_object_or_404(VirtualMachine, pk=vm_id)
    overrides = [o for o in request.POST.getlist("allow") if o]
    try:
        sync_type = job_service.choose_sync_type(vm, request.POST.get("sync_type", job_service.AUTO))
        job = job_service.start_replication(vm, sync_type, verify=request.POST.get("verify") == "on",
                                            overrides=overrides, actor=actor_of(request))
    except job_service.ReplicationError as exc:
        messages.error(request, str(exc))
        return redirect("vm-list")
    log_admin(request, vm, f"{sync_type} replication {job.id} started")
    messages.info(request, f"Started {sync_type} replication {job.id} of {vm.name}.")
    return redirect("job-detail", job_id=job.id)


@page_permission(READ)
def volume_list(request):
    volumes = TargetVolume.objects.select_related("source_disk__vm").order_by("source_disk__vm__name",
                                                                            "source_disk__disk_key")
    total = volumes.aggregate(size=Sum("size_bytes"))["size"] or 0
    return render_page(request, "replication/volume_list.html", {"volumes": volumes, "total_size": total})


def _start(request, vm, start, started: str, back: str = "vm-list"):
    """Start a failover or rollback of the VM: its page on success (the steps
    live), `back` with the reason otherwise. `started` is the message,
    formatted with the job and the VM."""
    try:
        job = start(vm, actor=actor_of(request))
    except (failover_service.FailoverError, PointError) as exc:
        messages.error(request, str(exc))
        return redirect(back)
    lost = " with the source site lost" if job.source_lost else ""
    point = f" from recovery point {job.recovery_point_id}" if job.recovery_point_id else ""
    log_admin(request, vm, f"{job.kind} failover {job.pk}{lost}{point} started")
    messages.info(request, started.format(job=job, vm=vm))
    return redirect("failover-detail", failover_id=job.pk)


@require_POST
@page_permission(OPERATE)
def vm_failover_test(request, vm_id):
    vm = get_object_or_404(VirtualMachine, pk=vm_id)
    try:
        point_id = _point_id(request.POST)
    except BadPoint as exc:
        messages.error(request, str(exc))
        return redirect("vm-list")
    cycles = ("its cycles wait until it ends (its CloudStack volumes boot in place)" if on_cloudstack(vm) else
              "the VM's cycles go on adding points meanwhile")
    return _start(request, vm,
                  lambda vm, actor: failover_service.start_failover(vm, FailoverKind.TEST, actor=actor,
                                                                    point_id=point_id),
                  "Test failover {job.pk} of {vm.name} started: it boots {job.destination_vm} from recovery point "
                  "{job.recovery_point_id} (cycle {job.replication_job_id}) on overlays of its own; " + cycles + ".")


@require_POST
@page_permission(OPERATE)
def vm_failover_end(request, vm_id):
    vm = get_object_or_404(VirtualMachine, pk=vm_id)
    try:
        job = failover_service.end_test_failover(vm, actor=actor_of(request))
    except failover_service.FailoverError as exc:
        messages.error(request, str(exc))
    else:
        log_admin(request, vm, f"test failover {job.pk} ended")
        messages.info(request, f"Test failover {job.pk} of {vm.name} ended: {job.destination_vm} and its "
                               "overlays removed, every recovery point as it was.")
    return redirect("vm-list")


@require_POST
@page_permission(ADMINISTER)
def vm_failover_commit(request, vm_id):
    """Commit the VM's live failover: it stays on the destination for good;
    no rollback after, its protection ends (its history stays)."""
    vm = get_object_or_404(VirtualMachine, pk=vm_id)
    try:
        job = failover_service.commit_failover(vm, actor=actor_of(request))
    except failover_service.FailoverError as exc:
        messages.error(request, str(exc))
    else:
        log_admin(request, vm, f"live failover {job.pk} committed: no rollback, protection ended")
        messages.info(request, f"Live failover {job.pk} of {vm.name} committed: {job.destination_vm} runs on the "
                               "destination for good. It can no longer be rolled back; its protection ended "
                               "(history kept).")
    return redirect("vm-list")


def _failover_context(failover_id: int) -> dict:
    from django.utils import timezone

    failover = get_object_or_404(FailoverJob.objects.select_related("vm__context", "recovery_point"), pk=failover_id)
    steps = list(failover.steps.all())
    now = timezone.now()
    for step in steps:
        step.running_s = (now - step.started_at).total_seconds()
    context = VMContext.of(failover.vm)
    history = list(context.changes.order_by("-at", "-id")[:12])
    return {"failover": failover, "steps": steps, "history": history}


@page_permission(READ)
def failover_detail(request, failover_id):
    return render_page(request, "replication/failover_detail.html", _failover_context(failover_id))


@page_permission(READ)
def failover_fragment(request, failover_id):
    return render(request, "replication/_failover_body.html", _failover_context(failover_id))


@page_permission(READ, post=ADMINISTER)
def vm_failover_live(request, vm_id):
    """GET: the confirmation, with every preflight check and the downtime
    forecast (anyone may read it); POST: shut the source down and fail
    over (administrators only)."""
    vm = get_object_or_404(VirtualMachine, pk=vm_id)
    if request.method != "POST":
        return _live_confirmation(request, vm)
    back = request.path
    try:
        point_id = _point_id(request.POST)
    except BadPoint as exc:
        messages.error(request, str(exc))
        return redirect(back)
    if request.POST.get("source_lost") != "on":
        return _start(request, vm, lambda vm, actor: failover_service.start_failover(
                          vm, FailoverKind.LIVE, actor=actor, point_id=point_id),
                      "Live failover {job.pk} of {vm.name} started: the source shuts down, a final cycle runs, "
                      "then {job.destination_vm} boots.", back)
    if request.POST.get("confirm_source_lost") != "on":
        messages.error(request, "A failover with the source site lost needs its confirmation ticked: nothing was "
                                "started.")
        return redirect(back)
    return _start(request, vm, lambda vm, actor: failover_service.start_failover(
                      vm, FailoverKind.LIVE, actor=actor, point_id=point_id, source_lost=True),
                  "Live failover {job.pk} of {vm.name} started with the source site lost: no shutdown request, no "
                  "final cycle; {job.destination_vm} boots from recovery point {job.recovery_point_id}.", back)


def _live_confirmation(request, vm):
    """The live failover's confirmation page: the preflight checks, the
    downtime forecast, the recovery point to boot (?point=ID preselects it)
    and the source-site-lost option."""
    checks = failover_checks.report(vm, failover_service.destination_name(vm, FailoverKind.LIVE))
    sealed = list(RecoveryPoint.sealed(vm))
    _summary(sealed, timezone.now())
    sealed = _bootable(sealed, on_cloudstack(vm))
    try:
        chosen = _point_id(request.GET)
    except BadPoint:
        chosen = None
    return render_page(request, "replication/failover_live.html",
                       {"vm": vm, "checks": checks, "ready": all(c["ok"] for c in checks),
                        "forecast": forecast.downtime(vm), "points": sealed,
                        "chosen": chosen if any(p.pk == chosen for p in sealed) else None,
                        "cycle": vm.active_job()})


@require_POST
@page_permission(ADMINISTER)
def vm_rollback(request, vm_id):
    return _start(request, get_object_or_404(VirtualMachine, pk=vm_id), failover_service.start_rollback,
                  "Rollback {job.pk} of {vm.name} started: {job.destination_vm} is destroyed, the volumes go back "
                  "to the rollback point and the source powers on.")
