from django.core.management.base import BaseCommand

from replication.management.lookup import vm_named
from replication.services.hardware import set_guest_conversion


class Command(BaseCommand):
    help = ("Whether a failover converts the VM's guest (virt-v2v-in-place: virtio drivers, boot configuration) on "
            "its overlays before the first boot. A guest it cannot convert boots unconverted, with the reason on the "
            "failover's 'convert guest' step.")

    def add_arguments(self, parser):
        parser.add_argument("name")
        parser.add_argument("switch", choices=["on", "off"])

    def handle(self, name, switch, **options):
        set_guest_conversion(vm_named(name), switch == "on")
        self.stdout.write(f"{name}: guest conversion {switch}")
