"""The VMA progress API over real HTTP (manage.py runserver in its own process)
on the test Redis: auth, validation, id resolution, monotonic updates.
MigrateKit OSSEA's wire format itself is pinned in tests/test_wire_contract.py."""

import json
import secrets
import time
import uuid

import pytest
import requests
from django.conf import settings
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from vma_agent.progress_records.schema import MAX_BODY_BYTES, InvalidUpdate, validate_update

pytestmark = pytest.mark.integration


def auth(token=None):
    return {"Authorization": f"Bearer {token or settings.VMA_TOKEN}"}


def new_job_id():
    return f"job-20261123-134500.123-{secrets.token_hex(3)}"


def new_export():
    return f"migration-vol-{uuid.uuid4()}"


def post(base, record_id, body, headers=None, raw=None):
    data = raw if raw is not None else json.dumps(body)
    return requests.post(f"{base}/api/v1/progress/{record_id}/update", data=data, timeout=10,
                         headers={"Content-Type": "application/json", **(headers if headers is not None else auth())})


def get(base, record_id, headers=None):
    return requests.get(f"{base}/api/v1/progress/{record_id}", timeout=10,
                        headers=headers if headers is not None else auth())


def stable(record):
    """A record without what moves with the clock while a job runs."""
    return {key: value for key, value in record.items() if key not in ("timing", "phases")}


def disk_update(seq, done, total=1000, **extra):
    return {"stage": "Transfer", "status": "in_progress", "seq": seq, "bytes_transferred": done,
            "total_bytes": total, "percent": 100.0 * done / total, "throughput_bps": 10, **extra}


def test_update_stored_under_job_id_is_found_by_export_name_and_back(vma_server):
    job_id, export = new_job_id(), new_export()
    r = post(vma_server, job_id, disk_update(1, 250, disk_id="disk-2000", export_name=export, job_id=job_id))
    assert r.status_code == 200 and r.json()["applied"] is True

    by_job, by_export = get(vma_server, job_id), get(vma_server, export)
    assert by_job.status_code == by_export.status_code == 200
    assert stable(by_job.json()) == stable(by_export.json())
    assert by_job.json()["disks"]["disk-2000"]["bytes_transferred"] == 250
    assert by_job.json()["aggregate"]["percent"] == 25.0


def test_update_posted_by_export_name_is_found_by_job_id(vma_server):
    """MigrateKit OSSEA's mismatch, reversed: the copy loop knows the export name."""
    job_id, exports = new_job_id(), [new_export(), new_export()]
    for i, export in enumerate(exports):
        assert post(vma_server, export, disk_update(1, 100 * (i + 1), disk_id=f"disk-200{i}",
                                                    job_id=job_id)).status_code == 200
    record = get(vma_server, job_id).json()
    assert record["job_id"] == job_id
    assert sorted(record["disks"]) == ["disk-2000", "disk-2001"]
    # Job totals are the disks' sums; percent is over data to copy.
    assert record["aggregate"]["bytes_transferred"] == 300
    assert record["aggregate"]["total_bytes"] == 2000
    assert record["aggregate"]["percent"] == 15.0
    assert get(vma_server, exports[1]).json()["id"] == job_id


def test_replayed_and_late_updates_never_move_a_disk_backwards(vma_server):
    job_id = new_job_id()
    assert post(vma_server, job_id, disk_update(5, 500, disk_id="d0")).json()["applied"] is True
    late = post(vma_server, job_id, disk_update(4, 400, disk_id="d0"))
    replay = post(vma_server, job_id, disk_update(5, 500, disk_id="d0"))
    assert late.status_code == replay.status_code == 200
    assert late.json()["applied"] is replay.json()["applied"] is False
    assert post(vma_server, job_id, disk_update(6, 1000, disk_id="d0", status="completed")).json()["applied"]
    # A completed disk keeps its final state even against a higher seq.
    assert post(vma_server, job_id, disk_update(7, 10, disk_id="d0")).json()["applied"] is False
    assert get(vma_server, job_id).json()["disks"]["d0"]["bytes_transferred"] == 1000


