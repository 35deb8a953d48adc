from django.core.management.base import BaseCommand, CommandError

from replication.models import VCenter
from replication.services.vmware import VCenterConfigError, sweep_snapshots
from vma_agent.vmware import VSphereError


class Command(BaseCommand):
    help = "Remove snapshots left by replication jobs that are no longer running (found by their name)."

    def add_arguments(self, parser):
        parser.add_argument("--vcenter", action="append", default=None, help="only this vCenter; repeat for more")

    def handle(self, vcenter, **options):
        vcenters = VCenter.objects.all()
        if vcenter:
            vcenters = vcenters.filter(name__in=vcenter)
            unknown = set(vcenter) - set(vcenters.values_list("name", flat=True))
            if unknown:
                raise CommandError(f"no vCenter named {', '.join(sorted(unknown))}")
        failed = []
        for record in vcenters:
            try:
                removed = sweep_snapshots(record)
            except (VCenterConfigError, VSphereError) as exc:
                failed.append(f"{record.name}: {exc}")
                continue
            for name in removed:
                self.stdout.write(f"removed {record.name}/{name}")
            self.stdout.write(f"{record.name}: {len(removed)} orphaned snapshots removed")
        if failed:
            raise CommandError("; ".join(failed))
