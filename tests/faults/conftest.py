import threading

import pytest
import redis
from django.conf import settings
from django.db import DatabaseError, connection

from replication.platforms import get_provider
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


class Workers:
    """Starts the case's worker processes; all are killed at its end.
    workers(name, role=..., **env) starts one; workers.pair(name, ...) the
    OMA's worker and the local agent's, as on two hosts."""

    def __init__(self):
        self.started: list[WorkerProcess] = []

    def __call__(self, name: str, concurrency: int = 2, queues: str = "", role: str = "all",
                 **env) -> WorkerProcess:
        worker = WorkerProcess(name, concurrency=concurrency, env={**FAULT_ENV, **env}, queues=queues, role=role)
        self.started.append(worker)
        return worker.start()

    def agent(self, name: str, concurrency: int = 2, **env) -> WorkerProcess:
        """An agent worker: queue vma.local, no database."""
        return self(name, concurrency=concurrency, role="agent", **env)

    def oma(self, name: str, concurrency: int = 2, **env) -> WorkerProcess:
        """The OMA's worker: queue oma, the database."""
        return self(name, concurrency=concurrency, role="oma", **env)

    def pair(self, name: str, concurrency: int = 2, oma_env: dict | None = None,
             **env) -> tuple[WorkerProcess, WorkerProcess]:
        """The OMA's worker and an agent worker of `concurrency` copies; env
        goes to both, oma_env to the OMA's only (its database)."""
        return (self.oma(f"{name}-oma", **{**env, **(oma_env or {})}),
                self.agent(f"{name}-agent", concurrency, **env))

    def kill_all(self) -> None:
        for worker in self.started:
            worker.kill()


@pytest.fixture
def workers():
    started = Workers()
    yield started
    started.kill_all()


class ReaperThread:
    """Beat's periodic passes in a thread of the test process: the progress
    poller (the one path by which the agent's reports, and so the copies'
    heartbeats, reach the database), then the reaper (the one judge of lost
    runs), every pass. Without the poller every live copy would look silent."""

    def __init__(self, interval_s: float = 0.5):
        from replication.services.progress import poll_once
        from replication.services.reaper import reap

        self.results = []
        self.polls = []
        self.errors: list[Exception] = []
        self._stop = threading.Event()

        def run():
            try:
                while not self._stop.wait(interval_s):
                    try:
                        self.polls.append(poll_once())
                        self.results.append(reap())
                    except Exception as exc:  # noqa: BLE001 - as under beat: this pass fails, the next one runs
                        self.errors.append(exc)
                        if isinstance(exc, DatabaseError):
                            connection.close()
            finally:
                connection.close()

        self._thread = threading.Thread(target=run, name="test-poller-reaper", daemon=True)
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
