"""Prometheus metrics, read from the database at each scrape (one writer per
fact: the jobs, the admission queue and the poller's record stay the only
source; nothing is counted twice in memory). Served at /metrics behind the
API's authentication (a session or an API token)."""

from __future__ import annotations

from django.db.models import Count, F, Sum
from django.utils import timezone
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from replication.choices import JOB_ACTIVE, JobStatus

# Cycle durations, seconds: from a small incremental to a large full copy.
CYCLE_BUCKETS = (5, 15, 30, 60, 120, 300, 600, 1800, 3600, 3 * 3600, 12 * 3600, 24 * 3600)


class OMACollector:
    def collect(self):
        from replication.choices import AdmissionStatus
        from replication.models import Admission, ReplicationJob
        from replication.services import progress, rpo

        jobs = GaugeMetricFamily("oma_jobs", "Replication jobs by status", labels=["status"])
        counts = dict(ReplicationJob.objects.values_list("status").annotate(n=Count("id")))
        for status in JobStatus.values:
            jobs.add_metric([status], counts.get(status, 0))
        yield jobs

        copied = CounterMetricFamily("oma_copied_bytes", "Data copied by replication cycles, per VM and agent",
                                     labels=["vm", "agent"])
        for vm, agent, total in (ReplicationJob.objects.values_list("vm__name", "vm__agent")
                                 .annotate(total=Sum("bytes_transferred"))):
            copied.add_metric([vm, agent], total or 0)
        yield copied

        durations = [(job.completed_at - job.started_at).total_seconds() for job in
                     ReplicationJob.objects.filter(status=JobStatus.COMPLETED, started_at__isnull=False,
                                                   completed_at__isnull=False).only("started_at", "completed_at")]
        buckets = [(str(bound), sum(1 for d in durations if d <= bound)) for bound in CYCLE_BUCKETS]
        yield HistogramMetricFamily("oma_cycle_duration_seconds", "Completed replication cycles by duration",
                                    buckets=[*buckets, ("+Inf", len(durations))], sum_value=sum(durations))

        ages = GaugeMetricFamily("oma_vm_rpo_age_seconds", "Age of each VM's recovery point (VMs with one)",
                                 labels=["vm", "group"])
        for point in rpo.recovery_points():
            if point.age_s is not None:
                ages.add_metric([point.vm.name, point.vm.group.name if point.vm.group_id else ""], point.age_s)
        yield ages

        waiting = Admission.objects.filter(status=AdmissionStatus.WAITING).count()
        yield GaugeMetricFamily("oma_admission_waiting", "VMs waiting for a slot to start a scheduled cycle",
                                value=waiting)

        lag = progress.poller_lag_s(timezone.now())
        yield GaugeMetricFamily("oma_progress_poller_lag_seconds",
                                "Seconds since the progress poller's last pass (NaN: it never ran)",
                                value=float("nan") if lag is None else lag)

        throughput = GaugeMetricFamily("oma_copy_throughput_bytes_per_second",
                                       "Throughput of each running replication job", labels=["vm", "agent"])
        for vm, agent, rate in (ReplicationJob.objects.filter(status__in=JOB_ACTIVE)
                                .values_list("vm__name", "vm__agent", F("throughput_bps"))):
            throughput.add_metric([vm, agent], rate)
        yield throughput


REGISTRY = CollectorRegistry(auto_describe=False)
REGISTRY.register(OMACollector())
