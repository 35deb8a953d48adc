"""The dashboard and the job pages: what runs, what failed, each job's
disks, throughput chart and timeline; cancel, retry and limit a job. The
pages read the database only, so they keep working while Redis is down;
actions that must queue work say so when it fails."""

from django.contrib import messages
from django.db.models import Count
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_POST

from replication.choices import JOB_ACTIVE, JobStatus
from replication.figures import job_figures
from replication.models import ReplicationJob, VirtualMachine
from replication.roles import OPERATE, READ, actor_of, log_admin, page_permission
from replication.services import jobs as job_service
from replication.services import limits, rpo
from replication.views.common import jobs_with_disks, render_page
from vma_agent.units import parse_rate

RECENT_FAILURES = 10


def dashboard_context() -> dict:
    active = list(jobs_with_disks().filter(status__in=JOB_ACTIVE).order_by("created_at"))
    for job in active:
        job.figures = job_figures(job)
    counts = dict(ReplicationJob.objects.values_list("status").annotate(n=Count("id")))
    return {
        "counts": [(status.label, counts.get(status.value, 0), status.value) for status in JobStatus],
        "throughput_now": sum(job.figures.rate_bps for job in active),
        "active_jobs": active,
        "recent_failures": ReplicationJob.objects.select_related("vm").filter(status=JobStatus.FAILED)
        .order_by("-completed_at")[:RECENT_FAILURES],
        "recovery_points": rpo.with_drills(rpo.recovery_points(VirtualMachine.objects.filter(group__isnull=False))),
    }


@page_permission(READ)
def dashboard(request):
    return render_page(request, "replication/dashboard.html", dashboard_context())


@page_permission(READ)
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
    return {"job": job, "figures": job_figures(job), "chart": throughput_chart(list(job.samples.all()))}


@page_permission(READ)
def job_detail(request, job_id):
    return render_page(request, "replication/job_detail.html", _job_context(job_id))


@page_permission(READ)
def job_fragment(request, job_id):
    return render(request, "replication/_job_body.html", _job_context(job_id))


@require_POST
@page_permission(OPERATE)
def job_cancel(request, job_id):
    job = get_object_or_404(ReplicationJob, pk=job_id)
    if job_service.cancel_job(job.id, actor=actor_of(request)):
        log_admin(request, job, "cancelled from the job page")
        messages.info(request, f"Job {job.id} cancelled; its copies stop within seconds.")
    else:
        messages.error(request, f"Job {job.id} is already {job.status} and cannot be cancelled.")
    return redirect("job-detail", job_id=job.id)


@require_POST
@page_permission(OPERATE)
def job_limit(request, job_id):
    job = get_object_or_404(ReplicationJob, pk=job_id)
    text = request.POST.get("rate", "").strip()
    try:
        rate = None if text.lower() in ("0", "none", "off", "unlimited") else parse_rate(text)
        change = limits.change_limit(job.id, rate, actor=actor_of(request))
    except (ValueError, limits.LimitError) as exc:
        # A refused rate is the request's fault: the page again, with the reason, as a 400.
        messages.error(request, str(exc))
        response = render_page(request, "replication/job_detail.html", _job_context(job.id))
        response.status_code = 400
        return response
    log_admin(request, job, f"bandwidth limit {change.label} per disk")
    if change.agent_error:
        messages.error(request, f"Limit {change.label} per disk recorded, but the agent was not told "
                                f"({change.agent_error}): running copies keep their limit.")
    else:
        messages.info(request, f"Limit {change.label} per disk; the running copies follow within seconds.")
    return redirect("job-detail", job_id=job.id)


@require_POST
@page_permission(OPERATE)
def job_retry(request, job_id):
    job = get_object_or_404(ReplicationJob, pk=job_id)
    try:
        new_job = job_service.retry_job(job.id, actor=actor_of(request))
    except job_service.ReplicationError as exc:
        messages.error(request, str(exc))
        return redirect("job-detail", job_id=job.id)
    log_admin(request, job, f"retried as {new_job.id}")
    messages.info(request, f"Started job {new_job.id} to retry {job.id}.")
    return redirect("job-detail", job_id=new_job.id)
