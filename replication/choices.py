"""Statuses, stages and the transitions allowed between statuses: one place."""

from django.db import models

from vma_agent import contract


class SourceKind(models.TextChoices):
    IMAGE = "image", "Disk image or NBD URI"
    QCOW2 = "qcow2", "qcow2 images with dirty bitmaps"
    VMWARE = "vmware", "VMware vCenter"


class SyncType(models.TextChoices):
    FULL = "full", "Full"
    INCREMENTAL = "incremental", "Incremental"


class VolumeProvider(models.TextChoices):
    LOCAL = "local", "Local volume files"
    CLOUDSTACK = "cloudstack", "CloudStack"


class JobStatus(models.TextChoices):
    PENDING = "pending", "Pending"
    PREPARING = "preparing", "Preparing"
    REPLICATING = "replicating", "Replicating"
    FINALIZING = "finalizing", "Finalizing"
    COMPLETED = "completed", "Completed"
    FAILED = "failed", "Failed"
    CANCELLED = "cancelled", "Cancelled"


class DiskStatus(models.TextChoices):
    PENDING = "pending", "Pending"
    COPYING = "copying", "Copying"
    COMPLETED = "completed", "Completed"
    FAILED = "failed", "Failed"
    CANCELLED = "cancelled", "Cancelled"


class Stage(models.TextChoices):
    """The stages of a copy, in order, named as MigrateKit OSSEA's OMA names them (defined in
    vma_agent.contract, which the agent shares)."""

    INITIALIZING = contract.INITIALIZING
    CREATING_SNAPSHOT = contract.CREATING_SNAPSHOT
    SETTING_UP_NBD = contract.SETTING_UP_NBD
    PREPARING_MIGRATION = contract.PREPARING_MIGRATION
    TRANSFER = contract.TRANSFER
    FINALIZING = contract.FINALIZING
    COMPLETED = contract.COMPLETED
    FAILED = contract.FAILED
    CANCELLED = contract.CANCELLED


# Job-level percent reached when a stage starts; Transfer maps the copy to 30..100.
STAGE_PERCENT = {
    **contract.STAGE_PERCENT,
    Stage.TRANSFER: contract.TRANSFER_FROM,
    Stage.FINALIZING: 100,
    Stage.COMPLETED: 100,
}
TRANSFER_START_PERCENT = contract.TRANSFER_FROM

JOB_TERMINAL = frozenset({JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED})
JOB_ACTIVE = frozenset(set(JobStatus) - JOB_TERMINAL)
JOB_TRANSITIONS = {
    JobStatus.PENDING: {JobStatus.PREPARING, JobStatus.FAILED, JobStatus.CANCELLED},
    JobStatus.PREPARING: {JobStatus.REPLICATING, JobStatus.FAILED, JobStatus.CANCELLED},
    JobStatus.REPLICATING: {JobStatus.FINALIZING, JobStatus.FAILED, JobStatus.CANCELLED},
    JobStatus.FINALIZING: {JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED},
}

DISK_TERMINAL = frozenset({DiskStatus.COMPLETED, DiskStatus.FAILED, DiskStatus.CANCELLED})
DISK_TRANSITIONS = {
    DiskStatus.PENDING: {DiskStatus.COPYING, DiskStatus.FAILED, DiskStatus.CANCELLED},
    DiskStatus.COPYING: {DiskStatus.COMPLETED, DiskStatus.FAILED, DiskStatus.CANCELLED},
}


def sources_of(transitions: dict, target, only_from=None) -> list:
    """The statuses from which `target` may be reached; with `only_from`,
    those of them a caller accepts (it may narrow the table, never widen it)."""
    sources = [source for source, targets in transitions.items() if target in targets]
    return sources if only_from is None else [source for source in sources if source in set(only_from)]


