"""How long a test failover takes, step by step: preflight, protect volumes
(qcow2 overlays), define VM, start VM, verify boot (the guest's own boot, to
its marker on the serial console), then ending it (destroy VM, discard the
overlays). A benchmark script, not a test.

On its own SQLite database and failover directory under a temporary
directory, with the real libvirt destination (libvirtd must run: virtlogd -d
&& libvirtd -d). The replica is the bootable test disk that
scripts/make_boot_disk.py builds (64 MiB), recorded as a completed cycle of
an image VM without copying it through a worker: what is measured is the
failover, not the replication. The steps run in this process, as the OMA
worker's run_failover task runs them.

    .venv/bin/python -m bench.failover_bench [--reps 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from bench.common import setup_django
from simulators.boot_disk import boot_disk_builder


def configure(workdir: Path) -> None:
    os.environ["DJANGO_SETTINGS_MODULE"] = "oma_site.settings"
    os.environ["DATABASE_URL"] = f"sqlite:///{workdir / 'bench.sqlite3'}"
    os.environ["OMA_VOLUME_DIR"] = str(workdir / "volumes")
    os.environ["OMA_RUN_DIR"] = str(workdir / "run")
    os.environ["FAILOVER_DIR"] = str(workdir / "failover")
    os.environ["IMAGE_SOURCE_DIRS"] = str(workdir)  # its boot disks (the OMA's own subdirectories stay refused)
    setup_django()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)


def completed_cycle(workdir: Path, name: str):
    """An image VM whose last cycle completed, its replica the boot disk."""
    from replication.choices import JobStatus
    from replication.models import VMContext
    from replication.services import jobs
    from replication.services.inventory import register_image_vm

    disk = workdir / f"{name}.img"
    boot_disk_builder().build_boot_disk(disk, "BENCH")
    vm = register_image_vm(name, [str(disk)], cpus=1, memory_mib=256)
    jobs.enqueue_prepare = lambda job_id: None  # no worker: the cycle is recorded by hand
    job = jobs.start_replication(vm)
    assert job.enter_stage("Initializing", JobStatus.PREPARING)
    assert job.enter_stage("Transfer", JobStatus.REPLICATING)
    vm_disk = job.disks.get()
    replica = workdir / f"{name}-replica.img"
    shutil.copyfile(disk, replica)
    type(vm_disk.target_volume).objects.filter(pk=vm_disk.target_volume_id).update(path=str(replica))
    assert vm_disk.start_attempt("bench") and vm_disk.complete(bytes_total=1, bytes_zeroed=0, throughput_bps=1)
    assert job.transition(JobStatus.FINALIZING)
    jobs.commit_and_complete(job)
    context = VMContext.of(vm)
    context.boot_check_regex, context.boot_check_timeout_s = r"BOOT-MARKER: BENCH", 300
    context.save()
    return vm


def one_failover(vm) -> dict:
    from replication.services import failover

    failover._enqueue = lambda job, task_name: None  # run in this process, as the OMA worker's task does
    started = time.monotonic()
    job = failover.start_failover(vm, "test", actor="bench")
    failover.run_failover(job.pk)
    booted = time.monotonic() - started
    job.refresh_from_db()
    if not job.boot_verified:
        raise SystemExit(f"failover {job.pk} failed: {job.error_message}\n{job.console_tail}")
    ending = time.monotonic()
    failover.end_test_failover(vm, actor="bench")
    ended = time.monotonic() - ending
    steps = {s.name: s.seconds for s in job.steps.all()}
    return {"to_boot_verified_s": round(booted, 3), "steps": steps, "end_s": round(ended, 3),
            "all_but_guest_boot_s": round(booted - steps["verify boot"], 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="failover-bench-"))
    try:
        configure(workdir)
        from replication.platforms import get_destination

        destination = get_destination()
        print(f"destination: libvirt, domain type {destination.domain_type()} ({destination.domain_type_reason()})")
        vm = completed_cycle(workdir, "bench-boot")
        runs = [one_failover(vm) for _ in range(args.reps)]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"{len(runs)} test failovers of a 64 MiB boot disk (1 vCPU, 256 MiB), medians (p95 = max of {len(runs)}):")
    rows = [("failover -> boot verified", [r["to_boot_verified_s"] for r in runs]),
            ("  everything but the guest's boot", [r["all_but_guest_boot_s"] for r in runs])]
    rows += [(f"  step {name}", [r["steps"][name] for r in runs]) for name in runs[0]["steps"]]
    rows += [("end test (destroy VM, discard overlays)", [r["end_s"] for r in runs])]
    for label, values in rows:
        print(f"  {label:<42} median {statistics.median(values):7.3f} s   max {max(values):7.3f} s")
    if args.json:
        print(json.dumps(runs, indent=2))


if __name__ == "__main__":
    main()
