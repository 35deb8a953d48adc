"""Replication state. Models own their state transitions: each transition is a
conditional UPDATE from the statuses allowed in choices.py, so two processes
racing on one row cannot both win, and terminal states stay final."""

from __future__ import annotations

import secrets
import uuid
from datetime import timedelta

from django.db import models
from django.db.models import Sum
from django.utils import timezone

from replication.choices import (
    DISK_TERMINAL,
    DISK_TRANSITIONS,
    JOB_ACTIVE,
    JOB_TERMINAL,
    JOB_TRANSITIONS,
    STAGE_PERCENT,
    TRANSFER_START_PERCENT,
    DiskStatus,
    JobStatus,
    SourceKind,
    Stage,
    SyncType,
    VolumeProvider,
    sources_of,
)

EXPORT_PREFIX = "migration-vol-"
PROGRESS_SAMPLE_S = timedelta(seconds=5)


def new_job_id() -> str:
    """The seeds' form: job-YYYYMMDD-HHMMSS.mmm-xxxxxx."""
    now = timezone.now()
    return f"job-{now:%Y%m%d-%H%M%S}.{now.microsecond // 1000:03d}-{secrets.token_hex(3)}"


def transfer_percent(bytes_done: int, bytes_total: int) -> float:
    """Job-level percent during Transfer: the copy mapped onto 30..100."""
    fraction = 1.0 if bytes_total <= 0 else min(1.0, bytes_done / bytes_total)
    return TRANSFER_START_PERCENT + (100 - TRANSFER_START_PERCENT) * fraction


class VirtualMachine(models.Model):
    name = models.CharField(max_length=200, unique=True)
    source_kind = models.CharField(max_length=20, choices=SourceKind.choices, default=SourceKind.IMAGE)
    agent = models.CharField(max_length=100, default="local", help_text="VMA whose queue copies this VM's disks")
    moref = models.CharField(max_length=100, blank=True)
    vm_uuid = models.CharField(max_length=64, blank=True)
    cbt_enabled = models.BooleanField(null=True, help_text="Changed block tracking; unknown for image sources")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        db_table = "virtual_machines"
        ordering = ["name"]

    def __str__(self):
        return self.name

    def active_job(self):
        return self.jobs.filter(status__in=JOB_ACTIVE).first()


class SourceDisk(models.Model):
    """A disk of a VM in the source inventory; persists across jobs."""

    vm = models.ForeignKey(VirtualMachine, on_delete=models.CASCADE, related_name="disks")
    disk_key = models.CharField(max_length=50, help_text="e.g. disk-2000")
    locator = models.CharField(max_length=1000, help_text="Image path or NBD URI")
    capacity_bytes = models.BigIntegerField()
    change_id = models.CharField(max_length=200, blank=True, help_text="Last committed changeId")

    class Meta:
        db_table = "source_disks"
        ordering = ["vm", "disk_key"]
        constraints = [models.UniqueConstraint(fields=["vm", "disk_key"], name="uniq_source_disk_key")]

    def __str__(self):
        return f"{self.vm.name}/{self.disk_key}"


class TargetVolume(models.Model):
    """A volume on the cloud side (the seeds' ossea_volumes), exported over
    NBD as migration-vol-{volume_uuid}. Reused by later jobs of its disk."""

    volume_uuid = models.UUIDField(default=uuid.uuid4, unique=True)
    source_disk = models.OneToOneField(
        SourceDisk, null=True, blank=True, on_delete=models.SET_NULL, related_name="target_volume"
    )
    provider = models.CharField(max_length=20, choices=VolumeProvider.choices, default=VolumeProvider.LOCAL)
    size_bytes = models.BigIntegerField()
    path = models.CharField(max_length=1000, blank=True, help_text="File or device on the appliance")
    created_at = models.DateTimeField(auto_now_add=True)

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


