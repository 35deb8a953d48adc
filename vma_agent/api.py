"""The VMA progress API as Django views: a thin HTTP layer over
vma_agent.progress_records. Bearer-token authenticated. Only when the agent is
configured for MigrateKit OSSEA's clients (VMA_TRUST_LOOPBACK, off by
default), a token-less request straight from loopback may post display
fields of a progress update and read a record by its id: MigrateKit OSSEA's
migratekit and OMA poller send no token. Control (stop, limit) and the
change feed always need the token. No cookies are involved, so CSRF as such
does not apply; but a browser on the agent host would still send a page's
cross-site POST, so every write refuses a foreign Origin and takes JSON
only. Every view answers JSON, errors and wrong methods too."""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
from collections.abc import Callable
from functools import lru_cache, wraps
from urllib.parse import urlsplit

import redis
from django.conf import settings
from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt

from vma_agent import __version__
from vma_agent.control import AgentControl
from vma_agent.openapi import OPENAPI
from vma_agent.progress_records.schema import MAX_BODY_BYTES, InvalidUpdate, parse_update, validate_id
from vma_agent.progress_records.store import FEED_LIMIT, FEED_MAX_LIMIT, ProgressStore
from vma_agent.progress_records.view import status_summary

log = logging.getLogger(__name__)

# Headers a reverse proxy adds: a request carrying one was relayed, so its
# loopback source address says nothing about the client.
PROXY_HEADERS = ("X-Forwarded-For", "Forwarded", "X-Real-IP")


@lru_cache(maxsize=4)
def _store_for(url: str, prefix: str, ttl_s: int) -> ProgressStore:
    return ProgressStore.from_url(url, prefix=prefix, ttl_s=ttl_s)


def get_store() -> ProgressStore:
    return _store_for(settings.VMA_REDIS_URL, settings.VMA_PROGRESS_PREFIX, settings.VMA_PROGRESS_TTL_S)


def _error(status: int, reason: str) -> JsonResponse:
    return JsonResponse({"error": reason}, status=status)


def api_view(*methods: str) -> Callable:
    """A JSON API view: CSRF-exempt (no cookies are read), and a wrong
    method is a JSON 405 with Allow, not Django's empty or HTML answer."""

    def decorate(view):
        @csrf_exempt
        @wraps(view)
        def wrapper(request: HttpRequest, *args, **kwargs):
            if request.method not in methods:
                response = _error(405, f"method {request.method} not allowed; use {', '.join(methods)}")
                response["Allow"] = ", ".join(methods)
                return response
            return view(request, *args, **kwargs)

        return wrapper

    return decorate


def from_loopback(request: HttpRequest) -> bool:
    """Whether the request came straight from this host: its peer address is
    loopback and no proxy header says it was relayed for someone else."""
    try:
        address = ipaddress.ip_address(request.META.get("REMOTE_ADDR", ""))
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback and not any(name in request.headers for name in PROXY_HEADERS)


def loopback_trusted(request: HttpRequest) -> bool:
    """A token-less request MigrateKit OSSEA's clients make (migratekit on
    this host, their OMA poller through an SSH tunnel), accepted for what
    they do only while VMA_TRUST_LOOPBACK is on."""
    return "Authorization" not in request.headers and settings.VMA_TRUST_LOOPBACK and from_loopback(request)


