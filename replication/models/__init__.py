"""The OMA's models, one module per area; every model is importable from
here (`from replication.models import X`), which is also where Django finds
them. Models write and guard their own state (models.base, the transition
tables in choices.py); services decide when."""

from replication.models.agents import Agent, AgentAuditEntry, PairingCode
from replication.models.auth import ApiToken, Role
from replication.models.base import StateMachine
from replication.models.checks import ChecksumRun
from replication.models.cloud import CloudError, CloudStackConfig
from replication.models.failover import FailoverJob, FailoverStep, NetworkMapping
from replication.models.inventory import (
    EXPORT_PREFIX,
    DeviceMapping,
    SourceDisk,
    TargetVolume,
    VCenter,
    VirtualMachine,
)
from replication.models.jobs import (
    ChangeIdRecord,
    CopyAttempt,
    JobEvent,
    ProgressSample,
    ReplicationJob,
    VMDisk,
    database_up_since,
    heartbeats_stale_before,
    new_job_id,
    transfer_percent,
)
from replication.models.lifecycle import IllegalMove, VMContext, VMStateChange
from replication.models.points import PointLayer, RecoveryPoint
from replication.models.protection import Admission, DrillRun, ProtectionGroup

__all__ = [
    "EXPORT_PREFIX",
    "Admission",
    "Agent",
    "AgentAuditEntry",
    "ApiToken",
    "ChangeIdRecord",
    "ChecksumRun",
    "CloudError",
    "CloudStackConfig",
    "CopyAttempt",
    "DeviceMapping",
    "DrillRun",
    "FailoverJob",
    "FailoverStep",
    "IllegalMove",
    "JobEvent",
    "NetworkMapping",
    "PairingCode",
    "PointLayer",
    "ProgressSample",
    "ProtectionGroup",
    "RecoveryPoint",
    "ReplicationJob",
    "Role",
    "SourceDisk",
    "StateMachine",
    "TargetVolume",
    "VCenter",
    "VMContext",
    "VMDisk",
    "VMStateChange",
    "VirtualMachine",
    "database_up_since",
    "heartbeats_stale_before",
    "new_job_id",
    "transfer_percent",
]
