"""Prometheus metrics, read from the database at each scrape (one writer per
fact: the jobs, the admission queue and the poller's record stay the only
source; nothing is counted twice in memory). Served at /metrics behind the
API's authentication (a session or an API token)."""

from __future__ import annotations

from django.db.models import Count, Sum
from django.utils import timezone
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from replication.choices import JOB_ACTIVE, JobStatus
from replication.figures import shown_rate_sum

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
                                       "Throughput of each running replication job (the sum of its disks', "
                                       "as the pages show it)", labels=["vm", "agent"])
        for vm, agent, rate in (ReplicationJob.objects.filter(status__in=JOB_ACTIVE)
                                .values_list("vm__name", "vm__agent").annotate(rate=shown_rate_sum("disks__"))
                                .order_by()):
            throughput.add_metric([vm, agent], rate)
        yield throughput
        yield from _agent_metrics()


def _agent_metrics():
    """Per agent, one series each (agents are records: bounded): its state,
    seconds since its API last answered, copies running and their bytes/s."""
    from replication.choices import DiskStatus
    from replication.models import Agent, VMDisk

    now = timezone.now()
    records = list(Agent.objects.values_list("name", "state", "last_seen_at"))
    copies = {agent: (n, rate or 0) for agent, n, rate in
              VMDisk.objects.filter(status=DiskStatus.COPYING).values_list("job__vm__agent")
              .annotate(n=Count("id"), rate=shown_rate_sum()).order_by()}
    state = GaugeMetricFamily("oma_agent_state", "Each agent's state (1 for the state it is in)",
                              labels=["agent", "state"])
    seen = GaugeMetricFamily("oma_agent_last_seen_seconds",
                             "Seconds since each agent's progress API last answered (NaN: never)", labels=["agent"])
    running = GaugeMetricFamily("oma_agent_copies_running", "Disk copies each agent runs", labels=["agent"])
    rate = GaugeMetricFamily("oma_agent_throughput_bytes_per_second", "Each agent's copy throughput, all disks",
                             labels=["agent"])
    for name, current, last_seen in records:
        state.add_metric([name, current], 1)
        seen.add_metric([name], float("nan") if last_seen is None else max(0.0, (now - last_seen).total_seconds()))
    for name in sorted({name for name, _, _ in records} | set(copies)):
        n, bps = copies.get(name, (0, 0))
        running.add_metric([name], n)
        rate.add_metric([name], bps)
    yield from (state, seen, running, rate)


REGISTRY = CollectorRegistry(auto_describe=False)
REGISTRY.register(OMACollector())
