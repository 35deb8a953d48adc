import json

from django.core.management.base import BaseCommand, CommandError

from replication.choices import FailoverKind
from replication.management.confirm import confirmed
from replication.management.following import follow, print_outcome
from replication.management.lookup import vm_named
from replication.roles import command_actor
from replication.services import forecast
from replication.services.failover import FailoverError, start_failover
from replication.services.points import PointError, chosen

SOURCE_LOST = ("Live failover with the source site lost: no shutdown request is sent to the source and no final cycle "
               "runs. A replication cycle of the VM still running is fenced first: ended as lost, its layer "
               "discarded and its exports closed, so a late write from an agent cut off from here lands nowhere. "
               "Then the chosen recovery point boots on the production networks. When the source site returns, "
               "nothing powers the source on and no cycle starts until you roll back or commit.")


class Command(BaseCommand):
    help = ("Fail a VM over onto the destination from one of its recovery points (--point ID, see "
            "recovery_points; default the newest). --test boots it on its own overlays on the test network and "
            "leaves it running until failover_end; cycles go on adding points meanwhile. "
            "--live shuts the source down, runs a final incremental cycle and boots the VM on the mapped "
            "production networks (undo with rollback, or keep it with failover_commit); with --source-lost it "
            "does neither (the source site is gone) and asks first. --forecast only prints the live downtime "
            "forecast.")

    def create_parser(self, prog_name, subcommand, **kwargs):
        # Kept to refuse option combinations argparse cannot express, as argparse does.
        self._parser = super().create_parser(prog_name, subcommand, **kwargs)
        return self._parser

    def add_arguments(self, parser):
        parser.add_argument("name")
        kind = parser.add_mutually_exclusive_group(required=True)
        kind.add_argument("--test", action="store_const", const=FailoverKind.TEST, dest="kind")
        kind.add_argument("--live", action="store_const", const=FailoverKind.LIVE, dest="kind")
        kind.add_argument("--forecast", action="store_const", const="forecast", dest="kind",
                          help="print the downtime a live failover would cost now, and start nothing")
        parser.add_argument("--point", type=int, metavar="ID",
                            help="the recovery point to boot (manage.py recovery_points VM); default the newest")
        parser.add_argument("--source-lost", action="store_true",
                            help="with --live: the source site is gone; no shutdown request, no final cycle, a "
                                 "running cycle fenced (asks first)")
        parser.add_argument("--yes", action="store_true", help="with --source-lost: do not ask")
        parser.add_argument("--wait", action="store_true", help="follow the steps; exit 0 only if the boot is verified")
        parser.add_argument("--timeout", type=float, default=1800, help="with --wait: give up after N seconds")
        parser.add_argument("--json", action="store_true", dest="as_json", help="print the outcome as JSON")
        parser.add_argument("--actor", default="", help="on whose behalf (recorded in the VM's history beside "
                            "the OS user running the command)")

    def handle(self, name, kind, point, source_lost, yes, wait, timeout, as_json, actor, **options):
        if source_lost and kind != FailoverKind.LIVE:
            self._parser.error("--source-lost goes with --live only: a test failover never touches the source, "
                               "and a forecast starts nothing")
        if point is not None and kind == "forecast":
            self._parser.error("--point goes with --test or --live: a forecast starts nothing")
        vm = vm_named(name)
        if kind == "forecast":
            self._forecast(forecast.downtime(vm), as_json)
            return
        try:
            if point is not None:
                chosen(vm, point)  # an unknown or expired point: its reason, before anything is asked
        except PointError as exc:
            raise CommandError(str(exc)) from exc
        if source_lost:
            out = self.stderr if as_json else self.stdout  # --json: stdout stays the JSON document
            out.write(SOURCE_LOST)
            confirmed(out, f"Fail {name} over live with its source site lost?", yes)
        try:
            job = start_failover(vm, kind, actor=command_actor(actor), point_id=point, source_lost=source_lost)
        except (FailoverError, PointError) as exc:
            raise CommandError(str(exc)) from exc
        if job.recovery_point_id is not None and not as_json:
            self.stdout.write(f"{kind} failover {job.pk} of {name} boots recovery point {job.recovery_point_id}")
        if kind == FailoverKind.LIVE and not source_lost and not as_json:
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
