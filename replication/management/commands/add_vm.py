from django.core.management.base import BaseCommand, CommandError

from replication.models import VMContext
from replication.platforms.base import DISK_BUSES, NIC_MODELS, SCSI_MODELS
from replication.roles import os_actor
from replication.services.inventory import InventoryError, register_image_vm


class Command(BaseCommand):
    help = "Register a VM whose disks are local images or NBD URIs (keys disk-2000, disk-2001, ...)."

    def add_arguments(self, parser):
        parser.add_argument("name")
        parser.add_argument("--disk", action="append", required=True, metavar="PATH_OR_NBD_URI",
                            help="an absolute raw image path or an NBD URI; repeat for each disk, in order")
        parser.add_argument("--agent", default="local", help="VMA whose queue copies the disks (default: local)")
        parser.add_argument("--cpus", type=int, default=None, help="virtual CPUs of a failed-over copy")
        parser.add_argument("--memory-mib", type=int, default=None, help="its memory in MiB")
        parser.add_argument("--firmware", choices=["bios", "efi"], default="bios", help="its firmware")
        parser.add_argument("--secure-boot", action="store_true",
                            help="UEFI Secure Boot with Microsoft's keys enrolled (needs --firmware efi)")
        parser.add_argument("--tpm", action="store_true", help="a vTPM 2.0 (swtpm on the libvirt destination)")
        parser.add_argument("--disk-bus", choices=DISK_BUSES, default="",
                            help="the bus the image's guest boots from (its drivers); default: unknown, decided "
                                 "at failover (see set_hardware)")
        parser.add_argument("--scsi-model", choices=SCSI_MODELS, default="",
                            help="with --disk-bus scsi: the SCSI controller")
        parser.add_argument("--nic-model", choices=NIC_MODELS, default="",
                            help="the NIC model the guest has a driver for; default: unknown")

    def handle(self, name, disk, agent, cpus, memory_mib, firmware, secure_boot, tpm, disk_bus, scsi_model,
               nic_model, **options):
        try:
            vm = register_image_vm(name, disk, agent=agent, cpus=cpus, memory_mib=memory_mib, firmware=firmware,
                                   secure_boot=secure_boot, tpm=tpm, disk_bus=disk_bus, scsi_model=scsi_model,
                                   nic_model=nic_model)
        except InventoryError as exc:
            raise CommandError(str(exc)) from exc
        VMContext.registered(vm, os_actor(), "with add_vm")
        for source_disk in vm.disks.all():
            self.stdout.write(f"{vm.name} {source_disk.disk_key} {source_disk.capacity_bytes} {source_disk.locator}")
