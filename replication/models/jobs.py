"""A replication cycle and its disks: the job, its timeline and progress
samples, each disk's copy runs, and the changeIds each committed. Statuses
move along choices.JOB_TRANSITIONS and DISK_TRANSITIONS (models.base)."""

from __future__ import annotations

import functools
import math
import re
import secrets
from datetime import UTC, datetime, timedelta

from django.conf import settings
from django.db import connection, models, transaction
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from replication import figures
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
    Stage,
    SyncType,
)
from replication.models.base import StateMachine
from replication.models.inventory import SourceDisk, TargetVolume, VirtualMachine
from vma_agent.units import iec_rate

PROGRESS_SAMPLE_S = timedelta(seconds=5)


def new_job_id() -> str:
    """MigrateKit OSSEA's form: job-YYYYMMDD-HHMMSS.mmm-xxxxxx."""
    now = timezone.now()
    return f"job-{now:%Y%m%d-%H%M%S}.{now.microsecond // 1000:03d}-{secrets.token_hex(3)}"


def database_up_since() -> datetime | None:
    """When the database server last started; None when unknown (SQLite)."""
    if connection.vendor != "mysql":
        return None
    with connection.cursor() as cursor:
        cursor.execute("SHOW GLOBAL STATUS LIKE 'Uptime'")
        row = cursor.fetchone()
    return timezone.now() - timedelta(seconds=int(row[1])) if row else None


def heartbeats_stale_before(now: datetime, seconds: float, up_since: datetime | None) -> datetime | None:
    """Heartbeats older than the returned time are stale. None while the
    database has been up for less than `seconds`: a heartbeat missing then
    may have been refused by the server (restarting), not lost with its
    worker, and a copy that rode out the outage must not be handed over."""
    cutoff = now - timedelta(seconds=seconds)
    return None if up_since is not None and up_since > cutoff else cutoff


def transfer_percent(bytes_done: int, bytes_total: int) -> float:
    """Job-level percent during Transfer: the copy mapped onto 30..100."""
    fraction = 1.0 if bytes_total <= 0 else min(1.0, bytes_done / bytes_total)
    return TRANSFER_START_PERCENT + (100 - TRANSFER_START_PERCENT) * fraction


UNFINISHED = frozenset({DiskStatus.PENDING.value, DiskStatus.COPYING.value})


def job_totals(status: str, limit_bps: int | None, disks) -> dict:
    """A job's totals (the columns written to its row) from its disks, each
    (status, bytes_done, bytes_total, throughput_bps, capacity_bytes), by
    the rules of replication.figures, the one source of shown rates: the
    job's rate is the sum of its copying disks' rates, each capped by the
    job's per-disk limit in force; while it replicates, its percent counts
    a disk not measured yet with its capacity (an upper bound of its data,
    so the percent only ever rises), and its ETA is its slowest unfinished
    disk's remaining bytes at that disk's rate, unknown while one of them
    has no rate yet."""
    done = total = rate = unmeasured = 0
    eta, unrated = 0.0, False
    for disk_status, bytes_done, bytes_total, throughput, capacity in disks:
        done += bytes_done
        total += bytes_total
        if not bytes_total and disk_status != DiskStatus.COMPLETED:
            unmeasured += capacity
        if disk_status in UNFINISHED:
            shown = figures.capped(throughput, limit_bps)
            if disk_status == DiskStatus.COPYING:
                rate += shown
            if throughput <= 0:
                unrated = True
            else:
                eta = max(eta, figures.remaining_bytes(bytes_done, bytes_total, capacity) / shown)
    row = {"bytes_transferred": done, "total_bytes": total, "throughput_bps": rate}
    if status == JobStatus.REPLICATING:
        row["progress_percent"] = transfer_percent(done, total + unmeasured)
        row["eta_seconds"] = None if unrated else int(eta)
    return row


# The columns an agent's update writes to its disk's row (VMDisk.apply_progress_of), in its VALUES' order.
PROGRESS_COLUMNS = ["attempts", "progress_seq", "bytes_done", "bytes_total", "progress_percent", "throughput_bps",
                    "current_operation", "eta_seconds", "checkpoint_bytes", "worker"]
JOINED_UPDATE_ROWS = 2000  # rows per statement: SQLite takes 32766 parameters, a row about a dozen


def _sql_number(value) -> str | None:
    """A number (or None) as SQL text, written into the statement rather
    than passed as a parameter: the driver quotes each parameter in Python,
    and a pass writes tens of thousands; None for anything else (a
    parameter then)."""
    if value is None:
        return "NULL"
    if type(value) is int:  # bool apart
        return str(value)
    if type(value) is float and math.isfinite(value):
        return repr(value)
    return None


