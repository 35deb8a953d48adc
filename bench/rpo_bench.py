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
        [--test-failovers 10] [--points-keep 3]

Retention keeps --points-keep points per VM (RECOVERY_POINTS_KEEP of the
services), so it merges old points all along. With --test-failovers N, once
every VM's first cycle is done a test failover starts on each of the first N
VMs (through the service, as `manage.py failover VM --test` does); the
measurement starts once they are all booted and runs while they do (their
cycles go on: each test VM runs on an overlay over its point); they end
after it. Those N VMs' images are the project's bootable test disk
(scripts/make_boot_disk.py, 64 MiB, as qcow2; the guests' writes land in its
first 32 MiB after the boot) with the boot check "BOOT-MARKER: RPO": the
other VMs' images boot nothing and their boot check could never pass.
Their guests run under QEMU (TCG where KVM is missing) with
--guest-memory-mib each.

Figures: recovery point age sampled every 5 s for every VM after the first
full cycles (p50, p90, p99, max), cycles completed, skips, cycle duration,
queue wait (due -> started), writes delayed by a cycle's lock; points
merged by retention (RecoveryPoint rows expired) and retention passes that
deferred a merge (a point past the policy kept: in use by a test VM, or
under one), from the OMA worker's log; qemu-nbd servers and layer files
left once the services stopped.
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
from simulators.boot_disk import boot_disk_builder

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


def make_images(workdir: Path, vms: int, bootable: int) -> list[Path]:
    """qcow2 images: the first `bootable` are the bootable test disk (marker
    RPO), the others 32 MiB with 8 MiB written."""
    images = []
    if bootable:
        boot_disk_builder().build_boot_disk(workdir / "boot.img", "RPO")
    for index in range(vms):
        image = workdir / "images" / f"guest{index:03d}.qcow2"
        if index < bootable:
            subprocess.run(["qemu-img", "convert", "-q", "-O", "qcow2", str(workdir / "boot.img"), str(image)],
                           check=True)
        else:
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "32M"], check=True)
            subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P {index % 250 + 1} 0 8M", str(image)],
                           check=True, capture_output=True)
        images.append(image)
    return images


def start_test_failovers(vms: list, timeout_s: float) -> list:
    """A test failover on each VM, all queued at once (from each VM's newest
    point: the guests have not written yet, the test disk boots)."""
    from replication.models import VMContext
    from replication.services import failover

    jobs = []
    for vm in vms:
        context = VMContext.of(vm)
        context.boot_check_regex, context.boot_check_timeout_s = "BOOT-MARKER: RPO$", int(timeout_s)
        context.save()
        jobs.append(failover.start_failover(vm, "test", actor="bench"))
    return jobs


def wait_booted(jobs: list, timeout_s: float) -> list:
    """Waits until each failover has booted (or failed); the jobs as they are then."""
    from replication.models import FailoverJob

    deadline = time.monotonic() + timeout_s + 60
    while True:
        jobs = [FailoverJob.objects.get(pk=job.pk) for job in jobs]
        if all(job.status in ("succeeded", "failed") for job in jobs) or time.monotonic() > deadline:
            return jobs
        time.sleep(1)


def end_test_failovers(jobs: list) -> None:
    from replication.services import failover

    for job in jobs:
        if job.status == "succeeded":
            try:
                failover.end_test_failover(job.vm, actor="bench")
            except failover.FailoverError as exc:
                print(f"  ending the test failover of {job.vm.name} failed: {exc}")


def retention_report(workdir: Path, failover_vms: list) -> None:
    """Merges done (points expired) and deferred (retention passes that kept a
    point past the policy), from the database and the OMA worker's log."""
    from django.db.models import Count

    from replication.models import RecoveryPoint

    log = (workdir / "log" / "oma-worker.log").read_text(errors="replace")
    merged = RecoveryPoint.objects.filter(status="expired").count()
    sealed = dict(RecoveryPoint.objects.filter(status="sealed").values_list("vm__name").annotate(n=Count("id")))
    pinned = [sealed.get(vm.name, 0) for vm in failover_vms]
    others = [n for name, n in sealed.items() if name not in {vm.name for vm in failover_vms}]
    failures = [line for line in log.splitlines() if "raised unexpected" in line or "ERROR" in line]
    print(f"  retention: {merged} points merged (expired); {log.count('past the policy kept')} retention passes "
          f"deferred a merge (a point in use by a test VM, or under one); OMA worker errors {len(failures)}")
    for line in failures[:5]:
        print(f"    {line[:300]}")
    if others:
        print(f"  sealed points now: other VMs {min(others)}..{max(others)}"
              + (f", test-failover VMs {min(pinned)}..{max(pinned)}" if pinned else ""))


