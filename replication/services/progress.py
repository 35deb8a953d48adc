"""The OMA progress poller: agent progress records -> the database.

Every pass reads the set of jobs to poll from the database (never from
memory, so a restarted poller simply carries on), reads what changed from
the VMA progress API's change feed in one request (the cursor is kept in
memory; a restarted poller reads every live record once), and applies the
records of the active jobs in this thread:
monotonic (by per-disk sequence number), throttled (>= 1 %, >= 2 s, or a
stage change), job totals always aggregated from the disks.

This is the one path by which copy counters reach the database, and every
update applied is also the copy run's heartbeat (with its resume cursor).
The poller judges nothing: "no record yet" and network errors only mean
"poll again"; the reaper alone decides that a run is lost."""

from __future__ import annotations

import gc
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from concurrent.futures import TimeoutError as FuturesTimeout
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import NamedTuple

import redis
from django.conf import settings
from django.db import transaction
from django.db.models import F
from django.utils import timezone

from replication.choices import DiskStatus, JobStatus, Stage
from replication.models import Agent, ReplicationJob, VMDisk
from replication.models.jobs import job_totals
from replication.services import agents
from vma_agent.client import ProgressClient, ProgressUnavailable
from vma_agent.contract import EXPORT_PREFIX

log = logging.getLogger(__name__)

# Pending jobs have nothing to report yet (the reaper watches them).
POLLED_STATUSES = (JobStatus.PREPARING, JobStatus.REPLICATING, JobStatus.FINALIZING)
FETCH_ATTEMPTS = 3
FETCH_BACKOFF_S = 0.2
LOCK_KEY = "oma:progress-poller:lock"
LAST_PASS_KEY = "oma:progress-poller:last-pass"  # written by the poller only; the metrics read its age
# Jobs per transaction: a batch is a handful of statements whatever its size
# (the models split their statements under SQLite's 32766 parameters).
APPLY_BATCH_JOBS = 1000


@dataclass
class Fetched:
    """What the agent said about one job: disk entries by VMDisk pk."""

    job_id: str
    entries: dict[int, dict] = field(default_factory=dict)
    found: bool = False
    error: str | None = None
    requests: int = 0
    records: tuple[str, ...] = ()  # the record ids read for it (its job id, its exports)
    unchanged: bool = False  # none of them changed since their last apply: nothing to weigh


@dataclass(frozen=True)
class DiskRef:
    """What never changes of a job's disk: how the agent's records name it."""

    pk: int
    key: str
    export: str


@dataclass
class ActiveJob:
    """What the poller reads of an active job: its columns, not a model."""

    id: str
    status: str
    began: datetime  # started_at, or created_at before it started
    poll_errors: int
    agent: str
    disks: tuple[DiskRef, ...] = ()

    @property
    def pk(self) -> str:
        return self.id


@dataclass
class PassStats:
    jobs: int = 0
    requests: int = 0
    disks_written: int = 0
    jobs_written: int = 0
    not_found: int = 0
    errors: int = 0
    failed: list[str] = field(default_factory=list)
    agents: int = 0  # agents with active jobs
    agents_busy: int = 0  # of them, not read (or not answered) within this pass's wait
    seconds: float = 0.0
    apply_seconds: float = 0.0  # of `seconds`, spent applying (database) rather than fetching


def _get(feed: _Feed, record_id: str, fetched: Fetched) -> dict | None:
    """GET with retries and backoff; raises ProgressUnavailable after the last."""
    delay = FETCH_BACKOFF_S
    for attempt in range(FETCH_ATTEMPTS):
        fetched.requests += 1
        try:
            return feed.client.get(record_id)
        except ProgressUnavailable:
            if attempt == FETCH_ATTEMPTS - 1:
                raise
            time.sleep(delay)
            delay *= 2
    return None


STAGES = frozenset(Stage.values)  # Stage.values builds its list anew on every call
FEED_PAGE = 5000  # records per change-feed read: one read per pass unless more changed


