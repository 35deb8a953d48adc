"""JSON endpoints behind the pages, for scripts: /api/jobs/, /api/jobs/{id}/,
/api/failovers/ (GET: list; POST: start one, from a chosen recovery point,
live with the source site lost), /api/failovers/{id}/ and its commit, and a
VM's recovery points (/api/vms/{name}/points/). Reading needs the viewer
role, a test failover the operator role, a live failover, a rollback or a
commit the administrator role."""

import json
from functools import wraps

from django.http import JsonResponse
from django.views.decorators.csrf import csrf_exempt

from replication.choices import JOB_ACTIVE, FailoverKind, FailoverStatus, JobStatus
from replication.models import ApiToken, FailoverJob, ReplicationJob, VirtualMachine
from replication.roles import ADMINISTER, OPERATE, READ, actor_of, log_admin, refusal
from replication.serializers import failover_json, job_json
from replication.services import points
from replication.views.common import jobs_with_disks

API_LIMIT = 200


def api_view(view=None, *, methods: tuple[str, ...] = ("GET", "HEAD"), permission=READ):
    """A JSON API view for a logged-in user (the pages' session) or a
    script's token (Authorization: Bearer ..., manage.py api_token, acting
    as its owner); else a JSON 401. Another method than `methods` is a JSON
    405 with Allow; a user without `permission` (a permission name, or a
    function of the request giving one) a JSON 403 with the reason, before
    anything runs. A write through the session needs the CSRF token as the
    pages' forms do (a token request cannot be forged by another site)."""
    if view is None:
        return lambda view: api_view(view, methods=methods, permission=permission)

    @csrf_exempt
    @wraps(view)
    def wrapped(request, *args, **kwargs):
        if request.method not in methods:
            response = JsonResponse({"error": f"method {request.method} not allowed; use "
                                              f"{' or '.join(methods)}"}, status=405)
            response["Allow"] = ", ".join(methods)
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
        elif request.method not in ("GET", "HEAD", "OPTIONS") and _csrf_refused(request):
            return JsonResponse({"error": "CSRF check failed: send the X-CSRFToken header of your session, or use "
                                          "an API token"}, status=403)
        needed = permission(request) if callable(permission) else permission
        if not request.user.has_perm(needed):
            return JsonResponse({"error": refusal(request.user, needed)}, status=403)
        return view(request, *args, **kwargs)

    return wrapped


def _csrf_refused(request) -> bool:
    from django.middleware.csrf import CsrfViewMiddleware

    return CsrfViewMiddleware(lambda r: None).process_view(request, None, (), {}) is not None


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


FAILOVER_PERMISSION = {FailoverKind.TEST: OPERATE, FailoverKind.LIVE: ADMINISTER, FailoverKind.ROLLBACK: ADMINISTER}


def _failover_permission(request):
    """Reading: viewer; starting: the kind's role (a request naming no kind
    it knows needs at least an operator, who is then told why it is wrong)."""
    if request.method != "POST":
        return READ
    kind = _body(request).get("kind")
    return FAILOVER_PERMISSION.get(kind, OPERATE) if isinstance(kind, str) else OPERATE


def _body(request) -> dict:
    """The request's JSON object; {} when it is not one (the view says why)."""
    if not hasattr(request, "_json_body"):
        try:
            body = json.loads(request.body) if request.content_type == "application/json" else None
        except ValueError:
            body = None
        request._json_body = body if isinstance(body, dict) else {}
    return request._json_body


@api_view(methods=("GET", "HEAD", "POST"), permission=_failover_permission)
def failovers(request):
    if request.method == "POST":
        return _start_failover(request)
    queryset = FailoverJob.objects.select_related("vm").prefetch_related("steps")
    if vm := request.GET.get("vm"):
        queryset = queryset.filter(vm__name=vm)
    return JsonResponse({"failovers": [failover_json(job) for job in queryset[:API_LIMIT]]})


