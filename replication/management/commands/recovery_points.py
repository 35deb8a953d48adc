import json
from datetime import UTC, datetime

from django.core.management.base import BaseCommand

from replication.management.lookup import vm_named
from replication.services import points
from replication.templatetags.replication_tags import duration
from vma_agent.units import iec


class Command(BaseCommand):
    help = ("List a VM's recovery points, newest first: the instant its source was frozen, the cycle that made it, "
            "the data that cycle changed and what boots from it now. `failover VM --test|--live --point ID` boots "
            "one of them; retention (RECOVERY_POINTS_KEEP, the group's --points-* options) decides how many stay.")

    def add_arguments(self, parser):
        parser.add_argument("name")
        parser.add_argument("--json", action="store_true", dest="as_json", help="the rows as JSON")

    def handle(self, name, as_json, **options):
        vm = vm_named(name)
        rows = points.points_of(vm)
        if as_json:
            self.stdout.write(json.dumps(rows, indent=2))
            return
        if not rows:
            self.stdout.write(f"{name}: no recovery point yet (a point is made when a cycle completes)")
            return
        self.stdout.write(f"{'ID':>6}  {'FROZEN AT (UTC)':<19}  {'AGE':>8}  {'JOB':<32}  {'SYNC':<11}  "
                          f"{'CHANGED':>10}  IN USE BY")
        for row in rows:
            frozen = f"{datetime.fromisoformat(row['frozen_at']).astimezone(UTC):%Y-%m-%d %H:%M:%S}"
            self.stdout.write(f"{row['id']:>6}  {frozen:<19}  {duration(row['age_s']):>8}  {row['job']:<32}  "
                              f"{row['sync_type']:<11}  {iec(row['changed_bytes']):>10}  "
                              f"{', '.join(row['in_use_by']) or '-'}")
        summary = points.summary(vm)
        self.stdout.write(f"{summary['count']} point(s); newest {duration(summary['newest_age_s'])} old, oldest "
                          f"{duration(summary['oldest_age_s'])} old")