@dataclass
class _Feed:
    """What this poller process knows of one agent's change feed. In memory
    only: a restarted poller starts at cursor 0 and reads every live record.
    Its lock is held for a whole read of the agent (taken by the pass,
    released by the thread that reads), so a read still running when the
    next pass starts makes that pass skip the agent instead of waiting."""

    address: tuple[str, str | None] = ("", None)  # the API's URL and token this feed was read from
    client: ProgressClient | None = None  # used under `lock` only: requests' sessions are not thread-safe
    agent_name: str = ""
    agent_version: str = ""
    epoch: str | None = None
    cursor: int = 0
    records: dict[str, dict] = field(default_factory=dict)  # latest record of ids active jobs use
    known: set[str] = field(default_factory=set)  # every record id the agent holds
    # Record ids that changed (or expired) since their job's last apply, or
    # whose update was held back (throttled): the jobs a pass weighs. A job
    # not in `seen` is weighed whatever its records (a new job, a restart).
    dirty: set[str] = field(default_factory=set)
    seen: set[str] = field(default_factory=set)  # job ids weighed at least once
    found: set[str] = field(default_factory=set)  # of them, those the agent had a record for
    lock: threading.Lock = field(default_factory=threading.Lock)

    def reset(self) -> None:
        """Forget the store: the next read starts at cursor 0."""
        self.epoch, self.cursor, self.records, self.known = None, 0, {}, set()
        self.dirty, self.seen, self.found = set(), set(), set()

    def arrived(self, record: dict) -> None:
        self.records[record["id"]] = record
        self.known.add(record["id"])
        self.dirty.add(record["id"])


_feeds: dict[str, _Feed] = {}  # by agent name


def _feed(agent_name: str = agents.LOCAL) -> _Feed:
    return _feeds.setdefault(agent_name, _Feed())


def _bind(feed: _Feed, url: str, token: str | None) -> None:
    """Point the feed at the agent's API as its record says now; a changed
    URL or token is another store, maybe: read it from cursor 0."""
    if feed.address != (url, token) or feed.client is None:
        feed.client = ProgressClient(url, token, timeout_s=settings.VMA_REQUEST_TIMEOUT_S,
                                     keep_alive=settings.VMA_HTTP_KEEPALIVE)
        if feed.address != ("", None):
            feed.reset()
        feed.address = (url, token)


def _changes_page(feed: _Feed, since: int) -> tuple[dict, int]:
    """One page of the change feed with retries and backoff, and the requests
    it took; raises ProgressUnavailable after the last."""
    delay = FETCH_BACKOFF_S
    for attempt in range(FETCH_ATTEMPTS):
        try:
            return feed.client.changes_page(since, FEED_PAGE), attempt + 1
        except ProgressUnavailable:
            if attempt == FETCH_ATTEMPTS - 1:
                raise
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


def _read_changes(feed: _Feed) -> int:
    """Bring `feed` up to date: the records changed since its cursor replace
    the ones it holds. Returns the requests made."""
    requests = 0
    while True:
        page, tries = _changes_page(feed, feed.cursor)
        requests += tries
        if page.get("epoch") != feed.epoch:
            if feed.cursor != 0:
                # The agent's store was emptied (or is another one): what we
                # hold is void. Read everything again, in this pass.
                log.warning("the agent's progress store changed (epoch %s -> %s): reading it again",
                            feed.epoch, page.get("epoch"))
                feed.reset()
                feed.epoch = page.get("epoch")
                continue
            feed.epoch = page.get("epoch")
        for record in page["records"]:
            feed.arrived(record)
        for record_id in page.get("expired") or ():
            feed.records.pop(record_id, None)
            feed.known.discard(record_id)
            feed.dirty.add(record_id)
        feed.cursor = page["cursor"]
        who = page.get("agent") or {}  # agents older than 0.30 do not say
        feed.agent_name, feed.agent_version = str(who.get("name") or ""), str(who.get("version") or "")
        if not page.get("more"):
            return requests


def _held(feed: _Feed, record_id: str, fetched: Fetched) -> dict | None:
    """The latest record for an id: the one the feed brought, or, for a
    record the agent holds that this poller let go (its job was not active
    then), one GET."""
    record = feed.records.get(record_id)
    if record is None and record_id in feed.known:
        record = _get(feed, record_id, fetched)
        if record is None:
            feed.known.discard(record_id)  # gone meanwhile
        else:
            feed.records[record_id] = record
    return record


