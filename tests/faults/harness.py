"""The fault suite's harness: restartable Celery worker processes, a source
whose every read is logged (to count bytes copied more than once), private
Redis and MariaDB servers that a test may restart, and the figures each case
records (written to test-artifacts/fault-figures.json, printed by
`python -m tests.faults`). Reusable by later cases (snapshots, incrementals)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from django.conf import settings
from django.utils import timezone

from replication.choices import DISK_TERMINAL, JOB_ACTIVE
from replication.models import CopyAttempt, ReplicationJob, VMDisk
from tests.helpers import (
    PROJECT_ROOT,
    NbdkitProcess,
    free_port,
    replica_sha256,
    sha256,
    source_exports_running,
    wait_until,
    worker_env,
)
from vma_agent import nbdkit

FIGURES_PATH = PROJECT_ROOT / "test-artifacts" / "fault-figures.json"
WORKER_START_TIMEOUT_S = 60


# A worker's role (PROCESS_ROLE) and the queue it consumes: the OMA's
# (orchestration and the agents' outcomes, with the database) or the local
# agent's (copies, snapshots; no database at all).
ROLE_QUEUES = {"oma": "oma", "agent": "vma.local", "all": ""}


class WorkerProcess:
    """A real Celery worker (prefork) in its own process group, so a test can
    SIGKILL it with its pool children and their nbdkit sources, as a crash
    or a lost host would. role "oma" or "agent" runs it as that process
    (PROCESS_ROLE) on that queue; "all" is one worker doing both."""

    def __init__(self, name: str, *, concurrency: int = 2, env: dict | None = None, queues: str = "",
                 role: str = "all"):
        self.name = name
        self.role = role
        self.concurrency = concurrency
        queues = queues or ROLE_QUEUES[role]
        self.queues = ["-Q", queues] if queues else []  # default: the role's queues
        self.env = {**worker_env(), "PROCESS_ROLE": role, **(env or {})}
        self.log_path = Path(settings.TEST_ROOT) / f"worker-{name}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> WorkerProcess:
        self.log_path.unlink(missing_ok=True)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "oma_site", "worker", "-c", str(self.concurrency),
                 "-l", "info", "--without-gossip", "--without-mingle", "--without-heartbeat",
                 "-n", f"{self.name}-{os.getpid()}@%h", *self.queues],
                cwd=PROJECT_ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"worker {self.name} did not start:\n{self.log_text()[-3000:]}")
            return b" ready." in self.log_path.read_bytes()

        try:
            wait_until(ready, WORKER_START_TIMEOUT_S, f"worker {self.name} to start", interval=0.1)
        except AssertionError:
            self.kill()
            raise
        return self

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def tasks_succeeded(self) -> list[str]:
        """Names of the tasks this worker ran to the end, in order."""
        return re.findall(r"Task ([\w.]+)\[[^]]+\] succeeded", self.log_text())

    def django(self, code: str) -> subprocess.CompletedProcess:
        """Run Python code after django.setup() with this worker's environment
        (its settings as the worker sees them)."""
        script = f"import django\ndjango.setup()\n{code}"
        return subprocess.run([sys.executable, "-c", script], cwd=PROJECT_ROOT, env=self.env, capture_output=True,
                              text=True, timeout=60)

    def kill(self) -> None:
        """SIGKILL the worker's whole process group: no cleanup code runs."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.kill()


class LoggedSource(NbdkitProcess):
    """A read-only NBD source (nbdkit file plugin) with every request logged
    (log filter) and optionally delayed (delay filter): the log tells which
    bytes were read how many times, across every run of a copy."""

    READ = re.compile(r"\bRead id=\d+ offset=(0x[0-9a-f]+) count=(0x[0-9a-f]+)")

    def __init__(self, sockdir: Path, image: Path, rdelay: str | None = None):
        self.log_path = sockdir / f"src-{time.monotonic_ns()}.log"
        delay = (["--filter=delay"], [f"rdelay={rdelay}"]) if rdelay else ([], [])
        super().__init__(sockdir, "--readonly", "--filter=log", *delay[0], "file", str(image),
                         f"logfile={self.log_path}", *delay[1])

    def reads(self) -> list[tuple[int, int]]:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return [(int(o, 16), int(c, 16)) for o, c in self.READ.findall(text)]

    def bytes_served(self) -> int:
        """Bytes read from this source so far, by every run."""
        return sum(count for _, count in self.reads())

    def bytes_read_more_than_once(self, granule: int = 4096) -> int:
        """Bytes the source served more than once (counted per 4 KiB)."""
        seen: Counter = Counter()
        for offset, count in self.reads():
            for block in range(offset // granule, (offset + count + granule - 1) // granule):
                seen[block] += 1
        return sum(n - 1 for n in seen.values() if n > 1) * granule


class PrivateRedis:
    """A redis-server of the test's own: by default with its append-only file
    on, so a restart keeps the queues, as a production broker should be
    configured; with persist=False a restart loses everything queued."""

    def __init__(self, root: Path, persist: bool = True):
        self.persist = ["--appendonly", "yes", "--appendfsync", "always"] if persist else ["--appendonly", "no"]
        self.dir = root / f"redis-{time.monotonic_ns()}"
        self.dir.mkdir(parents=True)
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> PrivateRedis:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
             *self.persist, "--save", ""],
            stdout=open(self.dir / "redis.log", "ab"), stderr=subprocess.STDOUT)  # noqa: SIM115
        import redis

        wait_until(lambda: _pings(redis.Redis(port=self.port)), 10, "the private redis")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: redis syncs its append-only file and exits
            self.proc.wait(10)

    def restart(self) -> None:
        self.stop()
        self.start()