def test_unknown_id_is_a_json_404(vma_server):
    r = get(vma_server, new_job_id())
    assert r.status_code == 404
    assert "no progress record" in r.json()["error"]
    assert get(vma_server, new_export()).status_code == 404


@pytest.mark.parametrize("headers", [{"Authorization": "Bearer wrong"}, {"Authorization": "Basic abc"},
                                     {"Authorization": "Bearer "}, {"X-Forwarded-For": "203.0.113.7"},
                                     {"Forwarded": "for=203.0.113.7"}, {"X-Real-IP": "203.0.113.7"}])
def test_requests_without_the_right_token_are_refused(vma_server, vma_store, headers):
    """A wrong token is refused even from loopback; so is a token-less
    request a proxy relayed (it only looks local)."""
    job_id = new_job_id()
    r = post(vma_server, job_id, disk_update(1, 1, disk_id="d0"), headers=headers)
    assert r.status_code == 401 and r.json()["error"]
    assert get(vma_server, job_id, headers=headers).status_code == 401
    assert vma_store.get(job_id) is None


def migratekit_update(done, total=1000, **extra):
    """As MigrateKit OSSEA's migratekit posts: no seq, no token."""
    return {"stage": "Transfer", "bytes_transferred": done, "total_bytes": total, "throughput_bps": 10, **extra}


def test_token_less_requests_straight_from_loopback_are_trusted(vma_server, vma_store):
    """MigrateKit OSSEA's migratekit and OMA poller send no token (same
    host, SSH tunnel): with VMA_TRUST_LOOPBACK (the test server's) they post
    display fields and read a record by its id."""
    job_id = new_job_id()
    r = post(vma_server, job_id, migratekit_update(10, disk_id="disk-2000"), headers={})
    assert r.status_code == 200 and r.json()["applied"] is True
    assert get(vma_server, job_id, headers={}).json()["disks"]["disk-2000"]["bytes_transferred"] == 10


@pytest.mark.parametrize("field,value", [("checkpoint_bytes", 10**9), ("attempt", 2), ("worker", "evil:1"),
                                         ("seq", 2**40)])
def test_a_token_less_update_may_not_carry_what_decides_what_is_copied(vma_server, vma_store, field, value):
    """Finding 1 of issue 26: a token-less update set checkpoint_bytes, and a
    redelivered copy skipped everything below it."""
    job_id = new_job_id()
    r = post(vma_server, job_id, migratekit_update(10, disk_id="disk-2000", **{field: value}), headers={})
    assert r.status_code == 403 and field in r.json()["error"] and "bearer token" in r.json()["error"]
    assert vma_store.get(job_id) is None


def test_a_token_less_update_never_changes_an_entry_of_our_own_copy(vma_server, vma_store):
    job_id = new_job_id()
    ours = disk_update(1, 100, disk_id="disk-2000", attempt=1, checkpoint_bytes=64, worker="vma:1")
    assert post(vma_server, job_id, ours).json()["applied"]
    for body in (migratekit_update(900, disk_id="disk-2000"),
                 {"stage": "Completed", "status": "completed", "disk_id": "disk-2000"}):
        r = post(vma_server, job_id, body, headers={})
        assert r.status_code == 403 and "own copy" in r.json()["error"]
    entry = get(vma_server, job_id).json()["disks"]["disk-2000"]
    assert (entry["bytes_transferred"], entry["status"], entry["checkpoint_bytes"]) == (100, "in_progress", 64)

    # A token-less "completed" on a disk our copy has not reported yet does
    # not lock the copy's own updates out, and the OMA poller skips it.
    r = post(vma_server, job_id, {"stage": "Completed", "status": "completed", "disk_id": "disk-2001"}, headers={})
    assert r.json()["applied"] and get(vma_server, job_id).json()["disks"]["disk-2001"]["loopback"] is True
    assert post(vma_server, job_id, disk_update(2, 5, disk_id="disk-2001", attempt=1)).json()["applied"]
    assert "loopback" not in get(vma_server, job_id).json()["disks"]["disk-2001"]


