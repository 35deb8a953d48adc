"""MigrateKit OSSEA's wire format (shared/contracts/progress-wire.md) against the
real agent API (runserver process, real Redis): migratekit's
VMAProgressUpdate bodies, byte for byte as Go marshals them, are accepted
with and without a token from loopback; the GET answer decodes into
MigrateKit OSSEA's VMAProgressResponse with Go's types; the change feed returns what
changed after a cursor and nothing else."""

import json
import secrets

import pytest
import redis
import requests
from django.conf import settings

from tests.test_progress_api import auth
from vma_agent.client import ProgressClient
from vma_agent.progress_records.store import ProgressStore

pytestmark = pytest.mark.integration

# As migratekit's VMAProgressUpdate marshals (encoding/json, omitempty): the
# contract's three examples, a whole float64 (Go writes 12, not 12.0), every
# field, and the stages before and after the copy.
EXAMPLES = [
    b'{"stage":"Transfer","bytes_transferred":65536,"total_bytes":43253760,"throughput_bps":0,"percent":0.15,'
    b'"disk_id":"disk-2000","sync_type":"incremental"}',
    b'{"stage":"Transfer","bytes_transferred":0,"throughput_bps":0}',
    b'{"stage":"Transfer","status":"failed","bytes_transferred":1048576,"throughput_bps":0,'
    b'"error_message":"nbd read failed"}',
    b'{"stage":"Transfer","bytes_transferred":5190451,"total_bytes":43253760,"throughput_bps":2097152,"percent":12,'
    b'"disk_id":"disk-2000","sync_type":"full"}',
    b'{"stage":"Transfer","status":"in_progress","bytes_transferred":21626880,"total_bytes":43253760,'
    b'"throughput_bps":52428800,"percent":50,"disk_id":"disk-2001","sync_type":"incremental",'
    b'"error_message":"retrying a read"}',
    b'{"stage":"Creating Snapshot","bytes_transferred":0,"throughput_bps":0,"sync_type":"full"}',
    b'{"stage":"Completed","status":"completed","bytes_transferred":43253760,"total_bytes":43253760,'
    b'"throughput_bps":0,"percent":100,"disk_id":"disk-2000"}',
]
EVERY_FIELD = EXAMPLES[4]

# VMAProgressResponse as MigrateKit OSSEA's OMA decodes it.
INT, FLOAT, STR, BOOL, ANY = "int", "float64", "string", "bool", "any"
TIMES = {"start_time", "last_update", "phase_start", "end_time"}
RESPONSE = {
    "job_id": STR, "status": STR, "sync_type": STR, "phase": STR, "percentage": FLOAT, "current_operation": STR,
    "bytes_transferred": INT, "total_bytes": INT,
    "throughput": {"current_mbps": FLOAT, "average_mbps": FLOAT, "peak_mbps": FLOAT, "last_update": STR},
    "timing": {"start_time": STR, "last_update": STR, "elapsed_ms": INT, "eta_seconds": INT, "phase_start": STR,
               "phase_elapsed_ms": INT},
    "vm_info": {"name": STR, "path": STR, "disk_size_gb": INT, "disk_size_bytes": INT, "cbt_enabled": BOOL},
    "phases": [{"name": STR, "status": STR, "start_time": STR, "end_time": STR, "duration_ms": INT}],
    "errors": [ANY],
    "last_error": ANY,
}


