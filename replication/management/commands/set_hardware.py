import json
import logging

from django.core.management.base import BaseCommand, CommandError

from replication.management.lookup import vm_named
from replication.models import VMContext
from replication.platforms.base import DISK_BUSES, NIC_MODELS, SCSI_MODELS
from replication.roles import command_actor
from replication.services import hardware as hardware_service

log = logging.getLogger(__name__)
AUTO = "auto"  # the operator's choice for that setting removed: the source's or the conversion's again
SWITCH = {"on": True, "off": False, AUTO: None}


class Command(BaseCommand):
    help = ("The hardware a failed-over VM boots with: firmware, Secure Boot, vTPM, the disks' bus (and SCSI "
            "controller) and the NICs' model. Each comes from the source, else the guest conversion's outcome, "
            "else a default, unless chosen here; 'auto' removes one choice, --clear all of them. Prints what the "
            "VM will boot with and where each value comes from; with no option it only prints.")

    def add_arguments(self, parser):
        parser.add_argument("name")
        parser.add_argument("--disk-bus", choices=[*DISK_BUSES, AUTO])
        parser.add_argument("--scsi-model", choices=[*SCSI_MODELS, AUTO], help="the controller when the bus is scsi")
        parser.add_argument("--nic-model", choices=[*NIC_MODELS, AUTO])
        parser.add_argument("--firmware", choices=["bios", "efi", AUTO])
        parser.add_argument("--secure-boot", choices=list(SWITCH), help="UEFI Secure Boot (needs --firmware efi)")
        parser.add_argument("--tpm", choices=list(SWITCH), help="a vTPM 2.0")
        parser.add_argument("--clear", action="store_true", help="remove every choice made here (alone)")
        parser.add_argument("--json", action="store_true", dest="as_json", help="print the outcome as JSON")
        parser.add_argument("--actor", default="", help="on whose behalf (logged beside the OS user)")

    def handle(self, name, clear, as_json, actor, **options):
        changes = {}
        for key in ("disk_bus", "scsi_model", "nic_model", "firmware"):
            if options[key] is not None:
                changes[key] = None if options[key] == AUTO else options[key]
        for key in ("secure_boot", "tpm"):
            if options[key] is not None:
                changes[key] = SWITCH[options[key]]
        if clear and changes:
            raise CommandError("--clear removes every choice; give it alone, then set what you want")
        vm = vm_named(name)
        if changes or clear:
            try:
                hardware = hardware_service.set_overrides(vm, changes, clear=clear)
            except hardware_service.HardwareError as exc:
                raise CommandError(str(exc)) from exc
            log.info("hardware of %s set by %s: %s", vm.name, command_actor(actor),
                     "cleared" if clear else json.dumps(changes))
        else:
            hardware = hardware_service.for_vm(vm)
        context = VMContext.of(vm)
        if as_json:
            self.stdout.write(json.dumps({"vm": vm.name, "overrides": context.hardware, "summary": hardware.summary(),
                                          "hardware": hardware.as_json(), "warning": hardware.warning}, indent=2))
            return
        self.stdout.write(f"{vm.name} boots with: {hardware.summary()}")
        for key in hardware_service.KEYS:
            choice = hardware.choices[key]
            value = ("on" if choice.value else "off") if isinstance(choice.value, bool) else choice.value
            self.stdout.write(f"  {key:<12} {value:<12} {choice.origin:<11} {choice.why}")
        if hardware.warning:
            self.stdout.write(f"warning: {hardware.warning}")
