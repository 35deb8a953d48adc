"""Time the live fragments with 50 active jobs of 4 disks each.

Builds a throwaway SQLite database (or uses DATABASE_URL if given), then
requests the dashboard fragment and a job's fragment through Django's test
client, logged in, and prints median and p95 milliseconds.

    .venv/bin/python -m bench.fragment_bench [--jobs 50] [--disks 4] [--requests 100]
"""

import argparse
import os
import statistics
import time

from bench.common import throwaway_django, viewer_client


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=50)
    parser.add_argument("--disks", type=int, default=4)
    parser.add_argument("--requests", type=int, default=100)
    args = parser.parse_args()
    throwaway_django("fragment-bench-")

    from replication.choices import DiskStatus, JobStatus, Stage
    from replication.models import ReplicationJob, SourceDisk, TargetVolume, VirtualMachine, VMDisk

    GiB = 1 << 30
    for j in range(args.jobs):
        vm = VirtualMachine.objects.create(name=f"bench-vm-{j}")
        job = ReplicationJob.objects.create(vm=vm, status=JobStatus.REPLICATING, current_operation=Stage.TRANSFER,
                                            progress_percent=30 + j, bytes_transferred=j * GiB,
                                            total_bytes=args.disks * 100 * GiB, throughput_bps=200_000_000)
        for d in range(args.disks):
            source = SourceDisk.objects.create(vm=vm, disk_key=f"disk-{2000 + d}", locator=f"/img/{j}-{d}",
                                               capacity_bytes=200 * GiB)
            volume = TargetVolume.objects.create(source_disk=source, size_bytes=200 * GiB)
            VMDisk.objects.create(job=job, source_disk=source, target_volume=volume, disk_key=source.disk_key,
                                  capacity_bytes=200 * GiB, source_locator=source.locator,
                                  status=DiskStatus.COPYING, bytes_total=100 * GiB, bytes_done=d * GiB,
                                  progress_percent=d, throughput_bps=50_000_000)
    client = viewer_client()
    some_job = ReplicationJob.objects.first()
    targets = {"dashboard fragment": "/fragments/dashboard/", "job fragment": f"/jobs/{some_job.id}/fragment/"}
    print(f"{args.jobs} active jobs x {args.disks} disks, {args.requests} requests each, "
          f"database {os.environ['DATABASE_URL'].split(':')[0]}")
    for name, url in targets.items():
        times = []
        for _ in range(args.requests):
            started = time.perf_counter()
            response = client.get(url)
            times.append((time.perf_counter() - started) * 1000)
            assert response.status_code == 200, response.status_code
        times.sort()
        p95 = times[int(len(times) * 0.95) - 1]
        print(f"  {name:<20} median {statistics.median(times):6.1f} ms   p95 {p95:6.1f} ms   "
              f"({len(response.content) // 1024} KiB)")


if __name__ == "__main__":
    main()
