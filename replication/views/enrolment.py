"""The enrolment endpoint an agent host calls (vma_agent.enrol), with no
account: its pairing code is its proof. POST /api/agents/enrol/ {code,
name, public_key, version} makes a pending agent; GET
/api/agents/enrol/<name>/ (Authorization: Pairing <code>) answers 202 while
it waits for approval, then its credentials, once. Refusals are 4xx JSON
with the reason."""

import json

from django.http import JsonResponse
from django.views.decorators.csrf import csrf_exempt

from replication.services import enrolment


def _source(request) -> str:
    return request.META.get("REMOTE_ADDR", "")[:200]


@csrf_exempt
def enrol(request):
    if request.method != "POST":
        response = JsonResponse({"error": f"method {request.method} not allowed; use POST"}, status=405)
        response["Allow"] = "POST"
        return response
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
