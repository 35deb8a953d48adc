import hashlib

from django.core.management.base import BaseCommand, CommandError

from replication.management.lookup import vm_named
from replication.services.inventory import is_nbd_uri

READ_BYTES = 4 * 1024 * 1024


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(READ_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


class Command(BaseCommand):
    help = "Compare the sha256 of each image-file disk of a VM with its local target volume; exit 1 on a mismatch."

    def add_arguments(self, parser):
        parser.add_argument("name")

    def handle(self, name, **options):
        vm = vm_named(name)
        mismatches = []
        for disk in vm.disks.select_related("target_volume"):
            volume = getattr(disk, "target_volume", None)
            if is_nbd_uri(disk.locator) or volume is None or not volume.path:
                self.stdout.write(f"{disk.disk_key}  (not comparable here: NBD source or no local volume)")
                continue
            source, target = file_sha256(disk.locator), file_sha256(volume.path)
            verdict = "MATCH" if source == target else "MISMATCH"
            self.stdout.write(f"{disk.disk_key}  source {source}\n{'':11}target {target}  {verdict}")
            if source != target:
                mismatches.append(disk.disk_key)
        if mismatches:
            raise CommandError(f"target differs from source for {', '.join(mismatches)}")
