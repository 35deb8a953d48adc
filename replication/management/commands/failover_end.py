import json

from django.core.management.base import BaseCommand, CommandError

from replication.management.lookup import vm_named
from replication.roles import command_actor
from replication.serializers import failover_json
from replication.services.failover import FailoverError, end_test_failover


class Command(BaseCommand):
    help = "End a VM's test failover: its destination VM and overlays go; the replica is as it was."

    def add_arguments(self, parser):
        parser.add_argument("name")
        parser.add_argument("--json", action="store_true", dest="as_json")
        parser.add_argument("--actor", default="", help="on whose behalf (recorded in the VM's history beside "
                            "the OS user running the command)")

    def handle(self, name, as_json, actor, **options):
        try:
            job = end_test_failover(vm_named(name), actor=command_actor(actor))
        except FailoverError as exc:
            raise CommandError(str(exc)) from exc
        if as_json:
            self.stdout.write(json.dumps(failover_json(job), indent=2))
        else:
            self.stdout.write(f"test failover {job.pk} of {name} ended; {job.destination_vm} and its overlays removed")
