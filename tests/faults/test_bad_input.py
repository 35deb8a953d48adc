"""9. 1000 generated malformed or oversized API requests: all 4xx, nothing
changed; and the auth matrix of the agent API, the JSON API and the pages."""

from __future__ import annotations

import json
import random
import re

import pytest
import requests
from django.apps import apps
from django.conf import settings
from django.contrib.auth.models import User

from replication.choices import JobStatus
from replication.services.inventory import register_image_vm
from replication.services.jobs import start_replication
from tests.faults.harness import CaseFigures, record
from tests.helpers import MiB, make_image, user_with_role
from tests.test_progress_api import stable
from vma_agent.progress_records.schema import MAX_BODY_BYTES

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def database_state() -> dict:
    """Row count and newest update of every table of the project."""
    state = {}
    for model in apps.get_app_config("replication").get_models():
        if not model._meta.managed:
            continue  # Role: permissions only, no table
        rows = model.objects.all()
        state[model.__name__] = (rows.count(), sorted(rows.values_list("pk", flat=True))[-5:])
    state["users"] = User.objects.count()
    return state


def without(body: dict, key: str) -> dict:
    return {k: v for k, v in body.items() if k != key}


def bad_requests(rng: random.Random, job_id: str, token: str):
    """Yield (method, path, headers, body): each malformed, oversized or unauthorized."""
    auth = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    good = {"stage": "Transfer", "status": "in_progress", "seq": 5, "disk_id": "disk-2000",
            "bytes_transferred": 1, "total_bytes": 2}
    bodies = [
        lambda: b"{",
        lambda: rng.randbytes(rng.randint(1, 200)),
        lambda: json.dumps([good]).encode(),
        lambda: json.dumps(rng.choice([1, "x", None, True])).encode(),
        lambda: json.dumps({**good, "evil": 1}).encode(),
        lambda: json.dumps(without(good, "stage")).encode(),  # status and seq may be left out (migratekit)
        lambda: json.dumps({**good, "seq": rng.choice(["1", -1, 1.5, 2**70])}).encode(),
        lambda: b"[" * rng.randint(2000, MAX_BODY_BYTES),
        lambda: json.dumps({**good, "percent": rng.choice([-1, 101, "x", 1e309])}).encode(),
        lambda: json.dumps({**good, "bytes_transferred": rng.choice([-5, "a", [1]])}).encode(),
        lambda: json.dumps({**good, "stage": "x" * rng.randint(300, 5000)}).encode(),
        lambda: b"x" * (MAX_BODY_BYTES + rng.randint(1, 50_000)),
        lambda: json.dumps({**good, "error_message": "e" * (MAX_BODY_BYTES + 10)}).encode(),
    ]
    bad_ids = ["a b", "../etc/passwd", "x" * 200, "-leading", "migration-vol-not-a-uuid", "é", "%00", "a;b"]
    for i in range(1000):
        kind = i % 5
        if kind in (0, 1, 2):  # bad bodies with the right token, to the existing job's record
            yield "POST", f"/api/v1/progress/{job_id}/update", auth, rng.choice(bodies)()
        elif kind == 3:  # bad ids
            record_id = requests.utils.quote(rng.choice(bad_ids), safe="")
            yield rng.choice(["POST", "GET"]), f"/api/v1/progress/{record_id}" + (
                "/update" if rng.random() < 0.5 else ""), auth, json.dumps(good).encode()
        else:  # no, wrong or malformed credentials; wrong methods; the OMA API without login
            yield rng.choice([
                # Token-less through a proxy: loopback, but not trusted.
                ("POST", f"/api/v1/progress/{job_id}/update", {"X-Forwarded-For": "198.51.100.4"},
                 json.dumps(good).encode()),
                ("POST", f"/api/v1/progress/{job_id}/update", {"Authorization": "Bearer wrong"},
                 json.dumps(good).encode()),
                ("POST", f"/api/v1/progress/{job_id}/update", {"Authorization": f"Basic {token}"},
                 json.dumps(good).encode()),
                ("GET", f"/api/v1/progress/{job_id}", {"Authorization": "Bearer "}, b""),
                ("PUT", f"/api/v1/progress/{job_id}/update", auth, json.dumps(good).encode()),
                ("DELETE", f"/api/v1/progress/{job_id}", auth, b""),
                ("GET", f"/api/v1/progress/{job_id}/update", auth, b""),
                ("GET", "/api/jobs/", {}, b""),
                ("GET", f"/api/jobs/{job_id}/", {}, b""),
            ])


def test_1000_malformed_requests_are_refused_and_change_nothing(vma_server, vma_store, tmp_path):
    image = make_image(tmp_path / "api.img", MiB, [(0, 4096)])
    job = start_replication(register_image_vm("vm-api", [str(image)]))
    token = settings.VMA_TOKEN
    session = requests.Session()
    assert session.post(f"{vma_server}/api/v1/progress/{job.id}/update", headers={"Authorization": f"Bearer {token}"},
                        json={"stage": "Transfer", "status": "in_progress", "seq": 1, "disk_id": "disk-2000",
                              "bytes_transferred": 1, "total_bytes": 4096}).status_code == 200
    before_db, before_record = database_state(), vma_store.get(job.id)
    statuses, wrong = {}, []
    for method, path, headers, body in bad_requests(random.Random(9), job.id, token):
        response = session.request(method, vma_server + path, headers=headers, data=body, timeout=30)
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        if not 400 <= response.status_code < 500:
            wrong.append((method, path, response.status_code))
    unchanged = database_state() == before_db and stable(vma_store.get(job.id)) == stable(before_record)
    record(CaseFigures("9 1000 malformed API requests", result="pass" if not wrong and unchanged else "FAIL",
                       non_terminal_rows=0 if unchanged else None,
                       note="status counts " + ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items()))
                       + "; rows and progress record unchanged" * unchanged))
    assert sum(statuses.values()) == 1000
    assert wrong == []
    assert unchanged