def fetch(job: ActiveJob, feed: _Feed) -> Fetched:
    """The agent's entries for the job's disks, from the records the feed
    brought (no request for a job whose record did not change): its record
    by job id gives every disk that reported with its job id; disks still
    missing are looked up under their export names (ReplicationJob -> VMDisk
    -> TargetVolume), which finds updates an agent posted by export name
    alone. A job whose record exists is found, changed or not."""
    fetched = Fetched(job.id, records=(job.id, *(d.export for d in job.disks)))
    by_key = {d.key: d.pk for d in job.disks}
    by_export = {d.export: d.pk for d in job.disks}
    try:
        record = _held(feed, job.id, fetched)
        if record is not None:
            fetched.found |= _collect(record, fetched, job, by_key, by_export)
        for export, pk in by_export.items():
            if pk in fetched.entries:
                continue
            record = _held(feed, export, fetched)
            if record is not None:
                fetched.found |= _collect(record, fetched, job, by_key, by_export, export_pk=pk)
    except ProgressUnavailable as exc:
        fetched.error = str(exc)
    return fetched


def fetch_all(jobs: list[ActiveJob], feed: _Feed) -> tuple[list[tuple[ActiveJob, Fetched]], int]:
    """Every active job's Fetched from ONE read of its agent's change feed
    (more only when more than FEED_PAGE records changed, or for a record
    this poller let go), and the requests made. A job none of whose
    records changed since its last apply is not weighed again (its
    Fetched says `unchanged`): a pass costs what changed, not the disks.
    The caller holds `feed.lock`."""
    try:
        requests = _read_changes(feed)
    except ProgressUnavailable as exc:
        return [(job, Fetched(job.id, error=str(exc))) for job in jobs], FETCH_ATTEMPTS
    results = []
    for job in jobs:
        if job.id in feed.seen and job.id not in feed.dirty and not any(d.export in feed.dirty for d in job.disks):
            results.append((job, Fetched(job.id, found=job.id in feed.found, unchanged=True)))
            continue
        results.append((job, fetch(job, feed)))
    # Hold only the records active jobs use; the rest stay known by id.
    used = {job.id for job in jobs} | {d.export for job in jobs for d in job.disks}
    feed.records = {record_id: record for record_id, record in feed.records.items() if record_id in used}
    feed.dirty &= used
    active = {job.id for job in jobs}
    feed.seen &= active
    feed.found &= active
    return results, requests


@dataclass
class AgentRead:
    """One agent's part of a pass: its jobs, and what reading its feed gave."""

    agent: Agent | None
    name: str
    jobs: list[ActiveJob]
    results: list[tuple[ActiveJob, Fetched]] = field(default_factory=list)
    requests: int = 0
    error: str | None = None  # its API did not answer (or it cannot be reached as recorded)
    version: str = ""


def _read_agent(read: AgentRead, feed: _Feed) -> AgentRead:
    """In a thread of its own, no database: the feed's lock is already held
    (taken by the pass) and released here."""
    try:
        read.results, read.requests = fetch_all(read.jobs, feed)
        if read.agent.api_url and feed.agent_name and feed.agent_name != read.name:
            # Another agent answers at this agent's URL (a swapped tunnel port, a
            # copied config): its records are not this agent's jobs' progress.
            read.error = (f"the API at {read.agent.api_url} answers as agent {feed.agent_name!r}, "
                          f"not {read.name!r}")
            read.results = [(job, Fetched(job.id, error=read.error)) for job in read.jobs]
            feed.reset()
            return read
        errors = [fetched.error for _, fetched in read.results if fetched.error]
        if errors and len(errors) == len(read.results):
            read.error = errors[0]
        read.version = feed.agent_version
    except Exception as exc:  # noqa: BLE001 - one agent's failure is its own, never the pass's
        log.exception("reading agent %s failed", read.name)
        read.error = f"{type(exc).__name__}: {exc}"
        read.results = [(job, Fetched(job.id, error=read.error)) for job in read.jobs]
    finally:
        feed.lock.release()
    return read


