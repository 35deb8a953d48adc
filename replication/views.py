from django.contrib.auth.decorators import login_required
from django.shortcuts import render

from replication.models import ReplicationJob


@login_required
def job_list(request):
    jobs = ReplicationJob.objects.select_related("vm").prefetch_related("disks")[:100]
    return render(request, "replication/job_list.html", {"jobs": jobs})
