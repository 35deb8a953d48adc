"""The source inventory and the cloud side it is copied to: vCenters, VMs
and their disks, and the target volumes (with where they are attached)."""

from __future__ import annotations

import uuid

from django.db import models

from replication.choices import JOB_ACTIVE, SourceKind, VMState, VolumeProvider
from replication.names import validate_no_control_characters
from vma_agent.contract import EXPORT_PREFIX


class VCenter(models.Model):
    """How to reach a vCenter. The password is not stored here: only where
    to read it (a file, or an environment variable of the processes)."""

    name = models.CharField(max_length=100, unique=True, validators=[validate_no_control_characters])
    host = models.CharField(max_length=255)
    port = models.PositiveIntegerField(default=443)
    username = models.CharField(max_length=200)
    password_file = models.CharField(max_length=1000, blank=True, help_text="File holding the password")
    password_env = models.CharField(max_length=100, blank=True, help_text="Environment variable holding it")
    thumbprint = models.CharField(max_length=200, help_text="Pinned SHA-1 thumbprint of the server certificate")
    agent = models.CharField(max_length=50, default="local",
                             help_text="The agent (Agent.name) that reaches this vCenter: discovery, and the "
                                       "default agent of its VMs")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        db_table = "vcenters"
        ordering = ["name"]
        verbose_name = "vCenter"

    def __str__(self):
        return self.name


class VirtualMachineQuerySet(models.QuerySet):
    def in_service(self):
        """The VMs the lists show: every one but the decommissioned."""
        return self.exclude(context__state=VMState.DECOMMISSIONED)


class VirtualMachine(models.Model):
    name = models.CharField(max_length=200, unique=True, validators=[validate_no_control_characters])
    source_kind = models.CharField(max_length=20, choices=SourceKind.choices, default=SourceKind.IMAGE)
    agent = models.CharField(max_length=100, default="local", help_text="VMA whose queue copies this VM's disks")
    vcenter = models.ForeignKey(VCenter, null=True, blank=True, on_delete=models.PROTECT, related_name="vms")
    moref = models.CharField(max_length=100, blank=True)
    vm_uuid = models.CharField(max_length=64, blank=True)
    cbt_enabled = models.BooleanField(null=True, help_text="Changed block tracking; unknown for image sources")
    power_state = models.CharField(max_length=20, blank=True)
    esxi_host = models.CharField(max_length=200, blank=True,
                                 help_text="The ESXi host it runs on (discovery): snapshots and NBD sessions are "
                                           "per-host resources, limited by Agent.max_per_host")
    firmware = models.CharField(max_length=20, blank=True)
    secure_boot = models.BooleanField(default=False, help_text="The source boots with UEFI Secure Boot")
    tpm = models.BooleanField(default=False, help_text="The source has a vTPM")
    disk_bus = models.CharField(max_length=10, blank=True,
                                help_text="The bus of the source's boot disk: virtio, sata, scsi or ide; "
                                          "empty: unknown")
    scsi_model = models.CharField(max_length=20, blank=True,
                                  help_text="The source's SCSI controller as QEMU emulates it (lsilogic, "
                                            "lsisas1068, vmpvscsi) when its disks are on SCSI")
    nic_model = models.CharField(max_length=20, blank=True,
                                 help_text="The source's NIC model as QEMU emulates it (e1000e, e1000, vmxnet3, "
                                           "virtio); empty: unknown")
    guest_os = models.CharField(max_length=200, blank=True)
    cpus = models.PositiveIntegerField(null=True, blank=True, help_text="Virtual CPUs; unknown: the destination's "
                                                                        "default")
    memory_mib = models.PositiveIntegerField(null=True, blank=True, help_text="Memory in MiB")
    nics = models.JSONField(default=list, blank=True, help_text="[{label, mac, network}]")
    snapshots = models.JSONField(default=list, blank=True, help_text="Snapshots at discovery: [{name, moref}]")
    discovered_at = models.DateTimeField(null=True, blank=True)
    group = models.ForeignKey("replication.ProtectionGroup", null=True, blank=True, on_delete=models.SET_NULL,
                              related_name="vms", help_text="Its protection group (at most one)")
    protection_flag = models.CharField(max_length=500, blank=True,
                                       help_text="Why scheduled protection gave up on it (after the last retry)")
    created_at = models.DateTimeField(auto_now_add=True)

    objects = VirtualMachineQuerySet.as_manager()

    class Meta:
        verbose_name = "VM"
        verbose_name_plural = "VMs"
        db_table = "virtual_machines"
        ordering = ["name"]

    def __str__(self):
        return self.name

    def active_job(self):
        return self.jobs.filter(status__in=JOB_ACTIVE).first()

    def shape(self) -> dict:
        """The VM's shape as recorded (discovery, or add_vm's options): what a
        cycle stores unless its agent reads a fresher one."""
        return {"cpus": self.cpus, "memory_mib": self.memory_mib, "firmware": self.firmware or "bios",
                "secure_boot": self.secure_boot, "tpm": self.tpm, "disk_bus": self.disk_bus,
                "scsi_model": self.scsi_model, "nic_model": self.nic_model,
                "guest_os": self.guest_os, "nics": self.nics,
                "disks": list(self.disks.order_by("disk_key").values_list("disk_key", flat=True))}

    @property
    def lifecycle_state(self) -> str:
        """Its lifecycle state (VMContext), discovered until its first move."""
        try:
            return self.context.state
        except models.ObjectDoesNotExist:
            return VMState.DISCOVERED.value

    @property
    def lifecycle_label(self) -> str:
        return VMState(self.lifecycle_state).label


