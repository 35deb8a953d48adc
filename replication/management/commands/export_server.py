from django.core.management.base import BaseCommand

from replication.platforms import get_provider
from vma_agent import nbdkit


class Command(BaseCommand):
    help = "Start, stop or show the NBD server that exports the local target volumes."

    def add_arguments(self, parser):
        parser.add_argument("action", choices=["start", "stop", "status"])

    def handle(self, action, **options):
        provider = get_provider()
        if action == "start":
            pid = provider.ensure_export_server()
            self.stdout.write(f"export server pid {pid} on {provider.socket_path} serving {provider.volume_dir}")
        elif action == "stop":
            provider.stop_export_server()
            self.stdout.write("export server stopped")
        else:
            pid = nbdkit.daemon_pid(provider.pidfile)
            self.stdout.write(f"running, pid {pid}, socket {provider.socket_path}" if pid else "not running")
