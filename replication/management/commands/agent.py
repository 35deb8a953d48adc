import json

from django.core.management.base import BaseCommand, CommandError

from replication.roles import command_actor
from replication.services import enrolment


class Command(BaseCommand):
    help = "Agents (VMAs): enrolment (pairing-code, approve, reject, revoke)."

    def add_arguments(self, parser):
        actions = parser.add_subparsers(dest="action", required=True)
        # --- enrolment [enrol] ------------------------------------------------
        code = actions.add_parser("pairing-code", help="a one-time code for one agent to enrol with (only its "
                                                       "hash is kept)")
        code.add_argument("--expires-min", type=int, default=None, dest="minutes",
                          help="minutes it stays valid (default PAIRING_CODE_MINUTES, 15)")
        code.add_argument("--json", action="store_true", dest="as_json")
        for action, what in (("approve", "give a pending agent its own broker user and message key"),
                             ("reject", "refuse a pending agent"),
                             ("revoke", "take an agent's credentials back at once (its broker user deleted, "
                                        "its connections closed)")):
            sub = actions.add_parser(action, help=what)
            sub.add_argument("name")
            sub.add_argument("--actor", default="", help="whom you act for (recorded in the audit trail)")
        # --- end enrolment ----------------------------------------------------

    def handle(self, action, **options):
        try:
            getattr(self, f"do_{action.replace('-', '_')}")(**options)
        except enrolment.EnrolmentError as exc:
            raise CommandError(str(exc)) from exc

    # --- enrolment [enrol] ----------------------------------------------------
    def do_pairing_code(self, minutes, as_json, **options):
        code = enrolment.new_pairing_code(command_actor(), minutes)
        if as_json:
            self.stdout.write(json.dumps({"code": code}))
        else:
            self.stdout.write(code)

    def do_approve(self, name, actor, **options):
        agent = enrolment.approve(name, command_actor(actor))
        self.stdout.write(f"agent {name} approved: broker user {agent.broker_user}, queue {agent.queue}")

    def do_reject(self, name, actor, **options):
        enrolment.reject(name, command_actor(actor))
        self.stdout.write(f"agent {name} rejected")

    def do_revoke(self, name, actor, **options):
        enrolment.revoke(name, command_actor(actor))
        self.stdout.write(f"agent {name} revoked: its broker user deleted, its messages refused")
    # --- end enrolment --------------------------------------------------------
