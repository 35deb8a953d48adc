import json

from django.core.management.base import BaseCommand, CommandError

from replication.choices import FailoverKind
from replication.management.following import follow, print_outcome
from replication.management.lookup import vm_named
from replication.roles import command_actor
from replication.services import forecast
from replication.services.failover import FailoverError, start_failover


class Command(BaseCommand):
    help = ("Fail a VM over onto the destination. --test boots it from a point-in-time protection of its "
            "replica (overlays) on the test network, leaves it running and pauses its cycles until failover_end. "
            "--live shuts the source down, runs a final incremental cycle and boots the VM on the mapped "
            "production networks (undo with rollback). --forecast only prints the live downtime forecast.")

    def add_arguments(self, parser):
        parser.add_argument("name")
        kind = parser.add_mutually_exclusive_group(required=True)
        kind.add_argument("--test", action="store_const", const=FailoverKind.TEST, dest="kind")
        kind.add_argument("--live", action="store_const", const=FailoverKind.LIVE, dest="kind")
        kind.add_argument("--forecast", action="store_const", const="forecast", dest="kind",
                          help="print the downtime a live failover would cost now, and start nothing")
        parser.add_argument("--wait", action="store_true", help="follow the steps; exit 0 only if the boot is verified")
        parser.add_argument("--timeout", type=float, default=1800, help="with --wait: give up after N seconds")
        parser.add_argument("--json", action="store_true", dest="as_json", help="print the outcome as JSON")
        parser.add_argument("--actor", default="", help="on whose behalf (recorded in the VM's history beside "
                            "the OS user running the command)")

    def handle(self, name, kind, wait, timeout, as_json, actor, **options):
        vm = vm_named(name)
        if kind == "forecast":
            self._forecast(forecast.downtime(vm), as_json)
            return
        try:
            job = start_failover(vm, kind, actor=command_actor(actor))
        except FailoverError as exc:
            raise CommandError(str(exc)) from exc
        if kind == FailoverKind.LIVE and not as_json:
            self.stdout.write(f"live failover {job.pk} of {name}: forecast downtime "
                              f"{'unknown' if job.forecast_downtime_s is None else f'{job.forecast_downtime_s} s'}")
        if wait:
            job = follow(job, self.stdout, as_json=as_json, timeout=timeout)
        print_outcome(job, self.stdout, as_json)
        if wait and not job.boot_verified:
            raise CommandError(f"failover {job.pk} {job.status}: {job.error_message}")

    def _forecast(self, forecast: dict, as_json: bool) -> None:
        if as_json:
            self.stdout.write(json.dumps(forecast, indent=2))
            return
        for part in ("shutdown", "final_cycle", "boot"):
            seconds = forecast[f"{part}_s"]
            self.stdout.write(f"  {part.replace('_', ' '):<12} {'?' if seconds is None else f'{seconds:8.1f} s'}  "
                              f"{forecast['basis'][part]}")
        total = forecast["total_s"]
        self.stdout.write(f"  {'downtime':<12} {'unknown' if total is None else f'{total:8.1f} s'}")