def check_go_types(value, spec, path="$"):
    """Fail where Go's strict decoding into its OMA's struct would: an int
    key must be a JSON integer (not 12.0, not "12"), a float64 any number,
    a string a string; every key present."""
    if isinstance(spec, dict):
        assert isinstance(value, dict), f"{path}: object expected, got {value!r}"
        for key, inner in spec.items():
            assert key in value, f"{path}.{key} missing"
            check_go_types(value[key], inner, f"{path}.{key}")
    elif isinstance(spec, list):
        assert isinstance(value, list), f"{path}: array expected, got {value!r}"
        for i, item in enumerate(value):
            check_go_types(item, spec[0], f"{path}[{i}]")
    elif spec == INT:
        assert type(value) is int, f"{path}: JSON integer expected, got {value!r}"
    elif spec == FLOAT:
        assert type(value) in (int, float), f"{path}: number expected, got {value!r}"
    elif spec == STR:
        assert type(value) is str, f"{path}: string expected, got {value!r}"
        if path.rsplit(".", 1)[-1] in TIMES and value:
            assert value.endswith("Z") and "T" in value, f"{path}: RFC 3339 expected, got {value!r}"
    elif spec == BOOL:
        assert type(value) is bool, f"{path}: bool expected, got {value!r}"


def migratekit_job_id():
    return f"job-20250925-134230.513-{secrets.token_hex(3)}"


def post_raw(base, job_id, raw, token):
    headers = {"Content-Type": "application/json"} | (auth() if token else {})
    return requests.post(f"{base}/api/v1/progress/{job_id}/update", data=raw, headers=headers, timeout=5)


def get_record(base, job_id, token=False):
    return requests.get(f"{base}/api/v1/progress/{job_id}", headers=auth() if token else {}, timeout=10)


@pytest.mark.parametrize("token", [False, True], ids=["token-less-loopback", "bearer-token"])
@pytest.mark.parametrize("raw", EXAMPLES, ids=range(len(EXAMPLES)))
def test_each_migratekit_body_is_accepted_and_read_back_in_the_ossea_omas_types(vma_server, raw, token):
    job_id = migratekit_job_id()
    r = post_raw(vma_server, job_id, raw, token)
    assert r.status_code == 200, r.text
    assert r.json()["applied"] is True and r.json()["id"] == job_id
    answer = get_record(vma_server, job_id, token)
    assert answer.status_code == 200
    record = answer.json()
    check_go_types(record, RESPONSE)
    sent = json.loads(raw)
    assert record["job_id"] == job_id
    assert record["sync_type"] == sent.get("sync_type", "")
    entry = record["disks"][sent["disk_id"]] if "disk_id" in sent else record["job"]
    for key, value in sent.items():
        assert entry[key] == value, key
    if "status" not in sent:
        assert entry["status"] == ("completed" if sent["stage"] == "Completed" else "in_progress")
    assert type(entry["seq"]) is int and entry["seq"] > 0


def test_every_field_lands_in_the_answer(vma_server):
    job_id = migratekit_job_id()
    assert post_raw(vma_server, job_id, EXAMPLES[5], token=False).ok  # Creating Snapshot, job-level
    assert post_raw(vma_server, job_id, EVERY_FIELD, token=False).ok
    record = get_record(vma_server, job_id).json()
    check_go_types(record, RESPONSE)
    assert record["status"] == "in_progress" and record["phase"] == "Transfer"
    assert record["bytes_transferred"] == 21626880 and record["total_bytes"] == 43253760
    assert record["percentage"] == 65.0  # Transfer maps the copy's 50 % to 30..100
    assert record["throughput"]["current_mbps"] == pytest.approx(52.4288)
    assert record["throughput"]["peak_mbps"] == pytest.approx(52.4288)
    assert record["vm_info"]["cbt_enabled"] is True and record["sync_type"] == "incremental"
    assert [p["name"] for p in record["phases"]] == ["Creating Snapshot", "Transfer"]
    assert [p["status"] for p in record["phases"]] == ["completed", "in_progress"]
    assert record["phases"][0]["end_time"] == record["phases"][1]["start_time"]
    assert record["phases"][1]["end_time"] == ""
    assert record["errors"] == ["disk-2001: retrying a read"] and record["last_error"] == "disk-2001: retrying a read"
    assert record["timing"]["eta_seconds"] == (43253760 - 21626880) // 52428800  # 0: under a second left


