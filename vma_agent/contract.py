"""Work orders: everything an agent needs to do one step of a job, so it
never reads the OMA's database. The OMA builds them from its rows and sends
them as the arguments of the agent's Celery tasks (plain JSON); the agent
answers by queueing an OMA task with the outcome. Free of Django."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from vma_agent.secrets import SecretError, read_secret
from vma_agent.vmware import VCenterConnection

# What a PowerOrder asks of the source VM.
SHUT_DOWN = "shut_down"
POWER_ON = "power_on"


class OrderError(ValueError):
    """A work order the agent cannot carry out as written."""


def _build(cls, data: dict):
    known = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class VCenterRef:
    """How the agent reaches a vCenter. The password is a reference the agent
    host owns (a file on it, or one of its environment variables): it never
    travels in an order, a log or a command line."""

    name: str
    host: str
    port: int
    username: str
    thumbprint: str
    password_file: str = ""
    password_env: str = ""

    def password(self) -> str:
        try:
            return read_secret(f"the password of vCenter {self.name}", self.password_file, self.password_env)
        except SecretError as exc:
            raise OrderError(str(exc)) from None

    def connection(self) -> VCenterConnection:
        return VCenterConnection(host=self.host, port=self.port, username=self.username,
                                 password=self.password(), thumbprint=self.thumbprint)


@dataclass(frozen=True)
class SourceOrder:
    """Prepare a VMware VM's source for one job: preflight, changed block
    tracking, the job's snapshot. Any other snapshot of ours on the VM is an
    orphan (the OMA runs one job per VM at a time) and is removed."""

    job_id: str
    sync_type: str
    vcenter: VCenterRef
    vm_moref: str
    vm_name: str
    disks: list[dict]  # [{"disk_key", "capacity_bytes"}]
    overrides: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> SourceOrder:
        return _build(cls, {**data, "vcenter": _build(VCenterRef, data["vcenter"])})


@dataclass(frozen=True)
class SnapshotRef:
    """A VMware disk as a job's snapshot froze it, and what to copy of it."""

    vcenter: VCenterRef
    vm_moref: str
    snapshot_moref: str
    device_key: int
    backing_file: str
    against_change_id: str  # "*" for a full copy (every allocated area)


@dataclass(frozen=True)
class CopyOrder:
    """Copy one disk of one job: attempt `attempt` (fences older runs)."""

    job_id: str
    disk_key: str
    attempt: int
    export_name: str
    source_locator: str  # image path or NBD URI; empty for a VMware disk
    target_uri: str
    capacity_bytes: int
    sync_type: str
    resume_from: int = 0
    verify: bool = False
    limit_bps: int | None = None
    snapshot: SnapshotRef | None = None
    # A qcow2 source: the bitmap this cycle starts (its change id once
    # committed), and for an incremental the committed one whose areas it copies.
    bitmap_new: str = ""
    bitmap_base: str = ""

    @property
    def zero_unlisted(self) -> bool:
        """A full copy from a list of allocated areas zeroes the rest of the
        target, which may hold an older copy."""
        return self.snapshot is not None and self.snapshot.against_change_id == "*"

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> CopyOrder:
        snapshot = data.get("snapshot")
        if snapshot is not None:
            snapshot = _build(SnapshotRef, {**snapshot, "vcenter": _build(VCenterRef, snapshot["vcenter"])})
        return _build(cls, {**data, "snapshot": snapshot})


@dataclass(frozen=True)
class SnapshotRemovalOrder:
    """Remove a job's snapshot once no copy of the job reads it any more;
    `finalize` says the OMA completes the job on success."""

    job_id: str
    vcenter: VCenterRef
    snapshot_moref: str
    finalize: bool = False

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> SnapshotRemovalOrder:
        return _build(cls, {**data, "vcenter": _build(VCenterRef, data["vcenter"])})


@dataclass(frozen=True)
class PowerOrder:
    """Power a VMware VM off for a live failover (the guest shuts down
    through VMware Tools; powered off if it is not off within `timeout_s`
    or cannot be asked) or back on for a rollback."""

    failover_id: int
    action: str  # SHUT_DOWN or POWER_ON
    vcenter: VCenterRef
    vm_moref: str
    vm_name: str
    timeout_s: float = 120.0

    def __post_init__(self):
        if self.action not in (SHUT_DOWN, POWER_ON):
            raise OrderError(f"power order action must be {SHUT_DOWN} or {POWER_ON}, not {self.action!r}")

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> PowerOrder:
        return _build(cls, {**data, "vcenter": _build(VCenterRef, data["vcenter"])})