class VMState(models.TextChoices):
    """A VM's lifecycle (MigrateKit OSSEA's vm_replication_contexts.current_status)."""

    DISCOVERED = "discovered", "Discovered"
    REPLICATING = "replicating", "Replicating"
    READY_FOR_FAILOVER = "ready_for_failover", "Ready for failover"
    FAILED_OVER_TEST = "failed_over_test", "Failed over (test)"
    FAILED_OVER_LIVE = "failed_over_live", "Failed over (live)"
    COMPLETED = "completed", "Completed"
    FAILED = "failed", "Failed"
    CLEANUP_REQUIRED = "cleanup_required", "Cleanup required"
    DECOMMISSIONED = "decommissioned", "Decommissioned"  # replicas gone, hidden from the lists, history kept


# What each state allows next; anything else is refused with the reason.
VM_TRANSITIONS = {
    VMState.DISCOVERED: {VMState.REPLICATING, VMState.DECOMMISSIONED},
    VMState.REPLICATING: {VMState.READY_FOR_FAILOVER, VMState.FAILED, VMState.DISCOVERED},
    VMState.READY_FOR_FAILOVER: {VMState.REPLICATING, VMState.FAILED_OVER_TEST, VMState.FAILED_OVER_LIVE,
                                 VMState.CLEANUP_REQUIRED, VMState.DISCOVERED},
    VMState.FAILED: {VMState.REPLICATING, VMState.DISCOVERED},
    VMState.FAILED_OVER_TEST: {VMState.READY_FOR_FAILOVER, VMState.CLEANUP_REQUIRED},
    VMState.FAILED_OVER_LIVE: {VMState.READY_FOR_FAILOVER, VMState.COMPLETED},
    VMState.CLEANUP_REQUIRED: {VMState.READY_FOR_FAILOVER},
    VMState.COMPLETED: set(),
    VMState.DECOMMISSIONED: set(),
}

# Why a move is refused, by the state the VM is in (the reason an operator reads).
VM_STATE_REFUSALS = {
    VMState.FAILED_OVER_TEST: "a test failover is running; end it first",
    VMState.FAILED_OVER_LIVE: "the VM runs on the destination (live failover); roll back first",
    VMState.CLEANUP_REQUIRED: "a failover left resources behind; clean up first",
    VMState.COMPLETED: "the migration is completed",
    VMState.DECOMMISSIONED: "the VM is decommissioned",
    VMState.REPLICATING: "a replication cycle is running",
    VMState.DISCOVERED: "no replication cycle has completed yet",
    VMState.FAILED: "the last replication cycle failed before any recovery point existed; replicate again first",
}


class FailoverKind(models.TextChoices):
    TEST = "test", "Test failover"
    LIVE = "live", "Live failover"
    ROLLBACK = "rollback", "Rollback"  # of a live failover: back to the source


class FailoverStatus(models.TextChoices):
    PENDING = "pending", "Pending"
    RUNNING = "running", "Running"
    SUCCEEDED = "succeeded", "Succeeded"
    FAILED = "failed", "Failed"
    ENDED = "ended", "Ended"  # a test failover ended, or a live one rolled back (VM and overlays gone)
    COMMITTED = "committed", "Committed"  # a live one whose VM's disks became its own: no rollback


# Not ended yet: its destination VM may exist (a succeeded test or live
# failover runs on). A rollback is open only while it runs: FailoverJob.open().
FAILOVER_OPEN = frozenset({FailoverStatus.PENDING, FailoverStatus.RUNNING, FailoverStatus.SUCCEEDED})
FAILOVER_RUNNING = frozenset({FailoverStatus.PENDING, FailoverStatus.RUNNING})

# The steps that bring a failed-over VM up on the destination, in order: what
# a failover that got to one of them has to undo, and what its boot took.
FAILOVER_BOOT_STEPS = ("protect volumes", "convert guest", "define VM", "start VM", "verify boot")

