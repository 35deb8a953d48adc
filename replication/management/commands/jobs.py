import json
import time

from django.core.management.base import BaseCommand
from django.db.models import Q
from tqdm import tqdm

from replication.choices import JOB_ACTIVE
from replication.figures import job_figures
from replication.models import ReplicationJob
from replication.serializers import job_row
from vma_agent.units import iec, iec_rate

BAR = "{desc:<44} {percentage:5.1f}%|{bar}| {unit}"  # the text rides in tqdm's free-form {unit} field


def _eta(seconds) -> str:
    return "" if seconds is None else f"ETA {int(seconds) // 60}:{int(seconds) % 60:02d}"


class Command(BaseCommand):
    help = "List replication jobs with status, stage, percent, bytes and throughput; --watch shows live bars."

    def add_arguments(self, parser):
        parser.add_argument("--json", action="store_true", dest="as_json")
        parser.add_argument("--limit", type=int, default=50)
        parser.add_argument("--watch", action="store_true", help="live progress bars of active jobs")
        parser.add_argument("--interval", type=float, default=1.0, help="with --watch: seconds between redraws")
        parser.add_argument("--iterations", type=int, default=0,
                            help="with --watch: stop after N redraws (default: when no job is active)")

    def handle(self, as_json, limit, watch, interval, iterations, **options):
        if watch:
            self.watch(interval, iterations)
            return
        rows = [job_row(job) for job in ReplicationJob.objects.select_related("vm").prefetch_related("disks")[:limit]]
        if as_json:
            self.stdout.write(json.dumps(rows, indent=2))
            return
        self.stdout.write(f"{'JOB':<32} {'VM':<16} {'STATUS':<12} {'STAGE':<20} {'%':>6} {'DATA':>12} {'RATE':>14}")
        for r in rows:
            self.stdout.write(
                f"{r['id']:<32} {r['vm']:<16} {r['status']:<12} {r['current_operation']:<20} "
                f"{r['progress_percent']:>6.1f} {iec(r['bytes_transferred']):>12} {iec_rate(r['throughput_bps']):>14}"
            )

    def watch(self, interval: float, iterations: int) -> None:
        """Redraw one bar per active job and per disk until no job is active
        (jobs that end meanwhile get their final state drawn first)."""
        bars: dict[tuple, tqdm] = {}
        watched: set[str] = set()
        count = 0
        try:
            while True:
                jobs = list(ReplicationJob.objects.filter(Q(pk__in=watched) | Q(status__in=JOB_ACTIVE))
                            .select_related("vm").order_by("created_at"))
                if not jobs and count > 0:
                    break
                if not jobs:
                    self.stdout.write("no active jobs")
                    return
                for job in jobs:
                    watched.add(job.id)
                    figures = job_figures(job)
                    self._draw(bars, ("job", job.id), f"{job.vm.name} {job.status} {job.current_operation}",
                               job.progress_percent, f"{iec_rate(figures.rate_bps)} {_eta(figures.eta_seconds)}")
                    for row in figures.disks:
                        disk = row.disk
                        self._draw(bars, ("disk", disk.pk), f"  {disk.disk_key} {row.state}",
                                   disk.progress_percent,
                                   f"{iec(disk.bytes_done)} of {iec(disk.bytes_total)} {iec_rate(row.rate_bps)} "
                                   f"{_eta(row.eta_seconds)}")
                watched = {job.id for job in jobs if job.status in JOB_ACTIVE}
                count += 1
                if iterations and count >= iterations:
                    break
                time.sleep(interval)
        finally:
            for bar in bars.values():
                bar.close()

    def _draw(self, bars: dict, key: tuple, desc: str, percent: float, postfix: str) -> None:
        bar = bars.get(key)
        if bar is None:
            bar = bars[key] = tqdm(total=100.0, position=len(bars), bar_format=BAR, file=self.stdout._out,
                                   leave=True, dynamic_ncols=True)
        bar.n = round(percent, 1)
        bar.set_description_str(desc, refresh=False)
        bar.unit = postfix.strip()
        bar.refresh()
