"""What an agent does, from work orders alone: prepare a VMware source (the
job's snapshot), copy a disk, remove a snapshot, power the source. Each
step returns its outcome (vma_agent.contract), which the agent's task hands
to the OMA. Progress,
the copy's resume cursor and its heartbeat go out through the reporter to
the agent's progress API; nothing here touches a database. Free of Django.

A copy resumes only from the cursor it recorded itself in the agent's control
store (AgentControl.record_checkpoint, after the target flush), never from a
number that came over HTTP: the progress API shows a cursor, the OMA's order
carries the one it saw reported, and neither decides what is skipped."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import redis
from tenacity import retry, retry_if_exception_type, stop_after_attempt, wait_exponential_jitter

from vma_agent import contract, export_tls, nbdkit, qcow2, vmware
from vma_agent.client import ProgressClient
from vma_agent.contract import (
    SHUT_DOWN,
    CopyOrder,
    DiskCopied,
    FrozenDisk,
    PowerOrder,
    SnapshotRemovalOrder,
    SnapshotRemoved,
    SourceOrder,
    SourcePowered,
    SourcePrepared,
    VCenterRef,
)
from vma_agent.control import AgentControl, Checkpoint, worker_id
from vma_agent.copy import RateLimit, copy_image, dirty_areas
from vma_agent.progress import CopyProgress
from vma_agent.reporter import DiskReporter, JobStageReporter
from vma_agent.snapshot_sources import ImageDirSource, SnapshotDisk, VddkSource, password_file
from vma_agent.units import iec_rate
from vma_agent.vmware import VSphereClient, VSphereError

log = logging.getLogger(__name__)

# How often a running copy reads its job's bandwidth limit from the agent's
# Redis: a limit the operator changes reaches the copy within about this
# plus the progress interval.
LIMIT_CHECK_S = 1.0


@dataclass(frozen=True)
class AgentConfig:
    """The agent host's own settings (its API, its Redis, its limits)."""

    vma_url: str
    vma_token: str
    redis_url: str
    request_timeout_s: float = 5.0
    http_keepalive: bool = False
    progress_prefix: str = "vma:progress"
    control_prefix: str = "vma:control"
    snapshot_source: str = "vddk"
    snapshot_image_dir: str = ""
    vddk_libdir: str = "/usr/lib/vmware-vix-disklib"
    vddk_transports: str = "nbdssl:nbd"
    vcenter_timeout_s: float = 60.0
    chunk_bytes: int = 2 * 1024 * 1024
    connections: int = 4
    target_connections: int = 0  # 0: as many as to the source
    depth: int = 8
    copy_limit_bps: int = 0
    progress_interval_s: float = 2.0
    checkpoint_interval_s: float = 5.0
    # A resumed run compares the data below its cursor with the source first
    # (COPY_COMPARE_RESUMED): it reads that part again, but writes nothing.
    compare_resumed: bool = True
    heartbeat_interval_s: float = 5.0
    heartbeat_timeout_s: float = 60.0
    cleanup_wait_s: float = 120.0
    # Its own TLS-PSK identity at the OMA's export server (vma_agent.export_tls); empty: the order's.
    export_psk_file: str = ""
    export_tls_username: str = ""

    def progress_client(self) -> ProgressClient:
        return ProgressClient(self.vma_url, self.vma_token, timeout_s=self.request_timeout_s,
                              keep_alive=self.http_keepalive)

    def control(self) -> AgentControl:
        return AgentControl.from_url(self.redis_url, prefix=self.control_prefix, lease_s=self.heartbeat_timeout_s)

    def vsphere(self, vcenter: VCenterRef) -> VSphereClient:
        return VSphereClient(vcenter.connection(), timeout_s=self.vcenter_timeout_s)


class CopyStopped(Exception):
    """The OMA stopped the job, or a newer attempt took the disk over."""

    def __init__(self, reason: str, superseded: bool):
        super().__init__(reason)
        self.superseded = superseded


