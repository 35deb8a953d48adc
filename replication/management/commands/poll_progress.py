import signal
import time

from django.conf import settings
from django.core.management.base import BaseCommand

from replication.services import progress


class Command(BaseCommand):
    help = "Poll the agents' progress into the database: one pass with --once, else every PROGRESS_POLL_INTERVAL_S."

    def add_arguments(self, parser):
        parser.add_argument("--once", action="store_true", help="run one pass and exit")

    def handle(self, once, **options):
        if once:
            self.report(progress.poll_once())
            return
        stopping = []
        signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
        while not stopping:
            started = time.monotonic()
            stats = progress.poll_once_locked()
            if stats is not None and options["verbosity"] > 1:
                self.report(stats)
            time.sleep(max(0.0, settings.PROGRESS_POLL_INTERVAL_S - (time.monotonic() - started)))

    def report(self, stats: progress.PassStats) -> None:
        self.stdout.write(
            f"polled {stats.jobs} jobs in {stats.seconds:.3f} s: {stats.requests} requests, "
            f"{stats.disks_written} disk and {stats.jobs_written} job writes, {stats.not_found} without a record, "
            f"{stats.errors} unreachable, failed: {', '.join(stats.failed) or 'none'}"
        )
