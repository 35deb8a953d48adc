"""The VMA's progress records: validation of update bodies and their storage
in Redis. Free of Django so the agent's store runs and tests on its own.

One record per job, a Redis hash: one field per disk (its latest update) and
a field for job-level stage updates. A job id and every export name that
reported for the job resolve to that record, so a reader never has to know
which of the two ids a writer used (the seeds' id-mismatch bug)."""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass

import redis

EXPORT_PREFIX = "migration-vol-"
MAX_BODY_BYTES = 16 * 1024
MAX_SEQ = 2**53 - 1  # exact in a double: Lua and JavaScript compare it safely

STAGES = ("Initializing", "Creating Snapshot", "Setting up NBD", "Preparing Migration", "Transfer",
          "Finalizing", "Completed", "Failed", "Cancelled")
STATUSES = ("pending", "in_progress", "completed", "failed", "cancelled")
SYNC_TYPES = ("full", "incremental")
JOB_FIELD = "_job"

ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
EXPORT_RE = re.compile(r"^migration-vol-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
DISK_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")

REQUIRED = ("stage", "status", "seq")
# checkpoint_bytes, attempt and worker: our agent's copy run (its committed
# resume cursor, the attempt number the OMA gave it, host:pid).
INT_FIELDS = ("bytes_transferred", "total_bytes", "throughput_bps", "seq", "eta_seconds", "checkpoint_bytes",
              "attempt")
STR_FIELDS = {"stage": 40, "status": 20, "disk_id": 128, "sync_type": 20, "error_message": 4000,
              "job_id": 128, "export_name": 128, "worker": 200}
ALLOWED = (*INT_FIELDS, *STR_FIELDS, "percent")


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
            if value > MAX_SEQ:
                raise InvalidUpdate(f"{name} is larger than {MAX_SEQ}")
            update[name] = value
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
    if done is not None and total is None:
        raise InvalidUpdate("bytes_transferred needs total_bytes")
    return update


# Compare-and-set per disk in one round trip, so two writers for one job never
# lose each other's disks and a late or replayed update never replaces a newer
# one; a disk that reported completion keeps that final state.
_APPLY = """
local current = redis.call('HGET', KEYS[1], ARGV[1])
if current then
  local stored = cjson.decode(current)
  if tonumber(stored['seq']) >= tonumber(ARGV[2]) then return 0 end
  if stored['status'] == 'completed' and ARGV[1] ~= '_job' then return 0 end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[4]))
for i = 2, #KEYS do
  redis.call('SET', KEYS[i], ARGV[5], 'EX', tonumber(ARGV[4]))
end
return 1
"""


@dataclass
class ApplyResult:
    record_id: str
    applied: bool


class ProgressStore:
    """Progress records in Redis under `prefix`, each kept `ttl_s` after its
    last update (long after completion, for late readers)."""

    def __init__(self, client: redis.Redis, prefix: str = "vma:progress", ttl_s: int = 7 * 24 * 3600):
        self.client = client
        self.prefix = prefix
        self.ttl_s = ttl_s
        self._apply = client.register_script(_APPLY)

    @classmethod
    def from_url(cls, url: str, **kwargs) -> ProgressStore:
        return cls(redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5), **kwargs)

    def _record_key(self, record_id: str) -> str:
        return f"{self.prefix}:record:{record_id}"

    def _alias_key(self, export_name: str) -> str:
        return f"{self.prefix}:alias:{export_name}"

    def resolve(self, record_id: str) -> str:
        """The record an id names: an export name that reported for a job
        resolves to the job's record."""
        if is_export_name(record_id):
            job_id = self.client.get(self._alias_key(record_id))
            if job_id:
                return job_id.decode()
        return record_id

    def apply(self, record_id: str, update: dict) -> ApplyResult:
        """Store a validated update posted to `record_id` (job id or export name)."""
        validate_id(record_id)
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
        stored = {**update, "received_at": time.time()}
        stored.setdefault("job_id", None if is_export_name(job_id) else job_id)
        keys = [self._record_key(job_id)] + [self._alias_key(name) for name in sorted(exports)]
        applied = self._apply(keys=keys, args=[field or JOB_FIELD, update["seq"], json.dumps(stored),
                                               self.ttl_s, job_id])
        return ApplyResult(job_id, bool(applied))

    def get(self, record_id: str) -> dict | None:
        """The record with every disk's latest update and the aggregate, or None."""
        job_id = self.resolve(record_id)
        raw = self.client.hgetall(self._record_key(job_id))
        if not raw:
            return None
        entries = {key.decode(): json.loads(value) for key, value in raw.items()}
        job_entry = entries.pop(JOB_FIELD, None)
        return {"id": job_id, "job_id": None if is_export_name(job_id) else job_id,
                "job": job_entry, "disks": entries, "aggregate": aggregate(job_entry, entries)}

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
    if disks:
        percent = 100.0 if total <= 0 else min(100.0, 100.0 * done / total)
    else:
        percent = (job_entry or {}).get("percent") or 0.0
    last = max([e.get("received_at", 0) for e in [*disks.values(), job_entry or {}]], default=0)
    return {"stage": stage, "status": status, "bytes_transferred": done, "total_bytes": total,
            "percent": round(percent, 4), "throughput_bps": rate,
            "eta_seconds": int((total - done) / rate) if rate > 0 and total > done else None,
            "disk_count": len(disks), "updated_at": last}