# Preparing a VMware source --------------------------------------------------

class PreflightError(Exception):
    """The VM cannot be replicated as it is; the message lists the blockers."""


def prepare_source(order: SourceOrder, config: AgentConfig) -> SourcePrepared:
    """Preflight, changed block tracking, then the job's snapshot. The
    snapshot's moref is part of the outcome even when a later step failed,
    so the OMA always knows what to remove."""
    stages = JobStageReporter(config.progress_client(), order.job_id, order.sync_type)
    found: dict = {"removed_orphans": [], "events": []}
    try:
        stages.stage(contract.INITIALIZING, contract.STAGE_PERCENT[contract.INITIALIZING])
        with config.vsphere(order.vcenter) as client:
            _snapshot_source(client, order, stages, found)
        stages.stage(contract.SETTING_UP_NBD, contract.STAGE_PERCENT[contract.SETTING_UP_NBD])
    except Exception as exc:
        log.exception("prepare of job %s failed", order.job_id)
        found["error"] = f"prepare failed: {exc}"
        stages.stage(contract.FAILED, 0, status="failed", error_message=found["error"])
    finally:
        stages.close(timeout_s=0.5)  # undelivered, it keeps being retried in the background
    return SourcePrepared(**found)


def _snapshot_source(client: VSphereClient, order: SourceOrder, stages: JobStageReporter, found: dict) -> None:
    """prepare_source's steps on vCenter; `found` gathers the outcome's
    fields as they become known."""
    info = client.vm_info(order.vm_moref)
    found["shape"] = info.shape()
    found["removed_orphans"] = [s.moref for s in client.remove_orphan_snapshots(info, {order.job_id})]
    _preflight(client, order, info)
    if not info.cbt_enabled or any(not d.change_id for d in info.disks):
        client.enable_change_tracking(order.vm_moref)
        found["cbt_enabled"] = True
        found["events"].append("changed block tracking enabled on the VM")
    stages.stage(contract.CREATING_SNAPSHOT, contract.STAGE_PERCENT[contract.CREATING_SNAPSHOT])
    name = vmware.snapshot_name(order.job_id)
    taken = client.take_snapshot(info, name, f"Replication job {order.job_id}")
    found.update(snapshot_moref=taken.moref, snapshot_name=name)
    found["events"].append(taken.note)
    found["disks"] = {d.disk_key: FrozenDisk(change_id=d.change_id, backing_file=d.backing_file, device_key=d.key)
                      for d in client.snapshot_disks(taken.moref)}


def _preflight(client: VSphereClient, order: SourceOrder, info: vmware.VMInfo) -> None:
    blockers = vmware.preflight_blockers(info, set(order.overrides))
    missing = client.missing_privileges(order.vm_moref)
    if missing:
        blockers.append(f"the vCenter user lacks privileges {', '.join(missing)}")
    live = {d.disk_key: d for d in info.disks}
    for disk in order.disks:
        found = live.get(disk["disk_key"])
        if found is None:
            blockers.append(f"{disk['disk_key']} is no longer on the VM; run discover again")
        elif found.capacity_bytes != disk["capacity_bytes"]:
            blockers.append(f"{disk['disk_key']} is now {found.capacity_bytes} bytes, not "
                            f"{disk['capacity_bytes']}; run discover again")
    if blockers:
        raise PreflightError("preflight: " + "; ".join(blockers))


# Removing a snapshot ---------------------------------------------------------

def remove_snapshot(order: SnapshotRemovalOrder, config: AgentConfig) -> SnapshotRemoved:
    """Remove the job's snapshot once none of its copies on this agent reads
    it any more (or CLEANUP_WAIT_S passed)."""
    control = config.control()
    deadline = time.monotonic() + config.cleanup_wait_s
    with contextlib.suppress(redis.RedisError):
        while control.copies_running(order.job_id) and time.monotonic() < deadline:
            time.sleep(0.2)
    try:
        _remove_with_retries(order, config)
    except Exception as exc:
        log.exception("removing snapshot %s of job %s failed", order.snapshot_moref, order.job_id)
        return SnapshotRemoved(removed=False, error=f"snapshot {order.snapshot_moref} not removed: {exc}")
    log.info("job %s: snapshot %s removed", order.job_id, order.snapshot_moref)
    return SnapshotRemoved(removed=True)


