from django.core.management.base import BaseCommand, CommandError

from replication.management.lookup import vm_named
from replication.roles import command_actor
from replication.services.protection import ProtectionError, decommission


class Command(BaseCommand):
    help = ("Decommission a VM: delete its replica volumes on their provider, take it out of its protection group "
            "and hide it from the lists for good. Its jobs, failovers and history stay.")

    def add_arguments(self, parser):
        parser.add_argument("name")
        parser.add_argument("--yes", action="store_true", required=True,
                            help="yes, delete the replicas and retire the VM")
        parser.add_argument("--actor", default="", help="on whose behalf (recorded in the VM's history beside "
                            "the OS user running the command)")

    def handle(self, name, yes, actor, **options):
        try:
            done = decommission(vm_named(name), actor=command_actor(actor))
        except ProtectionError as exc:
            raise CommandError(str(exc)) from exc
        for line in done:
            self.stdout.write(line)
        self.stdout.write(f"{name}: decommissioned; {len(done)} replica volume(s) removed, its history kept")
