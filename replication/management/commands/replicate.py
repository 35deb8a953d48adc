import argparse
import time

from django.core.management.base import BaseCommand, CommandError
from tqdm import tqdm

from replication.choices import JobStatus, SyncType
from replication.figures import job_figures
from replication.management.lookup import vm_named
from replication.models import ReplicationJob
from replication.roles import os_actor
from replication.services.jobs import AUTO, ReplicationError, choose_sync_type, start_replication
from replication.services.vmware import OVERRIDES
from vma_agent.units import iec, iec_rate, parse_rate

POLL_INTERVAL_S = 0.5


def _bytes_per_second(text: str) -> int:
    try:
        return parse_rate(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


class Command(BaseCommand):
    help = ("Start a replication of a VM and print the job id; --wait follows it to the end. By default "
            "incremental when a committed changeId holds, full otherwise; --full/--incremental force it.")

    def add_arguments(self, parser):
        parser.add_argument("name")
        kind = parser.add_mutually_exclusive_group()
        parser.set_defaults(sync_type=AUTO)
        kind.add_argument("--full", dest="sync_type", action="store_const", const=SyncType.FULL,
                          help="copy every disk whole")
        kind.add_argument("--incremental", dest="sync_type", action="store_const", const=SyncType.INCREMENTAL,
                          help="copy what changed since the committed changeId (refused without one)")
        parser.add_argument("--verify", action="store_true",
                            help="read every copied area back before committing the changeIds")
        parser.add_argument("--allow", action="append", default=[], choices=OVERRIDES, metavar="BLOCKER",
                            help=f"override a preflight blocker ({', '.join(OVERRIDES)})")
        parser.add_argument("--limit", type=_bytes_per_second, default=None, metavar="RATE",
                            help="bandwidth limit per disk, bytes per second (suffixes K, M, G: powers of 1024)")
        parser.add_argument("--wait", action="store_true", help="show live progress; exit 0 only if it completed")
        parser.add_argument("--timeout", type=float, default=0, help="with --wait: give up after N seconds")

    def handle(self, name, sync_type, verify, allow, limit, wait, timeout, **options):
        vm = vm_named(name, "; register it with add_vm or discover it with discover")
        try:
            job = start_replication(vm, choose_sync_type(vm, sync_type), verify=verify, overrides=allow,
                                    bandwidth_limit_bps=limit, actor=os_actor())
        except ReplicationError as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(job.id)
        if wait:
            self.follow(job, timeout)

    def follow(self, job: ReplicationJob, timeout: float) -> None:
        deadline = time.monotonic() + timeout if timeout else None
        disks = list(job.disks.order_by("disk_key"))
        # Sizes in IEC units, as everywhere; the text rides in tqdm's free-form
        # {unit} field (its {postfix} would start with ", ").
        bar_format = "{desc:<28} {percentage:5.1f}%|{bar}| {unit}"
        job_bar = tqdm(total=100.0, position=0, bar_format="{desc:<28} {percentage:5.1f}%|{bar}|",
                       leave=True, dynamic_ncols=True)
        disk_bars = {
            disk.pk: tqdm(total=max(disk.capacity_bytes, 1), desc=f"  {disk.disk_key}", position=i + 1,
                          bar_format=bar_format, leave=True, dynamic_ncols=True)
            for i, disk in enumerate(disks)
        }
        try:
            while True:
                job.refresh_from_db()
                job_bar.n = round(job.progress_percent, 1)
                job_bar.set_description_str(f"job {job.current_operation}", refresh=False)
                job_bar.refresh()
                for row in job_figures(job).disks:
                    disk = row.disk
                    bar = disk_bars[disk.pk]
                    bar.total = max(disk.bytes_total, 1)
                    bar.n = disk.bytes_done
                    bar.set_description_str(f"  {disk.disk_key} {row.state}", refresh=False)
                    bar.unit = f"{iec(disk.bytes_done)} of {iec(disk.bytes_total)} at {iec_rate(row.rate_bps)}"
                    bar.refresh()
                if job.is_terminal:
                    break
                if deadline and time.monotonic() > deadline:
                    raise CommandError(f"job {job.id} still {job.status} after {timeout:.0f} s")
                time.sleep(POLL_INTERVAL_S)
        finally:
            for bar in [*disk_bars.values(), job_bar]:
                bar.close()
        if job.status != JobStatus.COMPLETED:
            raise CommandError(f"job {job.id} {job.status}: {job.error_message or 'no reason recorded'}")
        self.stdout.write(f"job {job.id} completed: {iec(job.bytes_transferred)} of data copied "
                          f"at {iec_rate(job_figures(job).rate_bps)} on average")
