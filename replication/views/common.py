"""What the pages share: the page renderer (with the links every page
carries) and the job query the dashboard, job pages and the API read."""

from django.conf import settings
from django.db.models import Prefetch
from django.shortcuts import render

from replication.models import ReplicationJob, VMDisk


def jobs_with_disks():
    return ReplicationJob.objects.select_related("vm").prefetch_related(
        Prefetch("disks", queryset=VMDisk.objects.select_related("source_disk").order_by("disk_key"))
    )


def render_page(request, template, context, status: int = 200):
    return render(request, template, {"flower_url": settings.FLOWER_URL, **context}, status=status)