def test_a_seq_far_ahead_of_the_clock_is_refused_and_cannot_freeze_progress(vma_server, vma_store):
    """Finding 2: one forged update with a huge seq froze the real progress."""
    job_id = new_job_id()
    now_us = time.time_ns() // 1000
    for seq in (2**53 - 1, now_us + 3600 * 10**6):
        r = post(vma_server, job_id, disk_update(seq, 999, disk_id="disk-2000", attempt=1))
        assert r.status_code == 400 and "ahead of this agent's clock" in r.json()["error"]
    assert vma_store.get(job_id) is None
    # What the window lets through holds the same run back a minute at most,
    # and a new attempt (a restarted run) reports at once whatever was stored.
    assert post(vma_server, job_id, disk_update(now_us + 50 * 10**6, 999, disk_id="disk-2000",
                                                attempt=1)).json()["applied"]
    assert not post(vma_server, job_id, disk_update(now_us + 1, 10, disk_id="disk-2000", attempt=1)).json()["applied"]
    assert post(vma_server, job_id, disk_update(time.time_ns() // 1000, 20, disk_id="disk-2000",
                                                attempt=2)).json()["applied"]
    assert get(vma_server, job_id).json()["disks"]["disk-2000"]["bytes_transferred"] == 20


@pytest.mark.parametrize("body,reason", [
    (disk_update(1, 1, throughput_bps=999999999999), "throughput_bps is larger than"),
    (disk_update(1, 1, total=2**60), "total_bytes is larger than"),
    (disk_update(1, 1, eta_seconds=2**40), "eta_seconds is larger than"),
])
def test_numbers_an_update_shows_are_bounded(vma_server, vma_store, body, reason):
    job_id = new_job_id()
    r = post(vma_server, job_id, body)
    assert r.status_code == 400 and reason in r.json()["error"]
    assert vma_store.get(job_id) is None


def test_bytes_beyond_the_disks_stored_total_are_refused(vma_server):
    job_id = new_job_id()
    assert post(vma_server, job_id, disk_update(1, 10, total=1000, disk_id="disk-2000")).json()["applied"]
    later = {"stage": "Transfer", "seq": 2, "bytes_transferred": 5000, "disk_id": "disk-2000"}
    r = post(vma_server, job_id, later)
    assert r.status_code == 400 and "stored total_bytes" in r.json()["error"]
    assert get(vma_server, job_id).json()["disks"]["disk-2000"]["bytes_transferred"] == 10


def test_the_feed_needs_the_token_even_from_trusted_loopback(vma_server):
    """It lists every job id."""
    r = requests.get(f"{vma_server}/api/v1/progress", timeout=10)
    assert r.status_code == 401
    assert requests.get(f"{vma_server}/api/v1/progress", headers=auth(), timeout=10).status_code == 200


def control_call(base, path, body, headers):
    return requests.post(f"{base}/api/v1/jobs/{path}", data=body, headers=headers, timeout=10)


