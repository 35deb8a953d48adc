"""The VMA's progress records: validation of update bodies and their storage
in Redis. Free of Django so the agent's store runs and tests on its own.

One record per job, a Redis hash: one field per disk (its latest update), a
field for job-level stage updates and a few `_`-prefixed fields of its
history (first and last update, each stage's first update, the sync type,
the peak throughput). A job id and every export name that reported for the
job resolve to that record, so a reader never has to know which of the two
ids a writer used (the seeds' id-mismatch bug).

Every applied update also bumps a counter and files the record under it in
a sorted set: the change feed, which lets a reader ask for the records that
changed since its last read instead of reading every record."""

from __future__ import annotations

import json
import math
import re
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import redis

EXPORT_PREFIX = "migration-vol-"
MAX_BODY_BYTES = 16 * 1024
MAX_SEQ = 2**53 - 1  # exact in a double: Lua and JavaScript compare it safely
# Our reporter's seqs are the agent's clock in microseconds; one further ahead
# than this would hold back every later update until the clock caught up.
SEQ_AHEAD_US = 60 * 1_000_000
# Bounds of the numbers an update may show: a disk of at most 4 PiB (VMware's
# largest is 62 TB), a copy of at most 100 GB/s, an ETA of at most ten years.
MAX_DISK_BYTES = 4 * 2**50
MAX_THROUGHPUT_BPS = 100 * 10**9
MAX_ETA_S = 10 * 366 * 24 * 3600

STAGES = ("Initializing", "Creating Snapshot", "Setting up NBD", "Preparing Migration", "Transfer",
          "Finalizing", "Completed", "Failed", "Cancelled")
