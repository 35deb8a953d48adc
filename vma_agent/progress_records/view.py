"""A progress record as the API answers it: its disks' latest updates, the
job's totals, and MigrateKit OSSEA's VMAProgressResponse keys (phase,
job-level percentage, timing, phases, errors) built from the record's
history fields. Free of Django."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime

from vma_agent.contract import INITIALIZING, STAGE_PERCENT, STAGES, TRANSFER, TRANSFER_FROM
from vma_agent.progress_records.schema import FINISHED, JOB_FIELD, is_export_name


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
    stage = TRANSFER if disks else (job_entry or {}).get("stage", INITIALIZING)
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
    return {**ossea_view(job_id, job_entry, entries, meta, totals, now),
            "id": record_id, "job": job_entry, "disks": entries, "aggregate": totals}


def ossea_view(job_id: str, job_entry: dict | None, disks: dict[str, dict], meta: dict[str, str],
               totals: dict, now: float) -> dict:
    """MigrateKit OSSEA's VMAProgressResponse: every key, Go's types, zero
    values where this agent does not know (vm_info's name, path and size)."""
    first = float(meta.get("_first") or 0) or totals["updated_at"]
    last = float(meta.get("_last") or 0) or totals["updated_at"]
    starts = {key[4:]: float(value) for key, value in meta.items() if key.startswith("_ps:")}
    status, phase = _status_and_phase(job_entry, disks, totals)
    finished = status in FINISHED
    if status == "completed":
        percentage = 100.0
    elif disks:
        percentage = TRANSFER_FROM + (100.0 - TRANSFER_FROM) * totals["percent"] / 100.0
    else:
        percentage = (job_entry or {}).get("percent") or STAGE_PERCENT.get(phase, 0.0)
    end = last if finished else max(now, last)
    errors = _errors(job_entry, disks)
    current = totals["throughput_bps"]
    transfer_start = starts.get(TRANSFER)
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
        "phases": _phases(starts, status if finished else None, last, now),
        "errors": errors,
        "last_error": errors[-1] if errors else None,
    }


def _status_and_phase(job_entry: dict | None, disks: dict[str, dict], totals: dict) -> tuple[str, str]:
    """The job's status (a failed or cancelled job entry wins over its
    disks) and its phase: that job entry's stage, else as far as its
    slowest unfinished disk, else the stage of its latest update."""
    status = totals["status"]
    if job_entry and job_entry.get("status") in ("failed", "cancelled"):
        return job_entry["status"], job_entry["stage"]
    unfinished = [e for e in disks.values() if e.get("status") not in FINISHED]
    if unfinished:
        return status, min((e["stage"] for e in unfinished), key=_stage_order)
    latest = max([*disks.values(), job_entry or {}], key=lambda e: e.get("received_at", 0))
    return status, latest.get("stage") or INITIALIZING


def _phases(starts: dict[str, float], final_status: str | None, last: float, now: float) -> list[dict]:
    """Each stage from its first update to the next stage's; the last one
    ends with the job (final_status) or is still in progress (None)."""
    ordered = sorted(starts.items(), key=lambda item: (item[1], _stage_order(item[0])))
    phases = []
    for i, (name, started) in enumerate(ordered):
        if i + 1 < len(ordered):
            ended, phase_status = ordered[i + 1][1], "completed"
        elif final_status is not None:
            ended, phase_status = last, final_status
        else:
            ended, phase_status = None, "in_progress"
        phases.append({"name": name, "status": phase_status, "start_time": rfc3339(started),
                       "end_time": rfc3339(ended), "duration_ms": _ms((ended or now) - started)})
    return phases


def _errors(job_entry: dict | None, disks: dict[str, dict]) -> list[str]:
    """Every error message of the record, oldest first; a disk's names the disk."""
    return [f"{key}: {entry['error_message']}" if key != JOB_FIELD else entry["error_message"]
            for key, entry in sorted([*disks.items(), (JOB_FIELD, job_entry or {})],
                                     key=lambda item: item[1].get("received_at", 0))
            if entry.get("error_message")]


def status_summary(record: dict) -> dict:
    """GET /api/v1/status/{id}: the job's state in a few keys."""
    return {key: record[key] for key in ("job_id", "status", "sync_type", "phase", "percentage",
                                         "current_operation", "bytes_transferred", "total_bytes")} | {
        "id": record["id"], "last_update": record["timing"]["last_update"]}
