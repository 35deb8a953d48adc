"""The contract between the OMA and its agents (VMAs), free of Django: both
sides import it, the agent imports nothing of the OMA.

- Work orders: everything an agent needs to do one step of a job, so it
  never reads the OMA's database. The OMA builds them from its rows and
  sends them as the arguments of the agent's Celery tasks (plain JSON).
- Outcomes: the agent's answer to each order, queued as the argument of an
  OMA task (plain JSON too). Both sides hold them as frozen dataclasses and
  check a dict against its class where it crosses the boundary (`from_dict`):
  a malformed one is refused with the field and the reason.
- The stages a job goes through, their job-level percent, and the export
  name prefix of a target volume.

The Celery task and queue names are in vma_agent.task_names."""

from __future__ import annotations

import functools
import types
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass

from vma_agent.secrets import SecretError, read_secret
from vma_agent.vmware import VCenterConnection

# Stages, in order (MigrateKit OSSEA's names: the progress API's wire format).
INITIALIZING = "Initializing"
CREATING_SNAPSHOT = "Creating Snapshot"
SETTING_UP_NBD = "Setting up NBD"
PREPARING_MIGRATION = "Preparing Migration"
TRANSFER = "Transfer"
FINALIZING = "Finalizing"
COMPLETED = "Completed"
FAILED = "Failed"
CANCELLED = "Cancelled"
STAGES = (INITIALIZING, CREATING_SNAPSHOT, SETTING_UP_NBD, PREPARING_MIGRATION, TRANSFER, FINALIZING, COMPLETED,
          FAILED, CANCELLED)
# Job-level percent reached when a stage before the copy starts; Transfer
# maps the copy's own progress onto TRANSFER_FROM..100 (DESIGN section 4).
STAGE_PERCENT = {INITIALIZING: 5, CREATING_SNAPSHOT: 10, SETTING_UP_NBD: 20, PREPARING_MIGRATION: 30}
TRANSFER_FROM = 30

# A target volume's NBD export name: this prefix and the volume's uuid.
EXPORT_PREFIX = "migration-vol-"

# What a PowerOrder asks of the source VM.
SHUT_DOWN = "shut_down"
POWER_ON = "power_on"

# How a copy run ended (DiskCopied.status).
COPY_STATUSES = ("completed", "failed", "cancelled", "superseded", "duplicate")


class ContractError(ValueError):
    """An order or an outcome that does not match the contract."""


class OrderError(ContractError):
    """A work order the agent cannot carry out as written."""


class OutcomeError(ContractError):
    """An agent's outcome the OMA cannot read."""


# Checking a dict against a dataclass ----------------------------------------

@functools.cache
def _hints(cls) -> dict[str, object]:
    return typing.get_type_hints(cls)


def _matches(value, hint) -> bool:
    """Whether `value` (as JSON decoded it) is of the annotated type; an int
    passes for a float, a bool never passes for an int."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, option) for option in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if origin is dict:
        key, item = typing.get_args(hint)
        return isinstance(value, dict) and all(_matches(k, key) and _matches(v, item) for k, v in value.items())
    if is_dataclass(hint):
        return isinstance(value, hint)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _parse(value, hint):
    """`value` with its nested dataclasses built from their dicts."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            if option is not type(None) and value is not None:
                return _parse(value, option)
        return value
    if is_dataclass(hint) and isinstance(value, dict):
        return hint.from_dict(value)
    if origin is dict and isinstance(value, dict):
        item = typing.get_args(hint)[1]
        return {k: _parse(v, item) for k, v in value.items()}
    return value


class Message:
    """An order or an outcome: a frozen dataclass that travels as a dict.
    Unknown keys are ignored (the other side may be newer); a missing
    required field or a value of the wrong type is refused."""

    error: typing.ClassVar[type[ContractError]] = ContractError

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict):
        if not isinstance(data, dict):
            raise cls.error(f"{cls.__name__} must be a JSON object, not {type(data).__name__}")
        hints = _hints(cls)
        known = {f.name: _parse(data[f.name], hints[f.name]) for f in fields(cls) if f.name in data}
        try:
            return cls(**known)
        except TypeError as exc:  # a required field left out
            raise cls.error(f"{cls.__name__}: {exc}") from None

    def check(self) -> None:
        hints = _hints(type(self))
        for f in fields(self):
            value = getattr(self, f.name)
            if not _matches(value, hints[f.name]):
                raise self.error(f"{type(self).__name__}.{f.name} must be {f.type}, not {type(value).__name__} "
                                 f"{str(value)[:80]!r}")