# A failover waits (pending), runs, then succeeds or fails; a succeeded test
# or live one is ended (test ended, live rolled back) or, when undoing it
# goes wrong, failed. Failed and ended are final.
FAILOVER_TRANSITIONS = {
    FailoverStatus.PENDING: {FailoverStatus.RUNNING, FailoverStatus.FAILED},
    FailoverStatus.RUNNING: {FailoverStatus.SUCCEEDED, FailoverStatus.FAILED},
    FailoverStatus.SUCCEEDED: {FailoverStatus.ENDED, FailoverStatus.FAILED, FailoverStatus.COMMITTED},
}


class FailoverStepStatus(models.TextChoices):
    RUNNING = "running", "Running"
    DONE = "done", "Done"
    FAILED = "failed", "Failed"


FAILOVER_STEP_TRANSITIONS = {
    FailoverStepStatus.RUNNING: {FailoverStepStatus.DONE, FailoverStepStatus.FAILED},
}


class AdmissionStatus(models.TextChoices):
    WAITING = "waiting", "waiting for a slot"
    STARTED = "started", "started"
    SKIPPED = "skipped", "skipped"
    DROPPED = "dropped", "dropped"


class AdmissionReason(models.TextChoices):
    SCHEDULED = "scheduled", "scheduled"
    RETRY = "retry", "retry"


# A VM due for a cycle waits for a slot, then is decided once: its cycle
# started, skipped (with the reason), or dropped (it left the group).
ADMISSION_TRANSITIONS = {
    AdmissionStatus.WAITING: {AdmissionStatus.STARTED, AdmissionStatus.SKIPPED, AdmissionStatus.DROPPED},
}


class DrillStatus(models.TextChoices):
    QUEUED = "queued", "queued"
    RUNNING = "running", "running"
    PASSED = "passed", "passed"
    FAILED = "failed", "failed"


# A queued VM that cannot fail over fails its drill without running it.
DRILL_TRANSITIONS = {
    DrillStatus.QUEUED: {DrillStatus.RUNNING, DrillStatus.FAILED},
    DrillStatus.RUNNING: {DrillStatus.PASSED, DrillStatus.FAILED},
}


class AgentState(models.TextChoices):
    """An agent (MigrateKit OSSEA's VMA) as the OMA sees it."""

    PENDING = "pending", "pending approval"
    ACTIVE = "active", "active"
    PAUSED = "paused", "paused"  # takes no new cycle; its running copies go on
    DRAINING = "draining", "draining"  # takes no new cycle; removed (retired) once its copies end
    REJECTED = "rejected", "rejected"
    REVOKED = "revoked", "revoked"  # its credentials refused from now on


# Enrolment ends in approval (active) or rejection; an active agent may be
# paused, drained, resumed; revocation is final, as is rejection.
AGENT_TRANSITIONS = {
    AgentState.PENDING: {AgentState.ACTIVE, AgentState.REJECTED, AgentState.REVOKED},
    AgentState.ACTIVE: {AgentState.PAUSED, AgentState.DRAINING, AgentState.REVOKED},
    AgentState.PAUSED: {AgentState.ACTIVE, AgentState.DRAINING, AgentState.REVOKED},
    AgentState.DRAINING: {AgentState.ACTIVE, AgentState.PAUSED, AgentState.REVOKED},
}
AGENT_TAKES_WORK = (AgentState.ACTIVE,)


class ChecksumStatus(models.TextChoices):
    """A comparison of a VM's sources with its replicas (ChecksumRun)."""

    RUNNING = "running", "Running"
    MATCH = "match", "Every comparable disk matches"
    MISMATCH = "mismatch", "A replica differs from its source"
    FAILED = "failed", "Failed"


CHECKSUM_TRANSITIONS = {
    ChecksumStatus.RUNNING: {ChecksumStatus.MATCH, ChecksumStatus.MISMATCH, ChecksumStatus.FAILED},
    ChecksumStatus.MATCH: set(),
    ChecksumStatus.MISMATCH: set(),
    ChecksumStatus.FAILED: set(),
}