STATUSES = ("pending", "in_progress", "completed", "failed", "cancelled")
SYNC_TYPES = ("full", "incremental")
JOB_FIELD = "_job"

ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
EXPORT_RE = re.compile(r"^migration-vol-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
DISK_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")

# Only the stage is required: migratekit's VMAProgressUpdate leaves status,
# total_bytes, percent, disk_id, sync_type and error_message out when empty
# and has no seq at all (the seeds' wire contract, shared/contracts/progress-wire.md).
REQUIRED = ("stage",)
# checkpoint_bytes, attempt and worker: our agent's copy run (its committed
# resume cursor, the attempt number the OMA gave it, host:pid).
INT_FIELDS = ("bytes_transferred", "total_bytes", "throughput_bps", "seq", "eta_seconds", "checkpoint_bytes",
              "attempt")
INT_LIMITS = {"bytes_transferred": MAX_DISK_BYTES, "total_bytes": MAX_DISK_BYTES, "checkpoint_bytes": MAX_DISK_BYTES,
              "throughput_bps": MAX_THROUGHPUT_BPS, "eta_seconds": MAX_ETA_S}
# What a token-less writer (MigrateKit OSSEA's migratekit on the agent host,
# when VMA_TRUST_LOOPBACK is on) may send: what a screen shows. The rest
# speaks for our own copy runs (their cursor, attempt, worker) or orders the
# updates (seq): the bearer token only.
TOKEN_ONLY = ("seq", "checkpoint_bytes", "attempt", "worker")
STR_FIELDS = {"stage": 40, "status": 20, "disk_id": 128, "sync_type": 20, "error_message": 4000,
              "job_id": 128, "export_name": 128, "worker": 200}
ALLOWED = (*INT_FIELDS, *STR_FIELDS, "percent")
# A status left out follows from the stage.
FINAL_STAGE_STATUS = {"Completed": "completed", "Failed": "failed", "Cancelled": "cancelled"}
FINISHED = ("completed", "failed", "cancelled")
# Kept from a disk's stored entry when an update leaves them out (omitempty):
# a sync type or a total once known is never lost by a later update.
INHERITED = ("total_bytes", "sync_type", "export_name")


class InvalidUpdate(ValueError):
    """An update refused; `status` is the HTTP status to answer with."""

    def __init__(self, reason: str, status: int = 400):
        super().__init__(reason)
        self.reason = reason
        self.status = status


def is_export_name(record_id: str) -> bool:
    return record_id.startswith(EXPORT_PREFIX)


def validate_id(record_id: str) -> str:
    if not ID_RE.match(record_id or ""):
        raise InvalidUpdate(f"invalid id {record_id[:140]!r}")
    if is_export_name(record_id) and not EXPORT_RE.match(record_id):
        raise InvalidUpdate(f"invalid export name {record_id[:140]!r}: expected migration-vol-{{uuid}}")
    return record_id


def parse_update(raw: bytes) -> dict:
    """The update in `raw` (a JSON object), checked field by field; raises
    InvalidUpdate with the first reason found."""
    if len(raw) > MAX_BODY_BYTES:
        raise InvalidUpdate(f"body is {len(raw)} bytes; the limit is {MAX_BODY_BYTES}", status=413)
    try:
        body = json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidUpdate(f"body is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidUpdate("body is not valid JSON: nested too deeply") from None
    return validate_update(body)


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a number")


def validate_update(body) -> dict:
    if not isinstance(body, dict):
        raise InvalidUpdate("body must be a JSON object")
    unknown = sorted(set(body) - set(ALLOWED))
    if unknown:
        raise InvalidUpdate(f"unknown fields: {', '.join(map(str, unknown))[:200]}")
    for name in REQUIRED:
        if body.get(name) is None:
            raise InvalidUpdate(f"{name} is required")
    update: dict = {}
    for name in INT_FIELDS:
        if name in body and body[name] is not None:
            value = body[name]
            if isinstance(value, bool) or not isinstance(value, int):
                raise InvalidUpdate(f"{name} must be an integer")
            if value < 0:
                raise InvalidUpdate(f"{name} must not be negative")
            limit = INT_LIMITS.get(name, MAX_SEQ)
            if value > limit:
                raise InvalidUpdate(f"{name} is larger than {limit}")
            update[name] = value
    if update.get("attempt") == 0:
        raise InvalidUpdate("attempt must be 1 or more")
    for name, limit in STR_FIELDS.items():
        if name in body and body[name] is not None:
            value = body[name]
            if not isinstance(value, str):
                raise InvalidUpdate(f"{name} must be a string")
            if len(value) > limit:
                raise InvalidUpdate(f"{name} is longer than {limit} characters")
            update[name] = value
    if "percent" in body and body["percent"] is not None:
        value = body["percent"]
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise InvalidUpdate("percent must be a number")
        if not 0 <= value <= 100:
            raise InvalidUpdate("percent must be between 0 and 100")
        update["percent"] = float(value)
    if update["stage"] not in STAGES:
        raise InvalidUpdate(f"unknown stage {update['stage'][:40]!r}; expected one of {', '.join(STAGES)}")
    # Go's omitempty: an empty string is a field left out.
    for name in ("status", "disk_id", "sync_type", "error_message"):
        if update.get(name) == "":
            del update[name]
    update.setdefault("status", FINAL_STAGE_STATUS.get(update["stage"], "in_progress"))
    if update["status"] not in STATUSES:
        raise InvalidUpdate(f"unknown status {update['status'][:20]!r}; expected one of {', '.join(STATUSES)}")
    if "sync_type" in update and update["sync_type"] not in SYNC_TYPES:
        raise InvalidUpdate(f"unknown sync_type {update['sync_type'][:20]!r}")
    if "disk_id" in update and not DISK_ID_RE.match(update["disk_id"]):
        raise InvalidUpdate("disk_id must be 1-128 letters, digits or ._:-")
    for name in ("job_id", "export_name"):
        if name in update:
            validate_id(update[name])
    if "export_name" in update and not is_export_name(update["export_name"]):
        raise InvalidUpdate("export_name must be migration-vol-{uuid}")
    if "job_id" in update and is_export_name(update["job_id"]):
        raise InvalidUpdate("job_id must be a job id, not an export name")
    done, total = update.get("bytes_transferred"), update.get("total_bytes")
    if done is not None and total is not None and done > total:
        raise InvalidUpdate("bytes_transferred is larger than total_bytes")
    return update


# Compare-and-set per disk in one round trip, so two writers for one job never
# lose each other's disks and a late or replayed update never replaces a newer
# one; a disk that reported completion keeps that final state.
#
# An update with a seq applies only above the stored seq. One without (the
# seeds' migratekit) gets the stored seq + 1, or, for a disk's first entry,
# the agent's clock in microseconds (what our reporter's seqs are made of, so
# a record lost and written again never restarts below what a reader saw).
# Either way the stored seq only grows, however the two kinds mix.
#
# The entry is written as the JSON the caller built plus its seq, spliced in
# as text: cjson would print numbers with 14 significant digits.
#
# A disk entry our own copy wrote (it carries its attempt) takes no token-less
# update: a local process could otherwise pose as the copy's heartbeat or
# mark it completed, which would lock the copy's own updates out. A newer
# attempt of the copy applies whatever seq an older run left stored.
#
# KEYS: record, rates, feed counter, feed set, epoch, alias...
# ARGV: field, seq or '', entry JSON without seq, ttl, record id, now (s),
#       now (us), stage, status, throughput_bps, sync_type or '',
#       inherited names (comma-separated), new epoch, '1' if sent with the
#       token, bytes_transferred or '', attempt or ''
# Returns {applied, stored seq, why not ('' , 'owned' or 'bytes')}.
_APPLY = """
local record, field = KEYS[1], ARGV[1]
local current = redis.call('HGET', record, field)
local trusted = ARGV[14] == '1'
local seq
local extra = ''
if current then
  local stored = cjson.decode(current)
  local stored_seq = tonumber(stored['seq']) or 0
  if not trusted and field ~= '_job' and stored['attempt'] ~= nil then return {0, stored_seq, 'owned'} end
  if stored['status'] == 'completed' and field ~= '_job' and not (trusted and stored['loopback']) then
    return {0, stored_seq, ''}
  end
  local newer_attempt = ARGV[16] ~= '' and tonumber(ARGV[16]) > (tonumber(stored['attempt']) or 0)
  if ARGV[2] ~= '' then
    seq = tonumber(ARGV[2])
    if stored_seq >= seq and not newer_attempt then return {0, stored_seq, ''} end
  else
    seq = stored_seq + 1
  end
  for name in string.gmatch(ARGV[12], '[^,]+') do
    local value = stored[name]
    if type(value) == 'number' then
      extra = extra .. ',"' .. name .. '":' .. string.format('%d', value)
    elseif type(value) == 'string' then
      extra = extra .. ',"' .. name .. '":' .. cjson.encode(value)
    end
  end
  local total = tonumber(stored['total_bytes'])
  if ARGV[15] ~= '' and string.find(ARGV[12], 'total_bytes', 1, true) and total and total > 0
      and tonumber(ARGV[15]) > total then
    return {0, stored_seq, 'bytes'}
  end
elseif ARGV[2] ~= '' then
  seq = tonumber(ARGV[2])
else
  seq = tonumber(ARGV[7])
end
local ttl = tonumber(ARGV[4])
redis.call('HSET', record, field, string.sub(ARGV[3], 1, -2) .. extra .. ',"seq":' .. string.format('%d', seq) .. '}')
redis.call('HSETNX', record, '_first', ARGV[6])
redis.call('HSET', record, '_last', ARGV[6])
redis.call('HSETNX', record, '_ps:' .. ARGV[8], ARGV[6])
if ARGV[11] ~= '' then redis.call('HSET', record, '_sync', ARGV[11]) end
if field ~= '_job' then
  local rate = '0'
  if ARGV[9] == 'in_progress' then rate = ARGV[10] end
  redis.call('HSET', KEYS[2], field, rate)
  redis.call('EXPIRE', KEYS[2], ttl)
  local sum = 0
  for _, value in ipairs(redis.call('HVALS', KEYS[2])) do sum = sum + (tonumber(value) or 0) end
  if sum > (tonumber(redis.call('HGET', record, '_peak')) or 0) then
    redis.call('HSET', record, '_peak', string.format('%d', sum))
  end
end
redis.call('EXPIRE', record, ttl)
for i = 6, #KEYS do
  redis.call('SET', KEYS[i], ARGV[5], 'EX', ttl)
end
redis.call('SETNX', KEYS[5], ARGV[13])
redis.call('ZADD', KEYS[4], redis.call('INCR', KEYS[3]), ARGV[5])
return {1, seq, ''}
"""

# The change feed's read, atomic: the counter, the records filed above
# `since` (at most `limit`, oldest change first) with their fields, and the
# members whose record expired. Members are ordered by their last change and
# every record lives `ttl` after it, so expired ones are always at the bottom.
#
# KEYS: feed counter, feed set, epoch
# ARGV: since, limit, record key prefix, new epoch, trim limit
_CHANGES = """
redis.call('SETNX', KEYS[3], ARGV[4])
local epoch = redis.call('GET', KEYS[3])
local counter = redis.call('GET', KEYS[1]) or '0'
local expired = {}
while #expired < tonumber(ARGV[5]) do
  local lowest = redis.call('ZRANGE', KEYS[2], 0, 0)
  if #lowest == 0 or redis.call('EXISTS', ARGV[3] .. lowest[1]) == 1 then break end
  redis.call('ZREM', KEYS[2], lowest[1])
  table.insert(expired, lowest[1])
end
local limit = tonumber(ARGV[2])
local rows = redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. ARGV[1], '+inf', 'WITHSCORES', 'LIMIT', 0, limit)
local records = {}
local last = ARGV[1]
for i = 1, #rows, 2 do
  last = rows[i + 1]
  local fields = redis.call('HGETALL', ARGV[3] .. rows[i])
  if #fields == 0 then
    redis.call('ZREM', KEYS[2], rows[i])
    table.insert(expired, rows[i])
  else
    table.insert(records, {rows[i], fields})
  end
end
local more = 0
local cursor = counter
if #rows / 2 >= limit then
  more = 1
  cursor = last
end
return {epoch, cursor, more, expired, records}
"""

FEED_LIMIT = 2000  # records per batch read unless the reader asks otherwise
FEED_MAX_LIMIT = 10000
TRIM_PER_READ = 1000


@dataclass
class ApplyResult:
    record_id: str
    applied: bool
    seq: int = 0
    refused: str = ""  # why not, when it is not a late or replayed update: owned, bytes


@dataclass
class Changes:
    """One page of the change feed."""

    epoch: str
    cursor: int
    more: bool
    records: list[dict]
    expired: list[str]

    def as_json(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "more": self.more, "records": self.records,
                "expired": self.expired}


class ProgressStore:
    """Progress records in Redis under `prefix`, each kept `ttl_s` after its
    last update (long after completion, for late readers). Not for Redis
    Cluster: the feed's scripts touch records they learn as they run."""

    def __init__(self, client: redis.Redis, prefix: str = "vma:progress", ttl_s: int = 7 * 24 * 3600):
        self.client = client
        self.prefix = prefix
        self.ttl_s = ttl_s
        self._apply = client.register_script(_APPLY)
        self._changes = client.register_script(_CHANGES)

    @classmethod
    def from_url(cls, url: str, **kwargs) -> ProgressStore:
        return cls(redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5), **kwargs)

    def _record_key(self, record_id: str) -> str:
        return f"{self.prefix}:record:{record_id}"

    def _rates_key(self, record_id: str) -> str:
        return f"{self.prefix}:rates:{record_id}"

    def _alias_key(self, export_name: str) -> str:
        return f"{self.prefix}:alias:{export_name}"

    def _feed_keys(self) -> list[str]:
        return [f"{self.prefix}:feed:counter", f"{self.prefix}:feed:changes", f"{self.prefix}:feed:epoch"]

    def ping(self) -> bool:
        return bool(self.client.ping())

    def resolve(self, record_id: str) -> str:
        """The record an id names: an export name that reported for a job
        resolves to the job's record."""
        if is_export_name(record_id):
            job_id = self.client.get(self._alias_key(record_id))
            if job_id:
                return job_id.decode()
        return record_id

    def apply(self, record_id: str, update: dict, *, trusted: bool = True) -> ApplyResult:
        """Store a validated update posted to `record_id` (job id or export
        name). trusted: it came with the bearer token; a token-less one may
        carry display fields only (TOKEN_ONLY are refused) and never changes
        an entry our own copy wrote."""
        validate_id(record_id)
        if not trusted and (sent := [name for name in TOKEN_ONLY if name in update]):
            raise InvalidUpdate(f"{', '.join(sent)} need the bearer token: a token-less update may only "
                                f"change what is displayed", status=403)
        now_ns = time.time_ns()
        seq = update.get("seq")
        if seq is not None and seq > now_ns // 1000 + SEQ_AHEAD_US:
            raise InvalidUpdate(f"seq {seq} is more than {SEQ_AHEAD_US // 1_000_000} s ahead of this agent's "
                                f"clock in microseconds ({now_ns // 1000}); it would hold back every later update")
        job_id = update.get("job_id")
        if job_id is None and not is_export_name(record_id):
            job_id = record_id
        if job_id is None:
            job_id = self.resolve(record_id)  # an export name already linked to a job, or itself
        exports = {name for name in (update.get("export_name"), update.get("disk_id"), record_id)
                   if name and is_export_name(name) and name != job_id}
        field = update.get("disk_id") or update.get("export_name")
        if field is None and is_export_name(record_id) and record_id != job_id:
            field = record_id
        stored = {key: value for key, value in update.items() if key != "seq"}
        stored["received_at"] = now_ns / 1e9
        if not trusted:
            stored["loopback"] = True  # the OMA poller takes no heartbeat or progress of its copies from it
        stored.setdefault("job_id", None if is_export_name(job_id) else job_id)
        inherited = [name for name in INHERITED if name not in stored]
        counter, changes, epoch = self._feed_keys()
        keys = [self._record_key(job_id), self._rates_key(job_id), counter, changes, epoch]
        keys += [self._alias_key(name) for name in sorted(exports)]
        applied, stored_seq, refused = self._apply(keys=keys, args=[
            field or JOB_FIELD, "" if seq is None else seq, json.dumps(stored), self.ttl_s, job_id,
            f"{now_ns / 1e9:.6f}", now_ns // 1000, update["stage"], update["status"],
            update.get("throughput_bps") or 0, update.get("sync_type") or "", ",".join(inherited),
            secrets.token_hex(8), "1" if trusted else "", update.get("bytes_transferred", ""),
            update.get("attempt", "")])
        return ApplyResult(job_id, bool(applied), int(stored_seq), refused.decode() if refused else "")

    def get(self, record_id: str, now: float | None = None) -> dict | None:
        """The record: the seeds' VMAProgressResponse keys at the top level,
        beside each disk's latest update and the aggregate; None when none."""
        job_id = self.resolve(record_id)
        raw = self.client.hgetall(self._record_key(job_id))
        if not raw:
            return None
        return build_record(job_id, {key.decode(): value.decode() for key, value in raw.items()}, now)

    def changes(self, since: int = 0, limit: int = FEED_LIMIT, now: float | None = None) -> Changes:
        """The records changed after cursor `since` (0: every live record),
        oldest change first, and the cursor to ask from next time. A record
        changed twice comes once; one changed after this read comes next
        time. `expired` lists records gone since (their TTL ran out)."""
        epoch, cursor, more, expired, rows = self._changes(
            keys=self._feed_keys(), args=[since, limit, f"{self.prefix}:record:", secrets.token_hex(8),
                                          TRIM_PER_READ])
        records = []
        for record_id, flat in rows:
            fields = {flat[i].decode(): flat[i + 1].decode() for i in range(0, len(flat), 2)}
            records.append(build_record(record_id.decode(), fields, now))
        return Changes(epoch.decode(), int(cursor), bool(more), records, [name.decode() for name in expired])

    def count_keys(self) -> int:
        return sum(1 for _ in self.client.scan_iter(f"{self.prefix}:*", count=1000))


def aggregate(job_entry: dict | None, disks: dict[str, dict]) -> dict:
    """Job totals from the disks: bytes summed, percent over data to copy."""
    done = sum(d.get("bytes_transferred") or 0 for d in disks.values())
    total = sum(d.get("total_bytes") or 0 for d in disks.values())
    statuses = {d["status"] for d in disks.values()}
    if disks and statuses == {"completed"}:
        status = "completed"
    elif "failed" in statuses:
        status = "failed"
    elif disks:
        status = "in_progress"
    else:
        status = (job_entry or {}).get("status", "pending")
    stage = "Transfer" if disks else (job_entry or {}).get("stage", "Initializing")
    rate = sum(d.get("throughput_bps") or 0 for d in disks.values() if d["status"] == "in_progress")
    if disks and total > 0:
        percent = min(100.0, 100.0 * done / total)
    elif disks:
        # No total yet (migratekit leaves it out while it is 0): the disks'
        # own percent, and 100 % only once they are done.
        percent = 100.0 if status == "completed" else sum(d.get("percent") or 0.0 for d in disks.values()) / len(disks)
    else:
        percent = (job_entry or {}).get("percent") or 0.0
    last = max([e.get("received_at", 0) for e in [*disks.values(), job_entry or {}]], default=0)
    return {"stage": stage, "status": status, "bytes_transferred": done, "total_bytes": total,
            "percent": round(percent, 4), "throughput_bps": rate,
            "eta_seconds": int((total - done) / rate) if rate > 0 and total > done else None,
            "disk_count": len(disks), "updated_at": last}


# --- the seeds' VMAProgressResponse -------------------------------------------

# Job-level percentage of the stages before the copy; Transfer maps the copy
# to 30..100 (DESIGN section 4).
STAGE_PERCENT = {"Initializing": 5.0, "Creating Snapshot": 10.0, "Setting up NBD": 20.0,
                 "Preparing Migration": 30.0}
TRANSFER_FROM = 30.0
MB = 1_000_000  # throughput keys are in megabytes (10^6 bytes) per second


def rfc3339(unix: float | None) -> str:
    """An RFC 3339 UTC time with milliseconds; "" (Go's zero string) for none."""
    if not unix:
        return ""
    return datetime.fromtimestamp(unix, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _ms(seconds: float) -> int:
    return max(0, int(round(seconds * 1000)))


def _stage_order(stage: str) -> int:
    return STAGES.index(stage) if stage in STAGES else len(STAGES)


def build_record(record_id: str, fields: dict[str, str], now: float | None = None) -> dict:
    """A record as the API answers it, from its hash fields."""
    now = time.time() if now is None else now
    entries, meta = {}, {}
    for key, value in fields.items():
        if key.startswith("_") and key != JOB_FIELD:
            meta[key] = value
        else:
            entries[key] = json.loads(value)
    job_entry = entries.pop(JOB_FIELD, None)
    totals = aggregate(job_entry, entries)
    job_id = "" if is_export_name(record_id) else record_id
    return {**seeds_view(job_id, job_entry, entries, meta, totals, now),
            "id": record_id, "job": job_entry, "disks": entries, "aggregate": totals}


def seeds_view(job_id: str, job_entry: dict | None, disks: dict[str, dict], meta: dict[str, str],
               totals: dict, now: float) -> dict:
    """The seeds' VMAProgressResponse: every key, Go's types, zero values
    where this agent does not know (vm_info's name, path and size)."""
    first = float(meta.get("_first") or 0) or totals["updated_at"]
    last = float(meta.get("_last") or 0) or totals["updated_at"]
    starts = {key[4:]: float(value) for key, value in meta.items() if key.startswith("_ps:")}
    status = totals["status"]
    if job_entry and job_entry.get("status") in ("failed", "cancelled"):
        status = job_entry["status"]
    finished = status in FINISHED
    unfinished = [e for e in disks.values() if e.get("status") not in FINISHED]
    if job_entry and job_entry.get("status") in ("failed", "cancelled"):
        phase = job_entry["stage"]
    elif unfinished:
        phase = min((e["stage"] for e in unfinished), key=_stage_order)  # as far as its slowest disk
    else:
        latest = max([*disks.values(), job_entry or {}], key=lambda e: e.get("received_at", 0))
        phase = latest.get("stage") or "Initializing"
    if status == "completed":
        percentage = 100.0
    elif disks:
        percentage = TRANSFER_FROM + (100.0 - TRANSFER_FROM) * totals["percent"] / 100.0
    else:
        percentage = (job_entry or {}).get("percent") or STAGE_PERCENT.get(phase, 0.0)
    end = last if finished else max(now, last)
    ordered = sorted(starts.items(), key=lambda item: (item[1], _stage_order(item[0])))
    phases = []
    for i, (name, started) in enumerate(ordered):
        if i + 1 < len(ordered):
            ended, phase_status = ordered[i + 1][1], "completed"
        elif finished:
            ended, phase_status = last, status
        else:
            ended, phase_status = None, "in_progress"
        phases.append({"name": name, "status": phase_status, "start_time": rfc3339(started),
                       "end_time": rfc3339(ended), "duration_ms": _ms((ended or now) - started)})
    errors = [f"{key}: {entry['error_message']}" if key != JOB_FIELD else entry["error_message"]
              for key, entry in sorted([*disks.items(), (JOB_FIELD, job_entry or {})],
                                       key=lambda item: item[1].get("received_at", 0))
              if entry.get("error_message")]
    current = totals["throughput_bps"]
    transfer_start = starts.get("Transfer")
    average = totals["bytes_transferred"] / (last - transfer_start) if transfer_start and last > transfer_start else 0
    phase_start = starts.get(phase)
    sync_type = meta.get("_sync", "")
    return {
        "job_id": job_id,
        "status": status,
        "sync_type": sync_type,
        "phase": phase,
        "percentage": round(float(percentage), 2),
        "current_operation": phase,
        "bytes_transferred": int(totals["bytes_transferred"]),
        "total_bytes": int(totals["total_bytes"]),
        "throughput": {"current_mbps": round(current / MB, 6), "average_mbps": round(average / MB, 6),
                       "peak_mbps": round(max(current, int(meta.get("_peak") or 0)) / MB, 6),
                       "last_update": rfc3339(last)},
        "timing": {"start_time": rfc3339(first), "last_update": rfc3339(last), "elapsed_ms": _ms(end - first),
                   "eta_seconds": int(totals["eta_seconds"] or 0), "phase_start": rfc3339(phase_start),
                   "phase_elapsed_ms": _ms(end - phase_start) if phase_start else 0},
        "vm_info": {"name": "", "path": "", "disk_size_gb": 0, "disk_size_bytes": 0,
                    "cbt_enabled": sync_type == "incremental"},
        "phases": phases,
        "errors": errors,
        "last_error": errors[-1] if errors else None,
    }


def status_summary(record: dict) -> dict:
    """GET /api/v1/status/{id}: the job's state in a few keys."""
    return {key: record[key] for key in ("job_id", "status", "sync_type", "phase", "percentage",
                                         "current_operation", "bytes_transferred", "total_bytes")} | {
        "id": record["id"], "last_update": record["timing"]["last_update"]}
