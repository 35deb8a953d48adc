"""Statuses, stages and the transitions allowed between statuses: one place."""

from django.db import models


class SourceKind(models.TextChoices):
    IMAGE = "image", "Disk image or NBD URI"
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
    """The seeds' stages, in order."""

    INITIALIZING = "Initializing"
    CREATING_SNAPSHOT = "Creating Snapshot"
    SETTING_UP_NBD = "Setting up NBD"
    PREPARING_MIGRATION = "Preparing Migration"
    TRANSFER = "Transfer"
    FINALIZING = "Finalizing"
    COMPLETED = "Completed"
    FAILED = "Failed"
    CANCELLED = "Cancelled"


# Job-level percent reached when a stage starts; Transfer maps the copy to 30..100.
STAGE_PERCENT = {
    Stage.INITIALIZING: 5,
    Stage.CREATING_SNAPSHOT: 10,
    Stage.SETTING_UP_NBD: 20,
    Stage.PREPARING_MIGRATION: 30,
    Stage.TRANSFER: 30,
    Stage.FINALIZING: 100,
    Stage.COMPLETED: 100,
}
TRANSFER_START_PERCENT = 30

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


def sources_of(transitions: dict, target) -> list:
    """The statuses from which `target` may be reached."""
    return [source for source, targets in transitions.items() if target in targets]
