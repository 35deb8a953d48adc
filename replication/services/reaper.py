"""The reaper: the one judge of whether a run is lost. No job stays
non-terminal after the processes working on it are gone. Runs as a periodic
task; every decision is written with its reason.

Its thresholds (settings):
- HEARTBEAT_TIMEOUT_S: a copy run whose agent reported nothing for this long
  (its updates are its heartbeat, re-sent every HEARTBEAT_INTERVAL_S even
  when nothing moves) is lost: the disk goes to a new run, which resumes from
  the last reported checkpoint; after COPY_MAX_ATTEMPTS runs the job fails.
  A run that never reported and whose order still waits in its agent's queue
  (a busy agent, every copy slot taken) is queued, not lost; once its order
  has left the queue it has HEARTBEAT_TIMEOUT_S from the last pass that saw
  it waiting to send its first report.
- REAPER_TIMEOUT_S: a running job with no sign of life at all (no step of
  the OMA, no copy) for this long fails; a lost finalize is queued again.
- REAPER_PENDING_TIMEOUT_S: a job that never started fails.
- A revoked agent's cycles and copy runs still open are ended at once,
  with the reason, whatever their heartbeats say: its own word (outcomes,
  progress) is no longer trusted (services.enrolment.end_revoked_work).
- AGENT_SILENT_AFTER_S: an agent whose API has not answered the poller for
  this long (Agent.last_seen_at) is silent: its running copies are judged
  lost, its running jobs fail and its VMs are flagged with the reason;
  nothing of any other agent stops. Judged only while the poller itself
  runs (a stopped poller makes every agent look silent).
Nothing is judged until the database has been up HEARTBEAT_TIMEOUT_S: after
a restart every heartbeat looks old."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from django.conf import settings
from django.utils import timezone

from replication import dispatch
from replication.choices import JOB_TERMINAL, DiskStatus, JobStatus
from replication.models import CopyAttempt, JobEvent, ReplicationJob, VirtualMachine, VMDisk, database_up_since
from replication.services import agents, enrolment, failover, progress, sweeper
from replication.services import jobs as job_service
from replication.services.broker import WaitingTasks
from vma_agent import task_names
from vma_agent.task_names import agent_queue

log = logging.getLogger(__name__)


@dataclass
class Reaped:
    failed: list[str] = field(default_factory=list)
    requeued: list[str] = field(default_factory=list)
    disks_failed: list[int] = field(default_factory=list)
    disks_requeued: list[int] = field(default_factory=list)
    swept: list[str] = field(default_factory=list)
    failovers_failed: list[int] = field(default_factory=list)
    agents_silent: list[str] = field(default_factory=list)
    agents_revoked: list[str] = field(default_factory=list)


def reap(now: datetime | None = None) -> Reaped:
    now = now or timezone.now()
    result = Reaped()
    result.agents_revoked = enrolment.end_revoked_work()
    up_since = database_up_since()
    copies_stale = VMDisk.lost_before(now, up_since)
    if copies_stale is None:
        log.info("database up since %s: nothing is judged until %s s after its start", up_since,
                 settings.HEARTBEAT_TIMEOUT_S)
    else:
        _judge_silent_agents(now, result)
        _fail_silent_jobs(now, copies_stale, result)
        _hand_over_lost_copies(now, copies_stale, result)
        # Copies whose job already ended and whose agent never said they stopped.
        for disk in VMDisk.objects.filter(status=DiskStatus.COPYING, job__status__in=JOB_TERMINAL,
                                          heartbeat_at__lt=copies_stale):
            if disk.fail("copy lost after its job ended"):
                disk.end_attempt(disk.attempts, CopyAttempt.Outcome.LOST, reason="no word from its agent")
                result.disks_failed.append(disk.pk)
    pending_cutoff = now - timedelta(seconds=settings.REAPER_PENDING_TIMEOUT_S)
    for job in ReplicationJob.objects.filter(status=JobStatus.PENDING, created_at__lt=pending_cutoff):
        _fail(job, f"never started: pending for more than {settings.REAPER_PENDING_TIMEOUT_S:.0f} s", result)
    result.failovers_failed = failover.reap_failovers(now)
    result.swept = sweeper.sweep()
    return result


def _judge_silent_agents(now: datetime, result: Reaped) -> None:
    """An agent silent past AGENT_SILENT_AFTER_S: its runs cannot report,
    and a new run would go to the same silent agent; they are lost, their
    jobs fail, their VMs are flagged. Only that agent's."""
    lag = progress.poller_lag_s(now)
    if lag is None or lag > settings.AGENT_SILENT_AFTER_S:
        return  # the poller is the one that is silent: nobody asked the agents
    running = (JobStatus.PREPARING, JobStatus.REPLICATING, JobStatus.FINALIZING)
    for agent in agents.silent(now):
        quiet = (now - agent.last_seen_at).total_seconds()
        reason = (f"agent {agent.name} silent for {quiet:.0f} s (its API has not answered; AGENT_SILENT_AFTER_S "
                  f"{settings.AGENT_SILENT_AFTER_S:.0f}): its run is judged lost")
        # A job younger than the threshold has not had the time to be seen.
        jobs = list(ReplicationJob.objects.filter(status__in=running, vm__agent=agent.name,
                                                  created_at__lt=now - agents.silent_after()))
        if jobs:
            result.agents_silent.append(agent.name)
        for job in jobs:
            for disk in job.disks.filter(status=DiskStatus.COPYING):
                if disk.fail(reason):
                    disk.end_attempt(disk.attempts, CopyAttempt.Outcome.LOST, reason=reason)
                    result.disks_failed.append(disk.pk)
            _fail(job, reason, result)
            VirtualMachine.objects.filter(pk=job.vm_id).update(protection_flag=f"{job.id}: {reason}"[:500])


