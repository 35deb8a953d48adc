import json

from django.core.management.base import BaseCommand, CommandError

from replication.models import CloudError
from replication.platforms.cloudstack.drift import drift


class Command(BaseCommand):
    help = ("Compare the OMA's volume records with CloudStack's listVolumes: volumes attached to the OMA that no "
            "record knows, records whose volume is gone, volumes attached elsewhere. Exits 1 when they drift.")

    def add_arguments(self, parser):
        parser.add_argument("--json", action="store_true", dest="as_json")

    def handle(self, as_json, **options):
        try:
            report = drift()
        except CloudError as exc:
            raise CommandError(str(exc)) from exc
        if as_json:
            self.stdout.write(json.dumps(report, indent=2))
        else:
            self.stdout.write(f"{report['in_step']} volume(s) as recorded")
            for entry in report["unknown"]:
                self.stdout.write(f"  unknown: {entry['id']} ({entry['name']}) is attached to the OMA, no record")
            for entry in report["gone"]:
                self.stdout.write(f"  gone: {entry['record']} ({entry['export']}) -> {entry['id']} no longer exists")
            for entry in report["elsewhere"]:
                self.stdout.write(f"  elsewhere: {entry['record']} -> {entry['id']} is attached to "
                                  f"{entry['attached_to'] or 'no VM'}")
        if report["unknown"] or report["gone"] or report["elsewhere"]:
            raise SystemExit(1)
