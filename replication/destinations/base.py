"""The destination interface: where a failed-over VM runs.

Volumes in, VM out. A destination protects replica volumes at a point in
time (so a test never writes the replica and a live failover has a rollback
point), defines a VM from a shape and the protected volumes, starts, stops
and destroys it, and reads its console and state.

Every handle is a plain string, so a failover job can store it (JSON) and a
worker that picks the job up after a crash can still clean up:

- a protected volume is named by what ``protect`` returned (for libvirt: the
  overlay's path; for CloudStack later: a volume snapshot id);
- a VM is named by the name it was defined with.

Every call either does what it says or raises ``DestinationError`` with a
reason an operator can act on. ``destroy`` and ``discard_protection`` are
idempotent: undoing what is already gone is not an error.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

Firmware = Literal["bios", "efi"]

# state() answers one of these. "absent": no VM of that name is defined.
VM_STATES = ("running", "paused", "shutoff", "crashed", "shutdown", "blocked", "pmsuspended", "absent", "unknown")


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


@dataclass(frozen=True)
class VMShape:
    """What the destination VM looks like: the source's CPUs, memory, firmware,
    disks in boot order (their disk keys; the first boots) and NICs."""

    cpus: int
    memory_mib: int
    firmware: Firmware = "bios"
    disks: tuple[str, ...] = ()  # disk keys in boot order; empty: the order define_vm gets them in
    nics: tuple[NIC, ...] = field(default_factory=tuple)

    def __post_init__(self):
        if self.cpus < 1 or self.memory_mib < 16:
            raise DestinationError(f"VM shape needs at least 1 CPU and 16 MiB (got {self.cpus}, {self.memory_mib})")
        if self.firmware not in ("bios", "efi"):
            raise DestinationError(f"VM firmware must be 'bios' or 'efi', not {self.firmware!r}")


# A disk of define_vm: (protected volume handle, disk key). The key is what the
# guest sees as the disk's serial number, so it can tell its disks apart.
DiskSpec = tuple[str, str]


class Destination(abc.ABC):
    name: str = "destination"

    @abc.abstractmethod
    def protect(self, volumes: Sequence[str], point_name: str) -> list[str]:
        """Protect every replica volume (a path) at one point in time without
        copying it; returns one handle per volume, in order. Protecting the
        same volumes under the same point name again returns the same handles."""

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

    @abc.abstractmethod
    def convert_guest(self, name: str, shape: VMShape, disks: Sequence[DiskSpec]) -> str:
        """Prepare the guest on the protected volumes for this destination
        (drivers, boot configuration) before its first boot; returns what was
        done. Raises GuestNotConverted with the reason when the guest cannot
        be converted (it may still boot), DestinationError when the
        converter itself cannot run."""

    @abc.abstractmethod
    def start(self, vm: str) -> None:
        """Power the VM on; returns once it runs (not once the guest booted)."""

    @abc.abstractmethod
    def stop(self, vm: str, timeout: float = 60.0) -> str:
        """Ask the guest to shut down; power it off after ``timeout`` s.
        Returns "shutdown", "forced" or "not running"."""

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
