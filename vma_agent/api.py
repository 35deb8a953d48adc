"""The VMA progress API as Django views: a thin HTTP layer over
vma_agent.progress_store. Token-authenticated, so CSRF does not apply."""

from __future__ import annotations

import hmac
import json
import logging
from functools import lru_cache

import redis
from django.conf import settings
from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST

from vma_agent.control import AgentControl
from vma_agent.openapi import OPENAPI
from vma_agent.progress_store import MAX_BODY_BYTES, InvalidUpdate, ProgressStore, parse_update, validate_id

log = logging.getLogger(__name__)


@lru_cache(maxsize=4)
def _store_for(url: str, prefix: str, ttl_s: int) -> ProgressStore:
    return ProgressStore.from_url(url, prefix=prefix, ttl_s=ttl_s)


def get_store() -> ProgressStore:
    return _store_for(settings.VMA_REDIS_URL, settings.VMA_PROGRESS_PREFIX, settings.VMA_PROGRESS_TTL_S)


def _error(status: int, reason: str) -> JsonResponse:
    return JsonResponse({"error": reason}, status=status)


def _unauthorized(request: HttpRequest) -> JsonResponse | None:
    """None when the request carries the agent's token. With no token
    configured the API refuses everything: it is never open."""
    expected = settings.VMA_TOKEN
    if not expected:
        return _error(503, "the progress API is disabled: VMA_TOKEN is not set on this agent")
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        response = _error(401, "missing bearer token")
    elif not hmac.compare_digest(token.strip().encode(), expected.encode()):
        response = _error(401, "wrong bearer token")
    else:
        return None
    response["WWW-Authenticate"] = 'Bearer realm="vma"'
    return response


@csrf_exempt
@require_POST
def post_update(request: HttpRequest, record_id: str) -> JsonResponse:
    if denied := _unauthorized(request):
        return denied
    length = request.headers.get("Content-Length")
    if length and length.isdigit() and int(length) > MAX_BODY_BYTES:
        return _error(413, f"body is {length} bytes; the limit is {MAX_BODY_BYTES}")
    try:
        validate_id(record_id)
        update = parse_update(request.read(MAX_BODY_BYTES + 1))
    except InvalidUpdate as exc:
        return _error(exc.status, exc.reason)
    try:
        result = get_store().apply(record_id, update)
    except redis.RedisError as exc:
        log.error("progress store unavailable: %s", exc)
        return _error(503, f"progress store unavailable: {exc}")
    return JsonResponse({"id": result.record_id, "applied": result.applied,
                         "reason": None if result.applied else "an update with this or a newer seq is stored"})


@require_GET
def get_progress(request: HttpRequest, record_id: str) -> JsonResponse:
    if denied := _unauthorized(request):
        return denied
    try:
        validate_id(record_id)
    except InvalidUpdate as exc:
        return _error(exc.status, exc.reason)
    try:
        record = get_store().get(record_id)
    except redis.RedisError as exc:
        return _error(503, f"progress store unavailable: {exc}")
    if record is None:
        return _error(404, f"no progress record for {record_id}")
    return JsonResponse(record)


@lru_cache(maxsize=4)
def _control_for(url: str, prefix: str) -> AgentControl:
    return AgentControl.from_url(url, prefix=prefix)


@csrf_exempt
@require_POST
def stop_job(request: HttpRequest, job_id: str) -> JsonResponse:
    """The OMA asks this agent to stop a job's copies (cancelled or failed):
    each stops at its next check, within a heartbeat interval."""
    if denied := _unauthorized(request):
        return denied
    try:
        validate_id(job_id)
        body = json.loads(request.read(MAX_BODY_BYTES + 1) or b"{}")
    except InvalidUpdate as exc:
        return _error(exc.status, exc.reason)
    except (ValueError, RecursionError):
        return _error(400, "body is not valid JSON")
    reason = body.get("reason") if isinstance(body, dict) else None
    if not isinstance(reason, str) or not reason.strip():
        return _error(400, "reason is required: a non-empty string")
    try:
        _control_for(settings.VMA_REDIS_URL, f"{settings.VMA_PROGRESS_PREFIX}:control").request_stop(job_id, reason)
    except redis.RedisError as exc:
        return _error(503, f"agent store unavailable: {exc}")
    return JsonResponse({"job_id": job_id, "stopping": True})


@require_GET
def openapi(request: HttpRequest) -> JsonResponse:
    return JsonResponse(OPENAPI)
