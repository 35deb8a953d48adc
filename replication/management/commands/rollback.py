from django.core.management.base import BaseCommand, CommandError

from replication.management.following import follow, print_outcome
from replication.management.lookup import vm_named
from replication.roles import command_actor
from replication.services.failover import FailoverError, start_rollback


class Command(BaseCommand):
    help = ("Roll a VM's live failover back: its destination VM is destroyed, the replica volumes go back to the "
            "rollback point (what the writes on the destination did is lost) and the source powers on; the next "
            "cycle is incremental.")

    def add_arguments(self, parser):
        parser.add_argument("name")
        parser.add_argument("--wait", action="store_true", help="follow the steps; exit 0 only if it succeeded")
        parser.add_argument("--timeout", type=float, default=600)
        parser.add_argument("--json", action="store_true", dest="as_json")
        parser.add_argument("--actor", default="", help="on whose behalf (recorded in the VM's history beside "
                            "the OS user running the command)")

    def handle(self, name, wait, timeout, as_json, actor, **options):
        try:
            job = start_rollback(vm_named(name), actor=command_actor(actor))
        except FailoverError as exc:
            raise CommandError(str(exc)) from exc
        if wait:
            job = follow(job, self.stdout, as_json=as_json, timeout=timeout)
        print_outcome(job, self.stdout, as_json)
        if wait and job.status != "succeeded":
            raise CommandError(f"rollback {job.pk} {job.status}: {job.error_message}")