def _start_failover(request):
    """POST {"vm": NAME, "kind": "test" | "live" | "rollback"}: start it as
    the pages do; 201 with the failover, which runs on."""
    from replication.services import failover as failover_service

    if request.content_type != "application/json":
        return JsonResponse({"error": "send a JSON object with Content-Type: application/json"}, status=415)
    body = _body(request)
    kind, name = body.get("kind"), body.get("vm")
    point, source_lost = body.get("point"), body.get("source_lost", False)
    if not isinstance(kind, str) or kind not in FAILOVER_PERMISSION:
        return JsonResponse({"error": f"kind must be one of {', '.join(FAILOVER_PERMISSION)}, not {kind!r}"},
                            status=400)
    if not isinstance(name, str) or not name:
        return JsonResponse({"error": "vm: the name of a registered VM is required"}, status=400)
    if refused := _point_options_refused(kind, point, source_lost):
        return JsonResponse({"error": refused}, status=400)
    vm = VirtualMachine.objects.filter(name=name).first()
    if vm is None:
        return JsonResponse({"error": f"no VM named {name!r}"}, status=404)
    try:
        if kind == FailoverKind.ROLLBACK:
            job = failover_service.start_rollback(vm, actor=actor_of(request))
        else:
            job = failover_service.start_failover(vm, kind, actor=actor_of(request), point_id=point,
                                                  source_lost=source_lost)
    except (failover_service.FailoverError, points.PointError) as exc:
        return JsonResponse({"error": str(exc)}, status=409)
    lost = " with the source site lost" if source_lost else ""
    log_admin(request, vm, f"{kind} failover {job.pk}{lost} started through the API")
    return JsonResponse(failover_json(job), status=201)


def _point_options_refused(kind: str, point, source_lost) -> str:
    """Why `point` and `source_lost` do not fit the request ("" when they do)."""
    if point is not None and (isinstance(point, bool) or not isinstance(point, int) or point < 1):
        return f"point must be the id of one of the VM's recovery points (a positive integer) or null, not {point!r}"
    if not isinstance(source_lost, bool):
        return f"source_lost must be true or false, not {source_lost!r}"
    if source_lost and kind != FailoverKind.LIVE:
        return f"source_lost goes with kind live only, not {kind}: only a live failover acts on the source"
    if point is not None and kind == FailoverKind.ROLLBACK:
        return "point goes with a test or live failover: a rollback returns to the source"
    return ""


@api_view
def failover(request, failover_id):
    try:
        found = FailoverJob.objects.select_related("vm").prefetch_related("steps").get(pk=int(failover_id))
    except (ValueError, FailoverJob.DoesNotExist):
        return JsonResponse({"error": f"no failover {failover_id}"}, status=404)
    return JsonResponse(failover_json(found))


@api_view(methods=("POST",), permission=ADMINISTER)
def failover_commit(request, failover_id):
    """POST: commit this live failover (it must be the VM's open one): the VM
    stays on the destination, no rollback after, its protection ends."""
    from replication.services import failover as failover_service

    try:
        found = FailoverJob.objects.select_related("vm").get(pk=int(failover_id))
    except (ValueError, FailoverJob.DoesNotExist):
        return JsonResponse({"error": f"no failover {failover_id}"}, status=404)
    if found.kind != FailoverKind.LIVE or found.status != FailoverStatus.SUCCEEDED:
        return JsonResponse({"error": f"failover {found.pk} is a {found.kind} failover, {found.status}: only a live "
                                      "failover whose VM booted can be committed"}, status=409)
    try:
        job = failover_service.commit_failover(found.vm, actor=actor_of(request))
    except failover_service.FailoverError as exc:
        return JsonResponse({"error": str(exc)}, status=409)
    log_admin(request, found.vm, f"live failover {job.pk} committed through the API: no rollback, protection ended")
    return JsonResponse(failover_json(job))


@api_view
def vm_points(request, name):
    """A VM's recovery points, newest first, and their count and ages."""
    vm = VirtualMachine.objects.filter(name=name).first()
    if vm is None:
        return JsonResponse({"error": f"no VM named {name!r}"}, status=404)
    return JsonResponse({"vm": vm.name, **points.summary(vm), "points": points.points_of(vm)})


