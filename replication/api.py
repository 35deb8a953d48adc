"""JSON endpoints behind the pages, for scripts: /api/jobs/, /api/jobs/{id}/,
/api/failovers/ and /api/failovers/{id}/."""

from functools import wraps

from django.http import JsonResponse
from django.views.decorators.csrf import csrf_exempt

from replication.choices import JOB_ACTIVE, JobStatus
from replication.lifecycle import ApiToken, FailoverJob
from replication.models import ReplicationJob, VMDisk
from replication.services.failover import failover_report
from replication.views import jobs_with_disks

API_LIMIT = 200


def api_view(view):
    """A JSON API view: GET only (any other method a JSON 405 with Allow), for
    a logged-in user (the pages' session) or a script's token
    (Authorization: Bearer ..., manage.py api_token); else a JSON 401."""

    @csrf_exempt
    @wraps(view)
    def wrapped(request, *args, **kwargs):
        if request.method not in ("GET", "HEAD"):
            response = JsonResponse({"error": f"method {request.method} not allowed; use GET"}, status=405)
            response["Allow"] = "GET, HEAD"
            return response
        header = request.headers.get("Authorization")
        if header is not None:
            scheme, _, key = header.partition(" ")
            user = ApiToken.user_for(key.strip()) if scheme.lower() == "bearer" and key.strip() else None
            if user is None:
                return _unauthorized("wrong or unknown API token")
            request.user = user
        elif not request.user.is_authenticated:
            return _unauthorized("authentication required: log in, or send Authorization: Bearer <API token>")
        return view(request, *args, **kwargs)

    return wrapped


def _unauthorized(reason: str) -> JsonResponse:
    response = JsonResponse({"error": reason}, status=401)
    response["WWW-Authenticate"] = 'Bearer realm="oma"'
    return response


def not_found(request, exception=None):
    """404 for every path: JSON under /api/, Django's page elsewhere."""
    if request.path.startswith("/api/"):
        return JsonResponse({"error": f"no such resource: {request.path}"}, status=404)
    from django.views.defaults import page_not_found

    return page_not_found(request, exception)


def disk_json(disk: VMDisk) -> dict:
    return {
        "disk": disk.disk_key, "status": disk.status, "stage": disk.current_operation,
        "percent": round(disk.progress_percent, 2), "bytes_done": disk.bytes_done, "bytes_total": disk.bytes_total,
        "capacity_bytes": disk.capacity_bytes, "throughput_bps": disk.throughput_bps,
        "eta_seconds": disk.eta_seconds, "export_name": disk.target_volume.export_name,
        "error_message": disk.error_message,
    }


def job_json(job: ReplicationJob, with_disks: bool = True) -> dict:
    data = {
        "id": job.id, "vm": job.vm.name, "sync_type": job.sync_type, "status": job.status,
        "stage": job.current_operation, "percent": round(job.progress_percent, 2),
        "bytes_transferred": job.bytes_transferred, "total_bytes": job.total_bytes,
        "throughput_bps": job.throughput_bps, "eta_seconds": job.eta_seconds, "error_message": job.error_message,
        "created_at": job.created_at.isoformat(),
        "started_at": job.started_at.isoformat() if job.started_at else None,
        "completed_at": job.completed_at.isoformat() if job.completed_at else None,
    }
    if with_disks:
        data["disks"] = [disk_json(disk) for disk in job.disks.all()]
    return data


@api_view
def jobs(request):
    queryset = jobs_with_disks().prefetch_related("disks__target_volume")
    status = request.GET.get("status")
    if status == "active":
        queryset = queryset.filter(status__in=JOB_ACTIVE)
    elif status is not None:
        if status not in JobStatus.values:
            return JsonResponse({"error": f"unknown status {status!r}; use active or one of "
                                          f"{', '.join(JobStatus.values)}"}, status=400)
        queryset = queryset.filter(status=status)
    return JsonResponse({"jobs": [job_json(job) for job in queryset[:API_LIMIT]]})


@api_view
def job(request, job_id):
    try:
        found = jobs_with_disks().prefetch_related("disks__target_volume").get(pk=job_id)
    except ReplicationJob.DoesNotExist:
        return JsonResponse({"error": f"no job {job_id}"}, status=404)
    return JsonResponse(job_json(found))


@api_view
def failovers(request):
    queryset = FailoverJob.objects.select_related("vm").prefetch_related("steps")
    if vm := request.GET.get("vm"):
        queryset = queryset.filter(vm__name=vm)
    return JsonResponse({"failovers": [failover_report(job) for job in queryset[:API_LIMIT]]})


@api_view
def failover(request, failover_id):
    try:
        found = FailoverJob.objects.select_related("vm").prefetch_related("steps").get(pk=int(failover_id))
    except (ValueError, FailoverJob.DoesNotExist):
        return JsonResponse({"error": f"no failover {failover_id}"}, status=404)
    return JsonResponse(failover_report(found))