def login(base: str, username: str, password: str) -> requests.Session:
    session = requests.Session()
    page = session.get(f"{base}/login/").text
    csrf = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page).group(1)
    response = session.post(f"{base}/login/", data={"username": username, "password": password,
                                                    "csrfmiddlewaretoken": csrf}, allow_redirects=False)
    assert response.status_code == 302, response.text[:500]
    return session


def test_auth_matrix(vma_server, tmp_path, settings, rf):
    from vma_agent import api

    image = make_image(tmp_path / "auth.img", MiB, [(0, 4096)])
    job = start_replication(register_image_vm("vm-auth", [str(image)]))
    update = {"stage": "Transfer", "disk_id": "disk-2000"}  # as migratekit sends it: no seq, no status
    url = f"{vma_server}/api/v1/progress/{job.id}/update"
    # Agent API, straight from loopback (the test server listens on 127.0.0.1 and
    # trusts loopback, VMA_TRUST_LOOPBACK=true): no token -> a display update
    # accepted (MigrateKit OSSEA's migratekit and tunnelled OMA); the same
    # relayed by a proxy, a wrong token, another agent's token -> 401; its own -> 200.
    another_agents_token = "token-of-agent-b"
    assert requests.post(url, json=update).status_code == 200
    assert requests.get(f"{vma_server}/api/v1/progress/{job.id}").status_code == 200
    assert requests.post(url, json=update, headers={"X-Forwarded-For": "198.51.100.4"}).status_code == 401
    assert requests.post(url, json=update, headers={"Authorization": "Bearer nope"}).status_code == 401
    assert requests.post(url, json=update,
                         headers={"Authorization": f"Bearer {another_agents_token}"}).status_code == 401
    assert requests.post(url, json=update, headers={"Authorization": f"Bearer {settings.VMA_TOKEN}"}).ok
    # From another host (the view itself, as Django sees such a request): no
    # token -> 401, and 503 when the agent has no token configured; the token -> 200.
    remote = {"REMOTE_ADDR": "10.1.2.3", "content_type": "application/json"}
    body = json.dumps(update)
    assert api.post_update(rf.post(url, body, **remote), job.id).status_code == 401
    assert api.get_progress(rf.get(url, REMOTE_ADDR="10.1.2.3"), job.id).status_code == 401
    assert api.post_update(rf.post(url, body, HTTP_AUTHORIZATION=f"Bearer {settings.VMA_TOKEN}", **remote),
                           job.id).status_code == 200
    with_token = settings.VMA_TOKEN
    settings.VMA_TOKEN = ""
    assert api.post_update(rf.post(url, body, **remote), job.id).status_code == 503
    # Token-less from loopback only where the agent trusts it (VMA_TRUST_LOOPBACK, off by default).
    assert api.post_update(rf.post(url, body, content_type="application/json"), job.id).status_code == 503
    settings.VMA_TRUST_LOOPBACK = True
    assert api.post_update(rf.post(url, body, content_type="application/json"), job.id).status_code == 200
    settings.VMA_TOKEN = with_token
    # JSON API and pages need a login; actions need CSRF too.
    assert requests.get(f"{vma_server}/api/jobs/{job.id}/").status_code == 401
    page = requests.get(f"{vma_server}/", allow_redirects=False)
    assert page.status_code == 302 and "/login/" in page.headers["Location"]
    # An anonymous action is refused before it gets anywhere (CSRF first).
    assert requests.post(f"{vma_server}/jobs/{job.id}/cancel/", allow_redirects=False).status_code == 403
    user_with_role("operator", "operator", password="a-long-password")
    session = login(vma_server, "operator", "a-long-password")
    assert session.get(f"{vma_server}/api/jobs/{job.id}/").status_code == 200
    assert session.post(f"{vma_server}/jobs/{job.id}/cancel/", allow_redirects=False).status_code == 403
    job.refresh_from_db()
    assert job.status != JobStatus.CANCELLED
    page = session.get(f"{vma_server}/jobs/{job.id}/").text
    csrf = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page)
    if csrf:  # the Cancel form is shown while the job runs: with its token, it works
        session.post(f"{vma_server}/jobs/{job.id}/cancel/", data={"csrfmiddlewaretoken": csrf.group(1)})
        job.refresh_from_db()
        assert job.status == JobStatus.CANCELLED
    record(CaseFigures("9b auth matrix", note="agent API: token-less from loopback 200 where trusted (503 where "
                                              "not), token-less proxied or from another host, wrong or other "
                                              "agent's token 401; JSON API "
                                              "401 without login; pages 302 to login; actions 403 without CSRF"))
