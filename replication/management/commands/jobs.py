import json

from django.core.management.base import BaseCommand

from replication.models import ReplicationJob

FIELDS = ["id", "vm", "sync_type", "status", "current_operation", "progress_percent", "bytes_transferred",
          "total_bytes", "throughput_bps", "error_message", "created_at", "completed_at"]


def job_row(job: ReplicationJob) -> dict:
    row = {field: getattr(job, field) for field in FIELDS if field != "vm"}
    row["vm"] = job.vm.name
    row["progress_percent"] = round(job.progress_percent, 2)
    row["created_at"] = job.created_at.isoformat()
    row["completed_at"] = job.completed_at.isoformat() if job.completed_at else None
    return {field: row[field] for field in FIELDS}


class Command(BaseCommand):
    help = "List replication jobs with status, stage, percent, bytes and throughput."

    def add_arguments(self, parser):
        parser.add_argument("--json", action="store_true", dest="as_json")
        parser.add_argument("--limit", type=int, default=50)

    def handle(self, as_json, limit, **options):
        rows = [job_row(job) for job in ReplicationJob.objects.select_related("vm")[:limit]]
        if as_json:
            self.stdout.write(json.dumps(rows, indent=2))
            return
        self.stdout.write(f"{'JOB':<32} {'VM':<16} {'STATUS':<12} {'STAGE':<20} {'%':>6} {'BYTES':>15} {'B/S':>12}")
        for r in rows:
            self.stdout.write(
                f"{r['id']:<32} {r['vm']:<16} {r['status']:<12} {r['current_operation']:<20} "
                f"{r['progress_percent']:>6.1f} {r['bytes_transferred']:>15} {r['throughput_bps']:>12}"
            )
