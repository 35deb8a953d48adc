"""The two interfaces every platform implements (one package per place a
VM lives: replication.platforms.local, replication.platforms.cloudstack).

A target provider keeps the replica volumes: it provisions one per source
disk at the source's size, serves it to the agents' copies through the
OMA's export server, and deletes it for good.

A destination runs a failed-over VM: volumes in, VM out. It protects
replica volumes at a point in time (so a test never writes the replica and
a live failover has a rollback point), defines a VM from a shape and the
protected volumes, starts it, verifies its boot, destroys it, and reads its
console and state.

Every handle is a plain string, so a failover job can store it (JSON) and a
worker that picks the job up after a crash can still clean up:

- a replica volume is named by what ``replica_handle`` returns (libvirt: its
  path on the OMA; CloudStack: its volume id);
- a protected volume is named by what ``protect`` returned (libvirt: the
  overlay's path; CloudStack: a volume snapshot id);
- a VM is named by the name it was defined with.

Every call either does what it says or raises ``DestinationError`` (a
provider: ``VolumeError`` or the platform's own error) with a reason an
operator can act on. ``destroy`` and ``discard_protection`` are idempotent:
undoing what is already gone is not an error.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from replication.models import TargetVolume

Firmware = Literal["bios", "efi"]
# How the destination presents the disks and NICs to the guest. "scsi" is a
# SCSI controller of model VMShape.scsi_model (virtio-scsi unless the source's
# own controller is emulated: lsilogic, lsisas1068, vmpvscsi).
DISK_BUSES = ("virtio", "sata", "scsi", "ide")
SCSI_MODELS = ("virtio-scsi", "lsilogic", "lsisas1068", "vmpvscsi")
NIC_MODELS = ("virtio", "e1000e", "e1000", "vmxnet3", "rtl8139")

# state() answers one of these. "absent": no VM of that name is defined.
# How a failed-over VM's boot is seen (VMContext.boot_probes); any one suffices.
# console: its serial console shows the regex; screen: its screen, read by
# OCR, shows it; network: its NIC got a DHCP lease (or answered ARP) on its
# network; agent: the QEMU guest agent answers.
BOOT_PROBES = ("console", "screen", "network", "agent")
# No probes set: all four. The console and screen cover a Linux guest
# whatever its console= (the kernel prints on tty0 by default), Windows'
# sign-in screen, and our test guests; network covers a guest whose screen
# shows no words (a graphical lock screen) once its OS brought up its NIC
# (firmware never does: libvirt boots with strict boot order, so no PXE);
# the agent costs one refused call where no qemu-ga runs.
DEFAULT_BOOT_PROBES = BOOT_PROBES
# No regex set: a login prompt (Linux getty, OCR's spacing allowed), Windows'
# "Press Ctrl+Alt+Delete" or "Sign in", or the test guests' marker; never a
# firmware's or bootloader's banner (SeaBIOS, SYSLINUX, GRUB), which any
# console shows before the kernel has run.
DEFAULT_BOOT_REGEX = r"(?i)\blogin\s*:|\bBOOT-MARKER:|ctrl\s*\+\s*alt\s*\+\s*del|\bsign\s+in\b"

VM_STATES = ("running", "paused", "shutoff", "crashed", "shutdown", "blocked", "pmsuspended", "absent", "unknown")


@dataclass(frozen=True)
class BootEvidence:
    """What proved a boot: the probe (one of BOOT_PROBES, or the
    destination's own, e.g. CloudStack's 'running') and what it saw."""

    probe: str
    text: str


def parse_boot_probes(value: str | Sequence[str]) -> tuple[str, ...]:
    """Probes from a comma-separated string or a list, in BOOT_PROBES' order,
    without repeats; empty: DEFAULT_BOOT_PROBES. ValueError for an unknown one."""
    names = [n.strip().lower() for n in (value.split(",") if isinstance(value, str) else value) if n.strip()]
    unknown = [n for n in names if n not in BOOT_PROBES]
    if unknown:
        raise ValueError(f"unknown boot probe(s) {', '.join(map(repr, unknown))}: choose from "
                         f"{', '.join(BOOT_PROBES)}")
    return tuple(p for p in BOOT_PROBES if p in names) or DEFAULT_BOOT_PROBES


class VolumeError(RuntimeError):
    """A target volume cannot be made, served or removed; str() says why."""


class DestinationError(RuntimeError):
    """A destination operation failed; str() is the reason, readable as is."""


class GuestNotConverted(DestinationError):
    """The guest could not be converted (not inspectable, unsupported OS); it
    boots unconverted. str() is the converter's reason."""


@dataclass(frozen=True)
class NIC:
    """One network interface of the source VM."""

    mac: str | None = None  # None: the destination picks one
    source_network: str = ""  # the network's name on the source (for a mapping)
    ip: str | None = None  # the guest's address on it, where known (kept on CloudStack)