_PLAIN_TEXT = re.compile(r"[A-Za-z0-9 _.:@/+-]{0,200}")


@functools.lru_cache(maxsize=4096)
def _plain_literal(text: str) -> str | None:
    """A string of plain characters (no quote, backslash, % or comma) as an
    SQL literal, the same in every dialect here; None for any other (a
    parameter then: the driver quotes it, at a cost per value). A pass
    writes a stage and a worker name per disk, a handful of distinct ones."""
    return f"'{text}'" if _PLAIN_TEXT.fullmatch(text) else None


def _marks(count: int) -> str:
    return ", ".join(["%s"] * count)


def _aware(value) -> datetime | None:
    """A datetime column read by plain SQL (UTC, naive from MariaDB, text
    from SQLite), as the ORM would give it."""
    if isinstance(value, str):
        value = parse_datetime(value)
    return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value


def _update_rows(model, rows: dict, condition_sql: str = "", condition_params: tuple = (), *,
                 constants: dict | None = None) -> int:
    """UPDATE many rows to values of their own, {pk: {column: value}} (every
    row the same columns), plus `constants` set on every row: the rows go to
    the database as a table (VALUES) joined on the primary key, so each row
    costs the same however many there are (CASE WHEN pk = ... is read
    branch by branch, quadratic in the rows). `condition_sql` narrows the
    rows further: the table's row is `d`, its new values `v` (v.column).
    Returns the rows matched. Plain SQL: the ORM has no joined UPDATE."""
    if not rows:
        return 0
    columns = list(next(iter(rows.values())))
    return _update_rendered(model, columns, [_render_row((key, *(row[column] for column in columns)))
                                             for key, row in rows.items()],
                            condition_sql, condition_params, constants=constants)


def _render_row(values) -> tuple[str, list]:
    """A row of VALUES as SQL text, its numbers written in (_sql_number),
    and the parameters its other values take."""
    cells, params = [], []
    for value in values:
        literal = _sql_number(value)
        if literal is None:
            literal = "%s"
            params.append(connection.ops.adapt_datetimefield_value(value) if isinstance(value, datetime) else value)
        cells.append(literal)
    return f"({', '.join(cells)})", params


def _update_rendered(model, columns: list[str], rendered: list[tuple[str, list]], condition_sql: str = "",
                     condition_params: tuple = (), *, constants: dict | None = None) -> int:
    """_update_rows of rows already rendered: (SQL text, parameters) each,
    its primary key then `columns`."""
    if not rendered:
        return 0
    quote = connection.ops.quote_name
    adapt = connection.ops.adapt_datetimefield_value
    constants = {col: adapt(v) if isinstance(v, datetime) else v for col, v in (constants or {}).items()}
    table, pk = quote(model._meta.db_table), quote(model._meta.pk.column)
    names = [pk, *(quote(column) for column in columns)]
    matched = 0
    for start in range(0, len(rendered), JOINED_UPDATE_ROWS):
        chunk = rendered[start:start + JOINED_UPDATE_ROWS]
        values = [param for _, params in chunk for param in params]
        where = f" WHERE {condition_sql}" if condition_sql else ""
        if connection.vendor == "mysql":
            sets = ", ".join([*(f"d.{quote(c)} = v.{quote(c)}" for c in columns),
                              *(f"d.{quote(c)} = %s" for c in constants)])
            # The first row names the columns, the others follow it as a
            # table value constructor: MariaDB builds that table once, where
            # a CTE (WITH v (names) AS (VALUES ...)) is built twice, at about
            # twice the server's CPU for the whole UPDATE. A rendered row's
            # cells are numbers, NULL or %s: none holds ", ".
            first = ", ".join(f"{cell} AS {name}" for cell, name in zip(chunk[0][0][1:-1].split(", "), names,
                                                                         strict=True))
            rest = f" UNION ALL VALUES {', '.join(text for text, _ in chunk[1:])}" if len(chunk) > 1 else ""
            sql = f"UPDATE {table} d JOIN (SELECT {first}{rest}) v ON d.{pk} = v.{pk} SET {sets}{where}"
            params = [*values, *constants.values(), *condition_params]
        else:  # SQLite (3.33+: UPDATE ... FROM)
            sets = ", ".join([*(f"{quote(c)} = v.{quote(c)}" for c in columns),
                              *(f"{quote(c)} = %s" for c in constants)])
            named = ", ".join(f"column{i + 1} AS {name}" for i, name in enumerate(names))
            values_sql = "VALUES " + ", ".join(text for text, _ in chunk)
            sql = (f"UPDATE {table} AS d SET {sets} FROM (SELECT {named} FROM ({values_sql})) AS v "
                   f"WHERE d.{pk} = v.{pk}" + (f" AND ({condition_sql})" if condition_sql else ""))
            params = [*constants.values(), *values, *condition_params]
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
            matched += cursor.rowcount
    return matched


