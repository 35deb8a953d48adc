"""A fleet's control-plane cost: 10 agents, 5,000 VMs, 20,000 disks active
(every VM's cycle replicating, 4 disks each, every disk copying), on
MariaDB by default. Two passes are timed, their database queries counted:

  scheduler pass  admission (services.scheduler.admit: the Redis lock, the
                  in-flight counts per group, agent and ESXi host, the
                  agents' limits, the waiting queue) with every agent at its
                  limit and --waiting more VMs queued behind them (nothing
                  can start: the steady state of a busy fleet)
  ingest pass     the poller's pass (services.progress.poll_once: the
                  active jobs read from the database, each job's records
                  taken from the change feed, classified, applied in
                  batches, the agents marked seen) with the agents' change
                  feeds replaced by synthetic records for every disk: the
                  APPLY PATH ALONE, no HTTP. "moved": every disk advanced
                  1 % since the last pass (each of the 20,000 rows written:
                  the worst case, and the steady state while every disk
                  copies, as PROGRESS_WRITE_INTERVAL_S 2 s < the 5 s pass);
                  "still": nothing arrived in the feeds since (no write)

CPU of an ingest pass is this process's (Python, the driver) and the
database server's (mariadbd, from /proc when readable), as % of one core
at the poller's interval (PROGRESS_POLL_INTERVAL_S, 5 s). Medians over
--reps passes (after one warm-up pass of each kind).

The rows are bulk-created in the state a fleet in flight has (jobs
replicating, disks copying on run 1); no copy runs. Uses a database of its
own, emptied first (oma_fleet_bench on 127.0.0.1:3306 as root, or
BENCH_DATABASE_URL: mysql://root@127.0.0.1:3306/NAME or sqlite:////tmp/NAME.sqlite3)
and Redis database 12 (BENCH_REDIS_URL).

    .venv/bin/python -m bench.fleet_bench [--agents 10] [--vms 5000] [--disks-per-vm 4] [--waiting 500] [--reps 7]
        [--profile]

Measured (issue 30; 2 cores shared with other test runs, load average
about 3, interleaved with the code before it), median of 7: MariaDB 10.11
moved 0.97-1.1 s wall, 490 ms CPU (OMA) + 465 ms (mariadbd), 81 queries;
still 0.09-0.11 s, 80 ms CPU, 41 queries. Before it (the database summing
job totals, recent samples read every pass, querysets for the hot reads,
a CTE for the joined UPDATEs, the collector running within the pass):
moved 1.42-1.45 s, 677 + 505 ms CPU, 92 queries; still 0.14-0.15 s.
Earlier (load average 8-9, so wall times inflated several times; CPU
times are the steadier figures): MariaDB 10.11 moved 2.6 s wall, 985 ms CPU (OMA) + 680 ms
(mariadbd), 96 queries; still 0.26 s, 126 ms CPU, 41 queries; scheduler
0.3 s (112 ms unloaded), 5 queries. SQLite: moved 2.4 s, 1.44 s CPU; still
0.32 s, 107 ms CPU. Before (per-job models, CASE WHEN batches of 50 jobs):
MariaDB moved 5.6 s, 3.9 s + 1.6 s CPU, 722 queries, still 2.3 s, 2.1 s
CPU; SQLite moved 19.5 s, still 8.3 s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import time
from datetime import timedelta
from pathlib import Path

from bench.common import percentile, setup_django

GiB = 1 << 30


def configure() -> None:
    url = os.environ.get("BENCH_DATABASE_URL", "mysql://root@127.0.0.1:3306/oma_fleet_bench")
    if url.startswith("mysql://"):
        # A database of the bench's own (its name ends the URL): emptied first.
        name = url.rsplit("/", 1)[1]
        subprocess.run(["mysql", "-h", "127.0.0.1", "-P", "3306", "-u", "root", "-e",
                        f"DROP DATABASE IF EXISTS `{name}`; CREATE DATABASE `{name}` CHARACTER SET utf8mb4"],
                       check=True)
    elif url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite://")).unlink(missing_ok=True)
    os.environ.update({"DATABASE_URL": url, "DEBUG": "false", "LOG_LEVEL": "ERROR",
                       "CELERY_BROKER_URL": os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/12")})


def populate(args) -> None:
    from django.utils import timezone

    from replication.choices import DiskStatus, JobStatus, Stage, SyncType
    from replication.models import (
        Admission,
        Agent,
        ReplicationJob,
        SourceDisk,
        TargetVolume,
        VirtualMachine,
        VMDisk,
    )
    from replication.services import scheduler

    per_agent = args.vms // args.agents
    Agent.objects.bulk_create([Agent(name=f"site-{a:02d}", max_vms=per_agent, max_disks=per_agent * args.disks_per_vm,
                                     max_per_host=per_agent) for a in range(args.agents)])
    groups = [scheduler.create_group(f"fleet-g{a:02d}", max_concurrent=10_000) for a in range(args.agents)]
    total = args.vms + args.waiting
    VirtualMachine.objects.bulk_create(
        [VirtualMachine(name=f"fleet-vm-{i:05d}", agent=f"site-{i % args.agents:02d}", group=groups[i % args.agents],
                        esxi_host=f"esx-{i % args.agents:02d}-{(i // args.agents) % 8}.site") for i in range(total)],
        batch_size=2000)
    vms = list(VirtualMachine.objects.order_by("name"))
    SourceDisk.objects.bulk_create([SourceDisk(vm=vm, disk_key=f"disk-{2000 + d}", locator=f"/img/{vm.name}-{d}",
                                               capacity_bytes=GiB) for vm in vms for d in range(args.disks_per_vm)],
                                   batch_size=5000)
    active = vms[:args.vms]
    sources = list(SourceDisk.objects.filter(vm__in=active).order_by("vm_id", "disk_key"))
    TargetVolume.objects.bulk_create([TargetVolume(source_disk=s, size_bytes=GiB) for s in sources], batch_size=5000)
    volumes = {v.source_disk_id: v for v in TargetVolume.objects.all()}
    now = timezone.now()
    ReplicationJob.objects.bulk_create(
        [ReplicationJob(vm=vm, sync_type=SyncType.FULL, status=JobStatus.REPLICATING, started_at=now, heartbeat_at=now,
                        current_operation=Stage.TRANSFER) for vm in active], batch_size=2000)
    jobs = dict(ReplicationJob.objects.values_list("vm_id", "id"))
    VMDisk.objects.bulk_create(
        [VMDisk(job_id=jobs[s.vm_id], source_disk=s, target_volume=volumes[s.pk], disk_key=s.disk_key,
                capacity_bytes=GiB, source_locator=s.locator, status=DiskStatus.COPYING, attempts=1,
                bytes_total=GiB, started_at=now, heartbeat_at=now, last_progress_at=now - timedelta(seconds=10),
                current_operation=Stage.TRANSFER) for s in sources], batch_size=5000)
    Admission.objects.bulk_create([Admission(group=vm.group, vm=vm, due_at=now, not_before=now)
                                   for vm in vms[args.vms:]], batch_size=2000)


def mariadb_cpu_s() -> float | None:
    """CPU seconds the database server has used so far (None: not readable)."""
    try:
        pid = subprocess.run(["pgrep", "-x", "mariadbd"], capture_output=True, text=True).stdout.split()[0]
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (IndexError, OSError, ValueError):
        return None


class Feeds:
    """The agents' change feeds, synthetic: one record per job (its disks'
    entries), each disk 1 % further and a sequence number up per move."""

    def __init__(self):
        from replication.models import VMDisk

        self.jobs: dict[str, dict[str, list[str]]] = {}  # by agent, by job
        for agent, job_id, key in VMDisk.objects.values_list("job__vm__agent", "job_id", "disk_key"):
            self.jobs.setdefault(agent, {}).setdefault(job_id, []).append(key)
        self.step = 0

    def move(self) -> None:
        self.step += 1

    def fill(self) -> None:
        """Every agent's feed holds its jobs' records, as a read of its change feed leaves it."""
        from replication.services import progress

        for agent, jobs in self.jobs.items():
            self.fill_feed(progress._feed(agent), jobs)

    def fill_feed(self, feed, jobs: dict[str, list[str]]) -> None:
        from replication.choices import Stage

        done = min(GiB, self.step * GiB // 100)
        at = time.time()
        for job_id, keys in jobs.items():
            feed.arrived({"id": job_id, "job_id": job_id, "disks": {key: {
                "seq": self.step, "stage": Stage.TRANSFER.value, "bytes_transferred": done, "total_bytes": GiB,
                "throughput_bps": 50_000_000, "attempt": 1, "checkpoint_bytes": done, "worker": "bench",
                "received_at": at} for key in keys}})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--agents", type=int, default=10)
    parser.add_argument("--vms", type=int, default=5000)
    parser.add_argument("--disks-per-vm", type=int, default=4)
    parser.add_argument("--waiting", type=int, default=500, help="VMs queued for a slot behind the full agents")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--profile", action="store_true", help="also print where one more 'moved' pass spends its time")
    args = parser.parse_args()
    configure()
    setup_django()
    from django.conf import settings
    from django.core.management import call_command
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from replication.models import ReplicationJob, VMDisk
    from replication.services import progress, scheduler

    call_command("migrate", verbosity=0)
    started = time.perf_counter()
    populate(args)
    print(f"fleet benchmark: {args.agents} agents, {args.vms} VMs replicating with "
          f"{VMDisk.objects.filter(status='copying').count()} disks copying, {args.waiting} VMs waiting, "
          f"{connection.vendor} {connection.settings_dict['NAME']} (set up in {time.perf_counter() - started:.0f} s), "
          f"{args.reps} passes each")

    server_cpu = mariadb_cpu_s if connection.vendor == "mysql" else lambda: None  # SQLite: in this process

    def timed(call):
        cpu, db_cpu = time.process_time(), server_cpu()
        with CaptureQueriesContext(connection) as queries:
            t0 = time.perf_counter()
            result = call()
            seconds = time.perf_counter() - t0
        cpu = time.process_time() - cpu
        db_after = server_cpu()
        db = None if db_cpu is None or db_after is None else db_after - db_cpu
        return seconds, len(queries), cpu, db, result

    samples = {"scheduler pass": [], "ingest pass, moved": [], "ingest pass, still": []}
    scheduler.admit()  # warm-up: writes each waiting VM's reason once
    for _ in range(args.reps):
        seconds, queries, cpu, db, started_jobs = timed(scheduler.admit)
        assert started_jobs == [], "an agent at its limit started a cycle"
        samples["scheduler pass"].append((seconds, queries, cpu, db))

    feeds = Feeds()
    # The agents' change feeds hold the synthetic records before each pass (not
    # timed): the pass reads no API, only what it would apply. One read a pass.
    progress._read_changes = lambda feed: 1
    settings.PROGRESS_WRITE_STEP_PERCENT = 0.5  # every 1 % move is written (1 % of a GiB is not a whole byte)
    written = []
    for rep in range(args.reps + 1):
        feeds.move()
        feeds.fill()
        seconds, queries, cpu, db, stats = timed(progress.poll_once)
        if rep:
            samples["ingest pass, moved"].append((seconds, queries, cpu, db))
            written.append(stats.disks_written)
        seconds, queries, cpu, db, stats = timed(progress.poll_once)  # nothing arrived since
        assert stats.disks_written == 0, (rep, stats)
        if rep:
            samples["ingest pass, still"].append((seconds, queries, cpu, db))
    assert min(written) == args.vms * args.disks_per_vm, written
    assert ReplicationJob.objects.filter(status="replicating").count() == args.vms

    if args.profile:
        import cProfile
        import pstats

        feeds.move()
        feeds.fill()
        profiler = cProfile.Profile()
        profiler.runcall(progress.poll_once)
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(30)

    interval = settings.PROGRESS_POLL_INTERVAL_S
    print(f"  {'pass':<20} {'median ms':>10} {'p95 ms':>8} {'queries':>8} {'CPU ms (OMA)':>13} "
          f"{'CPU ms (db)':>12} {f'% core @{interval:.0f}s OMA':>16} {'OMA+db':>8}")
    for kind, values in samples.items():
        times = [v[0] * 1000 for v in values]
        cpu = statistics.median(v[2] for v in values) * 1000
        dbs = [v[3] for v in values if v[3] is not None]
        db = statistics.median(dbs) * 1000 if dbs else float("nan")
        oma = f"{cpu / (interval * 1000) * 100:.1f} %"
        both = f"{(cpu + (db if dbs else 0)) / (interval * 1000) * 100:.1f} %"
        print(f"  {kind:<20} {statistics.median(times):>10.0f} {percentile(times, 95):>8.0f} "
              f"{statistics.median(v[1] for v in values):>8.0f} {cpu:>13.0f} {db:>12.0f} {oma:>16} {both:>8}")
    print(f"  ingest 'moved' wrote {statistics.median(written):.0f} disk rows a pass; % core = CPU of one pass "
          "(the OMA process; + the database server, MariaDB only) / the poll interval")


if __name__ == "__main__":
    main()
