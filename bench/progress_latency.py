"""Measure the progress pipeline with its real parts: the copy loop's
reporter -> the VMA progress API (manage.py runserver, Redis) -> the OMA
poller -> the database.

1. Latency: simulated copy loops (4 disks, the engine's ThrottledReporter
   cadence, 2 s / 1 %) feed DiskReporters; the poller runs every
   PROGRESS_POLL_INTERVAL_S (default 5 s), as its own process
   (`manage.py poll_progress`, as scripts/demo.sh runs it; --poller thread:
   in this process); a watcher reads the database every 20 ms. Latency =
   when a byte count appeared in the database minus when the copy loop
   passed exactly that count to the reporter.
2. Scale: N active jobs x 4 disks against the real API (200 by default;
   200 and 1250 with --no-latency): duration of a poller pass, its HTTP
   requests and database writes (first pass, a pass with no change, a pass
   where a quarter of the disks moved). Each size's jobs end before the next.

Runs on its own SQLite database under a temporary directory (or
BENCH_DATABASE_URL, e.g. mysql://root@127.0.0.1:3306/oma_bench, a database
that exists and holds nothing else) and Redis database 13 (BENCH_REDIS_URL),
so it never touches a developer's jobs:

    .venv/bin/python -m bench.progress_latency [--seconds 60] [--jobs 200 ...] [--disks 4] [--poller process|thread]
    .venv/bin/python -m bench.progress_latency --no-latency        # pass times at 200x4 and 1250x4
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

from bench.common import ROOT, free_port, percentile, setup_django


def configure() -> tuple[dict, Path]:
    workdir = Path(tempfile.mkdtemp(prefix="oma-bench-"))
    redis_url = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/13")
    env = {
        "DJANGO_SETTINGS_MODULE": "oma_site.settings",
        "DATABASE_URL": os.environ.get("BENCH_DATABASE_URL", f"sqlite:///{workdir / 'bench.sqlite3'}"),
        "CELERY_BROKER_URL": redis_url,
        "VMA_REDIS_URL": redis_url,
        "VMA_PROGRESS_PREFIX": f"bench:{secrets.token_hex(4)}",
        "VMA_TOKEN": secrets.token_urlsafe(24),
        "LOG_LEVEL": "ERROR",
    }
    env["VMA_URL"] = f"http://127.0.0.1:{free_port()}"
    os.environ.update(env)
    return env, workdir


def make_jobs(count: int, disks: int, prefix: str):
    from django.utils import timezone

    from replication.choices import DiskStatus, JobStatus, Stage
    from replication.models import ReplicationJob, SourceDisk, TargetVolume, VirtualMachine, VMDisk

    now = timezone.now()
    jobs = []
    for j in range(count):
        vm = VirtualMachine.objects.create(name=f"{prefix}-{j}")
        job = ReplicationJob.objects.create(vm=vm, status=JobStatus.REPLICATING, current_operation=Stage.TRANSFER,
                                            started_at=now, heartbeat_at=now)
        rows = []
        for d in range(disks):
            source = SourceDisk.objects.create(vm=vm, disk_key=f"disk-{2000 + d}", locator=f"/bench/{j}/{d}",
                                               capacity_bytes=10 * 2**30)
            volume = TargetVolume.objects.create(source_disk=source, size_bytes=10 * 2**30,
                                                 volume_uuid=uuid.uuid4())
            rows.append(VMDisk(job=job, source_disk=source, target_volume=volume, disk_key=source.disk_key,
                               capacity_bytes=source.capacity_bytes, source_locator=source.locator,
                               status=DiskStatus.COPYING, started_at=now, heartbeat_at=now))
        VMDisk.objects.bulk_create(rows)
        jobs.append(job)
    return jobs


def latency(seconds: float, disks: int, poller_mode: str = "process", env: dict | None = None) -> dict:
    from django.conf import settings
    from django.db import connection

    from replication.choices import DiskStatus, JobStatus
    from replication.models import ReplicationJob, VMDisk
    from replication.services import progress
    from vma_agent.client import ProgressClient
    from vma_agent.progress import ThrottledReporter
    from vma_agent.reporter import DiskReporter

    job = make_jobs(1, disks, "latency")[0]
    job_disks = list(job.disks.select_related("target_volume"))
    passed: dict[int, dict[int, float]] = {d.pk: {} for d in job_disks}
    seen: dict[int, list[tuple[int, float]]] = {d.pk: [] for d in job_disks}
    stop = threading.Event()
    total = 64 * 2**30  # simulated data per disk
    step = 2**20

    def copy_loop(disk):
        reporter = DiskReporter(ProgressClient(settings.VMA_URL, settings.VMA_TOKEN), job.id, disk.disk_key,
                                export_name=disk.target_volume.export_name)

        def callback(p):
            passed[disk.pk][p.bytes_done] = time.monotonic()
            reporter(p)

        throttled = ThrottledReporter(callback, total, settings.PROGRESS_REPORT_INTERVAL_S)
        started, done = time.monotonic(), 0
        while not stop.is_set() and done < total:
            # A steady copy that would end a little after the measurement.
            done = min(total, int(total * (time.monotonic() - started) / (seconds * 1.2)) // step * step)
            throttled.update(done)
            time.sleep(0.005)
        reporter.close()

    def poller():
        try:
            while not stop.is_set():
                started = time.monotonic()
                progress.poll_once()
                stop.wait(max(0.0, settings.PROGRESS_POLL_INTERVAL_S - (time.monotonic() - started)))
        finally:
            connection.close()

    def watcher():
        try:
            last = {pk: 0 for pk in seen}
            while not stop.is_set():
                for pk, done in VMDisk.objects.filter(pk__in=list(seen)).values_list("pk", "bytes_done"):
                    if done != last[pk]:
                        seen[pk].append((done, time.monotonic()))
                        last[pk] = done
                time.sleep(0.02)
        finally:
            connection.close()

    threads = [threading.Thread(target=copy_loop, args=(d,)) for d in job_disks]
    threads.append(threading.Thread(target=watcher))
    poller_process = None
    if poller_mode == "thread":
        threads.append(threading.Thread(target=poller))
    else:
        poller_process = subprocess.Popen([sys.executable, "manage.py", "poll_progress"], cwd=ROOT,
                                          env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL)
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    if poller_process is not None:
        poller_process.terminate()
        poller_process.wait(30)
    # Each value the database showed, against when the copy loop passed it.
    samples = [t_seen - passed[pk][done] for pk, rows in seen.items() for done, t_seen in rows
               if done in passed[pk]]
    # Each count the copy loop passed, until the database showed it or more:
    # how old the progress an operator sees can be.
    visible = []
    for pk, counts in passed.items():
        for done, t_passed in counts.items():
            shown = [t for value, t in seen[pk] if value >= done and t >= t_passed]
            if shown:
                visible.append(min(shown) - t_passed)
    VMDisk.objects.filter(job=job).update(status=DiskStatus.CANCELLED)
    ReplicationJob.objects.filter(pk=job.id).update(status=JobStatus.CANCELLED)
    return {"samples": len(samples), "median_s": statistics.median(samples), "p95_s": percentile(samples, 95),
            "max_s": max(samples), "visible_samples": len(visible), "visible_median_s": statistics.median(visible),
            "visible_p95_s": percentile(visible, 95), "visible_max_s": max(visible),
            "poll_interval_s": settings.PROGRESS_POLL_INTERVAL_S,
            "report_interval_s": settings.PROGRESS_REPORT_INTERVAL_S}


class WriteCounter:
    def __init__(self):
        self.writes = 0
        self.queries = 0

    def __call__(self, execute, sql, params, many, context):
        self.queries += 1
        if sql.lstrip().upper().startswith(("UPDATE", "INSERT", "DELETE")):
            self.writes += 1
        return execute(sql, params, many, context)


def scale(job_count: int, disks: int) -> list[dict]:
    from concurrent.futures import ThreadPoolExecutor

    from django.conf import settings
    from django.db import connection

    from replication.choices import DiskStatus, JobStatus
    from replication.models import ReplicationJob, VMDisk
    from replication.services import progress
    from vma_agent.client import ProgressClient

    # Only this size's jobs are active: end what an earlier size left.
    VMDisk.objects.filter(status=DiskStatus.COPYING).update(status=DiskStatus.CANCELLED)
    ReplicationJob.objects.filter(status=JobStatus.REPLICATING).update(status=JobStatus.CANCELLED)
    jobs = make_jobs(job_count, disks, f"scale{job_count}")
    client = ProgressClient(settings.VMA_URL, settings.VMA_TOKEN)
    targets = [(job.id, disk.disk_key, disk.target_volume.export_name)
               for job in jobs for disk in job.disks.select_related("target_volume")]
    seq = [int(time.time() * 1e6)]

    def post(target, done):
        job_id, key, export = target
        seq[0] += 1
        body = {"stage": "Transfer", "status": "in_progress", "seq": seq[0], "disk_id": key, "job_id": job_id,
                "export_name": export, "bytes_transferred": done, "total_bytes": 10**9,
                "percent": done / 10**7, "throughput_bps": 50 * 2**20}
        client.post_update(job_id, body)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda t: post(t, 10**8), targets))
    results = []
    for label, moved in [("first pass (every disk new)", targets), ("no change", []),
                         ("a quarter of the disks moved", targets[::4])]:
        for target in moved:
            post(target, 2 * 10**8 if label != "first pass (every disk new)" else 10**8)
        counter = WriteCounter()
        with connection.execute_wrapper(counter):
            stats = progress.poll_once()
        results.append({"pass": label, "jobs": stats.jobs, "seconds": round(stats.seconds, 3),
                        "apply_seconds": round(stats.apply_seconds, 3),
                        "http_requests": stats.requests, "db_writes": counter.writes,
                        "db_queries": counter.queries, "disk_rows_written": stats.disks_written,
                        "job_rows_written": stats.jobs_written})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--jobs", type=int, nargs="+", default=None,
                        help="active jobs of the scale measurement, one run per size (default 200; "
                             "200 and 1250 with --no-latency)")
    parser.add_argument("--disks", type=int, default=4)
    parser.add_argument("--no-latency", action="store_true", help="only the poller pass measurement")
    parser.add_argument("--poller", choices=["process", "thread"], default="process",
                        help="the latency run's poller: its own process (manage.py poll_progress, as the demo "
                             "runs it) or a thread of this process")
    args = parser.parse_args()
    sizes = args.jobs or ([200, 1250] if args.no_latency else [200])
    env, workdir = configure()
    setup_django()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    port = env["VMA_URL"].rsplit(":", 1)[1]
    server = subprocess.Popen([sys.executable, "manage.py", "runserver", "--noreload", "--skip-checks",
                               f"127.0.0.1:{port}"], cwd=ROOT, env={**os.environ, **env},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import requests

        for _ in range(200):
            try:
                requests.get(f"{env['VMA_URL']}/api/v1/openapi.json", timeout=1)
                break
            except requests.RequestException:
                time.sleep(0.1)
        from django.conf import settings

        print(f"database: {settings.DATABASES['default']['ENGINE']}, API: {env['VMA_URL']} (runserver)")
        if not args.no_latency:
            seconds = max(args.seconds, 12)
            r = latency(seconds, args.disks, args.poller, env)
            print(f"copy loop -> database latency over {seconds:.0f} s, {args.disks} disks, poller: {args.poller}, "
                  f"poll every "
                  f"{r['poll_interval_s']} s, report every {r['report_interval_s']} s / 1 %:")
            print(f"  each value that reached the database: {r['samples']} samples, median {r['median_s']:.2f} s, "
                  f"p95 {r['p95_s']:.2f} s, max {r['max_s']:.2f} s")
            print(f"  every count passed, until the database showed it or more: {r['visible_samples']} samples, "
                  f"median {r['visible_median_s']:.2f} s, p95 {r['visible_p95_s']:.2f} s, "
                  f"max {r['visible_max_s']:.2f} s")
        for size in sizes:
            for row in scale(size, args.disks):
                print(f"poller pass, {row['jobs']} jobs x {args.disks} disks, {row['pass']}: {row['seconds']} s "
                      f"({row['apply_seconds']} s applying), "
                      f"{row['http_requests']} HTTP requests, {row['db_writes']} DB writes "
                      f"({row['disk_rows_written']} disk rows, {row['job_rows_written']} job rows), "
                      f"{row['db_queries']} queries", flush=True)
    finally:
        server.terminate()
        server.wait(10)
        import redis

        client = redis.Redis.from_url(env["VMA_REDIS_URL"])
        for key in client.scan_iter(f"{env['VMA_PROGRESS_PREFIX']}:*", count=1000):
            client.delete(key)
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
