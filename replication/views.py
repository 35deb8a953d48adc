"""The operator's pages. They read the database only, so they keep working
while Redis is down; actions that must queue work say so when it fails."""

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.db.models import Count, OuterRef, Prefetch, Subquery, Sum
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_POST

from replication.choices import JOB_ACTIVE, FailoverKind, JobStatus, SyncType
from replication.lifecycle import FailoverJob, VMContext
from replication.models import ReplicationJob, TargetVolume, VirtualMachine, VMDisk
from replication.services import failover as failover_service
from replication.services import failover_checks, forecast
from replication.services import jobs as job_service

RECENT_FAILURES = 10


def jobs_with_disks():
    return ReplicationJob.objects.select_related("vm").prefetch_related(
        Prefetch("disks", queryset=VMDisk.objects.order_by("disk_key"))
    )


def dashboard_context() -> dict:
    active = list(jobs_with_disks().filter(status__in=JOB_ACTIVE).order_by("created_at"))
    counts = dict(ReplicationJob.objects.values_list("status").annotate(n=Count("id")))
    return {
        "counts": [(status.label, counts.get(status.value, 0), status.value) for status in JobStatus],
        "throughput_now": sum(job.throughput_bps for job in active),
        "active_jobs": active,
        "recent_failures": ReplicationJob.objects.select_related("vm").filter(status=JobStatus.FAILED)
        .order_by("-completed_at")[:RECENT_FAILURES],
    }


def _page(request, template, context):
    return render(request, template, {"flower_url": settings.FLOWER_URL, **context})


@login_required
def dashboard(request):
    return _page(request, "replication/dashboard.html", dashboard_context())


@login_required
def dashboard_fragment(request):
    return render(request, "replication/_dashboard_body.html", dashboard_context())


CHART_WIDTH, CHART_HEIGHT, CHART_POINTS = 600, 120, 300
CHART_LEFT, CHART_BOTTOM, CHART_TOP = 78, 20, 8  # room for the axes' labels