class ReplicationJob(StateMachine):
    transitions = JOB_TRANSITIONS
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
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    completed_at = models.DateTimeField(null=True, blank=True)
    last_progress_at = models.DateTimeField(null=True, blank=True)
    eta_seconds = models.BigIntegerField(null=True, blank=True)
    heartbeat_at = models.DateTimeField(
        null=True, blank=True, help_text="Last sign of life of the workflow step working on this job")
    poll_errors = models.PositiveIntegerField(default=0, help_text="Consecutive failed polls of the agent")
    snapshot_name = models.CharField(max_length=200, blank=True)
    recovery_point_at = models.DateTimeField(
        null=True, blank=True, help_text="When the source was frozen (the snapshot; an image: its copy began)")
    snapshot_moref = models.CharField(max_length=100, blank=True, help_text="Set while the job's snapshot exists")
    verify = models.BooleanField(default=False, help_text="Read back every copied area before committing")
    bandwidth_limit_bps = models.BigIntegerField(null=True, blank=True, help_text="Per disk copy; empty: no limit")
    overrides = models.JSONField(default=list, blank=True, help_text="Preflight blockers the operator overrode")
    vm_shape = models.JSONField(default=dict, blank=True,
                                help_text="The VM's CPUs, memory, firmware, NICs and boot order at this cycle: "
                                          "what a failover to this cycle boots")
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        db_table = "replication_jobs"
        ordering = ["-created_at"]

    def __str__(self):
        return self.id

    @property
    def is_terminal(self) -> bool:
        return self.status in JOB_TERMINAL

    def transition(self, to: JobStatus, *, only_from=None, **fields) -> bool:
        """StateMachine.transition, stamped, and each move on the timeline."""
        fields.setdefault("updated_at", timezone.now())
        if to in JOB_TERMINAL:
            fields.setdefault("completed_at", timezone.now())
        moved = super().transition(to, only_from=only_from, **fields)
        if moved:
            JobEvent.objects.create(job=self, status=to, stage=self.current_operation,
                                    message=fields.get("error_message", ""))
        return moved

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

    def silent_for(self, now: datetime) -> float:
        """Seconds since the last sign of life of the job or any of its disks."""
        return (now - self.last_sign_of_life()).total_seconds()

    def last_sign_of_life(self):
        """The newest heartbeat of the job or any of its unfinished disks."""
        beats = [self.heartbeat_at, self.started_at, self.created_at]
        beats += list(self.disks.exclude(status__in=DISK_TERMINAL).values_list("heartbeat_at", flat=True))
        return max(b for b in beats if b is not None)

    def record_poll(self, *, error: bool) -> None:
        count = models.F("poll_errors") + 1 if error else 0
        ReplicationJob.objects.filter(pk=self.pk).update(poll_errors=count)

    @classmethod
    def snapshots_removed(cls, morefs, *, job_id: str | None = None) -> int:
        """These snapshots are gone from the source: the jobs holding them
        (only `job_id`'s, when given) no longer have one to remove. The one
        place snapshot_moref is cleared."""
        rows = cls.objects.filter(snapshot_moref__in=[moref for moref in morefs if moref])
        if job_id is not None:
            rows = rows.filter(pk=job_id)
        return rows.update(snapshot_moref="")

    def change_limit(self, bytes_per_s: int | None, actor: str) -> bool:
        """A new bandwidth limit per disk copy (None: none) for a job still
        running, recorded on its timeline; False when the job has ended."""
        if bytes_per_s is not None and bytes_per_s <= 0:
            raise ValueError(f"a bandwidth limit must be positive, not {bytes_per_s}")
        moved = ReplicationJob.objects.filter(pk=self.pk, status__in=JOB_ACTIVE).update(
            bandwidth_limit_bps=bytes_per_s, updated_at=timezone.now())
        if not moved:
            return False
        self.refresh_from_db()
        JobEvent.objects.create(job=self, status=self.status, stage=self.current_operation,
                                message=f"bandwidth limit {iec_rate(bytes_per_s) if bytes_per_s else 'none'} "
                                        f"per disk, set by {actor}")
        return True

    def fail(self, reason: str) -> bool:
        # An ended job copies nothing: no rate, no ETA (replication.figures).
        return self.transition(JobStatus.FAILED, error_message=reason[:4000], current_operation=Stage.FAILED,
                               throughput_bps=0, eta_seconds=None)

    def cancel(self, reason: str = "cancelled by the operator") -> bool:
        return self.transition(JobStatus.CANCELLED, error_message=reason, current_operation=Stage.CANCELLED,
                               throughput_bps=0, eta_seconds=None)

    def complete(self) -> bool:
        """Completed, with the throughput averaged over the whole job."""
        self.refresh_totals()
        self.refresh_from_db()
        now = timezone.now()
        average = figures.average_rate(self.bytes_transferred, self.started_at or self.created_at, now)
        return self.transition(JobStatus.COMPLETED, current_operation=Stage.COMPLETED, progress_percent=100.0,
                               throughput_bps=average, completed_at=now, eta_seconds=None)

    @property
    def data_percent(self) -> float:
        """How much of the data is copied: bytes, not the stage-weighted
        progress_percent of MigrateKit OSSEA's wire contract (which starts the copy at 30)."""
        if self.status == JobStatus.COMPLETED:
            return 100.0
        return min(100.0, 100.0 * self.bytes_transferred / self.total_bytes) if self.total_bytes else 0.0

    def refresh_totals(self) -> None:
        """Job totals are always aggregated from the disks."""
        ReplicationJob.refresh_totals_of([self])

    @classmethod
    def refresh_totals_of(cls, jobs: list) -> None:
        """refresh_totals for many jobs (anything with a pk): each job's row
        locked first (lock_for_totals), its disks read, its totals computed
        by job_totals and written in a joined UPDATE per few thousand jobs."""
        ids = list(dict.fromkeys(job.pk for job in jobs))
        if not ids:
            return
        with transaction.atomic():
            locked = cls.lock_for_totals(ids)
            disks: dict[str, list] = {pk: [] for pk in locked}
            for start in range(0, len(ids), 5000):
                for job_id, *disk in (VMDisk.objects.filter(job_id__in=ids[start:start + 5000]).order_by()
                                      .values_list("job_id", "status", "bytes_done", "bytes_total", "throughput_bps",
                                                   "capacity_bytes")):
                    disks[job_id].append(disk)
            cls.write_totals({pk: job_totals(status, limit, disks[pk]) for pk, (status, limit) in locked.items()},
                             timezone.now())

    @classmethod
    def lock_for_totals(cls, ids: list[str]) -> dict[str, tuple[str, int | None]]:
        """Lock these jobs' rows for the caller's transaction (SELECT ... FOR
        UPDATE; SQLite's write transaction holds the whole database) and
        read their (status, bandwidth_limit_bps). Whoever computes a job's
        totals holds its row from before reading its disks until the totals
        are written: two writers never interleave their reads and writes,
        so the last totals written are those of the disks as they last
        changed (a disk's outcome refreshes its job's totals after its own
        write), and a limit changed meanwhile (limits.change_limit locks the
        row too) waits for them, so no rate is written above it."""
        quote = connection.ops.quote_name
        lock = " FOR UPDATE" if connection.features.has_select_for_update else ""
        locked = {}
        for start in range(0, len(ids), 5000):
            chunk = ids[start:start + 5000]
            with connection.cursor() as cursor:
                cursor.execute(f"SELECT {quote('id')}, {quote('status')}, {quote('bandwidth_limit_bps')} "
                               f"FROM {quote(cls._meta.db_table)} WHERE {quote('id')} IN ({_marks(len(chunk))}) "
                               f"ORDER BY {quote('id')}{lock}", chunk)
                locked.update((pk, (status, limit)) for pk, status, limit in cursor.fetchall())
        return locked

    @classmethod
    def poll_rows(cls, statuses) -> list[tuple]:
        """The poller's read of the jobs in these statuses, as plain tuples
        (id, status, began: started_at or else created_at, poll_errors, the
        agent of its VM): one joined SELECT, no model."""
        quote = connection.ops.quote_name
        sql = (f"SELECT j.{quote('id')}, j.{quote('status')}, COALESCE(j.{quote('started_at')}, "
               f"j.{quote('created_at')}), j.{quote('poll_errors')}, v.{quote('agent')} "
               f"FROM {quote(cls._meta.db_table)} j INNER JOIN {quote(VirtualMachine._meta.db_table)} v "
               f"ON v.{quote('id')} = j.{quote('vm_id')} WHERE j.{quote('status')} IN ({_marks(len(statuses))})")
        with connection.cursor() as cursor:
            cursor.execute(sql, [str(status) for status in statuses])
            return [(pk, status, _aware(began), errors, agent)
                    for pk, status, began, errors, agent in cursor.fetchall()]

    @classmethod
    def write_totals(cls, rows: dict[str, dict], now: datetime, sampled: dict | None = None) -> None:
        """Write job_totals' rows ({job id: row}) to still active jobs as of
        `now`, and their progress samples (ProgressSample.record_for,
        `sampled` its memory). The caller holds the rows (lock_for_totals)."""
        if not rows:
            return
        # Rows of one statement share their columns: replicating jobs apart.
        for replicating in (True, False):
            part = {pk: row for pk, row in rows.items() if ("eta_seconds" in row) == replicating}
            _update_rows(cls, part, f"d.status IN ({', '.join(['%s'] * len(JOB_ACTIVE))})",
                         tuple(status.value for status in JOB_ACTIVE),
                         constants={"last_progress_at": now, "updated_at": now})
        ProgressSample.record_for(rows, now, sampled)

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

    @classmethod
    def record_for(cls, totals: dict, now, sampled: dict | None = None) -> None:
        """One sample per job every PROGRESS_SAMPLE_S, from the totals just
        written ({job id: row}). `sampled` ({job id: when its last sample
        was taken}, kept by the caller across calls: the poller's) saves
        reading the recent samples of the jobs it knows; the jobs it does
        not (all of them without it, or in a process just started) are read
        from the table, so a restarted poller never samples a job twice
        within PROGRESS_SAMPLE_S. A sample another process took meanwhile
        (a disk's outcome refreshing its job's totals) is not in it: that
        job may have two samples closer together."""
        cutoff = now - PROGRESS_SAMPLE_S
        known = {} if sampled is None else sampled
        unknown = [pk for pk in totals if pk not in known]
        last = {pk: known[pk] for pk in totals if pk in known}
        for start in range(0, len(unknown), 5000):
            for pk, at in cls.objects.filter(job_id__in=unknown[start:start + 5000], at__gt=cutoff).values_list(
                    "job_id", "at"):
                last[pk] = max(at, last.get(pk, at))
        due = [(pk, row) for pk, row in totals.items() if pk not in last or last[pk] <= cutoff]
        if sampled is not None:
            sampled.update(last)
            sampled.update((pk, now) for pk, _ in due)
        # One INSERT per few thousand samples, its numbers written into the
        # statement (bulk_create builds and quotes each value in Python).
        quote = connection.ops.quote_name
        at = connection.ops.adapt_datetimefield_value(now)
        for start in range(0, len(due), JOINED_UPDATE_ROWS):
            chunk = due[start:start + JOINED_UPDATE_ROWS]
            rows = ", ".join(f"(%s, %s, {int(row['bytes_transferred'])}, {int(row['throughput_bps'])})"
                             for _, row in chunk)
            with connection.cursor() as cursor:
                cursor.execute(f"INSERT INTO {quote(cls._meta.db_table)} ({quote('job_id')}, {quote('at')}, "
                               f"{quote('bytes_transferred')}, {quote('throughput_bps')}) VALUES {rows}",
                               [value for pk, _ in chunk for value in (pk, at)])