@pytest.mark.parametrize("action,body", [("stop", '{"reason": "forged"}'), ("limit", '{"bytes_per_s": 1}')])
def test_control_needs_the_token_json_and_no_foreign_origin(vma_server, action, body):
    """Finding 2: a page on another site posted text/plain (no preflight) to
    stop and limit, and any local process could without a token."""
    from vma_agent.api import _control

    job_id = new_job_id()
    json_type = {"Content-Type": "application/json"}
    refused = [
        (401, json_type),  # token-less from loopback: never enough for control
        (403, {"Content-Type": "text/plain", "Origin": "http://evil.example"}),  # the browser's simple request
        (403, {**json_type, "Origin": "http://evil.example", **auth()}),  # even with the token
        (403, {**json_type, "Origin": "null", **auth()}),
        (403, {**json_type, "Sec-Fetch-Site": "cross-site", **auth()}),
        (415, {"Content-Type": "text/plain", **auth()}),
        (415, auth()),
    ]
    for status, headers in refused:
        r = control_call(vma_server, f"{job_id}/{action}", body, headers)
        assert r.status_code == status, (headers, r.text)
        assert r.headers["Content-Type"] == "application/json" and r.json()["error"]
    assert _control().stop_reason(job_id) is None and _control().limit(job_id) == (False, None)
    assert requests.get(f"{vma_server}/api/v1/jobs/{job_id}/limit", timeout=10).status_code == 401

    own = vma_server.split("://", 1)[1]
    r = control_call(vma_server, f"{job_id}/{action}", body, {**json_type, **auth(), "Origin": f"http://{own}"})
    assert r.status_code == 200, r.text
    assert _control().stop_reason(job_id) == "forged" if action == "stop" else _control().limit(job_id) == (True, 1)


def test_an_update_from_a_page_of_another_site_is_refused(vma_server, vma_store):
    job_id = new_job_id()
    r = post(vma_server, job_id, migratekit_update(10, disk_id="disk-2000"),
             headers={"Origin": "https://evil.example"})
    assert r.status_code == 403
    r = requests.post(f"{vma_server}/api/v1/progress/{job_id}/update", data=json.dumps(migratekit_update(1)),
                      headers={"Content-Type": "text/plain"}, timeout=10)
    assert r.status_code == 415
    assert vma_store.get(job_id) is None


def test_openapi_describes_every_path(vma_server):
    doc = requests.get(f"{vma_server}/api/v1/openapi.json", timeout=10).json()
    assert doc["openapi"].startswith("3.")
    assert set(doc["paths"]) == {"/api/v1/progress/{id}/update", "/api/v1/progress/{id}", "/api/v1/progress",
                                 "/api/v1/status/{id}", "/api/v1/jobs/{id}/stop", "/api/v1/jobs/{id}/limit",
                                 "/api/v1/health",
                                 "/api/v1/openapi.json"}
    schemas = doc["components"]["schemas"]
    assert "seq" in schemas["ProgressUpdate"]["required"]
    assert schemas["MigratekitProgressUpdate"]["required"] == ["stage"]
    assert "seq" not in schemas["MigratekitProgressUpdate"]["properties"]
    for name in ("checkpoint_bytes", "attempt", "worker"):
        assert name in schemas["ProgressUpdate"]["properties"]
    for path, methods in doc["paths"].items():
        for operation in methods.values():
            assert "405" in operation["responses"], path


@pytest.mark.parametrize("body,reason", [
    (disk_update(1, 1001, percent=50.0), "bytes_transferred is larger than total_bytes"),
    (disk_update(1, -1), "must not be negative"),
    (disk_update(1, 1, percent=100.5), "percent must be between 0 and 100"),
    (disk_update(1, 1, stage="Copying"), "unknown stage"),
    (disk_update(1, 1, status="running"), "unknown status"),
    (disk_update("1", 1), "seq must be an integer"),
    (disk_update(1, 1, colour="red"), "unknown fields: colour"),
    (disk_update(1, 1, bytes_transferred=True), "must be an integer"),
    ({"status": "in_progress", "seq": 1}, "stage is required"),
    (disk_update(1, 1, attempt=0), "attempt must be 1 or more"),
    (disk_update(1, 1, worker="w" * 201), "worker is longer than 200"),
    (disk_update(1, 1, checkpoint_bytes=-1), "checkpoint_bytes must not be negative"),
    ([1, 2], "must be a JSON object"),
])
def test_invalid_bodies_are_refused_with_the_reason_and_not_stored(vma_server, vma_store, body, reason):
    job_id = new_job_id()
    r = post(vma_server, job_id, body)
    assert r.status_code == 400
    assert reason in r.json()["error"]
    assert vma_store.get(job_id) is None