OPENAPI = {
    "openapi": "3.0.3",
    "info": {"title": "OMA replication jobs", "version": "1"},
    "paths": {
        "/api/jobs/": {"get": {
            "summary": "Jobs, newest first (at most 200)",
            "parameters": [{"name": "status", "in": "query", "schema": {"type": "string",
                            "enum": ["active", *JobStatus.values]}}],
            "responses": {"200": {"description": "jobs", "content": {"application/json": {"schema": {
                "type": "object", "properties": {"jobs": {"type": "array",
                                                          "items": {"$ref": "#/components/schemas/Job"}}}}}}},
                          "400": {"description": "unknown status"}, "401": {"description": "not logged in"}}}},
        "/api/jobs/{id}/": {"get": {
            "summary": "One job with its disks",
            "parameters": [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {"200": {"description": "the job", "content": {"application/json": {"schema": {
                "$ref": "#/components/schemas/Job"}}}},
                          "401": {"description": "not logged in"}, "404": {"description": "no such job"}}}},
        "/api/failovers/": {"get": {
            "summary": "Failovers, newest first (at most 200), with their steps",
            "parameters": [{"name": "vm", "in": "query", "schema": {"type": "string"}}],
            "responses": {"200": {"description": "failovers", "content": {"application/json": {"schema": {
                "type": "object", "properties": {"failovers": {
                    "type": "array", "items": {"$ref": "#/components/schemas/Failover"}}}}}}},
                          "401": {"description": "not logged in"}}}},
        "/api/failovers/{id}/": {"get": {
            "summary": "One failover with its steps",
            "parameters": [{"name": "id", "in": "path", "required": True, "schema": {"type": "integer"}}],
            "responses": {"200": {"description": "the failover", "content": {"application/json": {"schema": {
                "$ref": "#/components/schemas/Failover"}}}},
                          "401": {"description": "not logged in"}, "404": {"description": "no such failover"}}}},
        "/api/rpo/": {"get": {
            "summary": "Every VM's recovery point and its age; VMs in a protection group against its target",
            "responses": {"200": {"description": "recovery points", "content": {"application/json": {"schema": {
                "type": "object", "properties": {
                    "vms": {"type": "array", "items": {"$ref": "#/components/schemas/RecoveryPoint"}},
                    "over_target": {"type": "array", "items": {"type": "string"}}}}}}},
                          "401": {"description": "not logged in"}}}},
    },
    # The pages' session (log in at /login/), or a token for scripts (manage.py api_token).
    "security": [{"session": []}, {"token": []}],
    "components": {"securitySchemes": {
        "session": {"type": "apiKey", "in": "cookie", "name": "sessionid",
                    "description": "the session of a user logged in to the pages"},
        "token": {"type": "http", "scheme": "bearer", "description": "an API token: manage.py api_token NAME --user U"},
    }, "schemas": {
        "RecoveryPoint": {"type": "object", "properties": {
            "vm": {"type": "string"}, "over_target": {"type": "boolean"},
            **{k: {"type": t, "nullable": True, "description": d} for k, t, d in [
                ("group", "string", "its protection group; null: none"),
                ("recovery_point_at", "string", "when its last completed cycle froze the source; null: never"),
                ("age_s", "number", "seconds since then; null: never"),
                ("target_s", "integer", "its group's target; null: not in a group"),
                ("flag", "string", "why scheduled protection gave up on it; null: it did not")]},
            "last_drill": {"type": "object", "nullable": True, "description": "its last rehearsal; null: never",
                           "properties": {"status": {"type": "string", "enum": ["passed", "failed"]},
                                          "ended_at": {"type": "string"},
                                          "rto_s": {"type": "number", "nullable": True},
                                          "note": {"type": "string"}}}}},
        "Failover": {"type": "object", "properties": {
            **{k: {"type": t} for k, t in [
                ("id", "integer"), ("vm", "string"), ("status", "string"), ("state", "string"),
                ("destination_vm", "string"), ("boot_verified", "boolean"),
                ("console_match", "string"), ("error", "string"), ("console_tail", "string"),
                ("created_at", "string")]},
            "kind": {"type": "string", "enum": ["test", "live", "rollback"]},
            # Null until known, or where they do not apply (a test failover has no downtime).
            **{k: {"type": t, "nullable": True, "description": d} for k, t, d in [
                ("replication_job", "string", "the completed cycle whose replica boots"),
                ("final_cycle", "string", "live: the incremental cycle run after the source shut down"),
                ("rolls_back", "integer", "rollback: the live failover it undoes"),
                ("downtime_s", "number", "live: seconds from the source's shutdown to the boot verified"),
                ("forecast_downtime_s", "number", "live: the downtime forecast when it started"),
                ("completed_at", "string", "")]},
            "steps": {"type": "array", "items": {"type": "object", "properties": {
                "name": {"type": "string"}, "status": {"type": "string"},
                "seconds": {"type": "number", "nullable": True, "description": "null while it runs"},
                "detail": {"type": "string"}}}}}},
        "Disk": {"type": "object", "properties": {
            **{k: {"type": t} for k, t in [
                ("disk", "string"), ("status", "string"), ("stage", "string"), ("percent", "number"),
                ("bytes_done", "integer"), ("bytes_total", "integer"), ("capacity_bytes", "integer"),
                ("throughput_bps", "integer"), ("export_name", "string"), ("error_message", "string")]},
            "eta_seconds": {"type": "integer", "nullable": True, "description": "null while unknown"}}},
        "Job": {"type": "object", "properties": {
            **{k: {"type": t} for k, t in [
                ("id", "string"), ("vm", "string"), ("sync_type", "string"), ("status", "string"),
                ("stage", "string"), ("percent", "number"), ("bytes_transferred", "integer"),
                ("total_bytes", "integer"), ("throughput_bps", "integer"), ("error_message", "string"),
                ("created_at", "string")]},
            **{k: {"type": t, "nullable": True} for k, t in [
                ("eta_seconds", "integer"), ("started_at", "string"), ("completed_at", "string")]},
            "disks": {"type": "array", "items": {"$ref": "#/components/schemas/Disk"}}}},
    }},
}


@api_view
def openapi(request):
    # Behind the API's own auth, as the README says: the document maps what a caller may reach.
    return JsonResponse(OPENAPI)
