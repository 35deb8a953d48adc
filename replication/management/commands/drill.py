import json
import time

from django.core.management.base import BaseCommand, CommandError

from replication.choices import DrillStatus
from replication.management.lookup import group_named
from replication.models import DrillRun
from replication.roles import os_actor
from replication.services import drills

POLL_S = 1.0


class Command(BaseCommand):
    help = ("Rehearse the recovery of a protection group's VMs now: each in turn is test-failed-over, its boot "
            "verified on its console, and the test ended; --wait follows it and exits 1 if any VM failed. "
            "(`group update NAME --drill-every 1d` schedules drills.)")

    def add_arguments(self, parser):
        parser.add_argument("action", choices=["run", "list"])
        parser.add_argument("group")
        parser.add_argument("--wait", action="store_true")
        parser.add_argument("--timeout", type=float, default=0, help="with --wait: give up after N seconds")
        parser.add_argument("--json", action="store_true", dest="as_json")

    def handle(self, action, group, wait, timeout, as_json, **options):
        target = group_named(group)
        if action == "list":
            runs = list(DrillRun.objects.filter(group=target).select_related("vm")[:50])
            self._show(runs, as_json)
            return
        try:
            runs = drills.start_now(target, os_actor())
        except drills.DrillError as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(f"drill of group {target.name}: {', '.join(run.vm.name for run in runs)}")
        if not wait:
            return
        ids = [run.pk for run in runs]
        deadline = time.monotonic() + timeout if timeout else None
        while DrillRun.objects.filter(pk__in=ids, status__in=(DrillStatus.QUEUED, DrillStatus.RUNNING)).exists():
            if deadline and time.monotonic() > deadline:
                raise CommandError(f"the drill is still running after {timeout:g} s")
            time.sleep(POLL_S)
        runs = list(DrillRun.objects.filter(pk__in=ids).select_related("vm").order_by("vm__name"))
        self._show(runs, as_json)
        if any(run.status != DrillStatus.PASSED for run in runs):
            raise CommandError("a VM failed its drill")

    def _show(self, runs, as_json):
        if as_json:
            self.stdout.write(json.dumps([{"vm": run.vm.name, "status": run.status, "rto_s": run.rto_s,
                                           "note": run.note, "ended_at": run.ended_at and run.ended_at.isoformat()}
                                          for run in runs], indent=2))
            return
        for run in runs:
            rto = f", recovery in {run.rto_s:.1f} s" if run.rto_s is not None else ""
            self.stdout.write(f"  {run.vm.name}: {run.status}{rto} - {run.note}")
