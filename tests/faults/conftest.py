import threading

import pytest
import redis
from django.conf import settings
from django.db import DatabaseError, connection

from replication.targets import get_provider
from tests.faults.harness import WorkerProcess, leftovers, reset_dir

# The test process runs the reaper; workers see the same short thresholds.
HEARTBEAT_TIMEOUT_S = 3
FAULT_ENV = {"HEARTBEAT_TIMEOUT_S": str(HEARTBEAT_TIMEOUT_S)}


@pytest.fixture(autouse=True)
def fault_case(settings, vma_server):
    """Each case starts from an empty broker and data plane and ends with its
    workers and the export server stopped."""
    redis.Redis.from_url(settings.CELERY_BROKER_URL).flushdb()
    get_provider().stop_export_server()
    reset_dir(settings.OMA_VOLUME_DIR)
    settings.HEARTBEAT_TIMEOUT_S = HEARTBEAT_TIMEOUT_S
    yield
    get_provider().stop_export_server()


@pytest.fixture
def workers():
    started: list[WorkerProcess] = []

    def start(name: str, concurrency: int = 2, queues: str = "", **env) -> WorkerProcess:
        worker = WorkerProcess(name, concurrency=concurrency, env={**FAULT_ENV, **env}, queues=queues)
        started.append(worker)
        return worker.start()

    yield start
    for worker in started:
        worker.kill()


class ReaperThread:
    """The reaper's periodic pass (beat's job) in a thread of the test process."""

    def __init__(self, interval_s: float = 0.5):
        from replication.services.reaper import reap

        self.results = []
        self.errors: list[Exception] = []
        self._stop = threading.Event()

        def run():
            try:
                while not self._stop.wait(interval_s):
                    try:
                        self.results.append(reap())
                    except DatabaseError as exc:  # as under beat: this pass fails, the next one runs
                        self.errors.append(exc)
                        connection.close()
            finally:
                connection.close()

        self._thread = threading.Thread(target=run, name="test-reaper", daemon=True)
        self._thread.start()

    def stop(self):
        self._stop.set()
        self._thread.join(30)


@pytest.fixture
def reaper_thread():
    thread = ReaperThread()
    yield thread
    thread.stop()


__all__ = ["leftovers", "settings"]
