"""Recovery points: journaled cycles and retention.

Every cycle writes into a layer of its own on each of its VM's target
volumes, over the volume's layer in the newest point (TargetProvider's
journal). When the cycle completes and its changeIds are committed, its
layers are sealed into one point, all disks at the instant its source
snapshot froze. A cycle that ends any other way has its layers discarded:
its exports close (a late write from a partitioned agent lands nowhere) and
every point stays as it was.

Retention keeps the newest RECOVERY_POINTS_KEEP points (a protection group
may keep its own number, plus the newest point of each hour and of each day
for a span); an expired point is merged with its newer neighbour, at a cost
proportional to that neighbour's changed data. Retention runs between the
VM's cycles (a running cycle holds the whole chain open), and a point a
failover boots from, with every point under it (its chain runs through
them), is kept until the failover ends."""

from __future__ import annotations

import contextlib
import fcntl
import logging
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

from django.conf import settings
from django.utils import timezone

from replication import dispatch
from replication.models import PointLayer, RecoveryPoint, ReplicationJob, VirtualMachine, VMDisk
from replication.platforms import get_provider
from replication.platforms.base import TargetProvider
from vma_agent import task_names

log = logging.getLogger(__name__)


class PointError(Exception):
    """A recovery point cannot be used as asked; the message is the reason."""


# Listing ---------------------------------------------------------------------------

def as_row(point: RecoveryPoint, now=None) -> dict:
    """A point as the command, the API and the pages show it."""
    now = now or timezone.now()
    return {"id": point.pk, "frozen_at": point.frozen_at.isoformat(), "age_s": round((now - point.frozen_at)
                                                                                     .total_seconds(), 1),
            "job": point.job_id, "sync_type": point.job.sync_type, "changed_bytes": point.changed_bytes,
            "status": point.status, "in_use_by": point.in_use_by(),
            "disks": {layer.disk_key: layer.changed_bytes for layer in point.layers.all()}}


def points_of(vm: VirtualMachine) -> list[dict]:
    """The VM's bootable points, newest first."""
    now = timezone.now()
    return [as_row(p, now) for p in RecoveryPoint.sealed(vm).select_related("job").prefetch_related("layers")]


def summary(vm: VirtualMachine, now=None) -> dict:
    """How many points the VM has and the age of its newest and oldest, in
    seconds (None without points)."""
    now = now or timezone.now()
    frozen = list(RecoveryPoint.sealed(vm).values_list("frozen_at", flat=True))
    return {"count": len(frozen),
            "newest_age_s": (now - frozen[0]).total_seconds() if frozen else None,
            "oldest_age_s": (now - frozen[-1]).total_seconds() if frozen else None}


def chosen(vm: VirtualMachine, point_id: int | None = None) -> RecoveryPoint:
    """The point a failover boots: the one asked for, else the newest."""
    if point_id is None:
        point = RecoveryPoint.newest(vm)
        if point is None:
            raise PointError(f"VM {vm.name} has no recovery point yet: no cycle has completed")
        return point
    point = RecoveryPoint.objects.filter(vm=vm, pk=point_id).first()
    if point is None:
        raise PointError(f"VM {vm.name} has no recovery point {point_id} (manage.py recovery_points {vm.name})")
    if point.status != RecoveryPoint.Status.SEALED:
        raise PointError(f"recovery point {point_id} of {vm.name} is {point.status}: it can no longer boot")
    return point


# The journal of a cycle ------------------------------------------------------------

def _provider(disk: VMDisk) -> TargetProvider:
    return get_provider(disk.target_volume.provider)


def base_of(disk: VMDisk) -> str | None:
    """The handle the disk's cycle writes over: its volume's layer in the
    newest point (None: the volume holds no point yet)."""
    layer = PointLayer.newest_of(disk.target_volume)
    # "": a point adopted from before points existed, with nothing to revert to.
    return (layer.handle or None) if layer is not None else None