def _by_agent(jobs: list[ActiveJob]) -> list[AgentRead]:
    """The active jobs grouped by the agent that copies them, each with its record."""
    groups: dict[str, list[ActiveJob]] = {}
    for job in jobs:
        groups.setdefault(job.agent, []).append(job)
    return [AgentRead(agents.named(name), name, group) for name, group in sorted(groups.items())]


def _record_health(read: AgentRead) -> None:
    """The agent's health as this pass saw it: the poller is the one writer
    of last_seen_at, version and last_error."""
    if read.agent is None:
        return
    if read.error is None:
        fields = {"last_seen_at": timezone.now(), "last_error": ""}
        if read.version:
            fields["version"] = read.version[:50]
    else:
        fields = {"last_error": read.error[:500]}
    Agent.objects.filter(pk=read.agent.pk).update(**fields)


def _collect(record: dict, fetched: Fetched, job: ActiveJob, by_key: dict, by_export: dict,
             export_pk: int | None = None) -> bool:
    """Take the record's entries for this job's disks; False when the record
    is not this job's (an export whose volume an earlier job reported)."""
    record_job = record.get("job_id") or None  # "" from MigrateKit OSSEA's migratekit: kept under an export name
    if record_job not in (None, job.id):
        return False
    started = job.began.timestamp()
    for disk_id, entry in (record.get("disks") or {}).items():
        if entry.get("loopback"):
            continue  # a token-less writer's: never our copies' progress, heartbeat or cursor
        if record_job is None:
            # A record an agent kept under the export name alone: everything
            # in it is that export's disk, but only if newer than this job.
            if export_pk is None or entry.get("received_at", 0) < started - 1:
                continue
            pk = export_pk
        else:
            pk = by_key.get(disk_id) or by_export.get(disk_id) or by_export.get(entry.get("export_name"))
        if pk is not None and entry.get("seq", 0) > fetched.entries.get(pk, {}).get("seq", 0):
            fetched.entries[pk] = entry
    return record_job == job.id or bool(fetched.entries)


class DiskState(NamedTuple):
    """A disk as the poller weighs an update against it (VMDisk.progress_states)."""

    pk: int
    status: str
    attempts: int
    progress_seq: int
    current_operation: str
    progress_percent: float
    bytes_done: int
    bytes_total: int
    throughput_bps: int
    checkpoint_bytes: int
    worker: str
    progress_due: bool | None  # PROGRESS_WRITE_INTERVAL_S since the last progress written
    heartbeat_due: bool | None  # HEARTBEAT_TIMEOUT_S / 4 since the last heartbeat
    job_id: str
    capacity_bytes: int


def _should_write(disk: DiskState, entry: dict, step_percent: float) -> bool:
    if entry["seq"] <= disk.progress_seq:
        return False  # late or replayed
    if entry.get("attempt", disk.attempts) != disk.attempts:
        return False  # an older run of the disk, taken over: it speaks no more
    if entry.get("stage") != disk.current_operation:
        return True
    total = entry.get("total_bytes") or disk.bytes_total
    done = entry.get("bytes_transferred") or 0
    percent = 100.0 if total <= 0 else 100.0 * done / total
    if abs(percent - disk.progress_percent) >= step_percent:
        return True
    changed = (done, total, entry.get("throughput_bps") or 0) != (disk.bytes_done, disk.bytes_total,
                                                                  disk.throughput_bps)
    if changed and disk.progress_due:
        return True
    # Nothing moved, but the run spoke: its heartbeat, stored often enough for
    # the reaper's HEARTBEAT_TIMEOUT_S and no more often.
    return bool(disk.heartbeat_due)


def _held_back(disk: DiskState, entry: dict) -> bool:
    """An update not written now that may be later (throttled, or from a
    run the database does not know yet): its record stays to be weighed."""
    return entry["seq"] > disk.progress_seq and entry.get("attempt", disk.attempts) >= disk.attempts


def apply(job: ActiveJob, fetched: Fetched, now: datetime, stats: PassStats) -> None:
    apply_batch([(job, fetched)], now, stats)


