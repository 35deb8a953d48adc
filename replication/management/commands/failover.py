import json
import time

from django.core.management.base import BaseCommand, CommandError

from replication.choices import FailoverStatus
from replication.lifecycle import FailoverJob
from replication.management.lookup import vm_named
from replication.services.failover import FailoverError, failover_report, start_test_failover

POLL_INTERVAL_S = 0.25


class Command(BaseCommand):
    help = ("Fail a VM over onto the destination. --test boots it from a point-in-time protection of its "
            "replica (overlays), leaves it running and pauses its cycles until failover_end.")

    def add_arguments(self, parser):
        parser.add_argument("name")
        parser.add_argument("--test", action="store_true", required=True,
                            help="a test failover (the only kind so far; live failover comes later)")
        parser.add_argument("--wait", action="store_true", help="follow the steps; exit 0 only if the boot is verified")
        parser.add_argument("--timeout", type=float, default=600, help="with --wait: give up after N seconds")
        parser.add_argument("--json", action="store_true", dest="as_json", help="print the outcome as JSON")
        parser.add_argument("--actor", default="operator", help="who asks (recorded in the VM's history)")

    def handle(self, name, test, wait, timeout, as_json, actor, **options):
        vm = vm_named(name)
        try:
            job = start_test_failover(vm, actor=actor)
        except FailoverError as exc:
            raise CommandError(str(exc)) from exc
        if not wait:
            self._print(job, as_json)
            return
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            job.refresh_from_db()
            steps = list(job.steps.all())
            if not as_json:
                for step in steps[seen:]:
                    if step.ended_at is not None:
                        self.stdout.write(f"  {step.name:<22} {step.status:<8} {step.seconds:7.2f} s  {step.detail}")
                        seen += 1
            if job.status in (FailoverStatus.SUCCEEDED, FailoverStatus.FAILED):
                break
            if time.monotonic() > deadline:
                raise CommandError(f"failover {job.pk} still {job.status} after {timeout:.0f} s")
            time.sleep(POLL_INTERVAL_S)
        self._print(job, as_json)
        if not job.boot_verified:
            raise CommandError(f"failover {job.pk} {job.status}: {job.error_message}")

    def _print(self, job: FailoverJob, as_json: bool) -> None:
        report = failover_report(job)
        if as_json:
            self.stdout.write(json.dumps(report, indent=2))
        elif job.status == FailoverStatus.SUCCEEDED:
            self.stdout.write(f"test failover {job.pk}: {job.destination_vm} booted; console: {job.console_match!r}\n"
                              f"end it with: manage.py failover_end {job.vm.name}")
        else:
            self.stdout.write(f"test failover {job.pk} of {job.vm.name}: {job.status}")
            if job.console_tail:
                self.stdout.write("console (last lines):\n" + job.console_tail)