@contextlib.contextmanager
def _chain_lock(vm_id: int, *, exclusive: bool) -> Iterator[None]:
    """Retention rewrites a VM's chain of layers under this lock; a cycle
    opens its layer over the chain under it too (shared), so it never opens
    a chain half-merged. A file lock: the OMA's workers share one host."""
    path = Path(settings.OMA_RUN_DIR) / "chains" / f"vm-{vm_id}.lock"
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with open(path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield


def open_layer(disk: VMDisk) -> str:
    """Make and serve the disk's layer of its cycle; the URI its copy writes."""
    with _chain_lock(disk.job.vm_id, exclusive=False):
        return _provider(disk).open_layer(disk.target_volume, disk.job_id, base_of(disk))


def seal_layers(job: ReplicationJob) -> list[tuple[VMDisk, str, int]]:
    """Close the completed cycle's exports and make its layers read-only:
    (disk, layer handle, its size) per disk. Nothing is a point yet."""
    sealed = []
    for disk in job.disks.select_related("target_volume"):
        provider = _provider(disk)
        handle = provider.seal_layer(disk.target_volume, job.id, base_of(disk))
        sealed.append((disk, handle, provider.layer_bytes(handle)))
    return sealed


def record(job: ReplicationJob, sealed: list[tuple[VMDisk, str, int]]) -> RecoveryPoint:
    """The sealed layers become one point (every disk at the instant the
    cycle's snapshot froze); called in the transaction that commits the
    cycle's changeIds. Retention runs after, in a task of its own."""
    point, _ = RecoveryPoint.objects.get_or_create(
        job=job, defaults={"vm": job.vm, "frozen_at": job.recovery_point_at or job.created_at,
                           "changed_bytes": sum(size for _, _, size in sealed)})
    for disk, handle, size in sealed:
        PointLayer.objects.get_or_create(point=point, disk_key=disk.disk_key,
                                         defaults={"volume": disk.target_volume, "handle": handle,
                                                   "changed_bytes": size})
    log.info("job %s sealed as recovery point %s of %s", job.id, point.pk, job.vm)
    return point


def discard(job: ReplicationJob) -> list[str]:
    """The cycle ended without completing: close its exports and throw its
    layers away; every point is as it was. Returns what was done per disk."""
    done = []
    for disk in job.disks.select_related("target_volume"):
        try:
            done.append(f"{disk.disk_key}: " + _provider(disk).discard_layer(disk.target_volume, job.id,
                                                                              base_of(disk)))
        except Exception as exc:  # noqa: BLE001 - every disk is tried; the reason is kept
            log.exception("discarding %s of job %s failed", disk.disk_key, job.id)
            done.append(f"{disk.disk_key}: discarding its layer failed: {exc}")
    return done


# Retention -------------------------------------------------------------------------

def policy(vm: VirtualMachine) -> tuple[int, int, int]:
    """(keep the newest N, hourly for H hours, daily for D days): the VM's
    protection group's, else RECOVERY_POINTS_KEEP and no hourly or daily."""
    group = vm.group
    keep = settings.RECOVERY_POINTS_KEEP
    if group is not None:
        return group.points_keep or keep, group.points_hourly_h, group.points_daily_d
    return keep, 0, 0


def to_keep(points: list[RecoveryPoint], keep: int, hourly_h: int, daily_d: int, now) -> set[int]:
    """Which points the policy keeps (ids): the newest `keep`, the newest of
    each hour of the last `hourly_h` hours and of each day of the last
    `daily_d` days. `points` newest first; the newest is always kept."""
    kept = {p.pk for p in points[:max(1, keep)]}
    for span, bucket in ((timedelta(hours=hourly_h), "%Y%m%d%H"), (timedelta(days=daily_d), "%Y%m%d")):
        seen = set()
        for point in points:
            if now - point.frozen_at > span:
                break
            key = point.frozen_at.strftime(bucket)
            if key not in seen:
                seen.add(key)
                kept.add(point.pk)
    return kept


def apply_retention(vm: VirtualMachine, now=None) -> list[str]:
    """Expire the points the policy no longer keeps, oldest first; returns
    what was done (and why a point is kept longer than the policy says)."""
    now = now or timezone.now()
    keep, hourly_h, daily_d = policy(vm)
    done = []
    while True:
        points = list(RecoveryPoint.sealed(vm).prefetch_related("layers"))
        kept = to_keep(points, keep, hourly_h, daily_d, now)
        expiring = [p for p in reversed(points) if p.pk not in kept]
        outcome = next((r for r in (_try_expire(points, p) for p in expiring) if r), None)
        if outcome is None:
            if expiring:
                done.append(f"{len(expiring)} point(s) past the policy kept: in use, or under one in use")
            return done
        done.append(outcome)


def retain(vm_id: int) -> None:
    """Retention for one VM, as its task runs it (after each point sealed,
    each failover ended), between its cycles: a running cycle holds the
    whole chain open (QEMU's locks refuse to rewrite it); the next cycle's
    retention catches up. No cycle opens its layer meanwhile (_chain_lock)."""
    with _chain_lock(vm_id, exclusive=True):
        vm = VirtualMachine.objects.filter(pk=vm_id).first()
        if vm is None or vm.active_job() is not None:
            return
        for line in apply_retention(vm):
            log.info("retention of %s: %s", vm, line)


def enqueue_retention(vm: VirtualMachine) -> None:
    """Queue the VM's retention once the transaction commits; if the broker
    cannot take it, the next point's retention catches up."""
    dispatch.enqueue_on_commit(task_names.RETAIN_POINTS, [vm.pk], what="recovery point retention",
                               subject=f"VM {vm.name}")


def _try_expire(points: list[RecoveryPoint], point: RecoveryPoint) -> str:
    """Merge `point` with its newer neighbour, unless a failover boots it or
    any newer point (each of their chains runs through this point's layers,
    and QEMU's locks keep a chain in use from being rewritten). Returns what
    was done, or "" when it must wait.

    The point is expired first: from the first merged disk on, its layers
    hold its neighbour's data. A merge refused half-way (by a holder these
    rules did not foresee) leaves that disk's layers where they were, under
    the neighbour: its data stays right, only its space is not reclaimed."""
    index = points.index(point)  # newest first: the newer neighbour is at index - 1
    if any(p.in_use_by() for p in points[:index + 1]):
        return ""
    newer = points[index - 1]
    above = points[index - 2] if index >= 2 else None
    older_layers, above_layers = point.handles(), above.handles() if above else {}
    point.transition(RecoveryPoint.Status.EXPIRED, ended_at=timezone.now(),
                     ended_reason=f"merged into point {newer.pk} by retention")
    for layer in newer.layers.select_related("volume"):
        older = older_layers.get(layer.disk_key)
        if older is None:
            continue  # a disk added since: its layer in `newer` is its first
        provider = get_provider(layer.volume.provider)
        try:
            merged = provider.merge_layers(older, layer.handle, above_layers.get(layer.disk_key))
        except Exception as exc:  # noqa: BLE001 - the point is expired either way; the reason is kept
            log.exception("merging %s of point %s into %s", layer.disk_key, point.pk, newer.pk)
            RecoveryPoint.objects.filter(pk=point.pk).update(
                ended_reason=f"merged into point {newer.pk} by retention; {layer.disk_key} not merged: {exc}"[:500])
            continue
        PointLayer.objects.filter(pk=layer.pk).update(handle=merged, changed_bytes=provider.layer_bytes(merged))
    RecoveryPoint.objects.filter(pk=newer.pk).update(changed_bytes=sum(newer.layers.values_list("changed_bytes",
                                                                                                 flat=True)))
    log.info("recovery point %s of %s expired: merged into %s", point.pk, point.vm, newer.pk)
    return f"point {point.pk} ({point.frozen_at:%Y-%m-%d %H:%M:%S}) merged into point {newer.pk}"


def release(vm: VirtualMachine, reason: str) -> list[str]:
    """Protection of the VM ended (a committed failover): every point's
    layers are dropped, the rows kept as history."""
    done = []
    for point in RecoveryPoint.sealed(vm).prefetch_related("layers__volume"):
        for layer in point.layers.all():
            get_provider(layer.volume.provider).drop_layer(layer.handle)
        point.transition(RecoveryPoint.Status.RELEASED, ended_at=timezone.now(), ended_reason=reason[:500])
        done.append(f"point {point.pk} released")
    return done
