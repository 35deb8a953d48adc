"""Scheduler overhead: 500 VMs in 10 protection groups (limit 5 each), spread
over 10 agents (AGENT_MAX_VMS each). Times each scheduling pass and counts
its database queries:

  due (cold)    a group comes due with nothing running: its 50 VMs queue and
                admission starts what the limits allow
  due (steady)  a group comes due while its cycles run: skips recorded, the
                rest already waiting, admission finds no slot
  job ended     a cycle completes: retries/flags checked, the freed slot
                admitted

Jobs are created for real (start_replication) but not run: their prepare is
not queued. Uses a throwaway SQLite database unless DATABASE_URL is given
(e.g. mysql://root@127.0.0.1:3306/oma_bench for MariaDB), and Redis for the
admission lock (CELERY_BROKER_URL, default redis://127.0.0.1:6379/14).

    .venv/bin/python -m bench.scheduler_bench [--vms 500] [--groups 10] [--reps 5]
"""

import argparse
import os
import statistics
import tempfile
import time

from bench.common import setup_django


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vms", type=int, default=500)
    parser.add_argument("--groups", type=int, default=10)
    parser.add_argument("--agents", type=int, default=10)
    parser.add_argument("--limit", type=int, default=5)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="scheduler-bench-")
    os.environ.setdefault("DATABASE_URL", f"sqlite:///{workdir}/bench.sqlite3")
    os.environ.setdefault("CELERY_BROKER_URL", "redis://127.0.0.1:6379/14")
    os.environ["DEBUG"] = "false"
    setup_django()
    from django.conf import settings
    from django.core.management import call_command
    from django.db import connection
    from django.test.utils import CaptureQueriesContext
    from django.utils import timezone

    from replication.choices import JOB_ACTIVE, JobStatus
    from replication.models import Admission, ProtectionGroup, ReplicationJob, SourceDisk, VirtualMachine
    from replication.services import jobs, scheduler

    call_command("migrate", verbosity=0)
    jobs.enqueue_prepare = lambda job_id: None  # created, never run
    jobs.enqueue_job_ended = lambda job_id: None  # the bench calls job_ended itself, timed
    groups = [scheduler.create_group(f"bench-g{g}", max_concurrent=args.limit) for g in range(args.groups)]
    for index in range(args.vms):
        vm = VirtualMachine.objects.create(name=f"bench-vm-{index:04d}", agent=f"agent-{index % args.agents}",
                                           group=groups[index % args.groups])
        SourceDisk.objects.create(vm=vm, disk_key="disk-2000", locator=f"/img/{index}.img", capacity_bytes=1 << 30)
    print(f"scheduler benchmark: {args.vms} VMs in {args.groups} groups (limit {args.limit}), {args.agents} agents "
          f"(AGENT_MAX_VMS {settings.AGENT_MAX_VMS}, AGENT_MAX_DISKS {settings.AGENT_MAX_DISKS}), "
          f"{connection.vendor} database, {args.reps} reps")

    samples = {"due (cold)": [], "due (steady)": [], "job ended": []}

    def timed(kind, call):
        with CaptureQueriesContext(connection) as queries:
            started = time.perf_counter()
            call()
            seconds = time.perf_counter() - started
        samples[kind].append((seconds, len(queries)))

    for _ in range(args.reps):
        for group in groups:
            timed("due (cold)", lambda group=group: scheduler.group_due(group.pk))
        running = ReplicationJob.objects.filter(status__in=JOB_ACTIVE).count()
        for group in groups:
            timed("due (steady)", lambda group=group: scheduler.group_due(group.pk))
        ended = list(ReplicationJob.objects.filter(status__in=JOB_ACTIVE).values_list("pk", flat=True))
        for job_id in ended:
            now = timezone.now()
            ReplicationJob.objects.filter(pk=job_id).update(status=JobStatus.COMPLETED, recovery_point_at=now,
                                                            started_at=now, completed_at=now)
            timed("job ended", lambda job_id=job_id: scheduler.job_ended(job_id))
        # Back to a clean slate for the next rep: nothing running, nothing waiting.
        ReplicationJob.objects.filter(status__in=JOB_ACTIVE).update(status=JobStatus.CANCELLED)
        Admission.objects.all().delete()
    print(f"  (first rep: {running} cycles running after the cold ticks)")
    print(f"  {'pass':<14} {'median ms':>10} {'p95 ms':>8} {'queries (median)':>17} {'queries (max)':>14} "
          f"{'passes':>7}")
    for kind, values in samples.items():
        times = sorted(v[0] * 1000 for v in values)
        queries = [v[1] for v in values]
        p95 = times[min(len(times) - 1, int(len(times) * 0.95))]
        print(f"  {kind:<14} {statistics.median(times):>10.1f} {p95:>8.1f} {statistics.median(queries):>17.0f} "
              f"{max(queries):>14} {len(values):>7}")
    print(f"  groups: {ProtectionGroup.objects.count()}, VMs: {VirtualMachine.objects.count()}")


if __name__ == "__main__":
    main()