@retry(retry=retry_if_exception_type(VSphereError), stop=stop_after_attempt(3),
       wait=wait_exponential_jitter(initial=1, max=10), reraise=True)
def _remove_with_retries(order: SnapshotRemovalOrder, config: AgentConfig) -> None:
    with config.vsphere(order.vcenter) as client:
        client.remove_snapshot(order.snapshot_moref)


# Powering the source off or on (live failover, rollback) -------------------

def power_source(order: PowerOrder, config: AgentConfig) -> SourcePowered:
    """Shut the source VM down (guest first, then power) or power it on; the
    outcome says how, the VM's power state after it, and how long it took."""
    started = time.monotonic()
    found: dict = {"action": order.action}
    try:
        with config.vsphere(order.vcenter) as client:
            if order.action == SHUT_DOWN:
                found["how"] = client.shut_down(order.vm_moref, order.timeout_s)
            else:
                found["how"] = client.power_on(order.vm_moref)
            found["power_state"] = client.power_state(order.vm_moref)
    except Exception as exc:
        log.exception("%s of VM %s failed", order.action, order.vm_name)
        found["error"] = f"{order.action.replace('_', ' ')} of VM {order.vm_name} failed: {exc}"
    return SourcePowered(**found, seconds=round(time.monotonic() - started, 3))


# Copying a disk ---------------------------------------------------------------

class CopyMonitor:
    """The copy loop's progress and checkpoint callbacks: every update goes to
    the reporter (a mailbox drop, never waits on the network); at most every
    heartbeat interval the run's claim is renewed in the agent's Redis, which
    also says whether the OMA stopped the job or a newer attempt took the
    disk: then the copy stops. Every LIMIT_CHECK_S it reads the job's
    bandwidth limit there, so a limit the OMA changes reaches the running
    copy. A Redis outage is ridden out: the data plane does not need it."""

    def __init__(self, order: CopyOrder, control: AgentControl, reporter: DiskReporter, worker: str,
                 interval_s: float, on_progress: Callable[[CopyProgress], None] | None = None,
                 agent_limit_bps: int = 0):
        self.order = order
        self.control = control
        self.reporter = reporter
        self.worker = worker
        self.interval_s = interval_s
        self.on_progress = on_progress
        self.agent_limit_bps = agent_limit_bps
        self.limit = RateLimit(self._effective(order.limit_bps))
        self.last_check = self.last_limit_check = time.monotonic()
        self.first_done: int | None = None
        self.bytes_done = 0
        self.redis_down = False

    @property
    def bytes_read(self) -> int:
        return self.bytes_done - (self.first_done or 0)

    def __call__(self, progress: CopyProgress) -> None:
        if self.first_done is None:
            self.first_done = progress.bytes_done
        self.bytes_done = progress.bytes_done
        self.reporter(progress)
        if self.on_progress is not None:
            self.on_progress(progress)
        if time.monotonic() - self.last_limit_check >= LIMIT_CHECK_S:
            self.follow_limit()
        if time.monotonic() - self.last_check >= self.interval_s:
            self.check()

    def _effective(self, job_limit_bps: int | None) -> int | None:
        """The tighter of the job's limit and this agent's own (COPY_LIMIT_BPS)."""
        limits = [limit for limit in (job_limit_bps, self.agent_limit_bps) if limit]
        return min(limits) if limits else None

    def follow_limit(self) -> None:
        self.last_limit_check = time.monotonic()
        try:
            changed, job_limit = self.control.limit(self.order.job_id)
            rate = self._effective(job_limit) if changed else self.limit.bytes_per_s
            if changed and rate != self.limit.bytes_per_s:
                log.info("copy of %s/%s: bandwidth limit now %s", self.order.job_id, self.order.disk_key,
                         iec_rate(rate) if rate else "none")
                self.limit.set(rate)
            self.control.limit_applied(self.order.job_id, self.order.disk_key, self.limit.bytes_per_s)
        except redis.RedisError:
            pass  # check() says so once; the copy goes on at its current limit

    def check(self) -> None:
        self.last_check = time.monotonic()
        try:
            reason = self.control.check(self.order.job_id, self.order.disk_key, self.order.attempt, self.worker)
        except redis.RedisError as exc:
            if not self.redis_down:
                log.warning("copy of %s/%s: agent Redis unreachable (%s); copying on", self.order.job_id,
                            self.order.disk_key, exc)
            self.redis_down = True
            return
        self.redis_down = False
        if reason is not None:
            raise CopyStopped(reason, superseded=reason.startswith("superseded"))

    def checkpoint(self, cursor: int) -> None:
        """The engine committed `cursor` (written and flushed below it): the
        copy records it where only it writes, then shows it."""
        try:
            self.control.record_checkpoint(self.order.job_id, self.order.disk_key, Checkpoint(
                cursor=cursor, attempt=self.order.attempt, worker=self.worker, plan=copy_plan_id(self.order),
                at=time.time()))
        except redis.RedisError as exc:
            # A next run then resumes from an older cursor, or from 0: slower, never wrong.
            log.warning("copy of %s/%s: checkpoint %d not recorded (%s)", self.order.job_id, self.order.disk_key,
                        cursor, exc)
        self.reporter.checkpoint(cursor)


