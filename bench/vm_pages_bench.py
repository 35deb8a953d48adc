"""Time the VMs table and one VM's page with thousands of VMs.

Builds a throwaway SQLite database (or uses DATABASE_URL if given) with
--vms VMs of 2 disks each (every third replicating), and --cycles completed
cycles with their recovery points on one VM; then requests, logged in, the
table's first page, a middle page sorted by last replication, a search, and
that VM's page; prints median and p95 milliseconds and each page's queries.

    .venv/bin/python -m bench.vm_pages_bench [--vms 5000] [--cycles 200] [--requests 20]
"""

import argparse
import os
import statistics
import time

from bench.common import percentile, throwaway_django, viewer_client


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vms", type=int, default=5000)
    parser.add_argument("--cycles", type=int, default=200)
    parser.add_argument("--requests", type=int, default=20)
    args = parser.parse_args()
    throwaway_django("vm-pages-bench-")
    from django.db import connection
    from django.test.utils import CaptureQueriesContext
    from django.utils import timezone

    from replication.choices import JobStatus, VMState
    from replication.models import RecoveryPoint, ReplicationJob, SourceDisk, VirtualMachine, VMContext

    GiB = 1 << 30
    VirtualMachine.objects.bulk_create(VirtualMachine(name=f"bench-vm-{i:05d}", agent=f"site-{i % 4}")
                                       for i in range(args.vms))
    vms = list(VirtualMachine.objects.order_by("name"))
    SourceDisk.objects.bulk_create(SourceDisk(vm=vm, disk_key=f"disk-{2000 + d}", locator=f"/img/{vm.pk}-{d}",
                                              capacity_bytes=100 * GiB) for vm in vms for d in range(2))
    VMContext.objects.bulk_create(VMContext(vm=vm, state=VMState.REPLICATING) for vm in vms[::3])
    busy = vms[len(vms) // 2]
    now = timezone.now()
    for c in range(args.cycles):
        at = now - timezone.timedelta(hours=c)
        job = ReplicationJob.objects.create(vm=busy, status=JobStatus.COMPLETED, bytes_transferred=GiB,
                                            total_bytes=GiB, started_at=at, completed_at=at, recovery_point_at=at)
        RecoveryPoint.objects.create(vm=busy, job=job, frozen_at=at, changed_bytes=GiB)
    client = viewer_client()
    targets = {"VMs page 1": "/vms/", "VMs page 40 by last": "/vms/?sort=-last&page=40",
               "VMs search": "/vms/?q=site-1&state=replicating", "VM page": f"/vms/{busy.pk}/"}
    print(f"{args.vms} VMs x 2 disks, {args.cycles} cycles on one VM, {args.requests} requests each, "
          f"database {os.environ['DATABASE_URL'].split(':')[0]}")
    for name, url in targets.items():
        times = []
        for _ in range(args.requests):
            with CaptureQueriesContext(connection) as queries:
                started = time.perf_counter()
                response = client.get(url)
                times.append((time.perf_counter() - started) * 1000)
            assert response.status_code == 200, response.status_code
        print(f"  {name:<20} median {statistics.median(times):6.1f} ms   p95 {percentile(times, 95):6.1f} ms   "
              f"{len(queries)} queries   ({len(response.content) // 1024} KiB)")


if __name__ == "__main__":
    main()