class ReplicationJob(models.Model):
    id = models.CharField(max_length=40, primary_key=True, default=new_job_id, editable=False)
    vm = models.ForeignKey(VirtualMachine, on_delete=models.PROTECT, related_name="jobs")
    sync_type = models.CharField(max_length=20, choices=SyncType.choices, default=SyncType.FULL)
    status = models.CharField(max_length=20, choices=JobStatus.choices, default=JobStatus.PENDING, db_index=True)
    current_operation = models.CharField(max_length=40, choices=Stage.choices, default=Stage.INITIALIZING)
    progress_percent = models.FloatField(default=0.0)
    bytes_transferred = models.BigIntegerField(default=0)
    total_bytes = models.BigIntegerField(default=0)
    throughput_bps = models.BigIntegerField(default=0)
    error_message = models.TextField(blank=True)
    celery_task_id = models.CharField(max_length=64, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    completed_at = models.DateTimeField(null=True, blank=True)
    last_progress_at = models.DateTimeField(null=True, blank=True)
    eta_seconds = models.BigIntegerField(null=True, blank=True)
    heartbeat_at = models.DateTimeField(
        null=True, blank=True, help_text="Last sign of life of the workflow step working on this job")
    poll_errors = models.PositiveIntegerField(default=0, help_text="Consecutive failed polls of the agent")
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        db_table = "replication_jobs"
        ordering = ["-created_at"]

    def __str__(self):
        return self.id

    @property
    def is_terminal(self) -> bool:
        return self.status in JOB_TERMINAL

    def transition(self, to: JobStatus, **fields) -> bool:
        """Move to `to` if allowed from the current stored status; returns
        whether this call made the move. Refreshes the instance either way."""
        fields.setdefault("updated_at", timezone.now())
        if to in JOB_TERMINAL:
            fields.setdefault("completed_at", timezone.now())
        moved = ReplicationJob.objects.filter(
            pk=self.pk, status__in=sources_of(JOB_TRANSITIONS, to)
        ).update(status=to, **fields)
        self.refresh_from_db()
        if moved:
            JobEvent.objects.create(job=self, status=to, stage=self.current_operation,
                                    message=fields.get("error_message", ""))
        return bool(moved)

    def enter_stage(self, stage: Stage, status: JobStatus) -> bool:
        extra = {"started_at": timezone.now()} if status == JobStatus.PREPARING else {}
        return self.transition(status, current_operation=stage, progress_percent=STAGE_PERCENT[stage], **extra)

    def set_stage(self, stage: Stage) -> None:
        now = timezone.now()
        moved = ReplicationJob.objects.filter(pk=self.pk, status__in=JOB_ACTIVE).update(
            current_operation=stage, progress_percent=STAGE_PERCENT[stage], updated_at=now, heartbeat_at=now,
        )
        if moved:
            JobEvent.objects.create(job=self, status=self.status, stage=stage)

    def beat(self) -> None:
        ReplicationJob.objects.filter(pk=self.pk, status__in=JOB_ACTIVE).update(heartbeat_at=timezone.now())

    def last_sign_of_life(self):
        """The newest heartbeat of the job or any of its unfinished disks."""
        beats = [self.heartbeat_at, self.started_at, self.created_at]
        beats += list(self.disks.exclude(status__in=DISK_TERMINAL).values_list("heartbeat_at", flat=True))
        return max(b for b in beats if b is not None)

    def record_poll(self, *, error: bool) -> None:
        count = models.F("poll_errors") + 1 if error else 0
        ReplicationJob.objects.filter(pk=self.pk).update(poll_errors=count)

    def fail(self, reason: str) -> bool:
        return self.transition(JobStatus.FAILED, error_message=reason[:4000], current_operation=Stage.FAILED)

    def cancel(self, reason: str = "cancelled by the operator") -> bool:
        return self.transition(JobStatus.CANCELLED, error_message=reason, current_operation=Stage.CANCELLED)

    def complete(self) -> bool:
        """Completed, with the throughput averaged over the whole job."""
        self.refresh_totals()
        self.refresh_from_db()
        seconds = (timezone.now() - (self.started_at or self.created_at)).total_seconds()
        average = int(self.bytes_transferred / seconds) if seconds > 0 else 0
        return self.transition(JobStatus.COMPLETED, current_operation=Stage.COMPLETED, progress_percent=100.0,
                               throughput_bps=average)

    def refresh_totals(self) -> None:
        """Job totals are always aggregated from the disks."""
        # A disk whose copy has not measured its data yet counts with its
        # capacity (an upper bound), so the job's percent only ever rises.
        unmeasured = models.Q(bytes_total=0) & ~models.Q(status=DiskStatus.COMPLETED)
        sums = self.disks.aggregate(
            done=Sum("bytes_done"), total=Sum("bytes_total"),
            rate=Sum("throughput_bps", filter=models.Q(status=DiskStatus.COPYING)),
            pending_capacity=Sum("capacity_bytes", filter=unmeasured),
        )
        done, total = sums["done"] or 0, sums["total"] or 0
        updates = {"bytes_transferred": done, "total_bytes": total, "throughput_bps": sums["rate"] or 0,
                   "last_progress_at": timezone.now()}
        if self.status == JobStatus.REPLICATING:
            updates["progress_percent"] = transfer_percent(done, total + (sums["pending_capacity"] or 0))
            rate = updates["throughput_bps"]
            updates["eta_seconds"] = int((total - done) / rate) if rate > 0 and total > done else None
        if ReplicationJob.objects.filter(pk=self.pk, status__in=JOB_ACTIVE).update(**updates):
            self._sample(updates["last_progress_at"], done, updates["throughput_bps"])

    def _sample(self, now, bytes_transferred: int, throughput_bps: int) -> None:
        """Keep one progress sample every PROGRESS_SAMPLE_S for the throughput chart."""
        if not self.samples.filter(at__gt=now - PROGRESS_SAMPLE_S).exists():
            ProgressSample.objects.create(job=self, at=now, bytes_transferred=bytes_transferred,
                                          throughput_bps=throughput_bps)

    def all_disks_completed(self) -> bool:
        return not self.disks.exclude(status=DiskStatus.COMPLETED).exists()


class JobEvent(models.Model):
    """The job's timeline: every status or stage it entered, and when."""

    job = models.ForeignKey(ReplicationJob, on_delete=models.CASCADE, related_name="events")
    at = models.DateTimeField(default=timezone.now)
    status = models.CharField(max_length=20, choices=JobStatus.choices)
    stage = models.CharField(max_length=40, choices=Stage.choices)
    message = models.TextField(blank=True)

    class Meta:
        db_table = "job_events"
        ordering = ["at", "id"]

    def __str__(self):
        return f"{self.job_id} {self.status}/{self.stage} at {self.at:%H:%M:%S}"


class ProgressSample(models.Model):
    """Job progress every few seconds, for the throughput-over-time chart."""

    job = models.ForeignKey(ReplicationJob, on_delete=models.CASCADE, related_name="samples")
    at = models.DateTimeField(db_index=True)
    bytes_transferred = models.BigIntegerField()
    throughput_bps = models.BigIntegerField()

    class Meta:
        db_table = "progress_samples"
        ordering = ["at"]

    def __str__(self):
        return f"{self.job_id} {self.throughput_bps} B/s at {self.at:%H:%M:%S}"


class VMDisk(models.Model):
    """One disk of one job: what is copied, from where, to which volume."""

    job = models.ForeignKey(ReplicationJob, on_delete=models.CASCADE, related_name="disks")
    source_disk = models.ForeignKey(SourceDisk, on_delete=models.PROTECT, related_name="job_disks")
    target_volume = models.ForeignKey(TargetVolume, on_delete=models.PROTECT, related_name="job_disks")
    disk_key = models.CharField(max_length=50)
    capacity_bytes = models.BigIntegerField()
    source_locator = models.CharField(max_length=1000)
    previous_change_id = models.CharField(max_length=200, blank=True)
    change_id = models.CharField(max_length=200, blank=True)
    status = models.CharField(max_length=20, choices=DiskStatus.choices, default=DiskStatus.PENDING, db_index=True)
    current_operation = models.CharField(max_length=40, choices=Stage.choices, default=Stage.INITIALIZING)
    bytes_total = models.BigIntegerField(default=0, help_text="Data to copy (allocated bytes)")
    bytes_done = models.BigIntegerField(default=0)
    bytes_zeroed = models.BigIntegerField(default=0)
    progress_percent = models.FloatField(default=0.0)
    throughput_bps = models.BigIntegerField(default=0)
    attempts = models.PositiveIntegerField(default=0)
    error_message = models.TextField(blank=True)
    celery_task_id = models.CharField(max_length=64, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    completed_at = models.DateTimeField(null=True, blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True, help_text="Last sign of life of its copy task")
    progress_seq = models.BigIntegerField(default=0, help_text="Sequence number of the applied agent update")
    last_progress_at = models.DateTimeField(null=True, blank=True)
    eta_seconds = models.BigIntegerField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        db_table = "vm_disks"
        ordering = ["job", "disk_key"]
        constraints = [models.UniqueConstraint(fields=["job", "disk_key"], name="uniq_job_disk_key")]

    def __str__(self):
        return f"{self.job_id}/{self.disk_key}"

    def transition(self, to: DiskStatus, **fields) -> bool:
        fields.setdefault("updated_at", timezone.now())
        if to in DISK_TERMINAL:
            fields.setdefault("completed_at", timezone.now())
        moved = VMDisk.objects.filter(
            pk=self.pk, status__in=sources_of(DISK_TRANSITIONS, to)
        ).update(status=to, **fields)
        self.refresh_from_db()
        return bool(moved)

    def claim(self, task_id: str = "") -> bool:
        """Take this disk for copying; a second delivery of its task loses."""
        now = timezone.now()
        return self.transition(
            DiskStatus.COPYING, attempts=models.F("attempts") + 1, started_at=now, heartbeat_at=now,
            current_operation=Stage.INITIALIZING, celery_task_id=task_id,
        )

    def beat(self) -> bool:
        """Stamp the copy's heartbeat; False when the copy should stop because
        the disk or its job is no longer running."""
        alive_jobs = ReplicationJob.objects.filter(pk=self.job_id, status__in=JOB_ACTIVE)
        return bool(VMDisk.objects.filter(pk=self.pk, status=DiskStatus.COPYING,
                                          job__in=alive_jobs).update(heartbeat_at=timezone.now()))

    def apply_progress(self, *, seq: int, bytes_done: int, bytes_total: int, throughput_bps: int,
                       stage: str, eta_seconds: int | None, at) -> bool:
        """Apply an agent update if it is newer than the applied one and the
        disk is still copying; progress never moves backwards."""
        percent = 100.0 if bytes_total <= 0 else min(100.0, 100.0 * bytes_done / bytes_total)
        return bool(VMDisk.objects.filter(pk=self.pk, status=DiskStatus.COPYING, progress_seq__lt=seq).update(
            progress_seq=seq, bytes_done=bytes_done, bytes_total=bytes_total, progress_percent=percent,
            throughput_bps=throughput_bps, current_operation=stage, eta_seconds=eta_seconds,
            last_progress_at=at, updated_at=at,
        ))

    def complete(self, bytes_total: int, bytes_zeroed: int, throughput_bps: int) -> bool:
        return self.transition(
            DiskStatus.COMPLETED, bytes_done=bytes_total, bytes_total=bytes_total, bytes_zeroed=bytes_zeroed,
            progress_percent=100.0, throughput_bps=throughput_bps, current_operation=Stage.COMPLETED,
            eta_seconds=0, last_progress_at=timezone.now(),
        )

    def fail(self, reason: str) -> bool:
        return self.transition(DiskStatus.FAILED, error_message=reason[:4000], throughput_bps=0,
                               current_operation=Stage.FAILED)

    def cancel(self) -> bool:
        return self.transition(DiskStatus.CANCELLED, throughput_bps=0, current_operation=Stage.CANCELLED)
