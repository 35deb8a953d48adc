import json

from django.core.management.base import BaseCommand, CommandError

from replication.management.confirm import confirmed
from replication.management.lookup import vm_named
from replication.roles import command_actor
from replication.serializers import failover_json
from replication.services.failover import FailoverError, commit_failover

WARNING = ("Committing {name}'s live failover: the VM keeps running on the destination and its disks become its own. "
           "A committed VM can no longer be rolled back. Its protection ends: no cycle runs for it again and its "
           "recovery points are released (their history, the jobs and the failovers, is kept).")


class Command(BaseCommand):
    help = ("Commit a VM's live failover: it stays on the destination for good, its disks its own; it can no longer "
            "be rolled back and its protection ends (history kept). Asks first unless --yes.")

    def add_arguments(self, parser):
        parser.add_argument("name")
        parser.add_argument("--yes", action="store_true", help="do not ask")
        parser.add_argument("--json", action="store_true", dest="as_json", help="print the failover as JSON")
        parser.add_argument("--actor", default="", help="on whose behalf (recorded in the VM's history beside "
                            "the OS user running the command)")

    def handle(self, name, yes, as_json, actor, **options):
        vm = vm_named(name)
        out = self.stderr if as_json else self.stdout  # --json: stdout stays the JSON document
        out.write(WARNING.format(name=name))
        confirmed(out, f"Commit {name}'s live failover?", yes)
        try:
            job = commit_failover(vm, actor=command_actor(actor))
        except FailoverError as exc:
            raise CommandError(str(exc)) from exc
        if as_json:
            self.stdout.write(json.dumps(failover_json(job), indent=2))
        else:
            self.stdout.write(f"live failover {job.pk} of {name} committed: {job.destination_vm} is the VM now; "
                              "no rollback, protection ended")