def _unauthorized(request: HttpRequest, *, loopback_may: bool = False) -> JsonResponse | None:
    """None when the request may use the endpoint: it carries the agent's
    token, or (loopback_may: the endpoint is one of MigrateKit OSSEA's) it is
    loopback_trusted. A token that is sent is always checked."""
    if loopback_may and loopback_trusted(request):
        return None
    header = request.headers.get("Authorization")
    expected = settings.VMA_TOKEN
    if not expected:
        return _error(503, "the progress API is disabled for this client: VMA_TOKEN is not set on this agent")
    scheme, _, token = (header or "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        response = _error(401, "missing bearer token")
    elif not hmac.compare_digest(token.strip().encode(), expected.encode()):
        response = _error(401, "wrong bearer token")
    else:
        return None
    response["WWW-Authenticate"] = 'Bearer realm="vma"'
    return response


def _foreign_origin(request: HttpRequest) -> JsonResponse | None:
    """A 403 for a write a browser sends on behalf of another site's page:
    its Origin (or Sec-Fetch-Site) says the page is not this API's own host.
    No client of the API is a browser, so nothing legitimate is lost."""
    origin = request.headers.get("Origin")
    if origin is not None:
        parts = urlsplit(origin)
        own = request.META.get("HTTP_HOST", "").lower()
        if parts.scheme not in ("http", "https") or not own or parts.netloc.lower() != own:
            return _error(403, f"refused: a request from a page of another site (Origin {origin[:100]!r})")
    if request.headers.get("Sec-Fetch-Site", "").lower() in ("cross-site", "same-site"):
        return _error(403, "refused: a request from a page of another site (Sec-Fetch-Site)")
    return None


def _write_refused(request: HttpRequest, *, loopback_may: bool = False) -> JsonResponse | None:
    """Why a write (POST) is refused, or None: a foreign origin, no token (or
    loopback_may and loopback_trusted), a body that is not declared JSON."""
    if denied := _foreign_origin(request):
        return denied
    if denied := _unauthorized(request, loopback_may=loopback_may):
        return denied
    if request.content_type != "application/json":
        return _error(415, f"Content-Type must be application/json, not {request.content_type[:100]!r}")
    return None


def _unavailable(exc: Exception) -> JsonResponse:
    log.error("progress store unavailable: %s", exc)
    return _error(503, f"progress store unavailable: {exc}")


@api_view("POST")
def post_update(request: HttpRequest, record_id: str) -> JsonResponse:
    if denied := _write_refused(request, loopback_may=True):
        return denied
    trusted = not loopback_trusted(request)
    length = request.headers.get("Content-Length")
    if length and length.isdigit() and int(length) > MAX_BODY_BYTES:
        return _error(413, f"body is {length} bytes; the limit is {MAX_BODY_BYTES}")
    try:
        validate_id(record_id)
        update = parse_update(request.read(MAX_BODY_BYTES + 1))
    except InvalidUpdate as exc:
        return _error(exc.status, exc.reason)
    try:
        result = get_store().apply(record_id, update, trusted=trusted)
    except InvalidUpdate as exc:
        return _error(exc.status, exc.reason)
    except redis.RedisError as exc:
        return _unavailable(exc)
    if result.refused == "owned":
        return _error(403, f"{update.get('disk_id') or update.get('export_name') or record_id} is reported by "
                           f"this agent's own copy: only updates with the bearer token change it")
    if result.refused == "bytes":
        return _error(400, "bytes_transferred is larger than the disk's stored total_bytes")
    return JsonResponse({"id": result.record_id, "applied": result.applied, "seq": result.seq,
                         "reason": None if result.applied else
                         "an update with this or a newer seq, or the disk's completion, is stored"})


def _record(request: HttpRequest, record_id: str) -> dict | JsonResponse:
    # MigrateKit OSSEA's OMA reads a job it knows the id of; loopback trust
    # lets it, and nothing else: the feed below lists every job id.
    if denied := _unauthorized(request, loopback_may=True):
        return denied
    try:
        validate_id(record_id)
    except InvalidUpdate as exc:
        return _error(exc.status, exc.reason)
    try:
        record = get_store().get(record_id)
    except redis.RedisError as exc:
        return _unavailable(exc)
    if record is None:
        return _error(404, f"no progress record for {record_id}")
    return record


@api_view("GET")
def get_progress(request: HttpRequest, record_id: str) -> JsonResponse:
    record = _record(request, record_id)
    return record if isinstance(record, JsonResponse) else JsonResponse(record)


@api_view("GET")
def get_status(request: HttpRequest, record_id: str) -> JsonResponse:
    record = _record(request, record_id)
    return record if isinstance(record, JsonResponse) else JsonResponse(status_summary(record))


def _int_param(request: HttpRequest, name: str, default: int, low: int, high: int) -> int:
    raw = request.GET.get(name)
    if raw is None:
        return default
    # An empty value is not "the default": the document says integer, and a
    # client that sent `limit=` has a bug worth hearing about.
    if not raw.isascii() or not raw.isdigit() or len(raw) > 19 or not low <= int(raw) <= high:
        raise InvalidUpdate(f"{name} must be an integer from {low} to {high}")
    return int(raw)


@api_view("GET")
def list_changes(request: HttpRequest) -> JsonResponse:
    """The change feed: every record changed after cursor `since`."""
    if denied := _unauthorized(request):
        return denied
    try:
        since = _int_param(request, "since", 0, 0, 2**53 - 1)
        limit = _int_param(request, "limit", FEED_LIMIT, 1, FEED_MAX_LIMIT)
    except InvalidUpdate as exc:
        return _error(exc.status, exc.reason)
    try:
        changes = get_store().changes(since, limit)
    except redis.RedisError as exc:
        return _unavailable(exc)
    # Who answers: the OMA records each agent's name and software version
    # from its poller's read of the feed.
    return JsonResponse(changes.as_json() | {"agent": {"name": settings.VMA_AGENT_NAME, "version": __version__}})


@api_view("GET")
def health(request: HttpRequest) -> JsonResponse:
    """Alive and its store answering; no token needed, nothing is revealed."""
    try:
        get_store().ping()
    except redis.RedisError as exc:
        log.error("progress store unavailable: %s", exc)
        # No token asked, so no detail given (the log has it).
        return JsonResponse({"status": "unavailable", "store": "unavailable",
                             "error": "progress store unavailable"}, status=503)
    return JsonResponse({"status": "ok", "store": "ok", "service": "vma-progress-api",
                         "version": OPENAPI["info"]["version"]})


@lru_cache(maxsize=4)
def _control_for(url: str, prefix: str) -> AgentControl:
    return AgentControl.from_url(url, prefix=prefix)


@api_view("POST")
def stop_job(request: HttpRequest, job_id: str) -> JsonResponse:
    """The OMA asks this agent to stop a job's copies (cancelled or failed):
    each stops at its next check, within a heartbeat interval."""
    if denied := _write_refused(request):
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
        _control().request_stop(job_id, reason)
    except redis.RedisError as exc:
        return _unavailable(exc)
    return JsonResponse({"job_id": job_id, "stopping": True})


def _control() -> AgentControl:
    return _control_for(settings.VMA_REDIS_URL, f"{settings.VMA_PROGRESS_PREFIX}:control")


@api_view("GET", "POST")
def job_limit(request: HttpRequest, job_id: str) -> JsonResponse:
    """A job's bandwidth limit per disk copy: POST {"bytes_per_s": N or null}
    changes it for the job's running copies, which follow within a second
    or two; GET shows it and, per disk, the limit each copy last applied."""
    if denied := _write_refused(request) if request.method == "POST" else _unauthorized(request):
        return denied
    try:
        validate_id(job_id)
        body = json.loads(request.read(MAX_BODY_BYTES + 1) or b"null") if request.method == "POST" else None
    except InvalidUpdate as exc:
        return _error(exc.status, exc.reason)
    except (ValueError, RecursionError):
        return _error(400, "body is not valid JSON")
    if request.method == "POST":
        rate = body.get("bytes_per_s", ...) if isinstance(body, dict) else ...
        if rate is not None and (isinstance(rate, bool) or not isinstance(rate, int) or rate <= 0):
            return _error(400, "bytes_per_s is required: a positive integer, or null for no limit")
    try:
        if request.method == "POST":
            _control().set_limit(job_id, rate)
        changed, rate = _control().limit(job_id)
        applied = _control().limits_applied(job_id)
    except redis.RedisError as exc:
        return _unavailable(exc)
    return JsonResponse({"job_id": job_id, "bytes_per_s": rate, "changed": changed, "applied": applied})


@api_view("GET")
def openapi(request: HttpRequest) -> JsonResponse:
    return JsonResponse(OPENAPI)
