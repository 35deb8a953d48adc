"""The JSON shapes of jobs, disks and failovers that the API, the pages'
scripts and the management commands' --json share: one builder per shape,
so a field added or renamed changes every reader at once."""

from replication.figures import DiskFigures, job_figures
from replication.models import FailoverJob, ReplicationJob, VMContext, VMDisk

# What `manage.py jobs --json` lists per job, in this order.
JOB_ROW_FIELDS = ["id", "vm", "sync_type", "status", "current_operation", "progress_percent", "bytes_transferred",
                  "total_bytes", "throughput_bps", "eta_seconds", "bandwidth_limit_bps", "error_message", "created_at",
                  "completed_at", "disks"]


def _iso(moment) -> str | None:
    return moment.isoformat() if moment else None


def disk_json(figures: DiskFigures) -> dict:
    """A disk of a job as /api/jobs/ shows it (rate and ETA: replication.figures)."""
    disk: VMDisk = figures.disk
    return {
        "disk": disk.disk_key, "status": disk.status, "state": figures.state, "stage": disk.current_operation,
        "percent": round(disk.progress_percent, 2), "bytes_done": disk.bytes_done, "bytes_total": disk.bytes_total,
        "capacity_bytes": disk.capacity_bytes, "throughput_bps": figures.rate_bps,
        "eta_seconds": figures.eta_seconds, "export_name": disk.target_volume.export_name,
        "error_message": disk.error_message,
    }


def job_json(job: ReplicationJob, with_disks: bool = True) -> dict:
    """A job as /api/jobs/ shows it, with its disks unless told not to."""
    figures = job_figures(job)
    data = {
        "id": job.id, "vm": job.vm.name, "sync_type": job.sync_type, "status": job.status,
        "stage": job.current_operation, "percent": round(job.progress_percent, 2),
        "bytes_transferred": job.bytes_transferred, "total_bytes": job.total_bytes,
        "throughput_bps": figures.rate_bps, "eta_seconds": figures.eta_seconds,
        "bandwidth_limit_bps": job.bandwidth_limit_bps, "error_message": job.error_message,
        "created_at": job.created_at.isoformat(), "started_at": _iso(job.started_at),
        "completed_at": _iso(job.completed_at),
    }
    if with_disks:
        data["disks"] = [disk_json(disk) for disk in figures.disks]
    return data


def job_row(job: ReplicationJob) -> dict:
    """A job as `manage.py jobs --json` lists it (the model's field names;
    rates and ETAs from replication.figures, as the pages and the API)."""
    figures = job_figures(job)
    row = {field: getattr(job, field) for field in JOB_ROW_FIELDS if field not in ("vm", "disks")}
    row["vm"] = job.vm.name
    row["throughput_bps"], row["eta_seconds"] = figures.rate_bps, figures.eta_seconds
    row["disks"] = [{"disk": f.disk.disk_key, "status": f.disk.status, "state": f.state,
                     "bytes_done": f.disk.bytes_done, "bytes_total": f.disk.bytes_total,
                     "throughput_bps": f.rate_bps, "eta_seconds": f.eta_seconds} for f in figures.disks]
    row["progress_percent"] = round(job.progress_percent, 2)
    row["created_at"] = job.created_at.isoformat()
    row["completed_at"] = _iso(job.completed_at)
    return {field: row[field] for field in JOB_ROW_FIELDS}


def failover_json(job: FailoverJob) -> dict:
    """A failover as the commands' --json and the JSON API show it."""
    return {"id": job.pk, "vm": job.vm.name, "kind": job.kind, "status": job.status,
            "state": VMContext.of(job.vm).state, "destination_vm": job.destination_vm,
            "replication_job": job.replication_job_id, "recovery_point": job.recovery_point_id,
            "source_lost": job.source_lost, "committed_at": _iso(job.committed_at), "final_cycle": job.final_cycle_id,
            "rolls_back": job.rolls_back_id, "boot_verified": job.boot_verified,
            "boot_probe": job.boot_probe, "console_match": job.console_match, "downtime_s": job.downtime_s,
            "forecast_downtime_s": job.forecast_downtime_s, "error": job.error_message,
            "console_tail": job.console_tail, "hardware": job.hardware,
            "hardware_warning": VMContext.of(job.vm).hardware_warning, "created_at": job.created_at.isoformat(),
            "completed_at": _iso(job.completed_at),
            "steps": [{"name": s.name, "status": s.status, "seconds": s.seconds, "detail": s.detail}
                      for s in job.steps.all()]}