def test_oversize_body_is_413(vma_server, vma_store):
    job_id = new_job_id()
    body = disk_update(1, 1, error_message="x" * 3000)
    raw = json.dumps(body) + " " * MAX_BODY_BYTES
    r = post(vma_server, job_id, None, raw=raw)
    assert r.status_code == 413 and "limit" in r.json()["error"]
    assert vma_store.get(job_id) is None


def test_api_with_no_token_configured_refuses_all_but_trusted_loopback(rf, settings, vma_store):
    from vma_agent import api

    settings.VMA_TOKEN = ""
    settings.VMA_TRUST_LOOPBACK = True
    for request in (rf.get("/api/v1/progress/x", HTTP_AUTHORIZATION="Bearer "),
                    rf.get("/api/v1/progress/x", REMOTE_ADDR="10.1.2.3"),
                    rf.get("/api/v1/progress/x", HTTP_X_FORWARDED_FOR="10.1.2.3")):
        response = api.get_progress(request, "x")
        assert response.status_code == 503
        assert b"VMA_TOKEN is not set" in response.content
    assert api.get_progress(rf.get("/api/v1/progress/x"), "x").status_code == 404  # REMOTE_ADDR 127.0.0.1
    settings.VMA_TRUST_LOOPBACK = False
    assert api.get_progress(rf.get("/api/v1/progress/x"), "x").status_code == 503


@pytest.mark.parametrize("address,trusted", [("127.0.0.1", True), ("127.8.9.10", True), ("::1", True),
                                             ("::ffff:127.0.0.1", True), ("10.1.2.3", False),
                                             ("192.168.1.5", False), ("::ffff:10.1.2.3", False),
                                             ("2001:db8::1", False), ("", False), ("localhost", False)])
def test_only_loopback_addresses_are_trusted_without_a_token(rf, settings, vma_store, address, trusted):
    from vma_agent import api

    settings.VMA_TRUST_LOOPBACK = True
    response = api.get_progress(rf.get("/api/v1/progress/x", REMOTE_ADDR=address), "x")
    assert response.status_code == (404 if trusted else 401)
    # With the right token the address does not matter.
    response = api.get_progress(rf.get("/api/v1/progress/x", REMOTE_ADDR=address,
                                       HTTP_AUTHORIZATION=f"Bearer {settings.VMA_TOKEN}"), "x")
    assert response.status_code == 404


def test_loopback_trust_is_off_unless_configured(rf, settings, vma_store):
    from vma_agent import api

    assert settings.VMA_TRUST_LOOPBACK is False
    assert api.get_progress(rf.get("/api/v1/progress/x"), "x").status_code == 401
    assert api.get_progress(rf.get("/api/v1/progress/x", HTTP_AUTHORIZATION=f"Bearer {settings.VMA_TOKEN}"),
                            "x").status_code == 404


@pytest.mark.parametrize("method,path", [("put", "/api/v1/progress/x/update"), ("get", "/api/v1/progress/x/update"),
                                         ("delete", "/api/v1/progress/x"), ("post", "/api/v1/progress/x"),
                                         ("post", "/api/v1/progress"), ("post", "/api/v1/health"),
                                         ("patch", "/api/v1/status/x"), ("delete", "/api/v1/openapi.json")])
def test_wrong_methods_are_a_json_405_not_a_csrf_page(vma_server, method, path):
    r = requests.request(method, f"{vma_server}{path}", headers=auth(), timeout=10, data=b"{}")
    assert r.status_code == 405
    assert r.headers["Content-Type"] == "application/json" and r.json()["error"] and r.headers["Allow"]


def test_deeply_nested_json_is_a_400_not_a_500(vma_server, vma_store):
    job_id = new_job_id()
    for raw in ("[" * 10000, "{\"a\":" * 2500 + "1" + "}" * 2500):
        r = post(vma_server, job_id, None, raw=raw)
        assert r.status_code == 400 and "JSON" in r.json()["error"]
    assert vma_store.get(job_id) is None