def throughput_chart(samples: list) -> dict | None:
    """Server-side SVG geometry for throughput over time, with both axes
    scaled and labelled (rate in IEC units, time since the first sample);
    None with < 2 samples."""
    from vma_agent.units import iec_rate

    if len(samples) < 2:
        return None
    step = max(1, len(samples) // CHART_POINTS)
    samples = samples[::step]
    start, end = samples[0].at, samples[-1].at
    span = max((end - start).total_seconds(), 1e-9)
    peak = max(max(s.throughput_bps for s in samples), 1)
    plot_w, plot_h = CHART_WIDTH - CHART_LEFT, CHART_HEIGHT - CHART_BOTTOM - CHART_TOP

    def x(seconds: float) -> float:
        return CHART_LEFT + seconds / span * plot_w

    def y(rate: float) -> float:
        return CHART_TOP + plot_h - rate / peak * plot_h

    points = " ".join(f"{x((s.at - start).total_seconds()):.1f},{y(s.throughput_bps):.1f}" for s in samples)
    y_ticks = [(round(y(peak * f), 1), iec_rate(peak * f)) for f in (0, 0.5, 1)]
    x_ticks = [(round(x(span * f), 1), f"{span * f:.0f} s") for f in (0, 0.5, 1)]
    return {"points": points, "peak_bps": peak, "seconds": int(span), "width": CHART_WIDTH,
            "height": CHART_HEIGHT, "left": CHART_LEFT, "top": CHART_TOP, "bottom": CHART_TOP + plot_h,
            "right": CHART_WIDTH, "y_ticks": y_ticks, "x_ticks": x_ticks}


def _job_context(job_id: str) -> dict:
    job = get_object_or_404(jobs_with_disks().prefetch_related("events"), pk=job_id)
    return {"job": job, "chart": throughput_chart(list(job.samples.all()))}


@login_required
def job_detail(request, job_id):
    return _page(request, "replication/job_detail.html", _job_context(job_id))


@login_required
def job_fragment(request, job_id):
    return render(request, "replication/_job_body.html", _job_context(job_id))


@login_required
@require_POST
def job_cancel(request, job_id):
    job = get_object_or_404(ReplicationJob, pk=job_id)
    if job_service.cancel_job(job.id):
        messages.info(request, f"Job {job.id} cancelled; its copies stop within seconds.")
    else:
        messages.error(request, f"Job {job.id} is already {job.status} and cannot be cancelled.")
    return redirect("job-detail", job_id=job.id)


@login_required
@require_POST
def job_retry(request, job_id):
    job = get_object_or_404(ReplicationJob, pk=job_id)
    try:
        new_job = job_service.retry_job(job.id)
    except job_service.ReplicationError as exc:
        messages.error(request, str(exc))
        return redirect("job-detail", job_id=job.id)
    messages.info(request, f"Started job {new_job.id} to retry {job.id}.")
    return redirect("job-detail", job_id=new_job.id)


@login_required
def vm_list(request):
    # The newest job of each VM in one subquery, not by reading every job ever run.
    newest = ReplicationJob.objects.filter(vm=OuterRef("pk")).order_by("-created_at").values("id")[:1]
    newest_failover = FailoverJob.objects.filter(vm=OuterRef("pk")).order_by("-created_at").values("id")[:1]
    vms = list(VirtualMachine.objects.select_related("context").prefetch_related("disks__target_volume")
               .annotate(last_job_id=Subquery(newest), last_failover_id=Subquery(newest_failover)))
    last_jobs = ReplicationJob.objects.in_bulk([vm.last_job_id for vm in vms if vm.last_job_id])
    failovers = FailoverJob.objects.in_bulk([vm.last_failover_id for vm in vms if vm.last_failover_id])
    rows = [(vm, last_jobs.get(vm.last_job_id), failovers.get(vm.last_failover_id)) for vm in vms]
    return _page(request, "replication/vm_list.html", {"rows": rows, "sync_types": SyncType.choices})


@login_required
@require_POST
def vm_replicate(request, vm_id):
    vm = get_object_or_404(VirtualMachine, pk=vm_id)
    sync_type = request.POST.get("sync_type", SyncType.FULL)
    if sync_type not in SyncType.values:
        messages.error(request, f"Unknown replication type {sync_type!r}.")
        return redirect("vm-list")
    overrides = [o for o in request.POST.getlist("allow") if o]
    try:
        job = job_service.start_replication(vm, sync_type, verify=request.POST.get("verify") == "on",
                                            overrides=overrides)
    except job_service.ReplicationError as exc:
        messages.error(request, str(exc))
        return redirect("vm-list")
    messages.info(request, f"Started {sync_type} replication {job.id} of {vm.name}.")
    return redirect("job-detail", job_id=job.id)


def _start(request, vm, start, started: str):
    """Start a failover or rollback of the VM: its page on success (the steps
    live), the VM list with the reason otherwise. `started` is the message,
    formatted with the job and the VM."""
    try:
        job = start(vm, actor=request.user.get_username())
    except failover_service.FailoverError as exc:
        messages.error(request, str(exc))
        return redirect("vm-list")
    messages.info(request, started.format(job=job, vm=vm))
    return redirect("failover-detail", failover_id=job.pk)


@login_required
@require_POST
def vm_failover_test(request, vm_id):
    return _start(request, get_object_or_404(VirtualMachine, pk=vm_id),
                  lambda vm, actor: failover_service.start_failover(vm, FailoverKind.TEST, actor=actor),
                  "Test failover {job.pk} of {vm.name} started: it boots {job.destination_vm} from the replica of "
                  "{job.replication_job_id}; cycles pause until it ends.")


@login_required
@require_POST
def vm_failover_end(request, vm_id):
    vm = get_object_or_404(VirtualMachine, pk=vm_id)
    try:
        job = failover_service.end_test_failover(vm, actor=request.user.get_username())
    except failover_service.FailoverError as exc:
        messages.error(request, str(exc))
    else:
        messages.info(request, f"Test failover {job.pk} of {vm.name} ended: {job.destination_vm} and its "
                               "overlays removed, the replica as it was.")
    return redirect("vm-list")


def _failover_context(failover_id: int) -> dict:
    from django.utils import timezone

    failover = get_object_or_404(FailoverJob.objects.select_related("vm__context"), pk=failover_id)
    steps = list(failover.steps.all())
    now = timezone.now()
    for step in steps:
        step.running_s = (now - step.started_at).total_seconds()
    context = VMContext.of(failover.vm)
    history = list(context.changes.order_by("-at", "-id")[:12])
    return {"failover": failover, "steps": steps, "history": history}


@login_required
def failover_detail(request, failover_id):
    return _page(request, "replication/failover_detail.html", _failover_context(failover_id))


@login_required
def failover_fragment(request, failover_id):
    return render(request, "replication/_failover_body.html", _failover_context(failover_id))


@login_required
def vm_failover_live(request, vm_id):
    """GET: the confirmation, with every preflight check and the downtime
    forecast; POST: shut the source down and fail over."""
    vm = get_object_or_404(VirtualMachine, pk=vm_id)
    if request.method != "POST":
        checks = failover_checks.report(vm, failover_service.destination_name(vm, FailoverKind.LIVE))
        return _page(request, "replication/failover_live.html",
                     {"vm": vm, "checks": checks, "ready": all(c["ok"] for c in checks),
                      "forecast": forecast.downtime(vm)})
    return _start(request, vm, lambda vm, actor: failover_service.start_failover(vm, FailoverKind.LIVE, actor=actor),
                  "Live failover {job.pk} of {vm.name} started: the source shuts down, a final cycle runs, then "
                  "{job.destination_vm} boots.")


@login_required
@require_POST
def vm_rollback(request, vm_id):
    return _start(request, get_object_or_404(VirtualMachine, pk=vm_id), failover_service.start_rollback,
                  "Rollback {job.pk} of {vm.name} started: {job.destination_vm} is destroyed, the volumes go back "
                  "to the rollback point and the source powers on.")


@login_required
def cloud(request):
    from replication.cloudstack.models import CloudStackConfig

    config = CloudStackConfig.objects.filter(is_active=True).order_by("-created_at").first()
    return _page(request, "replication/cloud.html", {"config": config})


@login_required
@require_POST
def cloud_check(request):
    """Ask the cloud about the config's credentials and ids, and compare its
    volumes with the records."""
    from replication.cloudstack.client import CloudClient
    from replication.cloudstack.drift import drift
    from replication.cloudstack.models import CloudError, CloudStackConfig

    config = CloudStackConfig.objects.filter(is_active=True).order_by("-created_at").first()
    context = {"config": config, "checked": True}
    if config is not None:
        try:
            context.update(found=CloudClient(config, job_timeout_s=30).check(), drift=drift(config))
        except CloudError as exc:
            context["error"] = str(exc)
    return _page(request, "replication/cloud.html", context)


@login_required
def sources(request):
    """vCenters (add one: fetch its certificate, trust it, give the user and
    password) and image/NBD VMs (add one through add_vm's checks)."""
    from replication.models import VCenter
    from replication.services import sources as source_service
    from replication.services import vmware as vmware_service
    from replication.services.inventory import InventoryError, register_image_vm
    from vma_agent.vmware import VSphereError

    context = {"form": {}, "image_form": {}}
    if request.method == "POST":
        step = request.POST.get("step")
        data = request.POST
        try:
            if step == "fetch":
                port = int(data.get("port") or 443)
                context["form"] = {"host": data.get("host", "").strip(), "port": port}
                context["form"]["thumbprint"] = source_service.certificate_thumbprint(context["form"]["host"], port)
                context["fetched"] = True
            elif step == "add":
                context["form"] = {k: data.get(k, "").strip() for k in ("host", "port", "thumbprint", "name", "user")}
                context["fetched"] = True
                vcenter = source_service.add_vcenter(context["form"]["name"], context["form"]["host"],
                                                     int(context["form"]["port"]), context["form"]["user"],
                                                     data.get("password", ""), context["form"]["thumbprint"])
                messages.info(request, f"vCenter {vcenter.name} added; choose which of its VMs to protect.")
                return redirect("vcenter-inventory", vcenter_id=vcenter.pk)
            elif step == "image":
                context["image_form"] = {k: data.get(k, "") for k in ("name", "disks", "cpus", "memory_mib")}
                vm = register_image_vm(data.get("name", ""), [line.strip() for line in data.get("disks", "")
                                                              .splitlines() if line.strip()],
                                       cpus=int(data["cpus"]) if data.get("cpus") else None,
                                       memory_mib=int(data["memory_mib"]) if data.get("memory_mib") else None,
                                       firmware=data.get("firmware") or "bios")
                messages.info(request, f"VM {vm.name} added with {vm.disks.count()} disk(s).")
                return redirect("vm-list")
        except (vmware_service.VCenterConfigError, VSphereError, ValueError) as exc:
            context["vcenter_error"] = str(exc)
        except InventoryError as exc:
            context["image_error"] = str(exc)
    context["vcenters"] = VCenter.objects.order_by("name")
    return _page(request, "replication/sources.html", context)


@login_required
def vcenter_inventory(request, vcenter_id):
    """The vCenter's VMs; the chosen ones are recorded (discovered) for protection."""
    from replication.models import VCenter
    from replication.services import sources as source_service
    from replication.services import vmware as vmware_service
    from vma_agent.vmware import VSphereError

    vcenter = get_object_or_404(VCenter, pk=vcenter_id)
    if request.method == "POST":
        names = request.POST.getlist("vm")
        try:
            recorded = vmware_service.discover(vcenter, names) if names else []
        except (vmware_service.VCenterConfigError, VSphereError) as exc:
            messages.error(request, str(exc))
        else:
            messages.info(request, f"{len(recorded)} VM(s) of {vcenter.name} protected: "
                                   f"{', '.join(vm.name for vm in recorded) or 'none chosen'}.")
            return redirect("vm-list")
    try:
        vms, error = source_service.inventory(vcenter), ""
    except (vmware_service.VCenterConfigError, VSphereError) as exc:
        vms, error = [], str(exc)
    return _page(request, "replication/vcenter_inventory.html", {"vcenter": vcenter, "vms": vms, "error": error})


@login_required
def volume_list(request):
    volumes = TargetVolume.objects.select_related("source_disk__vm").order_by("source_disk__vm__name",
                                                                            "source_disk__disk_key")
    total = volumes.aggregate(size=Sum("size_bytes"))["size"] or 0
    return _page(request, "replication/volume_list.html", {"volumes": volumes, "total_size": total})