def _outcomes(pairs: list[tuple[ActiveJob, Fetched]], stats: PassStats) -> tuple[list, list, dict, list]:
    """Count what is not progress (errors, no record yet: the reaper alone
    judges whether a run is lost): the jobs whose agent failed, those that
    failed before and not now, the entries to weigh (disk pk -> (job,
    entry)) and the jobs this batch weighs."""
    failed, recovered, wanted, weighed = [], [], {}, []
    for job, fetched in pairs:
        if fetched.error is not None and not fetched.entries:
            stats.errors += 1
            failed.append(job.id)
            continue
        if job.poll_errors:
            recovered.append(job.id)
        if not fetched.found:
            stats.not_found += 1
        if fetched.unchanged:
            continue
        if fetched.error is None:
            weighed.append((job, fetched))
        for pk, entry in fetched.entries.items():
            wanted[pk] = (job, entry)
    return failed, recovered, wanted, weighed


def apply_batch(pairs: list[tuple[ActiveJob, Fetched]], now: datetime, stats: PassStats,
                feed: _Feed | None = None) -> None:
    """Classify each job's outcome; lock the rows of the jobs an update came
    for and read their disks' state (columns, not models); then write every
    due disk of the batch in joined UPDATEs and the jobs' totals, computed
    from the disks as just read and written (models.jobs.job_totals), in
    one commit: statements, not rows, are what a pass costs. With `feed`,
    the jobs weighed are marked so: a later pass weighs them again only
    when their records change (or one was held back)."""
    failed, recovered, wanted, weighed = _outcomes(pairs, stats)
    with transaction.atomic():
        if failed:
            ReplicationJob.objects.filter(pk__in=failed).update(poll_errors=F("poll_errors") + 1)
        if recovered:
            ReplicationJob.objects.filter(pk__in=recovered).update(poll_errors=0)
        job_ids = list({job.id for job, _ in wanted.values()})
        held = set()
        if job_ids:
            locked = ReplicationJob.lock_for_totals(job_ids)  # before the disks are read: see its doc
            states = {pk: DiskState(*row) for pk, row in VMDisk.progress_states(job_ids, now).items()}
            updates, due_jobs = _weigh(wanted, states, held)
            if updates:
                written = VMDisk.apply_progress_of(list(updates.values()), now)
                stats.disks_written += written
                if written == len(updates):
                    ReplicationJob.write_totals(_totals(due_jobs, locked, states, updates), now, _sampled)
                else:  # a disk changed since it was read (it stopped copying): its job's disks read again
                    ReplicationJob.refresh_totals_of([ReplicationJob(pk=pk) for pk in due_jobs])
                stats.jobs_written += len(due_jobs)
    if feed is not None:
        for job, fetched in weighed:
            feed.seen.add(job.id)
            (feed.found.add if fetched.found else feed.found.discard)(job.id)
            if job.id not in held:
                feed.dirty.difference_update(fetched.records)


def _weigh(wanted: dict, states: dict[int, DiskState], held: set) -> tuple[dict[int, dict], set[str]]:
    """The updates due ({disk pk: update}) and the jobs they are of; the
    jobs with an update held back are added to `held`."""
    updates, due_jobs = {}, set()
    step_percent = settings.PROGRESS_WRITE_STEP_PERCENT  # once: each settings read costs microseconds
    for pk, (job, entry) in wanted.items():
        disk = states.get(pk)
        if disk is None or disk.status != DiskStatus.COPYING:
            continue  # only copying disks take progress: a finished disk keeps what its outcome wrote
        if _should_write(disk, entry, step_percent):
            updates[pk] = _update_of(disk, entry)
            due_jobs.add(disk.job_id)
        elif _held_back(disk, entry):
            held.add(job.id)
    return updates, due_jobs


_sampled: dict[str, datetime] = {}  # by job id: its last progress sample (ProgressSample.record_for)


def _totals(job_ids: set[str], locked: dict, states: dict[int, DiskState], updates: dict[int, dict]) -> dict:
    """The totals of these jobs from their disks as read, each one updated
    as written (a disk written was copying and still is: the UPDATE said so)."""
    disks: dict[str, list] = {pk: [] for pk in job_ids}
    for disk in states.values():
        if disk.job_id in disks:
            update = updates.get(disk.pk)
            if update is None:
                disks[disk.job_id].append((disk.status, disk.bytes_done, disk.bytes_total, disk.throughput_bps,
                                           disk.capacity_bytes))
            else:
                disks[disk.job_id].append((disk.status, update["bytes_done"], update["bytes_total"],
                                           update["throughput_bps"], disk.capacity_bytes))
    return {pk: job_totals(*locked[pk], disks[pk]) for pk in job_ids if pk in locked}