class Beat:
    """Re-sends the disk's latest state every interval from a thread, so a
    phase with nothing to report (a source export starting, the changed
    areas of a large disk being mapped) never looks like a lost copy."""

    def __init__(self, reporter: DiskReporter, interval_s: float):
        self.reporter = reporter
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="copy-beat", daemon=True)

    def __enter__(self) -> Beat:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.reporter.beat()


def copy_disk(order: CopyOrder, config: AgentConfig, *,
              on_progress: Callable[[CopyProgress], None] | None = None,
              time_limit_error: type[BaseException] | None = None, time_limit_s: float | None = None) -> DiskCopied:
    """Copy one disk as the order says; returns the outcome: status
    completed, failed, cancelled, superseded or duplicate, with the totals
    and the committed cursor. A run of an attempt whose earlier delivery
    already committed a cursor resumes there."""
    worker = worker_id()
    control = config.control()
    try:
        refusal = control.claim(order.job_id, order.disk_key, order.attempt, worker)
    except redis.RedisError as exc:
        refusal = None  # without the agent's Redis there is no second run to fence against
        log.warning("copy of %s/%s: claim not recorded (%s)", order.job_id, order.disk_key, exc)
    if refusal is not None:
        log.warning("copy of %s/%s attempt %d skipped: %s", order.job_id, order.disk_key, order.attempt, refusal)
        return DiskCopied(status="duplicate", worker=worker, reason=refusal)
    resume_from, resume_reason = recorded_resume(control, order)
    reporter = DiskReporter(config.progress_client(), order.job_id, order.disk_key, export_name=order.export_name,
                            sync_type=order.sync_type, attempt=order.attempt, worker=worker)
    reporter.checkpoint(resume_from)
    monitor = CopyMonitor(order, control, reporter, worker, config.heartbeat_interval_s, on_progress,
                          agent_limit_bps=config.copy_limit_bps)
    run = {"worker": worker, "resume_from": resume_from}
    if resume_from:
        run["resume_reason"] = resume_reason
        log.info("copy of %s/%s attempt %d resumes at offset %d: %s", order.job_id, order.disk_key, order.attempt,
                 resume_from, resume_reason)
    try:
        with Beat(reporter, config.heartbeat_interval_s):
            reporter.stage(contract.SETTING_UP_NBD)
            result = _copy(order, config, monitor, resume_from)
        reporter.finish("completed", bytes_total=result.bytes_allocated, throughput_bps=result.throughput_bps)
    except CopyStopped as exc:
        log.info("copy of %s/%s stopped: %s", order.job_id, order.disk_key, exc)
        if not exc.superseded:
            reporter.finish("cancelled", error_message=str(exc))
        return _ended("superseded" if exc.superseded else "cancelled", exc, run, monitor)
    except BaseException as exc:
        if time_limit_error is not None and isinstance(exc, time_limit_error):
            exc = TimeoutError(f"copy exceeded its time limit ({time_limit_s or '?'} s)")
        elif not isinstance(exc, Exception):
            raise  # the worker is shutting down: the reaper hands the disk on
        log.exception("copy of %s/%s failed", order.job_id, order.disk_key)
        reporter.finish("failed", error_message=str(exc))
        return _ended("failed", exc, run, monitor)
    finally:
        with contextlib.suppress(redis.RedisError):
            control.release(order.job_id, order.disk_key, order.attempt, worker)
        reporter.close(timeout_s=0.5)  # undelivered, it keeps being retried in the background
    log.info("copied %s/%s: %s", order.job_id, order.disk_key, result.as_dict())
    return _completed(result, run, monitor, config.compare_resumed)