class PrivateMariaDB:
    """A mariadbd of the test's own (Debian's packages), on a free TCP port of
    127.0.0.1 with user root and no password, its datadir under root: a test
    may stop and restart it (same datadir and port, so clients reconnect).
    stop() ends it; remove() also deletes its datadir."""

    START_TIMEOUT_S = 30

    def __init__(self, root: Path):
        self.dir = root / f"mariadb-{time.monotonic_ns()}"
        self.datadir = self.dir / "data"
        self.log_path = self.dir / "mariadb.log"  # its stdout and stderr
        self.error_log = self.dir / "error.log"
        # Unix socket paths are limited to 107 bytes: a short one under /tmp.
        self.socket = Path(f"/tmp/oma-my-{os.getpid()}-{time.monotonic_ns() % 10**9}.sock")
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.dir.mkdir(parents=True)
        installed = subprocess.run(
            [shutil.which("mariadb-install-db") or "mysql_install_db", "--no-defaults", f"--datadir={self.datadir}",
             "--user=root", "--auth-root-authentication-method=normal", "--skip-test-db", "--skip-name-resolve",
             "--innodb-log-file-size=16M"],
            capture_output=True, text=True)
        if installed.returncode != 0:
            raise AssertionError(f"mariadb-install-db failed:\n{(installed.stdout + installed.stderr)[-3000:]}")

    def url(self, name: str) -> str:
        return f"mysql://root@127.0.0.1:{self.port}/{name}"

    def connect(self, **kwargs):
        import MySQLdb

        return MySQLdb.connect(host="127.0.0.1", port=self.port, user="root", connect_timeout=2, **kwargs)

    def create_database(self, name: str) -> None:
        conn = self.connect()
        try:
            conn.cursor().execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
        finally:
            conn.close()

    def start(self) -> PrivateMariaDB:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                ["mariadbd", "--no-defaults", f"--datadir={self.datadir}", f"--port={self.port}",
                 f"--socket={self.socket}", "--bind-address=127.0.0.1", "--skip-networking=0", "--user=root",
                 "--skip-name-resolve", f"--pid-file={self.dir / 'mariadbd.pid'}", f"--log-error={self.error_log}",
                 "--innodb-buffer-pool-size=32M", "--performance-schema=OFF", "--skip-log-bin",
                 "--max-connections=200"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        def answers() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"private mariadbd on port {self.port} exited:\n{self.log_tail()}")
            return self._answers()

        try:
            wait_until(answers, self.START_TIMEOUT_S, f"private mariadbd on port {self.port}", interval=0.1)
        except AssertionError as exc:
            self.stop(hard=True)
            raise AssertionError(f"{exc}\n{self.log_tail()}") from None
        return self

    def _answers(self) -> bool:
        try:
            self.connect().close()
            return True
        except Exception:
            return False

    def log_tail(self, chars: int = 3000) -> str:
        texts = [p.read_text(errors="replace") for p in (self.log_path, self.error_log) if p.exists()]
        return "\n".join(texts)[-chars:]

    def stop(self, hard: bool = False) -> None:
        """SIGTERM (a clean shutdown) or SIGKILL (a crash: InnoDB recovers at
        the next start); returns once the process is gone."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGKILL if hard else signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def restart(self, hard: bool = False, down_s: float = 0) -> None:
        """Stop, stay down at least down_s seconds, start again."""
        stopped = time.monotonic()
        self.stop(hard=hard)
        time.sleep(max(0.0, down_s - (time.monotonic() - stopped)))
        self.start()

    def remove(self) -> None:
        self.stop(hard=True)
        shutil.rmtree(self.dir, ignore_errors=True)
        self.socket.unlink(missing_ok=True)


class use_database:  # noqa: N801 - a context manager named for what it does
    """Point this (test) process's default database connection, in every
    thread, at another database: the connection is closed, its settings
    (the same dict every thread's connection is made from) changed in place,
    and restored on exit, before pytest-django flushes its test database."""

    KEYS = ("NAME", "HOST", "PORT", "USER", "PASSWORD")

    def __init__(self, url: str):
        import environ

        self.config = environ.Env.db_url_config(url)

    def __enter__(self):
        from django.db import connections

        conn = connections["default"]
        if conn.vendor != "mysql":
            raise AssertionError(f"use_database needs the test run on MariaDB, not {conn.vendor}")
        self.saved = {key: conn.settings_dict[key] for key in self.KEYS}
        conn.close()
        conn.settings_dict.update({key: self.config[key] for key in self.KEYS})
        return self

    def __exit__(self, *exc):
        from django.db import connections

        conn = connections["default"]
        conn.close()
        conn.settings_dict.update(self.saved)


def _pings(client) -> bool:
    try:
        return client.ping()
    except Exception:
        return False


@dataclass
class CaseFigures:
    case: str
    result: str = "pass"
    sha256_match: bool | None = None
    bytes_recopied: int | None = None
    max_concurrent_copies: int | None = None
    leftovers: int | None = None
    non_terminal_rows: int | None = None
    detect_s: float | None = None
    resume_s: float | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)


def record(figures: CaseFigures) -> None:
    """Merge one case's figures into the figures file (one entry per case)."""
    FIGURES_PATH.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(FIGURES_PATH.read_text()) if FIGURES_PATH.exists() else {}
    data[figures.case] = {**asdict(figures), "recorded_at": timezone.now().isoformat()}
    FIGURES_PATH.write_text(json.dumps(data, indent=2, sort_keys=True))


# --- measurements ------------------------------------------------------------
def disk_bytes_done(job, disk_key: str) -> int:
    """The disk's progress as the database has it: what the poller last
    wrote from the agent's reports (0 before the first)."""
    return VMDisk.objects.filter(job_id=job.pk, disk_key=disk_key).values_list("bytes_done", flat=True).first() or 0


def max_concurrent_copies(disk: VMDisk) -> int:
    """The most runs of this disk's copy alive at one moment, from their
    recorded intervals (a run lost with its worker ends when the reaper
    handed the disk on; one still open counts as running now)."""
    points = []
    for attempt in CopyAttempt.objects.filter(disk=disk):
        end = attempt.ended_at or timezone.now()
        points += [(attempt.started_at, 1), (end, -1)]
    running = peak = 0
    for _, delta in sorted(points, key=lambda p: (p[0], p[1])):
        running += delta
        peak = max(peak, running)
    return peak


def max_concurrent_of(jobs) -> int:
    return max((max_concurrent_copies(d) for job in jobs for d in job.disks.all()), default=0)


def non_terminal_rows(jobs) -> int:
    ids = [job.pk for job in jobs]
    return (ReplicationJob.objects.filter(pk__in=ids, status__in=JOB_ACTIVE).count()
            + VMDisk.objects.filter(job_id__in=ids).exclude(status__in=DISK_TERMINAL).count()
            + CopyAttempt.objects.filter(disk__job_id__in=ids, ended_at__isnull=True).count())


def leftovers() -> list[str]:
    """Source nbdkit processes and source-export directories of this run."""
    tmp = Path(settings.TEST_ROOT) / "tmp"
    dirs = [str(p) for p in tmp.glob(f"{nbdkit.SOURCE_EXPORT_PREFIX}*")]
    return source_exports_running() + dirs


def sha256_match(job: ReplicationJob, sources: dict[str, Path]) -> bool:
    """Every disk's target volume against its source image, by disk key."""
    return all(replica_sha256(job.disks.get(disk_key=key)) == sha256(path) for key, path in sources.items())


def settle(jobs, timeout: float = 15) -> None:
    """Wait for copies to notice their job's end and for their exports to go."""
    with contextlib.suppress(AssertionError):  # best effort: the case's own checks judge what is left
        wait_until(lambda: not (non_terminal_rows(jobs) or leftovers()), timeout, "the jobs to settle", interval=0.1)


def reset_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)


class use_broker:  # noqa: N801 - a context manager named for what it does
    """Point this (test) process's Celery publishing at another broker."""

    def __init__(self, url: str):
        self.url = url

    def _switch(self, url: str) -> None:
        from oma_site.celery import app

        # Not force_close_all(): kombu keeps pools in a global registry, and
        # a closed one would be handed out again when switching back.
        app.conf.broker_url = url
        app._after_fork()  # drops the connection and producer pools

    def __enter__(self):
        self.previous = settings.CELERY_BROKER_URL
        self._switch(self.url)
        return self

    def __exit__(self, *exc):
        self._switch(self.previous)
