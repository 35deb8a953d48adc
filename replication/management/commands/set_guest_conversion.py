from django.core.management.base import BaseCommand

from replication.management.lookup import vm_named
from replication.models import VMContext


class Command(BaseCommand):
    help = ("Whether a failover converts the VM's guest (virt-v2v-in-place: virtio drivers, boot configuration) on "
            "its overlays before the first boot. A guest it cannot convert boots unconverted, with the reason on the "
            "failover's 'convert guest' step.")

    def add_arguments(self, parser):
        parser.add_argument("name")
        parser.add_argument("switch", choices=["on", "off"])

    def handle(self, name, switch, **options):
        context = VMContext.of(vm_named(name))
        context.convert_guest = switch == "on"
        context.save(update_fields=["convert_guest", "updated_at"])
        self.stdout.write(f"{name}: guest conversion {switch}")
