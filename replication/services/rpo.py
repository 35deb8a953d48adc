"""Recovery points: a VM's recovery point is when its last completed cycle
froze the source (the snapshot; an image: when its copy began). Its age,
against the VM's group's target, is what an operator watches."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from django.db.models import OuterRef, Subquery
from django.utils import timezone

from replication.choices import JobStatus
from replication.models import ReplicationJob, VirtualMachine


@dataclass(frozen=True)
class RecoveryPoint:
    vm: VirtualMachine
    at: datetime | None  # None: no cycle has completed
    age_s: float | None
    target_s: int | None  # its group's target; None: not in a group
    last_drill: object = None  # its last ended DrillRun (with_drills), if asked for

    @property
    def over_target(self) -> bool:
        return self.target_s is not None and (self.age_s is None or self.age_s > self.target_s)

    def as_dict(self) -> dict:
        return {"vm": self.vm.name, "group": self.vm.group.name if self.vm.group_id else None,
                "recovery_point_at": self.at.isoformat() if self.at else None,
                "age_s": round(self.age_s, 1) if self.age_s is not None else None,
                "target_s": self.target_s, "over_target": self.over_target,
                "flag": self.vm.protection_flag or None,
                "last_drill": None if self.last_drill is None else {
                    "status": self.last_drill.status, "ended_at": self.last_drill.ended_at.isoformat(),
                    "rto_s": self.last_drill.rto_s, "note": self.last_drill.note}}


def with_recovery_points(vms):
    """The VMs annotated with `recovery_point` (one subquery, not a query per VM)."""
    last = (ReplicationJob.objects.filter(vm_id=OuterRef("pk"), status=JobStatus.COMPLETED,
                                          recovery_point_at__isnull=False)
            .order_by("-recovery_point_at").values("recovery_point_at")[:1])
    return vms.annotate(recovery_point=Subquery(last))


def recovery_points(vms=None, now: datetime | None = None) -> list[RecoveryPoint]:
    now = now or timezone.now()
    vms = VirtualMachine.objects.in_service() if vms is None else vms
    vms = with_recovery_points(vms.select_related("group"))
    return [recovery_point(vm, now) for vm in vms]


def recovery_point(vm: VirtualMachine, now: datetime | None = None) -> RecoveryPoint:
    """vm annotated by with_recovery_points."""
    now = now or timezone.now()
    at = vm.recovery_point
    return RecoveryPoint(vm=vm, at=at, age_s=(now - at).total_seconds() if at else None,
                         target_s=vm.group.rpo_target_s if vm.group_id else None)


def with_drills(points: list[RecoveryPoint]) -> list[RecoveryPoint]:
    """The same points, each with its VM's last ended drill."""
    from dataclasses import replace

    from replication.services.drills import last_drills

    drills = last_drills([point.vm.pk for point in points])
    return [replace(point, last_drill=drills.get(point.vm.pk)) for point in points]
