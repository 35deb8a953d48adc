import logging
import signal
import threading
import time

from django.conf import settings
from django.core.management.base import BaseCommand
from django.db import connection

from replication.services import progress

log = logging.getLogger("replication.poller")


class Command(BaseCommand):
    help = ("Poll the agents' progress into the database: one pass with --once, else a pass every "
            "PROGRESS_POLL_INTERVAL_S until SIGTERM or SIGINT (the OMA's poller process).")

    def add_arguments(self, parser):
        parser.add_argument("--once", action="store_true", help="run one pass and exit")

    def handle(self, once, **options):
        if once:
            self.report(progress.poll_once())
            return
        stopping = threading.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stopping.set())
        log.info("progress poller: a pass every %.1f s", settings.PROGRESS_POLL_INTERVAL_S)
        while not stopping.is_set():
            started = time.monotonic()
            try:
                stats = progress.poll_once_locked()
            except Exception:
                # Redis or the database restarting: the process stays, the
                # next pass tries again (a dead poller freezes every bar).
                log.exception("progress poller pass failed; next pass in %.1f s", settings.PROGRESS_POLL_INTERVAL_S)
                connection.close()
                stats = None
            if stats is not None and options["verbosity"] > 1:
                self.report(stats)
            stopping.wait(max(0.0, settings.PROGRESS_POLL_INTERVAL_S - (time.monotonic() - started)))
        connection.close()

    def report(self, stats: progress.PassStats) -> None:
        self.stdout.write(
            f"polled {stats.jobs} jobs in {stats.seconds:.3f} s: {stats.requests} requests, "
            f"{stats.disks_written} disk and {stats.jobs_written} job writes, {stats.not_found} without a record, "
            f"{stats.errors} unreachable, failed: {', '.join(stats.failed) or 'none'}"
        )