def test_health_answers_while_the_store_does_and_503_when_it_does_not(vma_server, rf, settings):
    from vma_agent import api

    r = requests.get(f"{vma_server}/api/v1/health", timeout=10)
    assert r.status_code == 200 and r.json()["status"] == "ok"
    # No token needed, from anywhere.
    assert api.health(rf.get("/api/v1/health", REMOTE_ADDR="10.1.2.3")).status_code == 200
    from tests.helpers import free_port

    settings.VMA_REDIS_URL = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    response = api.health(rf.get("/api/v1/health"))
    assert response.status_code == 503 and json.loads(response.content)["status"] == "unavailable"


def test_status_summarises_a_job_and_404s_an_unknown_one(vma_server):
    job_id = new_job_id()
    post(vma_server, job_id, disk_update(1, 500, disk_id="disk-2000", sync_type="full"))
    r = requests.get(f"{vma_server}/api/v1/status/{job_id}", headers=auth(), timeout=10)
    assert r.status_code == 200
    assert r.json() | {"last_update": None} == {
        "id": job_id, "job_id": job_id, "status": "in_progress", "sync_type": "full", "phase": "Transfer",
        "percentage": 65.0, "current_operation": "Transfer", "bytes_transferred": 500, "total_bytes": 1000,
        "last_update": None}
    assert requests.get(f"{vma_server}/api/v1/status/{new_job_id()}", headers=auth(), timeout=10).status_code == 404
    assert requests.get(f"{vma_server}/api/v1/status/a%20b", headers=auth(), timeout=10).status_code == 400


# --- generated malformed bodies ------------------------------------------------

_valid = st.fixed_dictionaries({
    "stage": st.just("Transfer"), "status": st.just("in_progress"), "seq": st.integers(1, 2**40),
    "total_bytes": st.just(1000), "bytes_transferred": st.integers(0, 1000),
})
_junk = st.one_of(st.none(), st.booleans(), st.floats(allow_nan=True), st.text(max_size=20),
                  st.integers(-2**63, 2**64), st.lists(st.integers(), max_size=3),
                  st.dictionaries(st.text(max_size=5), st.integers(), max_size=2))
_fields = ["stage", "status", "seq", "total_bytes", "bytes_transferred", "percent", "throughput_bps", "disk_id",
           "sync_type", "error_message", "job_id", "export_name"]


@st.composite
def malformed_bodies(draw):
    """A valid update broken in one or more ways."""
    body = dict(draw(_valid))
    breakage = draw(st.sampled_from(["junk", "missing", "unknown", "bytes", "percent", "not-object", "huge"]))
    if breakage == "junk":
        name = draw(st.sampled_from(_fields))
        value = draw(_junk)
        body[name] = value
        try:  # keep only breakages the contract refuses
            validate_update(body)
            body[name] = {"not": "valid"}
        except InvalidUpdate:
            pass
    elif breakage == "missing":
        del body["stage"]  # the only required field
    elif breakage == "unknown":
        body[draw(st.text(min_size=1, max_size=10).filter(lambda k: k not in _fields))] = 1
    elif breakage == "bytes":
        body["bytes_transferred"] = 1000 + draw(st.integers(1, 10**9))
    elif breakage == "percent":
        body["percent"] = draw(st.one_of(st.floats(max_value=-0.001), st.floats(min_value=100.001),
                                         st.just(float("nan")), st.just(float("inf"))))
    elif breakage == "not-object":
        return json.dumps(draw(st.one_of(st.lists(st.integers()), st.text(), st.integers(), st.none())))
    elif breakage == "huge":
        body["error_message"] = "x" * draw(st.integers(4001, 20000))
    return json.dumps(body)


@pytest.fixture(scope="module")
def fuzz_run(vma_server):
    """The fuzzed id, and how many keys the store held before the fuzzing."""
    from vma_agent.api import get_store

    return new_job_id(), get_store().count_keys()


