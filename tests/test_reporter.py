"""The copy loop's reporter against real HTTP servers: a slow or dead progress
API never slows the copy loop, newer updates supersede waiting ones,
failures are retried with backoff, and the latest state gets through."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.helpers import free_port, wait_until
from vma_agent.client import ProgressClient
from vma_agent.progress import CopyProgress
from vma_agent.reporter import DiskReporter, LatestUpdateSender, MovingRate


class RecordingAPI:
    """A stand-in progress API on a real socket that records what it gets,
    answering after `delay_s` (a slow agent) or with `status`."""

    def __init__(self, port=None, delay_s=0.0, status=200, gate: threading.Event | None = None):
        self.bodies = []
        self.delay_s = delay_s
        self.status = status
        self.gate = gate  # when given, every answer waits until it is set
        self.held = threading.Event()  # a request arrived and is being held at the gate
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if api.gate is not None:
                    api.held.set()
                    api.gate.wait(30)
                time.sleep(api.delay_s)
                if api.status == 200:
                    api.bodies.append(body)
                self.send_response(api.status)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b'{"applied": true}')

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port or 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def held_api():
    """An API that holds every request until the test lets it answer."""
    api = RecordingAPI(gate=threading.Event())
    yield api
    api.gate.set()
    api.stop()


def test_a_stalled_api_never_holds_the_copy_loop_and_only_the_latest_is_sent(held_api):
    reporter = DiskReporter(ProgressClient(held_api.url, "t"), "job-1", "disk-2000")
    reporter(CopyProgress(0, 1000, 0.01))
    assert held_api.held.wait(10), "the first update never reached the API"
    # The API holds that request and answers nothing: the copy loop goes on all the same.
    for done in range(10, 1001, 10):
        reporter(CopyProgress(done, 1000, 0.01 * (done + 1)))
    assert held_api.bodies == [] and not held_api.gate.is_set()
    held_api.gate.set()
    assert reporter.close(timeout_s=5)
    assert reporter.sender.superseded > 90
    assert held_api.bodies[-1]["bytes_transferred"] == 1000
    seqs = [b["seq"] for b in held_api.bodies]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)


def test_a_dead_api_is_retried_with_backoff_and_gets_the_latest_once_back():
    port = free_port()
    sender = LatestUpdateSender(ProgressClient(f"http://127.0.0.1:{port}", "t", timeout_s=1), "job-2",
                                backoff_s=0.2, max_backoff_s=0.4)
    for seq in range(1, 6):
        sender.offer({"stage": "Transfer", "status": "in_progress", "seq": seq})
    wait_until(lambda: sender.failures >= 2, 10, "the sender to keep retrying, backing off")
    assert sender.sent == 0
    api = RecordingAPI(port=port)
    try:
        wait_until(lambda: api.bodies, 5, "the update once the API is back")
        assert sender.close(timeout_s=5), "the waiting update was not delivered after the API came back"
    finally:
        api.stop()
    assert [b["seq"] for b in api.bodies] == [5]


def test_closing_on_a_dead_api_does_not_wait_and_the_update_still_goes_out_once_back():
    """A workflow step closes its reporter before the next step: with the API
    down, close() used to wait its whole timeout (three 2 s hops per job)."""
    port = free_port()
    sender = LatestUpdateSender(ProgressClient(f"http://127.0.0.1:{port}", "t", timeout_s=1), "job-2b",
                                backoff_s=0.2, max_backoff_s=0.4)
    sender.offer({"stage": "Transfer", "status": "completed", "seq": 7})
    # Were close() to wait for delivery, this would outlast the test's timeout.
    assert not sender.close(timeout_s=3600)
    assert sender.failures >= 1
    api = RecordingAPI(port=port)
    try:
        wait_until(lambda: api.bodies, 5, "the closed sender's update once the API is back")
    finally:
        api.stop()
    assert [b["seq"] for b in api.bodies] == [7], "the closed sender gave up on its last update"


def test_a_refused_update_is_dropped_not_retried():
    api = RecordingAPI(status=400)
    try:
        sender = LatestUpdateSender(ProgressClient(api.url, "t"), "job-3")
        sender.offer({"stage": "Transfer", "status": "in_progress", "seq": 1})
        assert sender.close(timeout_s=5)
        assert sender.refused == 1 and sender.failures == 0
    finally:
        api.stop()


@pytest.fixture
def api():
    api = RecordingAPI()
    yield api
    api.stop()


def test_reporter_sends_stages_then_transfer_with_moving_throughput_and_eta(api):
    reporter = DiskReporter(ProgressClient(api.url, "t"), "job-4", "disk-2001",
                            export_name="migration-vol-00000000-0000-0000-0000-000000000001", sync_type="full")
    reporter.stage("Setting up NBD")
    assert reporter.close(timeout_s=5)
    reporter = DiskReporter(ProgressClient(api.url, "t"), "job-4", "disk-2001")
    reporter(CopyProgress(500, 1000, 5.0))
    reporter.close(timeout_s=5)
    first, last = api.bodies[0], api.bodies[-1]
    assert first["stage"] == "Setting up NBD" and first["export_name"].startswith("migration-vol-")
    assert last["stage"] == "Transfer" and last["throughput_bps"] == 100 and last["eta_seconds"] == 5


def test_moving_rate_follows_the_recent_speed():
    rate = MovingRate(window_s=4)
    for t in range(0, 11):  # 100 B/s for 10 s
        rate.add(float(t), 100 * t)
    for t in range(11, 16):  # then 1000 B/s
        value = rate.add(float(t), 1000 + 1000 * (t - 10))
    assert value > 700, "the average still reflects the old speed"