class VMDisk(StateMachine):
    """One disk of one job: what is copied, from where, to which volume."""

    transitions = DISK_TRANSITIONS

    job = models.ForeignKey(ReplicationJob, on_delete=models.CASCADE, related_name="disks")
    source_disk = models.ForeignKey(SourceDisk, on_delete=models.PROTECT, related_name="job_disks")
    target_volume = models.ForeignKey(TargetVolume, on_delete=models.PROTECT, related_name="job_disks")
    disk_key = models.CharField(max_length=50)
    capacity_bytes = models.BigIntegerField()
    source_locator = models.CharField(max_length=1000)
    target_uri = models.CharField(max_length=1200, blank=True,
                                  help_text="The NBD URI its copy writes: its cycle's layer of the target volume")
    previous_change_id = models.CharField(max_length=200, blank=True)
    change_id = models.CharField(max_length=200, blank=True, help_text="The snapshot's changeId, committed at the end")
    sync_type = models.CharField(max_length=20, choices=SyncType.choices, default=SyncType.FULL)
    full_copy_reason = models.CharField(max_length=500, blank=True, help_text="Why an incremental job copies it all")
    status = models.CharField(max_length=20, choices=DiskStatus.choices, default=DiskStatus.PENDING, db_index=True)
    current_operation = models.CharField(max_length=40, choices=Stage.choices, default=Stage.INITIALIZING)
    bytes_total = models.BigIntegerField(default=0, help_text="Data to copy (allocated bytes)")
    bytes_done = models.BigIntegerField(default=0)
    bytes_zeroed = models.BigIntegerField(default=0)
    progress_percent = models.FloatField(default=0.0)
    throughput_bps = models.BigIntegerField(default=0)
    attempts = models.PositiveIntegerField(default=0, help_text="Copy runs claimed so far; the newest one's number "
                                                                "fences the older ones' writes")
    worker = models.CharField(max_length=200, blank=True,
                              help_text="hostname:pid of the copy holding the claim; empty while (re)queued")
    checkpoint_bytes = models.BigIntegerField(
        default=0, help_text="Committed cursor: everything below it is written and flushed; a new run resumes here")
    error_message = models.TextField(blank=True)
    celery_task_id = models.CharField(max_length=64, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    completed_at = models.DateTimeField(null=True, blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True, help_text="Last sign of life of its copy task")
    waiting_seen_at = models.DateTimeField(
        null=True, blank=True,
        help_text="When the reaper last saw its run's order waiting in the agent's queue (every copy slot taken)")
    progress_seq = models.BigIntegerField(default=0, help_text="Sequence number of the applied agent update")
    last_progress_at = models.DateTimeField(null=True, blank=True)
    eta_seconds = models.BigIntegerField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name = "disk copy"
        verbose_name_plural = "disk copies"
        db_table = "vm_disks"
        ordering = ["job", "disk_key"]
        constraints = [models.UniqueConstraint(fields=["job", "disk_key"], name="uniq_job_disk_key")]

    def __str__(self):
        return f"{self.job_id}/{self.disk_key}"

    def transition(self, to: DiskStatus, attempt: int | None = None, *, only_from=None, **fields) -> bool:
        """StateMachine.transition; with `attempt`, only while that copy run
        is still the disk's newest (a run that was taken over must not end
        the disk its successor is copying)."""
        fields.setdefault("updated_at", timezone.now())
        if to in DISK_TERMINAL:
            fields.setdefault("completed_at", timezone.now())
        rows = VMDisk.objects.filter(pk=self.pk)
        if attempt is not None:
            rows = rows.filter(attempts=attempt)
        return self._move(rows, to, only_from, fields)

    @staticmethod
    def lost_before(now: datetime, up_since: datetime | None) -> datetime | None:
        """A copy run whose last report is older than this is lost (the
        reaper's one rule, HEARTBEAT_TIMEOUT_S); None while nothing may be
        judged (the database restarted less than that ago)."""
        return heartbeats_stale_before(now, settings.HEARTBEAT_TIMEOUT_S, up_since)

    def seen_waiting(self, at: datetime) -> None:
        """The reaper saw this run's order still waiting in its agent's queue."""
        VMDisk.objects.filter(pk=self.pk).update(waiting_seen_at=at)
        self.waiting_seen_at = at

    def start_attempt(self, task_id: str, *, taking_over: bool = False) -> bool:
        """Hand the disk's copy to a new run, attempt N+1, in one conditional
        UPDATE: a pending disk, or (taking_over) a copying one whose run went
        silent, exactly as this instance read it (another reaper pass, or a
        heartbeat meanwhile, wins). The agent fences older runs by this
        number, and every outcome of an older run is refused here."""
        now = timezone.now()
        rows = VMDisk.objects.filter(pk=self.pk, attempts=self.attempts)
        if taking_over:
            rows = rows.filter(status=DiskStatus.COPYING, heartbeat_at=self.heartbeat_at)
        else:
            rows = rows.filter(status=DiskStatus.PENDING)
        moved = rows.update(status=DiskStatus.COPYING, attempts=models.F("attempts") + 1, worker="",
                            celery_task_id=task_id, heartbeat_at=now, started_at=now, updated_at=now,
                            waiting_seen_at=None, current_operation=Stage.INITIALIZING)
        if not moved:
            return False
        if taking_over:
            CopyAttempt.objects.filter(disk=self, number=self.attempts, ended_at__isnull=True).update(
                ended_at=now, outcome=CopyAttempt.Outcome.LOST, checkpoint_bytes=self.checkpoint_bytes)
        self.refresh_from_db()
        CopyAttempt.objects.create(disk=self, number=self.attempts, task_id=task_id, started_at=now,
                                   resumed_from=self.checkpoint_bytes)
        return True

    def end_attempt(self, number: int, outcome: str, *, reason: str = "", **fields) -> None:
        """Close run `number` with what its agent reported (worker, bytes
        read, checkpoint...); a run already closed stays as it was."""
        CopyAttempt.objects.filter(disk_id=self.pk, number=number, ended_at__isnull=True).update(
            ended_at=timezone.now(), outcome=outcome, reason=reason[:2000], **fields)

    @classmethod
    def apply_progress_of(cls, updates: list[dict], at) -> int:
        """Apply agent updates to many disks, a joined UPDATE per few
        thousand. Each dict: pk, attempt, seq, bytes_done, bytes_total,
        throughput_bps, stage, eta_seconds, checkpoint_bytes, worker. A row
        changes only if its update is newer than the one applied, comes
        from the disk's current copy run, and the disk is still copying:
        progress never moves backwards, and a superseded run says nothing.
        Each applied update is the copy's heartbeat. Returns how many rows
        changed."""
        if not updates:
            return 0
        rendered = []
        for u in updates:
            done, total, eta = u["bytes_done"], u["bytes_total"], u["eta_seconds"]
            percent = 100.0 if total <= 0 else min(100.0, 100.0 * done / total)
            numbers = (u["pk"], u["attempt"], u["seq"], done, total, u["throughput_bps"], u["checkpoint_bytes"])
            stage, worker = str(u["stage"]), u["worker"]
            if all(type(n) is int for n in numbers) and (eta is None or type(eta) is int):
                # The common case, written at once (_render_row's result, in a fraction of its time).
                pk, attempt, seq, done, total, throughput, checkpoint = numbers
                texts = [_plain_literal(stage), _plain_literal(worker) if type(worker) is str else None]
                params = [value for value, text in zip((stage, worker), texts, strict=True) if text is None]
                rendered.append((f"({pk}, {attempt}, {seq}, {done}, {total}, {percent!r}, {throughput}, "
                                 f"{texts[0] or '%s'}, {'NULL' if eta is None else eta}, {checkpoint}, "
                                 f"{texts[1] or '%s'})", params))
            else:
                rendered.append(_render_row((u["pk"], u["attempt"], u["seq"], done, total, percent,
                                             u["throughput_bps"], str(u["stage"]), eta, u["checkpoint_bytes"],
                                             u["worker"])))
        # `attempts` is set to the value it must already have: a condition, not a change.
        return _update_rendered(cls, PROGRESS_COLUMNS, rendered,
                                "d.status = %s AND d.progress_seq < v.progress_seq AND d.attempts = v.attempts",
                                (DiskStatus.COPYING.value,),
                                constants={"heartbeat_at": at, "last_progress_at": at, "updated_at": at})

    @classmethod
    def progress_states(cls, job_ids: list[str], now: datetime) -> dict[int, tuple]:
        """What the poller weighs an agent's update against, for these jobs'
        disks (named by job: hundreds of parameters, not thousands), as
        plain tuples (pk, status, attempts, progress_seq, current_operation,
        progress_percent, bytes_done, bytes_total, throughput_bps,
        checkpoint_bytes, worker, progress_due, heartbeat_due, job_id,
        capacity_bytes) by pk:
        progress_due when the last progress written (or the run's start) is
        PROGRESS_WRITE_INTERVAL_S old at `now`, heartbeat_due when the last
        heartbeat (or start) is a quarter of HEARTBEAT_TIMEOUT_S old. The
        database compares the times: no datetime is read."""
        adapt = connection.ops.adapt_datetimefield_value
        progress_before = adapt(now - timedelta(seconds=settings.PROGRESS_WRITE_INTERVAL_S))
        beat_before = adapt(now - timedelta(seconds=settings.HEARTBEAT_TIMEOUT_S / 4))
        quote = connection.ops.quote_name
        columns = ", ".join(quote(column) for column in (
            "id", "status", "attempts", "progress_seq", "current_operation", "progress_percent", "bytes_done",
            "bytes_total", "throughput_bps", "checkpoint_bytes", "worker"))
        states = {}
        for start in range(0, len(job_ids), 5000):
            chunk = job_ids[start:start + 5000]
            # The database compares the times (0/1, NULL when unknown): no
            # datetime is read, and no column needs Django's conversions.
            sql = (f"SELECT {columns}, COALESCE({quote('last_progress_at')}, {quote('started_at')}) <= %s, "
                   f"COALESCE({quote('heartbeat_at')}, {quote('started_at')}) <= %s, {quote('job_id')}, "
                   f"{quote('capacity_bytes')} FROM {quote(cls._meta.db_table)} "
                   f"WHERE {quote('job_id')} IN ({_marks(len(chunk))})")
            with connection.cursor() as cursor:
                cursor.execute(sql, [progress_before, beat_before, *chunk])
                states.update((row[0], row) for row in cursor.fetchall())
        return states

    def complete(self, bytes_total: int, bytes_zeroed: int, throughput_bps: int, attempt: int | None = None) -> bool:
        return self.transition(
            DiskStatus.COMPLETED, attempt=attempt, bytes_done=bytes_total, bytes_total=bytes_total,
            bytes_zeroed=bytes_zeroed,
            progress_percent=100.0, throughput_bps=throughput_bps, current_operation=Stage.COMPLETED,
            eta_seconds=0, last_progress_at=timezone.now(),
        )

    def fail(self, reason: str, attempt: int | None = None) -> bool:
        return self.transition(DiskStatus.FAILED, attempt=attempt, error_message=reason[:4000], throughput_bps=0,
                               current_operation=Stage.FAILED)

    def cancel(self, attempt: int | None = None) -> bool:
        return self.transition(DiskStatus.CANCELLED, attempt=attempt, throughput_bps=0,
                               current_operation=Stage.CANCELLED)

    def commit_change_id(self) -> bool:
        """Advance the source disk's changeId to the one this copy covered.
        Only a completed copy may: a changeId advanced past data that was
        not written would make the next incremental skip it forever."""
        if not self.change_id:
            return False
        if self.status != DiskStatus.COMPLETED:
            raise ValueError(f"{self} is {self.status}: its changeId cannot be committed")
        with transaction.atomic():
            if ChangeIdRecord.objects.filter(job_id=self.job_id, source_disk_id=self.source_disk_id).exists():
                return False  # a finalize run again (the reaper requeues a lost one)
            SourceDisk.objects.filter(pk=self.source_disk_id).update(change_id=self.change_id)
            ChangeIdRecord.objects.create(
                source_disk_id=self.source_disk_id, job_id=self.job_id, previous_change_id=self.previous_change_id,
                change_id=self.change_id, sync_type=self.sync_type, note=self.full_copy_reason,
            )
        return True


class CopyAttempt(models.Model):
    """One run of a disk's copy: who ran it, where it resumed, how far its
    committed cursor got, what it read and how it ended. Lets an operator
    (and the fault suite) see retries, resumes and overlapping runs."""

    class Outcome(models.TextChoices):
        RUNNING = "running", "Running"
        COMPLETED = "completed", "Completed"
        FAILED = "failed", "Failed"
        CANCELLED = "cancelled", "Cancelled"
        LOST = "lost", "Lost (worker gone, handed over)"
        SUPERSEDED = "superseded", "Superseded by a newer run"
        RETRY = "retry", "Stopped for a retry"

    disk = models.ForeignKey(VMDisk, on_delete=models.CASCADE, related_name="copy_attempts")
    number = models.PositiveIntegerField()
    worker = models.CharField(max_length=200, blank=True)
    task_id = models.CharField(max_length=64, blank=True)
    started_at = models.DateTimeField()
    last_seen_at = models.DateTimeField(null=True, blank=True)
    ended_at = models.DateTimeField(null=True, blank=True)
    resumed_from = models.BigIntegerField(default=0)
    checkpoint_bytes = models.BigIntegerField(default=0)
    bytes_read = models.BigIntegerField(default=0, help_text="Source data this run read")
    outcome = models.CharField(max_length=20, choices=Outcome.choices, default=Outcome.RUNNING)
    reason = models.TextField(blank=True)

    class Meta:
        db_table = "copy_attempts"
        ordering = ["disk", "number"]
        constraints = [models.UniqueConstraint(fields=["disk", "number"], name="uniq_copy_attempt_number")]

    def __str__(self):
        return f"{self.disk_id}#{self.number} {self.outcome}"


class ChangeIdRecord(models.Model):
    """Every changeId committed for a disk, and by which job: the audit
    trail of what each incremental was computed against."""

    source_disk = models.ForeignKey(SourceDisk, on_delete=models.CASCADE, related_name="change_id_history")
    job = models.ForeignKey(ReplicationJob, on_delete=models.CASCADE, related_name="change_id_records")
    previous_change_id = models.CharField(max_length=200, blank=True)
    change_id = models.CharField(max_length=200)
    sync_type = models.CharField(max_length=20, choices=SyncType.choices)
    note = models.CharField(max_length=500, blank=True)
    committed_at = models.DateTimeField(default=timezone.now)

    class Meta:
        verbose_name = "change ID record"
        db_table = "change_id_history"
        ordering = ["committed_at", "id"]

    def __str__(self):
        return f"{self.source_disk} {self.change_id}"
