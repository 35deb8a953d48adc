import logging

from django.core.management.base import BaseCommand, CommandError

from replication.roles import os_actor
from replication.services.vmware import VCenterConfigError, register_vcenter
from vma_agent.vmware import VSphereError

log = logging.getLogger(__name__)


class Command(BaseCommand):
    help = ("Record a vCenter to discover VMs on. The password is read from a file or an environment "
            "variable, never given on the command line; the server's certificate thumbprint is pinned.")

    def add_arguments(self, parser):
        parser.add_argument("name", help="a short name for this vCenter, used by discover --vcenter")
        parser.add_argument("--host", required=True)
        parser.add_argument("--port", type=int, default=443)
        parser.add_argument("--user", required=True)
        secret = parser.add_mutually_exclusive_group(required=True)
        secret.add_argument("--password-file", default="", help="absolute path of a file holding the password")
        secret.add_argument("--password-env", default="", help="environment variable holding the password")
        parser.add_argument("--thumbprint", required=True, help="SHA-1 thumbprint of the vCenter certificate")
        parser.add_argument("--agent", default="local",
                            help="the agent (manage.py agent list) that reaches this vCenter: its discovery, and "
                                 "the agent of the VMs discovered on it (default: local)")
        parser.add_argument("--no-check", action="store_true", help="record it without logging in first")

    def handle(self, name, host, port, user, password_file, password_env, thumbprint, no_check, agent, **options):
        try:
            vcenter = register_vcenter(name, host, user, thumbprint, port=port, password_file=password_file,
                                       password_env=password_env, check=not no_check, agent=agent)
        except (VCenterConfigError, VSphereError) as exc:
            raise CommandError(str(exc)) from exc
        # A vCenter has no history of its own: the OMA's log says who registered it.
        log.info("vCenter %s (%s:%s) registered by %s", vcenter.name, vcenter.host, vcenter.port, os_actor())
        self.stdout.write(f"vCenter {vcenter.name} ({vcenter.host}:{vcenter.port}) recorded, reached through agent "
                          f"{vcenter.agent}")