@dataclass(frozen=True)
class VMShape:
    """What the destination VM looks like: the source's CPUs, memory, firmware,
    disks in boot order (their disk keys; the first boots) and NICs, and the
    devices the guest finds them on (the source's, the conversion's or the
    operator's choice: services.hardware decides)."""

    cpus: int
    memory_mib: int
    firmware: Firmware = "bios"
    disks: tuple[str, ...] = ()  # disk keys in boot order; empty: the order define_vm gets them in
    nics: tuple[NIC, ...] = field(default_factory=tuple)
    secure_boot: bool = False  # UEFI Secure Boot with Microsoft's keys enrolled (efi only)
    tpm: bool = False  # a vTPM 2.0 (swtpm on libvirt)
    disk_bus: str = "virtio"
    scsi_model: str = "virtio-scsi"  # the controller when disk_bus is scsi
    nic_model: str = "virtio"

    def __post_init__(self):
        if self.cpus < 1 or self.memory_mib < 16:
            raise DestinationError(f"VM shape needs at least 1 CPU and 16 MiB (got {self.cpus}, {self.memory_mib})")
        if self.firmware not in ("bios", "efi"):
            raise DestinationError(f"VM firmware must be 'bios' or 'efi', not {self.firmware!r}")
        if self.secure_boot and self.firmware != "efi":
            raise DestinationError("Secure Boot needs UEFI firmware (efi)")
        if self.disk_bus not in DISK_BUSES:
            raise DestinationError(f"disk bus must be one of {', '.join(DISK_BUSES)}, not {self.disk_bus!r}")
        if self.scsi_model not in SCSI_MODELS:
            raise DestinationError(f"SCSI controller must be one of {', '.join(SCSI_MODELS)}, "
                                   f"not {self.scsi_model!r}")
        if self.nic_model not in NIC_MODELS:
            raise DestinationError(f"NIC model must be one of {', '.join(NIC_MODELS)}, not {self.nic_model!r}")


@dataclass(frozen=True)
class GuestConversion:
    """What a guest conversion did and decided (virt-v2v's own words): the
    bus it prepared the boot disk for and the NIC model it left drivers for,
    so the destination boots the guest on devices it can drive.

    block_bus: "virtio-blk", "virtio-scsi" or "ide" (virt-v2v's fallback
    when it could not install virtio drivers); net_bus: "virtio-net",
    "e1000" or "rtl8139"; None: the converter did not say. guest_type is
    the inspected OS type (windows, linux), product its name."""

    detail: str  # one line for the failover's step
    block_bus: str | None = None
    net_bus: str | None = None
    guest_type: str = ""
    product: str = ""
    warnings: tuple[str, ...] = ()

    def __str__(self) -> str:
        return self.detail

    @property
    def virtio(self) -> bool:
        """Whether virtio drivers are in the guest (its boot disk can be virtio)."""
        return self.block_bus in ("virtio-blk", "virtio-scsi")


# A disk of define_vm: (protected volume handle, disk key). The key is what the
# guest sees as the disk's serial number, so it can tell its disks apart.
DiskSpec = tuple[str, str]


class TargetProvider(abc.ABC):
    """Where replicated disks land on the OMA's side."""

    name: str = "provider"

    @abc.abstractmethod
    def provision(self, volume: TargetVolume, size_bytes: int) -> Path:
        """The volume at the source's size, exported; returns its path on the
        OMA. Each part already done is skipped, so a retry is safe."""

    @abc.abstractmethod
    def delete(self, volume: TargetVolume) -> str:
        """Remove the volume for good; returns what was done."""

    @abc.abstractmethod
    def export_uri(self, export_name: str) -> str:
        """The NBD URI an agent's copy writes the volume through."""

    @abc.abstractmethod
    def ensure_export_server(self) -> int:
        """Start the export server unless one already serves; returns its pid."""

    @abc.abstractmethod
    def stop_export_server(self) -> None:
        """Stop the export server (no server: nothing to do)."""

    # -- the journal: every cycle writes a layer of its own ---------------------
    #
    # `base` is the handle of the volume's layer in its VM's newest recovery
    # point, or None when the volume holds no point yet (the first cycle then
    # writes the volume itself: there is nothing to keep). A layer becomes a
    # point's only by seal_layer; discard_layer throws it away and fences the
    # cycle: its export is closed, so a late write lands nowhere.

    @abc.abstractmethod
    def open_layer(self, volume: TargetVolume, cycle: str, base: str | None) -> str:
        """Make (or find again) the cycle's layer of the volume over `base`
        and serve it; returns the NBD URI the cycle's copy writes."""

    @abc.abstractmethod
    def seal_layer(self, volume: TargetVolume, cycle: str, base: str | None) -> str:
        """The cycle completed: close its export, make its layer read-only;
        returns the layer's handle (what a failover boots, what retention
        merges). Sealing a sealed layer returns the same handle."""

    @abc.abstractmethod
    def discard_layer(self, volume: TargetVolume, cycle: str, base: str | None) -> str:
        """The cycle ended without completing: close its export (fence),
        throw its layer away; the volume is at `base` again. Idempotent;
        returns what was done."""

    @abc.abstractmethod
    def merge_layers(self, older: str, newer: str, above: str | None) -> str:
        """Retention: the point of `older` expires. Its newer neighbour's
        layer `newer` is merged into it (a cost proportional to `newer`'s
        data), `above` (the layer over `newer`, if any) is re-pointed at the
        result; returns the handle that now holds `newer`'s point."""

    @abc.abstractmethod
    def drop_layer(self, handle: str) -> None:
        """Remove a layer no point needs any more (protection ended)."""

    @abc.abstractmethod
    def layer_bytes(self, handle: str) -> int:
        """Space the layer takes, in bytes."""