@hsettings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(raw=malformed_bodies())
def test_generated_malformed_bodies_are_all_refused(vma_server, fuzz_run, raw):
    r = post(vma_server, fuzz_run[0], None, raw=raw)
    assert 400 <= r.status_code < 500, (r.status_code, raw[:200])
    assert "error" in r.json()


def test_nothing_was_stored_by_the_malformed_bodies(vma_server, fuzz_run, vma_store):
    job_id, keys_before = fuzz_run
    assert get(vma_server, job_id).status_code == 404
    assert vma_store.count_keys() == keys_before


def test_a_stop_request_needs_a_reason_and_reaches_the_agents_copies(vma_server, settings):
    from vma_agent.control import AgentControl

    job_id = new_job_id()
    url = f"{vma_server}/api/v1/jobs/{job_id}/stop"
    # Control takes JSON only (a form or text/plain is what a browser posts cross-site).
    auth = {"Authorization": f"Bearer {settings.VMA_TOKEN}", "Content-Type": "application/json"}
    assert requests.post(url, json={}, headers=auth, timeout=10).status_code == 400
    assert requests.post(url, data=b"[" * 10_000, headers=auth, timeout=10).status_code == 400
    assert requests.get(url, headers=auth, timeout=10).status_code == 405
    response = requests.post(url, json={"reason": "cancelled by the operator"}, headers=auth, timeout=10)
    assert response.status_code == 200 and response.json() == {"job_id": job_id, "stopping": True}
    control = AgentControl.from_url(settings.VMA_REDIS_URL, prefix=f"{settings.VMA_PROGRESS_PREFIX}:control")
    assert control.stop_reason(job_id) == "cancelled by the operator"


def test_a_jobs_limit_is_changed_through_the_agent_api_and_bad_limits_are_refused(vma_server, settings):
    from vma_agent.control import AgentControl

    job_id = new_job_id()
    url = f"{vma_server}/api/v1/jobs/{job_id}/limit"
    auth = {"Authorization": f"Bearer {settings.VMA_TOKEN}", "Content-Type": "application/json"}
    assert requests.get(url, headers=auth, timeout=10).json() == {
        "job_id": job_id, "bytes_per_s": None, "changed": False, "applied": {}}
    for bad in (None, {}, {"bytes_per_s": 0}, {"bytes_per_s": -5}, {"bytes_per_s": "60M"}, {"bytes_per_s": True},
                {"bytes_per_s": 1.5}, [1]):
        response = requests.post(url, json=bad, headers=auth, timeout=10)
        assert response.status_code == 400 and "bytes_per_s" in response.json()["error"], bad
    assert requests.post(url, data=b"{", headers=auth, timeout=10).status_code == 400
    assert requests.post(url, json={"bytes_per_s": 1}, timeout=10, headers={"Authorization": "Bearer x"}
                         ).status_code == 401
    assert requests.put(url, json={"bytes_per_s": 1}, headers=auth, timeout=10).status_code == 405
    control = AgentControl.from_url(settings.VMA_REDIS_URL, prefix=f"{settings.VMA_PROGRESS_PREFIX}:control")
    assert control.limit(job_id) == (False, None)  # nothing refused was stored

    response = requests.post(url, json={"bytes_per_s": 60 * 1024 * 1024}, headers=auth, timeout=10)
    assert response.status_code == 200 and response.json()["bytes_per_s"] == 60 * 1024 * 1024
    assert control.limit(job_id) == (True, 60 * 1024 * 1024)
    control.limit_applied(job_id, "disk-2000", 60 * 1024 * 1024)
    assert requests.get(url, headers=auth, timeout=10).json()["applied"] == {"disk-2000": 60 * 1024 * 1024}
    assert requests.post(url, json={"bytes_per_s": None}, headers=auth, timeout=10).json()["bytes_per_s"] is None
    assert control.limit(job_id) == (True, None)  # lifted: a change, not "unchanged"
