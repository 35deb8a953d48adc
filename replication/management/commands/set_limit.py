import time

from django.core.management.base import BaseCommand, CommandError

from replication.roles import os_actor
from replication.services.limits import LimitError, change_limit, wait_applied
from vma_agent.units import parse_rate


def _rate(text: str) -> int | None:
    if text.strip().lower() in ("0", "none", "off", "unlimited"):
        return None
    try:
        return parse_rate(text)
    except ValueError as exc:
        raise CommandError(str(exc)) from None


class Command(BaseCommand):
    help = ("Change a running job's bandwidth limit per disk copy (RATE such as 60M or 60MiB/s; K, M, G are "
            "powers of 1024; 0 or none lifts it). Its running copies follow within a few seconds.")

    def add_arguments(self, parser):
        parser.add_argument("job_id")
        parser.add_argument("rate")
        parser.add_argument("--timeout", type=float, default=10.0,
                            help="seconds to wait for the running copies to apply it (default 10)")

    def handle(self, job_id, rate, timeout, **options):
        started = time.monotonic()
        try:
            change = change_limit(job_id, _rate(rate), actor=os_actor())
        except LimitError as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(f"job {change.job.id}: limit {change.label} per disk")
        if change.agent_error:
            raise CommandError(f"the agent was not told ({change.agent_error}); running copies keep their limit, "
                               f"copies started from now take the new one")
        if not change.copying:
            self.stdout.write("no copy is running now; the next ones start with it")
            return
        wait_applied(change, timeout)
        seconds = time.monotonic() - started
        done = [disk for disk in change.copying if disk not in change.pending()]
        if done:
            self.stdout.write(f"applied by {', '.join(done)} in {seconds:.1f} s")
        if change.pending():
            raise CommandError(f"not yet applied by {', '.join(change.pending())} after {timeout:g} s"
                               + (f": {change.agent_error}" if change.agent_error else ""))
