import json

from django.core.management.base import BaseCommand

from replication.management.lookup import vm_named


class Command(BaseCommand):
    help = "Show the target volume of each disk of a VM."

    def add_arguments(self, parser):
        parser.add_argument("name")
        parser.add_argument("--json", action="store_true")

    def handle(self, name, **options):
        vm = vm_named(name)
        rows = []
        for disk in vm.disks.select_related("target_volume"):
            volume = getattr(disk, "target_volume", None)
            rows.append({
                "disk": disk.disk_key,
                "volume_id": str(volume.volume_uuid) if volume else None,
                "export_name": volume.export_name if volume else None,
                "path": volume.path if volume and volume.path else None,
            })
        if options["json"]:
            self.stdout.write(json.dumps(rows, indent=2))
            return
        for row in rows:
            self.stdout.write(f"{row['disk']:<10} {row['export_name'] or '(no volume yet)':<52} {row['path'] or ''}")
