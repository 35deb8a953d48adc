"""What a progress update may say: the fields of an update body, their
types and bounds, and the ids a record goes by. Free of Django."""

from __future__ import annotations

import json
import math
import re

from vma_agent.contract import CANCELLED, COMPLETED, EXPORT_PREFIX, FAILED, STAGES

MAX_BODY_BYTES = 16 * 1024
MAX_SEQ = 2**53 - 1  # exact in a double: Lua and JavaScript compare it safely
# Bounds of the numbers an update may show: a disk of at most 4 PiB (VMware's
# largest is 62 TB), a copy of at most 100 GB/s, an ETA of at most ten years.
MAX_DISK_BYTES = 4 * 2**50
MAX_THROUGHPUT_BPS = 100 * 10**9
MAX_ETA_S = 10 * 366 * 24 * 3600

STATUSES = ("pending", "in_progress", "completed", "failed", "cancelled")
SYNC_TYPES = ("full", "incremental")
JOB_FIELD = "_job"

ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
EXPORT_RE = re.compile("^" + EXPORT_PREFIX + r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
DISK_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")

# Only the stage is required: migratekit's VMAProgressUpdate leaves status,
# total_bytes, percent, disk_id, sync_type and error_message out when empty
# and has no seq at all (MigrateKit OSSEA's wire contract, shared/contracts/progress-wire.md).
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
FINAL_STAGE_STATUS = {COMPLETED: "completed", FAILED: "failed", CANCELLED: "cancelled"}
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
    update = _typed(body)
    _check_values(update)
    return update


def _integer(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidUpdate(f"{name} must be an integer")
    if value < 0:
        raise InvalidUpdate(f"{name} must not be negative")
    limit = INT_LIMITS.get(name, MAX_SEQ)
    if value > limit:
        raise InvalidUpdate(f"{name} is larger than {limit}")
    return value


def _typed(body: dict) -> dict:
    """The body's fields, each checked for its type and bounds."""
    update = {name: _integer(name, body[name]) for name in INT_FIELDS if body.get(name) is not None}
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
    return update


def _check_values(update: dict) -> None:
    """The fields' vocabularies and how they relate; a status left out
    follows from the stage."""
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