def _hand_over_lost_copies(now: datetime, stale: datetime, result: Reaped) -> None:
    """A copy run silent past HEARTBEAT_TIMEOUT_S while its job replicates lost
    its worker (killed, its host gone, its task lost with a broker's queue):
    Redis would hand its unacknowledged task back only after the visibility
    timeout (hours), so the disk goes to a new run at once."""
    lost = VMDisk.objects.filter(status=DiskStatus.COPYING, job__status=JobStatus.REPLICATING,
                                 heartbeat_at__lt=stale).select_related("job__vm")
    waiting = WaitingTasks()
    for disk in lost:
        if not disk.worker and waiting.holds(agent_queue(disk.job.vm.agent), disk.celery_task_id):
            disk.seen_waiting(now)
            continue  # never started: its order waits for a free copy slot on a busy agent
        if not disk.worker and disk.waiting_seen_at and disk.waiting_seen_at >= stale:
            # Its order left the queue since a recent pass: the run has just
            # started, and its first report may not have come through yet.
            continue
        quiet = (now - disk.heartbeat_at).total_seconds()
        who = disk.worker or "a run that never reported"
        if disk.attempts >= settings.COPY_MAX_ATTEMPTS:
            reason = (f"{disk.disk_key}: copy lost {disk.attempts} times, the last on {who} "
                      f"(nothing for {quiet:.0f} s); giving up (COPY_MAX_ATTEMPTS)")
            if disk.fail(reason):
                disk.end_attempt(disk.attempts, CopyAttempt.Outcome.LOST, reason=reason)
                result.disks_failed.append(disk.pk)
            _fail(disk.job, reason, result, copies_stale=stale)
            continue
        attempt, checkpoint = disk.attempts, disk.checkpoint_bytes
        if not job_service.dispatch_copy(disk, taking_over=True):
            continue  # it reported, or another reaper took it, meanwhile
        message = (f"{disk.disk_key}: copy attempt {attempt} on {who} silent for {quiet:.0f} s; "
                   f"requeued as attempt {attempt + 1}, resuming from offset {checkpoint}")
        JobEvent.objects.create(job=disk.job, status=disk.job.status, stage=disk.job.current_operation,
                                message=message)
        log.warning("job %s: %s", disk.job_id, message)
        result.disks_requeued.append(disk.pk)


def _fail_silent_jobs(now: datetime, copies_stale: datetime, result: Reaped) -> None:
    running = (JobStatus.PREPARING, JobStatus.REPLICATING, JobStatus.FINALIZING)
    for job in ReplicationJob.objects.filter(status__in=running):
        quiet = job.silent_for(now)
        if quiet < settings.REAPER_TIMEOUT_S:
            continue
        if job.status == JobStatus.FINALIZING and job.all_disks_completed():
            # Every disk is written: only the finalize step was lost. It is
            # idempotent, so run it again rather than throw the copy away.
            job.beat()
            dispatch.publish(task_names.FINALIZE_JOB, [job.id])
            log.warning("job %s: finalize lost (%.0f s without a sign of life), queued again", job.id, quiet)
            result.requeued.append(job.id)
            continue
        _fail(job, f"no sign of life for {quiet:.0f} s while {job.status}: the worker running it is gone", result,
              copies_stale=copies_stale)


def _fail(job: ReplicationJob, reason: str, result: Reaped, copies_stale: datetime | None = None) -> None:
    """Fail the job; its copies that went silent too end with it (nobody
    else will say they stopped)."""
    log.warning("job %s reaped: %s", job.id, reason)
    job_service.fail_job(job.id, reason)
    result.failed.append(job.id)
    if copies_stale is None:
        return
    for disk in job.disks.filter(status=DiskStatus.COPYING, heartbeat_at__lt=copies_stale):
        if disk.fail(reason):
            disk.end_attempt(disk.attempts, CopyAttempt.Outcome.LOST, reason=reason)
            result.disks_failed.append(disk.pk)