class SourceDisk(models.Model):
    """A disk of a VM in the source inventory; persists across jobs."""

    vm = models.ForeignKey(VirtualMachine, on_delete=models.CASCADE, related_name="disks")
    disk_key = models.CharField(max_length=50, help_text="e.g. disk-2000")
    label = models.CharField(max_length=80, blank=True,
                             help_text="vCenter's own name for the disk (deviceInfo.label), e.g. Hard disk 1")
    locator = models.CharField(max_length=1000, help_text="Image path or NBD URI")
    capacity_bytes = models.BigIntegerField()
    change_id = models.CharField(max_length=200, blank=True, help_text="Last committed changeId")
    device_key = models.IntegerField(null=True, blank=True, help_text="vSphere device key")
    unit_number = models.IntegerField(null=True, blank=True)
    backing_file = models.CharField(max_length=1000, blank=True, help_text="e.g. [datastore] vm/vm.vmdk")
    disk_mode = models.CharField(max_length=40, blank=True)
    sharing = models.CharField(max_length=40, blank=True)
    is_rdm = models.BooleanField(default=False)
    discovered_change_id = models.CharField(max_length=200, blank=True,
                                            help_text="changeId vCenter reported at the last discovery")

    class Meta:
        verbose_name = "source disk"
        db_table = "source_disks"
        ordering = ["vm", "disk_key"]
        constraints = [models.UniqueConstraint(fields=["vm", "disk_key"], name="uniq_source_disk_key")]

    def __str__(self):
        return f"{self.vm.name}/{self.disk_key}"


class TargetVolume(models.Model):
    """A volume on the cloud side (MigrateKit OSSEA's ossea_volumes), exported over
    NBD as migration-vol-{volume_uuid}. Reused by later jobs of its disk."""

    volume_uuid = models.UUIDField(default=uuid.uuid4, unique=True)
    source_disk = models.OneToOneField(
        SourceDisk, null=True, blank=True, on_delete=models.SET_NULL, related_name="target_volume"
    )
    provider = models.CharField(max_length=20, choices=VolumeProvider.choices, default=VolumeProvider.LOCAL)
    size_bytes = models.BigIntegerField()
    path = models.CharField(max_length=1000, blank=True, help_text="File or device on the appliance")
    cloud_volume_id = models.CharField(max_length=64, blank=True, help_text="CloudStack: the volume's id")
    requested_bytes = models.BigIntegerField(null=True, blank=True,
                                             help_text="CloudStack: the source's size, before rounding up to "
                                                       "what the disk offering allows (size_bytes)")
    created_at = models.DateTimeField(auto_now_add=True)
    retired_at = models.DateTimeField(null=True, blank=True,
                                      help_text="Deleted from its provider (the VM's replicas were removed); kept "
                                                "as the history of the jobs that wrote it")

    class Meta:
        db_table = "ossea_volumes"

    def __str__(self):
        return self.export_name

    @property
    def export_name(self) -> str:
        return f"{EXPORT_PREFIX}{self.volume_uuid}"


class DeviceMapping(models.Model):
    """Where a target volume is attached on the appliance."""

    volume = models.OneToOneField(TargetVolume, on_delete=models.CASCADE, related_name="device_mapping")
    vm = models.ForeignKey(VirtualMachine, on_delete=models.CASCADE, related_name="device_mappings")
    device_path = models.CharField(max_length=1000)
    operation_mode = models.CharField(max_length=20, default="oma")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        db_table = "device_mappings"

    def __str__(self):
        return f"{self.volume} -> {self.device_path}"