def test_sync_type_and_total_are_never_lost_between_update_and_read(vma_server):
    """MigrateKit OSSEA's bug: a later update without sync_type wiped it."""
    job_id = migratekit_job_id()
    assert post_raw(vma_server, job_id, EXAMPLES[0], token=False).ok
    later = (b'{"stage":"Transfer","bytes_transferred":131072,"throughput_bps":1048576,"percent":0.3,'
             b'"disk_id":"disk-2000"}')
    assert post_raw(vma_server, job_id, later, token=False).ok
    record = get_record(vma_server, job_id).json()
    assert record["sync_type"] == "incremental"
    disk = record["disks"]["disk-2000"]
    assert disk["sync_type"] == "incremental" and disk["total_bytes"] == 43253760
    assert disk["bytes_transferred"] == 131072
    status = requests.get(f"{vma_server}/api/v1/status/{job_id}", timeout=5).json()
    assert status["sync_type"] == "incremental" and status["phase"] == "Transfer"


def test_updates_without_seq_apply_in_arrival_order_and_mixing_never_moves_back(vma_server):
    job_id = migratekit_job_id()

    def send(body, token=False):
        return post_raw(vma_server, job_id, json.dumps(body).encode(), token).json()

    def refused(body):
        r = post_raw(vma_server, job_id, json.dumps(body).encode(), token=False)
        return r.status_code == 403 and "own copy" in r.json()["error"]

    first = send({"stage": "Transfer", "bytes_transferred": 10, "total_bytes": 1000, "throughput_bps": 0,
                  "disk_id": "disk-2000"})
    second = send({"stage": "Transfer", "bytes_transferred": 20, "throughput_bps": 0, "disk_id": "disk-2000"})
    assert first["applied"] and second["applied"] and second["seq"] == first["seq"] + 1
    # Our reporter's seq (microseconds) still wins over the seq-less chain...
    ours = send({"stage": "Transfer", "status": "in_progress", "seq": second["seq"] + 10, "disk_id": "disk-2000",
                 "bytes_transferred": 30, "total_bytes": 1000, "checkpoint_bytes": 16, "attempt": 2,
                 "worker": "vma-1:4242"}, token=True)
    assert ours["applied"] and ours["seq"] == second["seq"] + 10
    # ... a seq-less update after it goes on from there (a token-less one no
    # longer changes the disk: our copy reports it) ...
    assert refused({"stage": "Transfer", "bytes_transferred": 35, "throughput_bps": 0, "disk_id": "disk-2000"})
    after = send({"stage": "Transfer", "bytes_transferred": 40, "throughput_bps": 0, "disk_id": "disk-2000"},
                 token=True)
    assert after["applied"] and after["seq"] == ours["seq"] + 1
    # ... and a late seq'd update never moves the disk back.
    late = send({"stage": "Transfer", "status": "in_progress", "seq": ours["seq"], "disk_id": "disk-2000",
                 "bytes_transferred": 25, "total_bytes": 1000}, token=True)
    assert late["applied"] is False
    disk = get_record(vma_server, job_id).json()["disks"]["disk-2000"]
    assert disk["bytes_transferred"] == 40 and disk["seq"] == after["seq"]
    # Our agent's extra fields are kept as given by the update that sent them.
    assert "attempt" not in disk
    send({"stage": "Transfer", "status": "in_progress", "seq": after["seq"] + 1, "disk_id": "disk-2000",
          "bytes_transferred": 50, "total_bytes": 1000, "checkpoint_bytes": 48, "attempt": 3, "worker": "vma-2:7"},
         token=True)
    disk = get_record(vma_server, job_id).json()["disks"]["disk-2000"]
    assert (disk["checkpoint_bytes"], disk["attempt"], disk["worker"]) == (48, 3, "vma-2:7")


# --- the change feed ------------------------------------------------------------