def _ended(status: str, exc: BaseException, run: dict, monitor: CopyMonitor) -> DiskCopied:
    """The outcome of a run that stopped or failed before the end."""
    return DiskCopied(status=status, reason=str(exc), bytes_read=monitor.bytes_read,
                      checkpoint_bytes=monitor.reporter.checkpoint_bytes, **run)


def _completed(result, run: dict, monitor: CopyMonitor, compared: bool) -> DiskCopied:
    """The outcome of a completed run; a resumed one says where it resumed,
    from which recorded checkpoint, and what comparing below it found."""
    if run["resume_from"]:
        run.update(resume_from=result.resumed_from, resume_checkpoint=run["resume_from"],
                   resume_differed_at=result.resume_differed_at)
        if compared:
            run["resume_compared"] = result.resume_compared
    return DiskCopied(status="completed", bytes_total=result.bytes_allocated, bytes_zeroed=result.bytes_zeroed,
                      throughput_bps=result.throughput_bps, bytes_read=result.bytes_read,
                      checkpoint_bytes=monitor.reporter.checkpoint_bytes, **run)


def _copy(order: CopyOrder, config: AgentConfig, monitor: CopyMonitor, resume_from: int):
    with source_export(order, config) as src_uri:
        monitor.check()
        monitor.reporter.stage(contract.PREPARING_MIGRATION)
        areas = None
        if order.bitmap_base:
            areas = dirty_areas(src_uri, order.bitmap_base)
        elif order.snapshot is not None:
            snap = order.snapshot
            with config.vsphere(snap.vcenter) as client:
                areas = client.changed_areas(snap.vm_moref, snap.snapshot_moref, snap.device_key,
                                             order.capacity_bytes, snap.against_change_id)
        monitor.follow_limit()  # a limit changed before this copy started applies from its first byte
        target_uri = export_tls.own_uri(order.target_uri, config.export_psk_file, config.export_tls_username)
        return copy_image(
            src_uri, target_uri, extents=areas, resume_from=resume_from, zero_unlisted=order.zero_unlisted,
            verify=order.verify, compare_resumed=config.compare_resumed, limit=monitor.limit,
            chunk_bytes=config.chunk_bytes, connections=config.connections,
            target_connections=config.target_connections or None, depth=config.depth, progress=monitor,
            progress_interval_s=config.progress_interval_s, checkpoint=monitor.checkpoint,
            checkpoint_interval_s=config.checkpoint_interval_s,
        )