def _update_of(disk: DiskState, entry: dict) -> dict:
    return {"pk": disk.pk, "seq": entry["seq"], "attempt": entry.get("attempt", disk.attempts),
            "bytes_done": entry.get("bytes_transferred") or 0,
            # MigrateKit OSSEA's migratekit may leave total_bytes out (omitempty): the known total stays.
            "bytes_total": entry.get("total_bytes") or disk.bytes_total,
            "throughput_bps": entry.get("throughput_bps") or 0,
            "stage": entry["stage"] if entry.get("stage") in STAGES else disk.current_operation,
            "eta_seconds": entry.get("eta_seconds"),
            "checkpoint_bytes": max(disk.checkpoint_bytes, entry.get("checkpoint_bytes") or 0),
            "worker": (entry.get("worker") or disk.worker)[:200]}


_disk_refs: dict[str, tuple[DiskRef, ...]] = {}  # by job id: a job's disks are made with it and never change


def active_jobs() -> list[ActiveJob]:
    """The jobs to poll, as columns; their disks' names from memory (read
    once per job: a job's disks are created with it)."""
    jobs = [ActiveJob(*row) for row in ReplicationJob.poll_rows(POLLED_STATUSES)]
    new = [job.id for job in jobs if job.id not in _disk_refs]
    refs: dict[str, list[DiskRef]] = {job_id: [] for job_id in new}
    for start in range(0, len(new), 5000):
        for pk, job_id, key, volume in (VMDisk.objects.filter(job_id__in=new[start:start + 5000]).order_by("pk")
                                        .values_list("pk", "job_id", "disk_key", "target_volume__volume_uuid")):
            refs[job_id].append(DiskRef(pk, key, f"{EXPORT_PREFIX}{volume}"))
    active = {job.id for job in jobs}
    for job_id in [job_id for job_id in _disk_refs if job_id not in active]:
        del _disk_refs[job_id]
    for job_id in [job_id for job_id in _sampled if job_id not in active]:
        del _sampled[job_id]
    _disk_refs.update((job_id, tuple(disks)) for job_id, disks in refs.items())
    for job in jobs:
        job.agent = job.agent or agents.LOCAL
        job.disks = _disk_refs[job.id]
    return jobs


def poll_once(now: datetime | None = None) -> PassStats:
    """One pass over every job the database says is active: every agent's
    feed read at once, each in a thread of its own with the per-request
    timeout; each agent's progress applied (here, the one writer) as soon as
    its read ends. An agent whose read outlasts the pass's wait
    (PROGRESS_POLL_INTERVAL_S) is left to finish in its thread: the records
    it brings stay in its feed for the next pass, which skips the agent
    while it is still being read. So a slow or dead agent never delays the
    others' progress."""
    with _collector_paused():
        return _pass(now)


