"""The enrolment endpoint an agent host calls (vma_agent.enrol), with no
account: its pairing code is its proof. POST /api/agents/enrol/ {code,
name, public_key, version} makes a pending agent; GET
/api/agents/enrol/<name>/ (Authorization: Pairing <code>) answers 202 while
it waits for approval, then its credentials, once. Refusals are 4xx JSON
with the reason. Enrolment attempts are limited per client address
(ENROL_RATE): past it, 429 with Retry-After, logged, the first refusal of
each window in the agents' audit trail."""

import json
import logging
import math

from django.conf import settings
from django.http import JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django_ratelimit.core import get_usage

from replication.services import enrolment

log = logging.getLogger(__name__)


def _source(request) -> str:
    return request.META.get("REMOTE_ADDR", "")[:200]


def _throttled(request):
    """The 429 answer when this address has used up its enrolment attempts
    (this one counted), else None."""
    usage = get_usage(request, group="agent-enrol", key="ip", rate=settings.ENROL_RATE, method="POST",
                      increment=True)
    if usage is None or not usage["should_limit"]:
        return None
    retry_after = max(1, math.ceil(usage["time_left"]))
    source = _source(request)
    log.warning("enrolment attempt %s from %s refused: over ENROL_RATE %s", usage["count"], source,
                settings.ENROL_RATE)
    if usage["count"] == usage["limit"] + 1:  # once a window: a flood writes one audit entry, not one each
        enrolment.audit(None, "enrol-throttled", "unknown", source,
                        f"more than {usage['limit']} enrolment attempts (ENROL_RATE {settings.ENROL_RATE}); "
                        f"refused for {retry_after} s")
    response = JsonResponse({"error": f"too many enrolment attempts from {source}: at most {settings.ENROL_RATE}; "
                                      f"try again in {retry_after} s", "retry_after_s": retry_after}, status=429)
    response["Retry-After"] = str(retry_after)
    return response


@csrf_exempt
def enrol(request):
    if request.method != "POST":
        response = JsonResponse({"error": f"method {request.method} not allowed; use POST"}, status=405)
        response["Allow"] = "POST"
        return response
    if (throttled := _throttled(request)) is not None:
        return throttled
    try:
        body = json.loads(request.body)
    except ValueError:
        body = None
    if not isinstance(body, dict):
        return JsonResponse({"error": "send a JSON object {code, name, public_key, version}"}, status=400)
    missing = [key for key in ("code", "name", "public_key") if not body.get(key)]
    if missing:
        return JsonResponse({"error": f"missing {', '.join(missing)}"}, status=400)
    try:
        agent = enrolment.enrol(body["code"], body["name"], body["public_key"], body.get("version", ""),
                                _source(request))
    except enrolment.EnrolmentError as exc:
        return JsonResponse({"error": str(exc)}, status=exc.status)
    return JsonResponse({"name": agent.name, "state": agent.state, "queue": agent.queue,
                         "detail": "pending: an administrator approves it (manage.py agent approve "
                                   f"{agent.name}); poll GET /api/agents/enrol/{agent.name}/"}, status=201)


def credentials(request, name):
    if request.method not in ("GET", "HEAD"):
        response = JsonResponse({"error": f"method {request.method} not allowed; use GET"}, status=405)
        response["Allow"] = "GET, HEAD"
        return response
    scheme, _, code = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "pairing" or not code.strip():
        return JsonResponse({"error": "send Authorization: Pairing <the pairing code you enrolled with>"},
                            status=401)
    status, body = enrolment.credentials(name, code.strip(), _source(request))
    return JsonResponse(body, status=status)
