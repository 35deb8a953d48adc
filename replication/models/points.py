"""Recovery points: what a VM can fail over to.

A cycle writes into a layer of its own on every target volume (see
TargetProvider's journal); only once every disk of the VM completed and the
changeIds were committed do its layers become a point, all disks at the
instant the cycle's source snapshot froze. A cycle that fails leaves every
point as it was. Points are kept by retention (services.points) and merged
into their newer neighbour when they expire; a point that a failover boots
from is in use and never merged away."""

from __future__ import annotations

from django.db import models

from replication.choices import FAILOVER_OPEN
from replication.models.base import StateMachine


class RecoveryPoint(StateMachine):
    class Status(models.TextChoices):
        SEALED = "sealed", "Sealed"  # can be booted
        EXPIRED = "expired", "Expired"  # merged into its newer neighbour by retention
        RELEASED = "released", "Released"  # protection ended (committed failover, VM removed)

    transitions = {
        Status.SEALED: {Status.EXPIRED, Status.RELEASED},
        Status.EXPIRED: set(),
        Status.RELEASED: set(),
    }

    vm = models.ForeignKey("replication.VirtualMachine", on_delete=models.CASCADE, related_name="recovery_points")
    job = models.OneToOneField("replication.ReplicationJob", on_delete=models.PROTECT, related_name="recovery_point")
    frozen_at = models.DateTimeField(help_text="When the source was frozen (the cycle's snapshot)")
    sealed_at = models.DateTimeField(auto_now_add=True)
    changed_bytes = models.BigIntegerField(default=0, help_text="Space its layers take: the data the cycle changed")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.SEALED, db_index=True)
    ended_at = models.DateTimeField(null=True, blank=True)
    ended_reason = models.CharField(max_length=500, blank=True)

    class Meta:
        db_table = "recovery_points"
        ordering = ["-frozen_at", "-id"]

    def __str__(self):
        return f"point {self.pk} of {self.vm_id} ({self.frozen_at:%Y-%m-%d %H:%M:%S})"

    @classmethod
    def sealed(cls, vm) -> models.QuerySet:
        """The VM's bootable points, newest first."""
        return cls.objects.filter(vm=vm, status=cls.Status.SEALED).order_by("-frozen_at", "-id")

    @classmethod
    def newest(cls, vm) -> RecoveryPoint | None:
        return cls.sealed(vm).first()

    def in_use_by(self) -> list[str]:
        """What boots from this point right now (open failovers), readable."""
        return [f"{f.kind} failover {f.pk}" for f in self.failovers.filter(status__in=FAILOVER_OPEN)]

    def handles(self) -> dict[str, str]:
        """Disk key -> the handle of its layer (what a failover boots)."""
        return dict(self.layers.values_list("disk_key", "handle"))


class PointLayer(models.Model):
    """One disk's layer of a point: a file on the OMA (the replica's base or a
    qcow2 layer over the point before) or, on CloudStack, a volume snapshot."""

    point = models.ForeignKey(RecoveryPoint, on_delete=models.CASCADE, related_name="layers")
    volume = models.ForeignKey("replication.TargetVolume", on_delete=models.CASCADE, related_name="layers")
    disk_key = models.CharField(max_length=64)
    handle = models.CharField(max_length=1024, help_text="The layer as its provider knows it")
    changed_bytes = models.BigIntegerField(default=0)

    class Meta:
        db_table = "recovery_point_layers"
        ordering = ["disk_key"]
        constraints = [models.UniqueConstraint(fields=["point", "disk_key"], name="one_layer_per_disk")]

    def __str__(self):
        return f"{self.disk_key} of {self.point}"

    @classmethod
    def newest_of(cls, volume) -> PointLayer | None:
        """The volume's layer in its VM's newest point (what the next cycle
        writes over), or None when the volume holds no point yet."""
        return (cls.objects.filter(volume=volume, point__status=RecoveryPoint.Status.SEALED)
                .order_by("-point__frozen_at", "-point__id").first())
