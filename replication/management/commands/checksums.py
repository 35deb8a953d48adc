from django.core.management.base import BaseCommand, CommandError

from replication.management.lookup import vm_named
from replication.services import checksums


class Command(BaseCommand):
    help = "Compare the sha256 of each image-file disk of a VM with its local target volume; exit 1 on a mismatch."

    def add_arguments(self, parser):
        parser.add_argument("name")

    def handle(self, name, **options):
        mismatches = []
        for disk in checksums.compare(vm_named(name)):
            if disk["verdict"] == checksums.NOT_COMPARABLE:
                self.stdout.write(f"{disk['disk']}  (not comparable here: NBD source or no local volume)")
                continue
            self.stdout.write(f"{disk['disk']}  source {disk['source']}\n{'':11}target {disk['target']}  "
                              f"{disk['verdict'].upper()}")
            if disk["verdict"] == checksums.MISMATCH:
                mismatches.append(disk["disk"])
        if mismatches:
            raise CommandError(f"target differs from source for {', '.join(mismatches)}")