def leftovers(workdir: Path) -> None:
    from replication.models import PointLayer

    servers = subprocess.run(["pgrep", "-f", f"qemu-nbd.*{workdir}"], capture_output=True, text=True).stdout.split()
    layer_dir = workdir / "volumes" / "layers"
    files = {str(path) for path in layer_dir.glob("*.qcow2")} if layer_dir.is_dir() else set()
    live = set(PointLayer.objects.filter(point__status="sealed").values_list("handle", flat=True))
    print(f"  after the services stopped: qemu-nbd servers {len(servers)}, layer files {len(files)} "
          f"({len(files - live)} not a sealed point's layer)")


def print_rpo(label: str, samples: list[float]) -> None:
    if samples:
        print(f"  RPO age {label} over {len(samples)} samples: p50 {percentile(samples, 50):.1f} s, p90 "
              f"{percentile(samples, 90):.1f} s, p99 {percentile(samples, 99):.1f} s, max {max(samples):.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vms", type=int, default=50)
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--every", type=int, default=30, help="the group's schedule, seconds")
    parser.add_argument("--limit", type=int, default=4, help="the group's concurrency limit")
    parser.add_argument("--write-kib", type=int, default=1024, help="KiB each guest writes per write period")
    parser.add_argument("--write-every", type=float, default=6.0, help="seconds between a guest's writes")
    parser.add_argument("--workdir", type=Path, default=ROOT / "var" / "rpo-bench")
    parser.add_argument("--test-failovers", type=int, default=0,
                        help="VMs running a test failover through the whole measurement")
    parser.add_argument("--points-keep", type=int, default=3, help="RECOVERY_POINTS_KEEP of the services")
    parser.add_argument("--guest-memory-mib", type=int, default=256, help="memory of each test failover's VM")
    parser.add_argument("--keep", action="store_true", help="leave the work directory (logs) afterwards")
    args = parser.parse_args()
    workdir = args.workdir.resolve()
    env = configure(workdir)
    extra = {"RECOVERY_POINTS_KEEP": str(args.points_keep), "FAILOVER_DIR": str(workdir / "run" / "failover")}
    env.update(extra)
    os.environ.update(extra)
    if mariadb_up():
        name = os.environ.get("BENCH_DATABASE_NAME", "oma_rpo_bench")  # one per bench running at once
        subprocess.run(["mariadb", "-h", "127.0.0.1", "-u", "root", "-e",
                        f"DROP DATABASE IF EXISTS {name}; CREATE DATABASE {name}"], check=True)
        env["DATABASE_URL"] = os.environ["DATABASE_URL"] = f"mysql://root@127.0.0.1:3306/{name}"
    setup_django()
    import logging

    import redis
    from django.conf import settings
    from django.core.management import call_command
    from django.db import connection

    from replication.choices import AdmissionStatus, JobStatus
    from replication.models import Admission, FailoverJob, ReplicationJob, VirtualMachine
    from replication.services import rpo, scheduler
    from replication.services.inventory import register_image_vm

    for name in ("replication", "vma_agent"):
        logging.getLogger(name).setLevel(logging.WARNING)
    redis.Redis.from_url(env["CELERY_BROKER_URL"]).delete("oma", "vma.local")
    call_command("migrate", verbosity=0)
    images = make_images(workdir, args.vms, args.test_failovers)
    for index, image in enumerate(images):
        register_image_vm(f"rpo-vm{index:03d}", [str(image)], cpus=1,
                          memory_mib=args.guest_memory_mib if index < args.test_failovers else None)
    group = scheduler.create_group("sustained", max_concurrent=args.limit, rpo_target_s=2 * args.every)
    scheduler.add_vms(group, list(VirtualMachine.objects.all()))
    print(f"sustained RPO: {args.vms} qcow2 VMs (32 MiB, 8 MiB written first), group limit {args.limit}, agent "
          f"limits {settings.AGENT_MAX_VMS} VMs / {settings.AGENT_MAX_DISKS} disks, every {args.every} s, guests "
          f"write {args.write_kib} KiB every {args.write_every:g} s, {args.minutes:g} min, {connection.vendor}, "
          f"RECOVERY_POINTS_KEEP {args.points_keep}, test failovers on {args.test_failovers} VMs "
          f"({args.guest_memory_mib} MiB each)")
    services = Services(workdir, env, "split")
    stop = threading.Event()
    guests = Guests(images, args.write_kib, args.write_every, stop)
    samples: list[float] = []
    tested: list[float] = []
    by_minute: dict[int, list[float]] = {}
    failovers: list = []
    failover_vms = list(VirtualMachine.objects.order_by("name")[:args.test_failovers])
    try:
        scheduler.set_schedule(group, interval_s=args.every)
        started = time.monotonic()
        while not all(ReplicationJob.objects.filter(vm=vm, status=JobStatus.COMPLETED).exists()
                       for vm in VirtualMachine.objects.all()):
            if time.monotonic() - started > 600:
                raise SystemExit("the first cycles did not all complete within 10 minutes")
            time.sleep(1)
        warmup = time.monotonic() - started
        print(f"  first cycles of every VM done after {warmup:.0f} s", flush=True)
        booting = time.monotonic()
        failovers = start_test_failovers(failover_vms, timeout_s=600)
        guests.start()
        if failovers:
            failovers = wait_booted(failovers, timeout_s=600)
            booted = [job for job in failovers if job.status == "succeeded"]
            print(f"  test failovers: {len(booted)} of {len(failovers)} booted after "
                  f"{time.monotonic() - booting:.0f} s (cycles and guests' writes ran meanwhile)", flush=True)
            for job in failovers:
                if job.status != "succeeded":
                    print(f"    {job.vm.name}: {job.status}: {job.error_message}")
            # The RPO right after the boots, while the boots' backlog drains, is not sampled:
            print(f"  RPO age max just after the boots: "
                  f"{max(p.age_s for p in rpo.recovery_points() if p.age_s is not None):.1f} s")
        print(f"  sampling for {args.minutes:g} min", flush=True)
        names = {vm.name for vm in failover_vms}
        begin = time.monotonic()
        end = begin + args.minutes * 60
        while time.monotonic() < end:
            minute = int((time.monotonic() - begin) // 60)
            for point in rpo.recovery_points():
                if point.age_s is not None:
                    (tested if point.vm.name in names else samples).append(point.age_s)
                    by_minute.setdefault(minute, []).append(point.age_s)
            time.sleep(5)
        running = FailoverJob.objects.filter(pk__in=[job.pk for job in failovers], status="succeeded").count()
        print(f"  test failovers still running at the end of the measurement: {running}")
        stop.set()
        guests.join(30)
        scheduler.set_paused(group, True)
        end_test_failovers(failovers)
        time.sleep(5)  # retention queued by the ends runs in the OMA worker
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
    print_rpo("of every VM (goal: p99 under 60 s)", samples + tested)
    if tested:
        print_rpo(f"of the {len(failover_vms)} VMs under a test failover", tested)
        print_rpo("of the others", samples)
    print("  RPO age per minute of the measurement, p99 / max: " + ", ".join(
        f"{minute}: {percentile(ages, 99):.0f}/{max(ages):.0f}" for minute, ages in sorted(by_minute.items())))
    print(f"  cycles completed {len(jobs)}, failed {failed}, skipped ticks {skips}; cycle (created -> completed) "
          f"median {statistics.median(durations):.1f} s, p90 {percentile(durations, 90):.1f} s")
    print(f"  queue wait (due -> started) median {statistics.median(waits):.1f} s, p90 {percentile(waits, 90):.1f} s, "
          f"max {max(waits):.1f} s")
    print(f"  guest writes {guests.writes}, delayed by a cycle's image lock {guests.delayed} times, "
          f"{guests.lock_wait_s:.0f} s in all")
    retention_report(workdir, failover_vms)
    leftovers(workdir)
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