def _pass(now: datetime | None) -> PassStats:
    started = time.monotonic()
    jobs = active_jobs()
    stats = PassStats(jobs=len(jobs))
    if jobs:
        current = now or timezone.now()
        reads = _by_agent(jobs)
        stats.agents = len(reads)
        pool = ThreadPoolExecutor(max_workers=len(reads), thread_name_prefix="poller-agent")
        pending: dict = {}  # future -> AgentRead
        try:
            for read in reads:
                if read.agent is None:
                    _apply_read(read, current, stats)
                    continue
                feed = _feed(read.name)
                if not feed.lock.acquire(blocking=False):
                    stats.agents_busy += 1  # its last read is still running: not now, and not waited for
                    continue
                try:
                    _bind(feed, agents.api_url(read.agent), agents.api_token(read.agent))
                except agents.AgentError as exc:
                    feed.lock.release()
                    read.error = str(exc)
                    read.results = [(job, Fetched(job.id, error=read.error)) for job in read.jobs]
                    _apply_read(read, current, stats)
                    continue
                pending[pool.submit(_read_agent, read, feed)] = read
            try:
                for future in as_completed(list(pending), timeout=settings.PROGRESS_POLL_INTERVAL_S):
                    del pending[future]
                    _apply_read(future.result(), current, stats)
            except FuturesTimeout:
                # The wait counts this thread's applying too: reads that ended
                # meanwhile are applied, only the unanswered ones are not.
                for future in [future for future in pending if future.done()]:
                    _apply_read(future.result(), current, stats)
                    del pending[future]
                stats.agents_busy += len(pending)
                wait_s = settings.PROGRESS_POLL_INTERVAL_S
                if pending:
                    log.warning("agent(s) %s did not answer within %.1f s; their progress comes in a later pass",
                                ", ".join(read.name for read in pending.values()), wait_s)
                for read in pending.values():
                    # Its thread goes on; this pass only says why it has nothing from the agent.
                    _record_health(AgentRead(read.agent, read.name, [], error=f"no answer within {wait_s:g} s"))
        finally:
            pool.shutdown(wait=False)
    stats.seconds = time.monotonic() - started
    _record_pass()
    return stats


FULL_COLLECTION_EVERY_S = 60.0
_full_collection_at = 0.0  # time.monotonic() of this process's last full collection


@contextmanager
def _collector_paused():
    """Python's cyclic garbage collector paused for a pass, and run at its
    end. A pass allocates hundreds of thousands of objects while the poller
    holds as many (the feeds' records, the disks' names), so the collector
    left to itself walks them all twice a pass: measured, a quarter of a
    20,000-disk pass's CPU, most of it in full collections. Instead: the
    young generations after every pass, and everything at most every
    FULL_COLLECTION_EVERY_S (a pass's garbage is mostly freed at once,
    without the collector: cycles wait a minute at most). Nothing changes
    if the collector was off already (another pass in another thread)."""
    global _full_collection_at
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
            if time.monotonic() - _full_collection_at >= FULL_COLLECTION_EVERY_S:
                gc.collect()
                _full_collection_at = time.monotonic()
            else:
                gc.collect(1)


def _apply_read(read: AgentRead, current: datetime, stats: PassStats) -> None:
    applying = time.monotonic()
    stats.requests += read.requests + sum(fetched.requests for _, fetched in read.results)
    for start in range(0, len(read.results), APPLY_BATCH_JOBS):
        # Copies no longer write these rows (they run on the agent); a
        # batch's transaction holds them for milliseconds.
        try:
            apply_batch(read.results[start:start + APPLY_BATCH_JOBS], current, stats, _feed(read.name))
        except Exception:
            log.exception("applying a batch of progress failed; the next pass retries it")
    try:
        _record_health(read)
    except Exception:
        log.exception("recording agent %s's health failed", read.name)
    stats.apply_seconds += time.monotonic() - applying


def _record_pass() -> None:
    try:
        redis.Redis.from_url(settings.CELERY_BROKER_URL).set(LAST_PASS_KEY, time.time(), ex=7 * 24 * 3600)
    except redis.RedisError as exc:
        log.warning("could not record the poller's pass: %s", exc)


def poller_lag_s(now: datetime) -> float | None:
    """Seconds since the poller's last pass; None when it never ran (or Redis is down)."""
    try:
        value = redis.Redis.from_url(settings.CELERY_BROKER_URL).get(LAST_PASS_KEY)
    except redis.RedisError:
        return None
    return None if value is None else max(0.0, now.timestamp() - float(value))


def poll_once_locked() -> PassStats | None:
    """A pass unless another poller's pass is still running (beat fires every
    few seconds; a slow pass must not pile up behind itself)."""
    client = redis.Redis.from_url(settings.CELERY_BROKER_URL)
    token = str(time.time_ns())
    ttl = max(10, int(settings.PROGRESS_POLL_INTERVAL_S * 6))
    if not client.set(LOCK_KEY, token, nx=True, ex=ttl):
        return None
    try:
        return poll_once()
    finally:
        if client.get(LOCK_KEY) == token.encode():
            client.delete(LOCK_KEY)
