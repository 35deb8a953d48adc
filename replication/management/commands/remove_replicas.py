from django.core.management.base import BaseCommand, CommandError

from replication.management.lookup import vm_named
from replication.roles import command_actor
from replication.services.protection import ProtectionError, remove_replicas


class Command(BaseCommand):
    help = ("Take a VM out of protection: delete its replica volumes on their provider (CloudStack volumes are "
            "detached from the OMA and deleted) and forget its changeIds, so a later cycle copies everything into "
            "new volumes. Its job history stays.")

    def add_arguments(self, parser):
        parser.add_argument("name")
        parser.add_argument("--yes", action="store_true", required=True, help="yes, delete the replicas")
        parser.add_argument("--actor", default="", help="on whose behalf (recorded in the VM's history beside "
                            "the OS user running the command)")

    def handle(self, name, yes, actor, **options):
        try:
            done = remove_replicas(vm_named(name), actor=command_actor(actor))
        except ProtectionError as exc:
            raise CommandError(str(exc)) from exc
        for line in done:
            self.stdout.write(line)
        self.stdout.write(f"{name}: {len(done)} replica volume(s) removed; the next cycle is a full copy")
