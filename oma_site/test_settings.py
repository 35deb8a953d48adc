"""Settings for the test suite: the project's settings (so DATABASE_URL still
picks SQLite or MariaDB), with a Redis database and data-plane directories
of its own so tests never touch a developer's jobs, queues or volumes."""

import os

from oma_site.settings import *  # noqa: F403
from oma_site.settings import DATABASES, env
from vma_agent import broker_tls

CELERY_BROKER_URL = env("TEST_CELERY_BROKER_URL", default="redis://127.0.0.1:6379/15")
CELERY_BROKER_USE_SSL = broker_tls.use_ssl(CELERY_BROKER_URL, VMA_BROKER_CA_FILE)  # noqa: F405
TEST_ROOT = Path(env("OMA_TEST_ROOT", default=f"/tmp/oma-tests-{os.getuid()}"))  # noqa: F405
OMA_VOLUME_DIR = Path(env("OMA_TEST_VOLUME_DIR", default=str(TEST_ROOT / "volumes")))  # noqa: F405
OMA_RUN_DIR = TEST_ROOT / "run"  # short: Unix socket paths are limited to 107 bytes
OMA_SECRETS_DIR = TEST_ROOT / "secrets"
AGENT_SSH_DIR = TEST_ROOT / "agent-ssh"  # agents' authorized_keys written at approval
PROGRESS_REPORT_INTERVAL_S = 0.25


def _pytest_temproot() -> str:
    """Where pytest's tmp_path directories are, found as pytest finds it, and
    kept in the environment for the workers (their TMPDIR is another)."""
    import getpass
    import tempfile

    try:
        user = getpass.getuser()
    except (ImportError, KeyError, OSError):
        user = "unknown"
    root = Path(os.environ.get("PYTEST_DEBUG_TEMPROOT") or tempfile.gettempdir()).resolve()  # noqa: F405
    return str(root / f"pytest-of-{user}")


# Test sources: images in tmp_path, nbdkit sockets under TEST_ROOT (its
# volume, run, failover and secrets directories stay refused).
os.environ.setdefault("OMA_TEST_PYTEST_TMP", _pytest_temproot())
IMAGE_SOURCE_DIRS = [str(TEST_ROOT), os.environ["OMA_TEST_PYTEST_TMP"]]
NBD_SOURCE_SOCKET_DIRS = list(IMAGE_SOURCE_DIRS)
NBD_SOURCE_HOSTS = []
# Snapshot disks come from the vCenter simulator's image files (simulators/vcenter.py).
VMA_SNAPSHOT_SOURCE = "image-dir"
VMA_SNAPSHOT_IMAGE_DIR = TEST_ROOT / "vcsim"
COPY_CHUNK_BYTES = 1024 * 1024
# The progress store shares the test broker's Redis database, under its own prefix.
# A test whose workers use RabbitMQ as their broker keeps them on the test
# Redis for the progress store (TEST_VMA_REDIS_URL).
VMA_REDIS_URL = env("TEST_VMA_REDIS_URL", default=CELERY_BROKER_URL)
VMA_TOKEN = env("VMA_TOKEN", default="test-vma-token")
# Rate-limit counts in the test Redis database, under this process's own
# prefix (a run never meets an earlier run's counts); a test of the limit
# sets its own rate and client address.
CACHES = {**CACHES, "ratelimit": {**CACHES["ratelimit"], "LOCATION": VMA_REDIS_URL,  # noqa: F405
                                  "KEY_PREFIX": f"test-ratelimit-{os.getpid()}"}}
ENROL_RATE = "1000/h"

if os.environ.get("TEST_DATABASE_NAME") and "sqlite" not in DATABASES["default"]["ENGINE"]:
    # Lets two test runs share one database server without sharing a database.
    DATABASES["default"].setdefault("TEST", {})["NAME"] = os.environ["TEST_DATABASE_NAME"]

if os.environ.get("OMA_TEST_WORKER") and PROCESS_ROLE != "agent":  # noqa: F405
    # A Celery worker started by the tests works on the test database.
    _db = DATABASES["default"]
    _db["NAME"] = _db.get("TEST", {}).get("NAME") or f"test_{_db['NAME']}"

# Short heartbeats so a copy notices its job's end quickly in tests.
HEARTBEAT_INTERVAL_S = env.float("HEARTBEAT_INTERVAL_S", default=0.25)
COPY_CHECKPOINT_INTERVAL_S = env.float("COPY_CHECKPOINT_INTERVAL_S", default=0.5)
TASK_EVENT_INTERVAL_S = 0.25
FAILOVER_DIR = TEST_ROOT / "failover"  # noqa: F405
# The CloudStack simulator finishes a job in a fraction of a second: a job
# that does not finish within seconds is one a test made hang.
CLOUDSTACK_JOB_TIMEOUT_S = env.float("CLOUDSTACK_JOB_TIMEOUT_S", default=6.0)
CLOUDSTACK_BOOT_SETTLE_S = env.float("CLOUDSTACK_BOOT_SETTLE_S", default=1.0)

# axe-core (an npm dev dependency) for the browser tests' accessibility checks:
# served as static/axe-core/axe.min.js in tests only.
STATICFILES_DIRS = [*STATICFILES_DIRS, ("axe-core", NODE_MODULES / "axe-core")]  # noqa: F405
