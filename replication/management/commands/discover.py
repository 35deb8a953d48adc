import json

from django.core.management.base import BaseCommand, CommandError

from replication.models import VCenter
from replication.roles import os_actor
from replication.services.vmware import VCenterConfigError, discover
from vma_agent.vmware import VSphereError


class Command(BaseCommand):
    help = ("Record the VMs of a vCenter (or the named ones) with their disks, NICs (and guest addresses), hardware "
            "(firmware, Secure Boot, vTPM, boot disk bus, NIC model), CBT state and snapshots.")

    def add_arguments(self, parser):
        parser.add_argument("--vcenter", required=True, help="name given to add_vcenter")
        parser.add_argument("--vm", action="append", default=None, help="only this VM; repeat for more")
        parser.add_argument("--agent", default=None,
                            help="agent that copies new VMs' disks (default: the vCenter's agent)")
        parser.add_argument("--json", dest="as_json", action="store_true", help="print the recorded VMs as JSON")

    def handle(self, vcenter, vm, agent, as_json, **options):
        try:
            record = VCenter.objects.get(name=vcenter)
        except VCenter.DoesNotExist:
            raise CommandError(f"no vCenter named {vcenter!r}; record it with add_vcenter") from None
        try:
            vms = discover(record, vm, agent=agent, actor=os_actor())
        except (VCenterConfigError, VSphereError) as exc:
            raise CommandError(str(exc)) from exc
        if as_json:
            self.stdout.write(json.dumps([_vm_dict(v) for v in vms], indent=2))
            return
        for v in vms:
            cbt = "CBT on" if v.cbt_enabled else "CBT off"
            self.stdout.write(f"{v.name} {v.moref} {v.power_state} {cbt} {v.disks.count()} disks "
                              f"{len(v.snapshots)} snapshots")
            for disk in v.disks.all():
                self.stdout.write(f"  {disk.disk_key} {disk.capacity_bytes} {disk.disk_mode} {disk.backing_file}")


def _vm_dict(vm) -> dict:
    return {
        "name": vm.name, "moref": vm.moref, "uuid": vm.vm_uuid, "power_state": vm.power_state,
        "firmware": vm.firmware, "secure_boot": vm.secure_boot, "tpm": vm.tpm, "disk_bus": vm.disk_bus,
        "scsi_model": vm.scsi_model, "nic_model": vm.nic_model, "cpus": vm.cpus, "memory_mib": vm.memory_mib,
        "guest_os": vm.guest_os, "cbt_enabled": vm.cbt_enabled, "nics": vm.nics,
        "snapshots": vm.snapshots,
        "disks": [{"disk_key": d.disk_key, "label": d.label, "device_key": d.device_key, "unit_number": d.unit_number,
                   "capacity_bytes": d.capacity_bytes, "backing_file": d.backing_file, "disk_mode": d.disk_mode,
                   "sharing": d.sharing, "is_rdm": d.is_rdm, "discovered_change_id": d.discovered_change_id,
                   "committed_change_id": d.change_id}
                  for d in vm.disks.all()],
    }