class Destination(abc.ABC):
    name: str = "destination"
    # True where a failover boots the replica volumes themselves (CloudStack)
    # rather than an overlay over a recovery point's layers: then only the
    # newest point boots, and no cycle may run while a failover does.
    replica_boots_in_place: bool = False

    @abc.abstractmethod
    def replica_handle(self, volume: TargetVolume) -> str:
        """What this destination knows a replica volume by (``protect`` takes it)."""

    @abc.abstractmethod
    def check_ready(self) -> str:
        """What the destination needs besides the volumes is there; returns
        what was found, raises DestinationError with what is missing."""

    @abc.abstractmethod
    def protect(self, volumes: Sequence[str], point_name: str) -> list[str]:
        """Protect every replica volume (by its replica_handle) at one point in
        time without copying it; returns one handle per volume, in order.
        Protecting the same volumes under the same point name again returns
        the same handles."""

    @abc.abstractmethod
    def discard_protection(self, handles: Sequence[str]) -> None:
        """Throw the protections away (the guest's writes with them); the
        replicas stay exactly as they were. Refuses while a VM uses one."""

    @abc.abstractmethod
    def define_vm(self, name: str, shape: VMShape, disks: Sequence[DiskSpec | str],
                  network: str | Mapping[str, str] | None = None) -> str:
        """Define (not start) a VM from protected volumes; returns its handle.
        ``network``: one destination network for every NIC, a mapping from
        source network name to destination network, or None for no NICs.
        A VM of that name already defined is an error."""

    def check_nics(self, name: str, shape: VMShape, network: Mapping[str, str]) -> None:
        """Raise DestinationError with the reason when the destination cannot
        give the VM its NICs on these mapped networks (checked before a live
        failover touches the source). Not abstract: nothing to check."""
        return None

    def hardware_choices(self, vm: str) -> dict:
        """What the destination chose for the VM it defined as ``vm`` where
        the shape left it a choice, as FailoverJob.hardware records it:
        ``{what: {"value": ..., "origin": "destination", "why": ...}}`` (CloudStack: the service
        offering, the NICs it kept, the boot type, the disk controller).
        Not abstract: {} where the destination chooses nothing."""
        return {}

    @abc.abstractmethod
    def convert_guest(self, name: str, shape: VMShape, disks: Sequence[DiskSpec]) -> str | GuestConversion:
        """Prepare the guest on the protected volumes for this destination
        (drivers, boot configuration) before its first boot; returns what was
        done (a GuestConversion where the converter says what it decided:
        services.hardware then boots the guest on those devices). Raises
        GuestNotConverted with the reason when the guest cannot be converted
        (it may still boot), DestinationError when the converter itself
        cannot run."""

    @abc.abstractmethod
    def start(self, vm: str) -> None:
        """Power the VM on; returns once it runs (not once the guest booted)."""

    @abc.abstractmethod
    def verify_boot(self, vm: str, probes: Sequence[str], pattern: str, timeout_s: float,
                    heartbeat: Callable[[], None]) -> BootEvidence:
        """Once the VM started: what proves its guest booted, by the first of
        ``probes`` (BOOT_PROBES) to see it within ``timeout_s`` (the regex
        ``pattern``, DEFAULT_BOOT_REGEX if empty, for the console and the
        screen), all polled together. Raises DestinationError with the reason
        (each probe's last word, the console's or screen's last lines) when
        the boot is not proven, at once if the VM stops running. A
        destination that cannot run a probe says so, or proves the boot its
        own way (named in the evidence). ``heartbeat`` is called every few
        seconds of a long wait."""

    @abc.abstractmethod
    def commit_vm(self, vm: str, protection: Sequence[str], heartbeat: Callable[[], None]) -> str:
        """A live failover is made final: the running VM's disks become its
        own (nothing of them left in the protections' backing chain, nor
        in a protection that a rollback would discard); returns what was
        done. The VM keeps running throughout."""

    @abc.abstractmethod
    def destroy(self, vm: str) -> None:
        """Power off and undefine the VM. No VM of that name: nothing to do."""

    @abc.abstractmethod
    def console_text(self, vm: str) -> str:
        """Everything the VM's serial console printed since it last started
        ("" if nothing yet or no such VM)."""

    @abc.abstractmethod
    def state(self, vm: str) -> str:
        """One of VM_STATES."""

    @abc.abstractmethod
    def free_memory_mib(self) -> int | None:
        """Memory free for new VMs, in MiB (None: the destination cannot say)."""

    @abc.abstractmethod
    def has_network(self, network: str) -> bool:
        """Whether a NIC can join this destination network."""

    @abc.abstractmethod
    def close(self) -> None:
        """Let go of what the destination holds open (a connection); it may
        be used again afterwards."""