FORBIDDEN = {"description": "the user's role does not allow it (or a session's write lacks the CSRF token)"}

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
                          "400": {"description": "unknown status"}, "401": {"description": "not logged in"},
                          "403": FORBIDDEN}}},
        "/api/jobs/{id}/": {"get": {
            "summary": "One job with its disks",
            "parameters": [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {"200": {"description": "the job", "content": {"application/json": {"schema": {
                "$ref": "#/components/schemas/Job"}}}},
                          "401": {"description": "not logged in"},
                          "403": FORBIDDEN, "404": {"description": "no such job"}}}},
        "/api/failovers/": {"get": {
            "summary": "Failovers, newest first (at most 200), with their steps",
            "parameters": [{"name": "vm", "in": "query", "schema": {"type": "string"}}],
            "responses": {"200": {"description": "failovers", "content": {"application/json": {"schema": {
                "type": "object", "properties": {"failovers": {
                    "type": "array", "items": {"$ref": "#/components/schemas/Failover"}}}}}}},
                          "401": {"description": "not logged in"},
                          "403": FORBIDDEN}},
            "post": {
                "summary": "Start a failover of a VM: test (operator role), live or rollback (administrator role)",
                "description": "A test or live failover boots `point` (one of the VM's recovery points; default "
                               "the newest). `source_lost` (live only): the source site is gone; no shutdown "
                               "request, no final cycle, the VM's running cycle fenced (ended, its layer "
                               "discarded).",
                "requestBody": {"required": True, "content": {"application/json": {"schema": {
                    "type": "object", "required": ["vm", "kind"], "properties": {
                        "vm": {"type": "string", "minLength": 1},
                        "kind": {"type": "string", "enum": ["test", "live", "rollback"]},
                        "point": {"type": "integer", "minimum": 1, "nullable": True,
                                  "description": "a recovery point's id (GET /api/vms/{name}/points/); null: the "
                                                 "newest"},
                        "source_lost": {"type": "boolean", "default": False,
                                        "description": "live only: fail over with the source site lost"}}}}}},
                "responses": {"201": {"description": "started; it runs on", "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/Failover"}}}},
                              "400": {"description": "bad request body"},
                              "401": {"description": "not logged in"},
                          "403": FORBIDDEN,
                              "404": {"description": "no such VM"},
                              "409": {"description": "the VM's state does not allow it now"},
                              "415": {"description": "not JSON"}}}},
        "/api/failovers/{id}/": {"get": {
            "summary": "One failover with its steps",
            "parameters": [{"name": "id", "in": "path", "required": True, "schema": {"type": "integer"}}],
            "responses": {"200": {"description": "the failover", "content": {"application/json": {"schema": {
                "$ref": "#/components/schemas/Failover"}}}},
                          "401": {"description": "not logged in"},
                          "403": FORBIDDEN, "404": {"description": "no such failover"}}}},
        "/api/failovers/{id}/commit/": {"post": {
            "summary": "Commit a live failover whose VM booted (administrator role): the VM stays on the "
                       "destination, its disks its own; no rollback after, its protection ends (history kept)",
            "parameters": [{"name": "id", "in": "path", "required": True, "schema": {"type": "integer"}}],
            "responses": {"200": {"description": "committed", "content": {"application/json": {"schema": {
                "$ref": "#/components/schemas/Failover"}}}},
                          "401": {"description": "not logged in"},
                          "403": FORBIDDEN, "404": {"description": "no such failover"},
                          "409": {"description": "not a live failover whose VM booted, or committing failed"}}}},
        "/api/vms/{name}/points/": {"get": {
            "summary": "A VM's recovery points, newest first, with their count and the ages of the newest and "
                       "oldest",
            "parameters": [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {"200": {"description": "its points", "content": {"application/json": {"schema": {
                "type": "object", "properties": {
                    "vm": {"type": "string"}, "count": {"type": "integer"},
                    "newest_age_s": {"type": "number", "nullable": True, "description": "null: no point"},
                    "oldest_age_s": {"type": "number", "nullable": True, "description": "null: no point"},
                    "points": {"type": "array", "items": {"$ref": "#/components/schemas/Point"}}}}}}},
                          "401": {"description": "not logged in"},
                          "403": FORBIDDEN, "404": {"description": "no such VM"}}}},
        "/api/rpo/": {"get": {
            "summary": "Every VM's recovery point and its age; VMs in a protection group against its target",
            "responses": {"200": {"description": "recovery points", "content": {"application/json": {"schema": {
                "type": "object", "properties": {
                    "vms": {"type": "array", "items": {"$ref": "#/components/schemas/RecoveryPoint"}},
                    "over_target": {"type": "array", "items": {"type": "string"}}}}}}},
                          "401": {"description": "not logged in"},
                          "403": FORBIDDEN}}},
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
        "Point": {"type": "object", "properties": {
            "id": {"type": "integer"},
            "frozen_at": {"type": "string", "description": "when the cycle's snapshot froze the source"},
            "age_s": {"type": "number"},
            "job": {"type": "string", "description": "the cycle that made it"},
            "sync_type": {"type": "string"},
            "changed_bytes": {"type": "integer", "description": "the space its layers take: the data it changed"},
            "status": {"type": "string", "enum": ["sealed", "expired", "released"]},
            "in_use_by": {"type": "array", "items": {"type": "string"},
                          "description": "the failovers booting from it; empty: none"},
            "disks": {"type": "object", "additionalProperties": {"type": "integer"},
                      "description": "disk key: the bytes its layer of that disk takes"}}},
        "Failover": {"type": "object", "properties": {
            **{k: {"type": t} for k, t in [
                ("id", "integer"), ("vm", "string"), ("status", "string"), ("state", "string"),
                ("source_lost", "boolean"),
                ("destination_vm", "string"), ("boot_verified", "boolean"),
                ("console_match", "string"), ("error", "string"), ("console_tail", "string"),
                ("created_at", "string")]},
            "boot_probe": {"type": "string", "description": "the probe that verified the boot (console, screen, "
                                                            "network, agent; CloudStack: running); empty: not yet"},
            "kind": {"type": "string", "enum": ["test", "live", "rollback"]},
            # Null until known, or where they do not apply (a test failover has no downtime).
            **{k: {"type": t, "nullable": True, "description": d} for k, t, d in [
                ("replication_job", "string", "the completed cycle whose replica boots"),
                ("final_cycle", "string", "live: the incremental cycle run after the source shut down"),
                ("rolls_back", "integer", "rollback: the live failover it undoes"),
                ("recovery_point", "integer", "the recovery point its VM boots"),
                ("committed_at", "string", "live: when it was committed (no rollback after)"),
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
                ("export_name", "string"), ("error_message", "string")]},
            "state": {"type": "string", "description": "its status, or stopping: copying for a job that ended"},
            "throughput_bps": {"type": "integer", "description": "copying: measured, never above the job's limit; "
                                                                  "completed: its average; else 0"},
            "eta_seconds": {"type": "integer", "nullable": True,
                            "description": "remaining / min(rate, limit); null while unknown or not copying"}}},
        "Job": {"type": "object", "properties": {
            **{k: {"type": t} for k, t in [
                ("id", "string"), ("vm", "string"), ("sync_type", "string"), ("status", "string"),
                ("stage", "string"), ("percent", "number"), ("bytes_transferred", "integer"),
                ("total_bytes", "integer"), ("error_message", "string"), ("created_at", "string")]},
            "throughput_bps": {"type": "integer", "description": "running: the sum of its copying disks' rates; "
                                                                  "completed: bytes / duration; else 0"},
            **{k: {"type": t, "nullable": True} for k, t in [
                ("eta_seconds", "integer"), ("bandwidth_limit_bps", "integer"), ("started_at", "string"),
                ("completed_at", "string")]},
            "disks": {"type": "array", "items": {"$ref": "#/components/schemas/Disk"}}}},
    }},
}


@api_view
def openapi(request):
    # Behind the API's own auth, as the README says: the document maps what a caller may reach.
    return JsonResponse(OPENAPI)