def feed(base, since, token=True, **params):
    r = requests.get(f"{base}/api/v1/progress", params={"since": since, **params},
                     headers=auth() if token else {}, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def test_the_feed_returns_only_what_changed_after_the_cursor(vma_server):
    ours = [migratekit_job_id() for _ in range(3)]
    for job_id in ours:
        assert post_raw(vma_server, job_id, EXAMPLES[0], token=False).ok
    everything = feed(vma_server, 0)
    assert set(ours) <= {r["id"] for r in everything["records"]}
    cursor = everything["cursor"]

    # A fresh cursor with no change: no records.
    quiet = feed(vma_server, cursor, token=True)
    assert quiet["records"] == [] and quiet["cursor"] == cursor and quiet["epoch"] == everything["epoch"]

    # One job changed twice, another once: each comes once, in its latest state.
    body = b'{"stage":"Transfer","bytes_transferred":%d,"throughput_bps":0,"disk_id":"disk-2000"}'
    for done in (70000, 80000):
        assert post_raw(vma_server, ours[0], body % done, token=False).ok
    assert post_raw(vma_server, ours[2], body % 90000, token=True).ok
    changed = feed(vma_server, cursor)
    mine = [r for r in changed["records"] if r["id"] in ours]
    assert [r["id"] for r in mine] == [ours[0], ours[2]]
    assert mine[0]["disks"]["disk-2000"]["bytes_transferred"] == 80000
    for record in mine:
        check_go_types(record, RESPONSE)
    assert changed["cursor"] > cursor
    assert [r for r in feed(vma_server, changed["cursor"])["records"] if r["id"] in ours] == []


def test_the_feed_client_pages_and_its_bad_parameters_are_400(vma_server):
    client = ProgressClient(vma_server, settings.VMA_TOKEN)  # the feed lists every job id: the token only
    _, start = client.changes(0)
    ours = [migratekit_job_id() for _ in range(5)]
    for job_id in ours:
        assert post_raw(vma_server, job_id, EXAMPLES[1], token=False).ok
    page = client.changes_page(start, limit=2)
    assert page["more"] is True and len(page["records"]) == 2
    records, cursor = client.changes(start)
    assert [r["id"] for r in records if r["id"] in ours] == ours and cursor > start
    assert client.changes(cursor) == ([], cursor)
    for params in ({"since": "-1"}, {"since": "x"}, {"since": "1e3"}, {"limit": "0"}, {"limit": "100001"}):
        r = requests.get(f"{vma_server}/api/v1/progress", params=params, headers=auth(), timeout=5)
        assert r.status_code == 400 and r.json()["error"]


@pytest.fixture
def own_store():
    """A store under a prefix of its own on the test Redis (for what the API
    cannot do on demand: a record's time to live running out)."""
    store = ProgressStore(redis.Redis.from_url(settings.VMA_REDIS_URL), prefix=f"wire-test:{secrets.token_hex(4)}")
    yield store
    for key in store.client.scan_iter(f"{store.prefix}:*"):
        store.client.delete(key)


def test_expired_records_drop_out_of_the_feed(own_store):
    from vma_agent.progress_records.schema import parse_update

    jobs = [migratekit_job_id() for _ in range(3)]
    for job_id in jobs:
        own_store.apply(job_id, parse_update(EXAMPLES[0]))
    first = own_store.changes(0)
    assert [r["id"] for r in first.records] == jobs
    # The two least recently updated records' TTL runs out (as Redis would).
    own_store.client.delete(own_store._record_key(jobs[0]), own_store._record_key(jobs[1]))
    again = own_store.changes(0)
    assert [r["id"] for r in again.records] == [jobs[2]]
    assert again.expired == jobs[:2] and again.epoch == first.epoch
    assert own_store.changes(0).expired == []  # reported once, then gone from the feed
    assert own_store.client.zcard(own_store._feed_keys()[1]) == 1


def test_an_emptied_store_has_a_new_epoch(own_store):
    from vma_agent.progress_records.schema import parse_update

    own_store.apply(migratekit_job_id(), parse_update(EXAMPLES[0]))
    before = own_store.changes(0)
    for key in own_store.client.scan_iter(f"{own_store.prefix}:*"):
        own_store.client.delete(key)
    after = own_store.changes(before.cursor)
    assert after.epoch != before.epoch and after.records == [] and after.cursor == 0
