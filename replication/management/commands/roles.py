import logging

from django.contrib.auth.models import User
from django.core.management.base import BaseCommand, CommandError

from replication import roles

log = logging.getLogger(__name__)


class Command(BaseCommand):
    help = ("Users and their roles (viewer: reads; operator: replicates, test failovers, drills; administrator: "
            "live failover, rollback, sources, clouds, users, settings, the admin). `roles` lists them; "
            "`roles grant USER ROLE` gives USER that role (replacing another); `roles revoke USER` takes it away; "
            "`roles sync` recreates the groups and their permissions.")

    def add_arguments(self, parser):
        actions = parser.add_subparsers(dest="action")
        actions.add_parser("list")
        grant = actions.add_parser("grant")
        grant.add_argument("user")
        grant.add_argument("role", choices=roles.ROLES)
        actions.add_parser("revoke").add_argument("user")
        actions.add_parser("sync")

    def handle(self, action=None, **options):
        if action == "sync":
            groups = roles.ensure_roles()
            self.stdout.write(f"roles {', '.join(groups)} in place")
            return
        if action in ("grant", "revoke"):
            try:
                user = User.objects.get(username=options["user"])
            except User.DoesNotExist:
                raise CommandError(f"no user named {options['user']!r} (manage.py createsuperuser, or add one "
                                   "in the admin)") from None
            if action == "grant":
                roles.grant(user, options["role"])
                log.info("role %s granted to %s by %s", options["role"], user.username, roles.os_actor())
                self.stdout.write(f"{user.username} is {options['role']} (granted by {roles.os_actor()})")
            else:
                roles.revoke(user)
                log.info("role of %s revoked by %s", user.username, roles.os_actor())
                self.stdout.write(f"{user.username} has no role now (revoked by {roles.os_actor()})")
            return
        for user in User.objects.order_by("username").prefetch_related("groups"):
            role = roles.role_of(user) or "-"
            notes = [note for flag, note in ((user.is_superuser, "superuser"), (not user.is_active, "inactive"))
                     if flag]
            self.stdout.write(f"{user.username:<24} {role:<14} {' '.join(notes)}".rstrip())