class Outcome(Message):
    """An agent's answer to one order. Checked as it is built (by the agent)
    and as it is read (by the OMA); travels without its empty fields."""

    error = OutcomeError

    def __post_init__(self):
        self.check()

    def as_dict(self) -> dict:
        return {key: value for key, value in asdict(self).items() if value is not None}


# Orders ---------------------------------------------------------------------

class Order(Message):
    """Checked where the agent reads it; the OMA builds it from its rows."""

    error = OrderError

    @classmethod
    def from_dict(cls, data: dict):
        order = super().from_dict(data)
        order.check()
        return order


@dataclass(frozen=True)
class VCenterRef(Order):
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
class SourceOrder(Order):
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


@dataclass(frozen=True)
class SnapshotRef(Order):
    """A VMware disk as a job's snapshot froze it, and what to copy of it."""

    vcenter: VCenterRef
    vm_moref: str
    snapshot_moref: str
    device_key: int
    backing_file: str
    against_change_id: str  # "*" for a full copy (every allocated area)


@dataclass(frozen=True)
class CopyOrder(Order):
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


@dataclass(frozen=True)
class SnapshotRemovalOrder(Order):
    """Remove a job's snapshot once no copy of the job reads it any more;
    `finalize` says the OMA completes the job on success."""

    job_id: str
    vcenter: VCenterRef
    snapshot_moref: str
    finalize: bool = False


@dataclass(frozen=True)
class PowerOrder(Order):
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


# Outcomes -------------------------------------------------------------------

@dataclass(frozen=True)
class FrozenDisk(Outcome):
    """A disk as the job's snapshot froze it."""

    change_id: str
    backing_file: str
    device_key: int


@dataclass(frozen=True)
class SourcePrepared(Outcome):
    """The answer to a SourceOrder: the snapshot taken (its moref even when a
    later step failed, so the OMA always knows what to remove), the VM's
    shape and per disk what the snapshot froze; or why it failed."""

    snapshot_moref: str = ""
    snapshot_name: str = ""
    removed_orphans: list[str] = field(default_factory=list)  # morefs of other jobs' snapshots removed
    events: list[str] = field(default_factory=list)  # for the job's timeline
    shape: dict | None = None  # VMInfo.shape(): what this cycle's replica is
    cbt_enabled: bool = False  # changed block tracking was turned on now
    disks: dict[str, FrozenDisk] | None = None  # by disk key
    error: str = ""


@dataclass(frozen=True)
class DiskCopied(Outcome):
    """The answer to a CopyOrder: how the run ended (COPY_STATUSES), its
    figures and committed cursor, and where it resumed and why."""

    status: str
    worker: str = ""
    reason: str = ""
    resume_from: int | None = None  # where the run started (after comparing below the checkpoint)
    resume_checkpoint: int | None = None  # the recorded checkpoint it resumed from
    resume_reason: str = ""
    resume_differed_at: int | None = None  # where the target first differed from the source
    resume_compared: int | None = None  # data below the checkpoint compared equal; None: not compared
    bytes_total: int | None = None
    bytes_zeroed: int | None = None
    throughput_bps: int | None = None
    bytes_read: int = 0
    checkpoint_bytes: int = 0

    def __post_init__(self):
        super().__post_init__()
        if self.status not in COPY_STATUSES:
            raise OutcomeError(f"DiskCopied.status must be one of {', '.join(COPY_STATUSES)}, not {self.status!r}")
        if self.status == "completed" and None in (self.bytes_total, self.bytes_zeroed, self.throughput_bps):
            raise OutcomeError("a completed DiskCopied needs bytes_total, bytes_zeroed and throughput_bps")

    @property
    def checkpoint_resumed(self) -> int:
        """The recorded checkpoint the run resumed from; 0 for a run from the start."""
        return (self.resume_from if self.resume_checkpoint is None else self.resume_checkpoint) or 0


@dataclass(frozen=True)
class SnapshotRemoved(Outcome):
    """The answer to a SnapshotRemovalOrder."""

    removed: bool = False
    error: str = ""


@dataclass(frozen=True)
class SourcePowered(Outcome):
    """The answer to a PowerOrder: how the VM was powered off or on, its
    power state after it and how long it took; or why it failed."""

    action: str = ""
    how: str | None = None
    power_state: str | None = None
    seconds: float | None = None
    error: str = ""