def copy_plan_id(order: CopyOrder) -> str:
    """What a cursor is a position in: the disk's source, its target and
    which areas the copy covers. A cursor recorded for another plan (the
    OMA gave the disk a new volume, a source changed) is not used."""
    snap = order.snapshot
    plan = [order.source_locator, order.target_uri, order.capacity_bytes, order.sync_type, order.bitmap_base,
            order.bitmap_new, order.zero_unlisted,
            [snap.vm_moref, snap.snapshot_moref, snap.device_key, snap.against_change_id] if snap else None]
    return hashlib.sha256(json.dumps(plan).encode()).hexdigest()[:32]


def recorded_resume(control: AgentControl, order: CopyOrder) -> tuple[int, str]:
    """Where a run of this job's disk resumes, and why: the cursor an
    earlier run (a delivery killed mid-copy, or an attempt the reaper
    replaced) recorded in the agent's control store, for the same plan;
    0 without one. The order's resume_from is the OMA's view of the
    reported cursor and is not used: it came through the progress API."""
    try:
        recorded = control.checkpoint(order.job_id, order.disk_key)
    except redis.RedisError as exc:
        log.warning("copy of %s/%s: no recorded checkpoint readable (%s); copying from the start", order.job_id,
                    order.disk_key, exc)
        return 0, ""
    if recorded is None or recorded.cursor <= 0:
        return 0, ""
    if recorded.plan != copy_plan_id(order):
        log.warning("copy of %s/%s: the checkpoint at %d was recorded for another copy plan; copying from the "
                    "start", order.job_id, order.disk_key, recorded.cursor)
        return 0, ""
    if recorded.cursor != order.resume_from:
        log.info("copy of %s/%s: the OMA's order says resume at %d, the agent's record %d (attempt %d): "
                 "the record wins", order.job_id, order.disk_key, order.resume_from, recorded.cursor,
                 recorded.attempt)
    return recorded.cursor, (f"the checkpoint attempt {recorded.attempt} on {recorded.worker} recorded on the agent "
                             f"after flushing the target")


@contextlib.contextmanager
def source_export(order: CopyOrder, config: AgentConfig) -> Iterator[str]:
    """The NBD URI to read the disk from: a VMware disk as its job's snapshot
    froze it, an NBD source as it is, an image file through a read-only
    nbdkit that lives as long as the copy."""
    snap = order.snapshot
    if snap is not None:
        disk = SnapshotDisk(vcenter=snap.vcenter.name, vm_moref=snap.vm_moref, snapshot_moref=snap.snapshot_moref,
                            device_key=snap.device_key, backing_file=snap.backing_file)
        if config.snapshot_source == "image-dir":
            with ImageDirSource(Path(config.snapshot_image_dir)).serve(disk) as uri:
                yield uri
            return
        with password_file_of(snap.vcenter) as secret, vddk_source(snap.vcenter, secret, config).serve(disk) as uri:
            yield uri
    elif order.bitmap_new:
        qcow2.freeze(order.source_locator, order.bitmap_base, order.bitmap_new)
        with qcow2.serve_readonly(order.source_locator, order.bitmap_base) as uri:
            yield uri
    elif order.source_locator.startswith(("nbd://", "nbd+unix://", "nbds://", "nbds+unix://")):
        yield order.source_locator
    else:
        with nbdkit.serve_file_readonly(order.source_locator) as uri:
            yield uri


def vddk_source(vcenter: VCenterRef, secret_file: str, config: AgentConfig) -> VddkSource:
    return VddkSource(libdir=config.vddk_libdir, server=vcenter.host, port=vcenter.port, username=vcenter.username,
                      thumbprint=vcenter.thumbprint, password_file=secret_file, transports=config.vddk_transports)


@contextlib.contextmanager
def password_file_of(vcenter: VCenterRef) -> Iterator[str]:
    """The vCenter's password as a file nbdkit reads (`password=+FILE`): the
    agent's own file, or a private temporary one for a password held in an
    environment variable."""
    if vcenter.password_file:
        yield vcenter.password_file
    else:
        with password_file(vcenter.password()) as path:
            yield path
