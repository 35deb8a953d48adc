"""Sustained RPO on one agent: N VMs (qcow2 images, copied incrementally from
dirty bitmaps) each receiving scattered writes, in one protection group
scheduled every --every seconds, for --minutes. Prints the distribution of
recovery point ages and where the time goes.

In a directory of its own (--workdir) it starts what scripts/demo.sh starts
(agent API, OMA worker, the agent's worker with no database, beat with the
database scheduler, the poller; bench/cycle_bench.py's "split" layout), on
MariaDB when 127.0.0.1:3306 answers (database oma_rpo_bench, recreated),
else SQLite. A writer thread plays the guests: every VM gets --write-kib
KiB per --write-every seconds in 64 KiB pieces at random offsets, through
qemu-io (which waits while a cycle's qemu-nbd holds the image's lock: the
wait is reported).

    .venv/bin/python -m bench.rpo_bench [--vms 50] [--minutes 10] [--every 30] [--limit 4]

Figures: recovery point age sampled every 5 s for every VM after the first
full cycles (p50, p90, p99, max), cycles completed, skips, cycle duration,
queue wait (due -> started), writes delayed by a cycle's lock.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench.common import ROOT, percentile, setup_django
from bench.cycle_bench import Services, configure

MiB = 1024 * 1024


def mariadb_up() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 3306), timeout=1):
            return True
    except OSError:
        return False


class Guests(threading.Thread):
    """Writes to every image on its own clock; counts writes delayed by a lock."""

    def __init__(self, images: list[Path], write_kib: int, every_s: float, stop: threading.Event):
        super().__init__(daemon=True)
        self.images, self.write_kib, self.every_s, self.stop = images, write_kib, every_s, stop
        self.writes = self.delayed = 0
        self.lock_wait_s = 0.0

    def run(self) -> None:
        rng = random.Random(7)
        due = {image: time.monotonic() + rng.uniform(0, self.every_s) for image in self.images}
        while not self.stop.is_set():
            image, when = min(due.items(), key=lambda item: item[1])
            if self.stop.wait(max(0.0, when - time.monotonic())):
                return
            commands = []
            for _ in range(max(1, self.write_kib // 64)):
                commands += ["-c", f"write -P {rng.randrange(1, 255)} {rng.randrange(0, 512) * 65536} 64k"]
            started = time.monotonic()
            while not self.stop.is_set():
                done = subprocess.run(["qemu-io", "-f", "qcow2", *commands, str(image)], capture_output=True,
                                      text=True)
                if done.returncode == 0:
                    break
                if "lock" not in done.stderr:
                    raise SystemExit(f"qemu-io on {image}: {done.stderr}")
                self.delayed += 1
                time.sleep(0.2)  # a cycle reads the image: the guest waits for its lock
            self.lock_wait_s += time.monotonic() - started
            self.writes += 1
            due[image] = when + self.every_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vms", type=int, default=50)
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--every", type=int, default=30, help="the group's schedule, seconds")
    parser.add_argument("--limit", type=int, default=4, help="the group's concurrency limit")
    parser.add_argument("--write-kib", type=int, default=1024, help="KiB each guest writes per write period")
    parser.add_argument("--write-every", type=float, default=6.0, help="seconds between a guest's writes")
    parser.add_argument("--workdir", type=Path, default=ROOT / "var" / "rpo-bench")
    args = parser.parse_args()
    workdir = args.workdir.resolve()
    env = configure(workdir)
    if mariadb_up():
        subprocess.run(["mariadb", "-h", "127.0.0.1", "-u", "root", "-e",
                        "DROP DATABASE IF EXISTS oma_rpo_bench; CREATE DATABASE oma_rpo_bench"], check=True)
        env["DATABASE_URL"] = os.environ["DATABASE_URL"] = "mysql://root@127.0.0.1:3306/oma_rpo_bench"
    setup_django()
    import logging

    import redis
    from django.conf import settings
    from django.core.management import call_command
    from django.db import connection

    from replication.choices import AdmissionStatus, JobStatus
    from replication.models import Admission, ReplicationJob, VirtualMachine
    from replication.services import rpo, scheduler
    from replication.services.inventory import register_image_vm

    for name in ("replication", "vma_agent"):
        logging.getLogger(name).setLevel(logging.WARNING)
    redis.Redis.from_url(env["CELERY_BROKER_URL"]).delete("oma", "vma.local")
    call_command("migrate", verbosity=0)
    images = []
    for index in range(args.vms):
        image = workdir / "images" / f"guest{index:03d}.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "32M"], check=True)
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P {index % 250 + 1} 0 8M", str(image)],
                       check=True, capture_output=True)
        images.append(image)
        register_image_vm(f"rpo-vm{index:03d}", [str(image)])
    group = scheduler.create_group("sustained", max_concurrent=args.limit, rpo_target_s=2 * args.every)
    scheduler.add_vms(group, list(VirtualMachine.objects.all()))
    print(f"sustained RPO: {args.vms} qcow2 VMs (32 MiB, 8 MiB written first), group limit {args.limit}, agent "
          f"limits {settings.AGENT_MAX_VMS} VMs / {settings.AGENT_MAX_DISKS} disks, every {args.every} s, guests "
          f"write {args.write_kib} KiB every {args.write_every:g} s, {args.minutes:g} min, {connection.vendor}")
    services = Services(workdir, env, "split")
    stop = threading.Event()
    guests = Guests(images, args.write_kib, args.write_every, stop)
    samples: list[float] = []
    try:
        scheduler.set_schedule(group, interval_s=args.every)
        started = time.monotonic()
        while not all(ReplicationJob.objects.filter(vm=vm, status=JobStatus.COMPLETED).exists()
                       for vm in VirtualMachine.objects.all()):
            if time.monotonic() - started > 600:
                raise SystemExit("the first cycles did not all complete within 10 minutes")
            time.sleep(1)
        warmup = time.monotonic() - started
        print(f"  first cycles of every VM done after {warmup:.0f} s; sampling for {args.minutes:g} min")
        guests.start()
        end = time.monotonic() + args.minutes * 60
        while time.monotonic() < end:
            samples += [point.age_s for point in rpo.recovery_points() if point.age_s is not None]
            time.sleep(5)
        stop.set()
        guests.join(30)
    finally:
        stop.set()
        scheduler.set_paused(group, True)
        services.stop()
        subprocess.run([sys.executable, "manage.py", "export_server", "stop"], cwd=ROOT, env={**os.environ, **env},
                       capture_output=True)
    jobs = list(ReplicationJob.objects.filter(status=JobStatus.COMPLETED, started_at__isnull=False))
    durations = [(job.completed_at - job.created_at).total_seconds() for job in jobs]
    started = list(Admission.objects.filter(status=AdmissionStatus.STARTED))
    waits = [(entry.decided_at - entry.due_at).total_seconds() for entry in started if entry.decided_at]
    skips = Admission.objects.filter(status=AdmissionStatus.SKIPPED).count()
    failed = ReplicationJob.objects.filter(status=JobStatus.FAILED).count()
    print(f"  RPO age over {len(samples)} samples: p50 {percentile(samples, 50):.1f} s, p90 "
          f"{percentile(samples, 90):.1f} s, p99 {percentile(samples, 99):.1f} s, max {max(samples):.1f} s "
          f"(goal: p99 under 60 s)")
    print(f"  cycles completed {len(jobs)}, failed {failed}, skipped ticks {skips}; cycle (created -> completed) "
          f"median {statistics.median(durations):.1f} s, p90 {percentile(durations, 90):.1f} s")
    print(f"  queue wait (due -> started) median {statistics.median(waits):.1f} s, p90 {percentile(waits, 90):.1f} s, "
          f"max {max(waits):.1f} s")
    print(f"  guest writes {guests.writes}, delayed by a cycle's image lock {guests.delayed} times, "
          f"{guests.lock_wait_s:.0f} s in all")
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
