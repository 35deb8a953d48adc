"""OMA settings, all from the environment (django-environ) with embedded defaults:
SQLite under var/, a local Redis, local volume files under var/volumes."""

import os
import warnings
from datetime import timedelta
from pathlib import Path

import environ
from django.core.exceptions import ImproperlyConfigured
from kombu import Exchange, Queue

from vma_agent import broker_tls

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = BASE_DIR / "var"

env = environ.Env()
environ.Env.read_env(BASE_DIR / ".env")  # optional; absent by default

def _secret(name: str, default: str = "") -> str:
    """A secret from NAME_FILE (a file, e.g. a mounted secret) or NAME: files
    keep secrets out of process listings and shell histories."""
    path = env(f"{name}_FILE", default="")
    if path:
        return Path(path).read_text().strip()
    return env(name, default=default)


def _generated_secret_key(path: Path) -> str:
    """The key in path, made there (mode 0600, in a 0700 var/) on first use:
    a fresh install needs no setup and never runs on a key known to everyone.
    Linked into place whole, so processes starting together agree on one."""
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    from django.core.management.utils import get_random_secret_key

    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    draft = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(get_random_secret_key() + "\n")
    try:
        os.link(draft, path)
    except FileExistsError:
        pass  # another process made it first: use theirs
    finally:
        draft.unlink()
    return path.read_text().strip()


# Production by default: DEBUG shows settings and every URL to anyone who
# finds an error page, so it is on only when asked for (DEBUG=1).
DEBUG = env.bool("DEBUG", default=False)
SECRET_KEY = _secret("SECRET_KEY") or _generated_secret_key(
    Path(env("SECRET_KEY_PATH", default=str(VAR_DIR / "secret-key"))))
ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=["localhost", "127.0.0.1"])

# Behind HTTPS (HTTPS=1): plain HTTP redirected, HSTS, cookies only over
# TLS. A TLS-terminating proxy in front sets X-Forwarded-Proto
# (HTTPS_BEHIND_PROXY=1 trusts it; only with a proxy that overwrites it).
HTTPS = env.bool("HTTPS", default=False)
if HTTPS:
    SECURE_SSL_REDIRECT = env.bool("SECURE_SSL_REDIRECT", default=True)
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    SECURE_HSTS_SECONDS = env.int("SECURE_HSTS_SECONDS", default=365 * 24 * 3600)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = env.bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", default=True)
    # Only a directive: a domain is preloaded once someone submits it to the browsers' list.
    SECURE_HSTS_PRELOAD = env.bool("SECURE_HSTS_PRELOAD", default=True)
    if env.bool("HTTPS_BEHIND_PROXY", default=False):
        SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SESSION_COOKIE_HTTPONLY = True

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    # WhiteNoise serves the static files under runserver too, as in production.
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "django_celery_beat",
    "axes",
    "django_ratelimit",
    "replication",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "csp.middleware.CSPMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "oma_site.display_zone.DisplayZoneMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # Last, as django-axes asks: it turns a locked-out login into its answer.
    "axes.middleware.AxesMiddleware",
]

# Pages load scripts, styles, images and fragments from this origin only;
# nothing inline (the progress bars are <progress> elements, the scripts files).
CONTENT_SECURITY_POLICY = {
    "DIRECTIVES": {
        "default-src": ["'self'"],
        "script-src": ["'self'"],
        "style-src": ["'self'"],
        "img-src": ["'self'", "data:"],
        "connect-src": ["'self'"],
        "object-src": ["'none'"],
        "base-uri": ["'self'"],
        "form-action": ["'self'"],
        "frame-ancestors": ["'none'"],
    },
}

# Login throttling (django-axes): after AXES_FAILURE_LIMIT wrong passwords
# for one user name from one address, that pair is locked out for
# AXES_COOLOFF_MINUTES; a right password before then resets the count.
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]

ROOT_URLCONF = "oma_site.urls"
WSGI_APPLICATION = "oma_site.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "oma_site" / "templates"],  # admin/base_site.html: the admin's CSS fixes
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# Which role this process plays: "all" (one machine: OMA and agent), "oma",
# or "agent". An agent host holds no OMA database credentials: its
# processes run with Django's dummy backend, so any ORM access raises.
PROCESS_ROLE = env("PROCESS_ROLE", default="all")
if PROCESS_ROLE not in ("all", "oma", "agent"):
    raise ImproperlyConfigured(f"PROCESS_ROLE must be all, oma or agent, not {PROCESS_ROLE!r}")
DATABASES = {
    "default": env.db("DATABASE_URL", default=f"sqlite:///{VAR_DIR / 'oma.sqlite3'}"),
}
if PROCESS_ROLE == "agent":
    DATABASES = {"default": {"ENGINE": "django.db.backends.dummy"}}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # Workers are separate processes: WAL lets them write progress while pages
    # read, and the test database must be a file they can all open.
    DATABASES["default"].setdefault("OPTIONS", {}).update(
        {
            "timeout": 30,
            "transaction_mode": "IMMEDIATE",
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        }
    )
    DATABASES["default"]["TEST"] = {"NAME": str(VAR_DIR / "test-oma.sqlite3")}
elif DATABASES["default"]["ENGINE"] == "django.db.backends.mysql":
    DATABASES["default"].setdefault("OPTIONS", {}).setdefault("charset", "utf8mb4")

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# An agent host has no database to count failures in, and no login page.
AXES_ENABLED = env.bool("AXES_ENABLED", default=PROCESS_ROLE != "agent")
AXES_FAILURE_LIMIT = env.int("AXES_FAILURE_LIMIT", default=5)
AXES_COOLOFF_TIME = timedelta(minutes=env.float("AXES_COOLOFF_MINUTES", default=15.0))
# The pair: one address guessing cannot lock everyone out of an account, nor
# one account's guesses lock out a whole office behind one NAT address.
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
AXES_RESET_ON_SUCCESS = True

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
# Pages and the admin show times in the operator's own zone, which their
# browser tells the server (the "tz" cookie, oma_site/display_zone.py); this
# named zone (e.g. Europe/Berlin) is the default until the browser has said,
# without JavaScript, and for a zone name the server does not know. Every
# time carries its zone's abbreviation, so two operators in two zones read
# the same moment. The database keeps UTC (USE_TZ).
TIME_ZONE_DISPLAY = env("TIME_ZONE_DISPLAY", default="UTC")
# Times are written one way everywhere: 2026-12-07 17:20:33 CET (ISO order,
# 24 h, the zone's abbreviation). The format module overrides the locale's
# formats, which would otherwise win over DATETIME_FORMAT in the admin.
FORMAT_MODULE_PATH = ["oma_site.formats"]
DATETIME_FORMAT = "Y-m-d H:i:s T"
SHORT_DATETIME_FORMAT = "Y-m-d H:i T"
DATE_FORMAT = "Y-m-d"
SHORT_DATE_FORMAT = "Y-m-d"
TIME_FORMAT = "H:i:s"
USE_I18N = True
USE_TZ = True
STATIC_URL = "static/"
STATIC_ROOT = VAR_DIR / "static"
# WhiteNoise serves the apps' static files straight from where they are
# (collectstatic into STATIC_ROOT is optional), with DEBUG off as on.
WHITENOISE_USE_FINDERS = True
# The design system comes from npm (package.json, installed by scripts/setup.sh
# into node_modules, never copied into git): its built files are served as
# static/bootstrap/... and static/htmx/..., and collectstatic gathers them for
# production. No CDN: the OMA may have no internet.
NODE_MODULES = BASE_DIR / "node_modules"
STATICFILES_DIRS = [
    ("bootstrap", NODE_MODULES / "bootstrap" / "dist"),
    ("htmx", NODE_MODULES / "htmx.org" / "dist"),
]
# ... so an absent STATIC_ROOT (no collectstatic run) is normal, not worth a warning in every process.
warnings.filterwarnings("ignore", message=f"No directory at: {STATIC_ROOT}", category=UserWarning)

# --- Celery -----------------------------------------------------------------
# Name of the agent (VMA) this process acts as. Copy tasks of its VMs go to
# queue "vma.<name>"; orchestration and the periodic tasks go to "oma". Run
# one worker per queue (`-Q oma` on the OMA, `-Q vma.<name>` on each agent):
# a plain `celery -A oma_site worker` consumes both, and then orchestration
# steps and the reaper wait behind copies whenever every slot is copying.
VMA_AGENT_NAME = env("VMA_AGENT_NAME", default="local")
CELERY_TASK_DEFAULT_QUEUE = "oma"
# Each queue bound to its own same-named exchange (as Celery makes a queue it
# was not told of): left without one, Celery binds every listed queue to the
# default exchange "oma", and an agent's broker user would need the OMA's.
_OMA_QUEUE, _AGENT_QUEUE = (Queue(q, Exchange(q), routing_key=q) for q in ("oma", f"vma.{VMA_AGENT_NAME}"))
CELERY_TASK_QUEUES = {"all": [_OMA_QUEUE, _AGENT_QUEUE], "oma": [_OMA_QUEUE],
                      "agent": [_AGENT_QUEUE]}[PROCESS_ROLE]
CELERY_BROKER_URL = env("CELERY_BROKER_URL", default="redis://127.0.0.1:6379/0")
# An amqps:// broker URL (an enrolled agent's, when the OMA runs its broker
# over TLS): the broker's certificate must be signed by the CA in this file
# (enrolment writes it to <state dir>/broker_ca.pem) and name the URL's host;
# blank: the system's CAs. A plain amqp:// or redis:// URL: no TLS, as before.
VMA_BROKER_CA_FILE = env("VMA_BROKER_CA_FILE", default="")
CELERY_BROKER_USE_SSL = broker_tls.use_ssl(CELERY_BROKER_URL, VMA_BROKER_CA_FILE)
# --- Enrolment (replication/services/enrolment.py) ---------------------------
# The key this agent host signs its outcomes with (given at approval); empty:
# unsigned, accepted only for an agent recorded without a key (by hand).
VMA_MESSAGE_KEY_FILE = env("VMA_MESSAGE_KEY_FILE", default="")
# The broker an enrolled agent is told to use (RabbitMQ; its own user and
# password are put in), and how the OMA manages those users.
AGENT_BROKER_URL = env("AGENT_BROKER_URL", default="amqp://127.0.0.1:5672/oma")
# With AGENT_BROKER_URL amqps://host:port/vhost, agents reach the broker
# there over TLS (not through their tunnels) and are handed this CA
# certificate (PEM), which signed the broker's: approval is refused while it
# cannot be read.
AGENT_BROKER_CA_FILE = env("AGENT_BROKER_CA_FILE", default="")
RABBITMQCTL = env.list("RABBITMQCTL", default=["rabbitmqctl"])
PAIRING_CODE_MINUTES = env.int("PAIRING_CODE_MINUTES", default=15)
# POST /api/agents/enrol/ answers at most this many attempts per client
# address (django-ratelimit's "N/s|m|h|d"); past it 429 with Retry-After.
# The counts live in Redis (the broker's by default), shared by every web
# process; the default cache stays per process.
ENROL_RATE = env("ENROL_RATE", default="20/h")
RATELIMIT_REDIS_URL = env("RATELIMIT_REDIS_URL", default=CELERY_BROKER_URL if CELERY_BROKER_URL.startswith(
    ("redis://", "rediss://")) else "redis://127.0.0.1:6379/0")
CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
          "ratelimit": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": RATELIMIT_REDIS_URL,
                        "KEY_PREFIX": "oma-ratelimit"}}
RATELIMIT_USE_CACHE = "ratelimit"
# Django's own Redis cache increments atomically (INCR), which is all
# django-ratelimit needs; its check knows only django-redis by name.
SILENCED_SYSTEM_CHECKS = ["django_ratelimit.W001"]
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
# An agent's worker answers no remote control (celery.pidbox): its broker
# user may not read any pidbox (services.enrolment.broker_permissions), so no
# other agent's control commands or replies are open to it; the OMA stops
# copies through the agent's API instead. Run it --without-gossip --without-mingle.
CELERY_WORKER_ENABLE_REMOTE_CONTROL = PROCESS_ROLE != "agent"
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_SEND_SENT_EVENT = True
# A disk copy can run for hours; Redis must not redeliver it meanwhile. A
# copy whose worker died is not left to this timeout: the reaper hands it to
# a new task within HEARTBEAT_TIMEOUT_S + REAPER_INTERVAL_S, and a late
# redelivery only loses the claim.
CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": 12 * 3600}
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_BROKER_CONNECTION_MAX_RETRIES = None  # a restarting Redis: keep trying
# Publishing (the next step of a job) rides out a Redis restart of a few
# seconds; beyond that the reaper requeues what was lost.
CELERY_TASK_PUBLISH_RETRY_POLICY = {"max_retries": 20, "interval_start": 0.2, "interval_step": 0.5,
                                    "interval_max": 2.0}

# --- Replication ------------------------------------------------------------
VMA_URL = env("VMA_URL", default="http://127.0.0.1:8000")
VMA_TOKEN = _secret("VMA_TOKEN")
OMA_VOLUME_DIR = Path(env("OMA_VOLUME_DIR", default=str(VAR_DIR / "volumes")))
# Runtime files of the data plane: Unix sockets and pid files of nbdkit.
OMA_RUN_DIR = Path(env("OMA_RUN_DIR", default=str(VAR_DIR / "run")))
# Passwords typed into the pages land here, one file each (mode 0600, the
# directory 0700); records keep only the file's path.
OMA_SECRETS_DIR = Path(env("OMA_SECRETS_DIR", default=str(VAR_DIR / "secrets")))
# What may be registered as a source (replication/services/allowlist.py):
# image files (raw or qcow2) and block devices only under these directories,
# symlinks resolved; none by default, so image sources are refused until set.
IMAGE_SOURCE_DIRS = env.list("IMAGE_SOURCE_DIRS", default=[])
# NBD sources only from these servers: "host" (any port) or "host:port"
# ("[v6addr]:port"), and nbd+unix sockets only under these directories.
NBD_SOURCE_HOSTS = env.list("NBD_SOURCE_HOSTS", default=[])
NBD_SOURCE_SOCKET_DIRS = env.list("NBD_SOURCE_SOCKET_DIRS", default=[])
# A vCenter's password by reference: a file inside OMA_SECRETS_DIR, or an
# environment variable named with this prefix or listed here.
VCENTER_PASSWORD_ENV_PREFIX = env("VCENTER_PASSWORD_ENV_PREFIX", default="VCENTER_PASSWORD_")
VCENTER_PASSWORD_ENVS = env.list("VCENTER_PASSWORD_ENVS", default=[])
# The same rule for a CloudStack cloud's secret key (add_cloud, the admin).
CLOUDSTACK_SECRET_ENV_PREFIX = env("CLOUDSTACK_SECRET_ENV_PREFIX", default="CLOUDSTACK_SECRET_")
CLOUDSTACK_SECRET_ENVS = env.list("CLOUDSTACK_SECRET_ENVS", default=[])
# How long the web process waits for a source or cloud it asks something
# (an NBD server's handshake, an image's inspection, a certificate, a
# CloudStack call) before it gives up with the reason.
PROBE_TIMEOUT_S = env.float("PROBE_TIMEOUT_S", default=10.0)
# Where new target volumes go: "local" (files in OMA_VOLUME_DIR) or
# "cloudstack" (volumes of the active CloudStack config, attached to the OMA).
OMA_VOLUME_PROVIDER = env("OMA_VOLUME_PROVIDER", default="local")
if OMA_VOLUME_PROVIDER not in ("local", "cloudstack"):
    raise ImproperlyConfigured(f"OMA_VOLUME_PROVIDER must be local or cloudstack, not {OMA_VOLUME_PROVIDER!r}")
CLOUDSTACK_JOB_TIMEOUT_S = env.float("CLOUDSTACK_JOB_TIMEOUT_S", default=300.0)  # one async job
CLOUDSTACK_DEVICE_TIMEOUT_S = env.float("CLOUDSTACK_DEVICE_TIMEOUT_S", default=30.0)  # attached -> device seen
# CloudStack has no console API: a failed-over VM counts as booted once it has run this long.
CLOUDSTACK_BOOT_SETTLE_S = env.float("CLOUDSTACK_BOOT_SETTLE_S", default=30.0)
CLOUDSTACK_DRIFT_INTERVAL_S = env.float("CLOUDSTACK_DRIFT_INTERVAL_S", default=900.0)  # records vs listVolumes
# The target export server listens on a Unix socket under OMA_RUN_DIR. With a
# PSK file ("username:hexkey" lines, mode 600) it requires TLS and the copies
# use the same file: for agents that reach it through a forwarded socket or
# another host. The key is read from the file, never passed on a command line.
OMA_EXPORT_TLS_PSK_FILE = env("OMA_EXPORT_TLS_PSK_FILE", default="")
# Empty: the export server listens on a Unix socket in OMA_RUN_DIR. IP:PORT:
# on TCP for agents on other hosts (anything but loopback requires TLS).
OMA_EXPORT_LISTEN = env("OMA_EXPORT_LISTEN", default="")
OMA_EXPORT_TLS_USERNAME = env("OMA_EXPORT_TLS_USERNAME", default="oma")
# An enrolled agent's own identity at that server (its line in the OMA's PSK
# file, issued at approval, removed at revocation; enrolment writes
# <state dir>/export.psk): its copies present it instead of the one in the
# work order's URI. Empty: the URI's, as given.
VMA_EXPORT_PSK_FILE = env("VMA_EXPORT_PSK_FILE", default="")
VMA_EXPORT_TLS_USERNAME = env("VMA_EXPORT_TLS_USERNAME", default="")
# Extra nbdkit arguments for the export server (filters), e.g. fault injection.
OMA_EXPORT_NBDKIT_ARGS = env.list("OMA_EXPORT_NBDKIT_ARGS", default=[])
# The copy engine's request size, connections to the source (a VMware host
# limits NBD connections: keep it at most 4 there) and to the target (0: as
# many as to the source), and requests in flight per pipeline (measured
# defaults: bench/copy_bench.py).
COPY_CHUNK_BYTES = env.int("COPY_CHUNK_BYTES", default=512 * 1024)
COPY_CONNECTIONS = env.int("COPY_CONNECTIONS", default=2)
COPY_TARGET_CONNECTIONS = env.int("COPY_TARGET_CONNECTIONS", default=0)
COPY_DEPTH = env.int("COPY_DEPTH", default=32)
# Bandwidth limit of each disk copy, bytes per second; 0 = none.
COPY_LIMIT_BPS = env.int("COPY_LIMIT_BPS", default=0)
# Copy-loop progress cadence (as MigrateKit OSSEA's migratekit: every N seconds or 1 % of a disk).
PROGRESS_REPORT_INTERVAL_S = env.float("PROGRESS_REPORT_INTERVAL_S", default=2.0)
# The copy's committed cursor is recorded in the agent's Redis this often:
# what a resumed run copies again is at most this much time of copying.
COPY_CHECKPOINT_INTERVAL_S = env.float("COPY_CHECKPOINT_INTERVAL_S", default=5.0)
# A resumed run first compares the data below its cursor with the source and
# resumes at the first difference: it reads that part again (both sides) but
# writes nothing. False trusts the cursor (a slow source where re-reading
# costs what copying does).
COPY_COMPARE_RESUMED = env.bool("COPY_COMPARE_RESUMED", default=True)
# Runs of one disk's copy (worker lost, handed over) before the job fails.
COPY_MAX_ATTEMPTS = env.int("COPY_MAX_ATTEMPTS", default=5)
# Copies need no database (they run on the agent). The OMA tasks that record
# an agent's outcome retry through a database outage (MariaDB restarting),
# with exponential backoff and jitter, at most COPY_TASK_MAX_RETRIES times.
COPY_TASK_MAX_RETRIES = env.int("COPY_TASK_MAX_RETRIES", default=8)
COPY_RETRY_BACKOFF_S = env.int("COPY_RETRY_BACKOFF_S", default=2)
COPY_RETRY_BACKOFF_MAX_S = env.int("COPY_RETRY_BACKOFF_MAX_S", default=120)
# Time limits of a copy task: base + capacity at the slowest rate worth
# waiting for; the soft limit fails the disk with the reason, the hard one
# (soft + grace) kills a copy stuck in C.
COPY_TIME_LIMIT_BASE_S = env.float("COPY_TIME_LIMIT_BASE_S", default=600.0)
COPY_MIN_THROUGHPUT_BPS = env.float("COPY_MIN_THROUGHPUT_BPS", default=5 * 1024 * 1024)
COPY_TIME_LIMIT_GRACE_S = env.float("COPY_TIME_LIMIT_GRACE_S", default=300.0)

# --- VMware sources ---------------------------------------------------------
# A vCenter login, and each of the OMA's calls to it (a snapshot's removal waits longer).
VCENTER_TIMEOUT_S = env.float("VCENTER_TIMEOUT_S", default=60.0)
# How the agent reads a snapshot's disks: "vddk" (nbdkit's vddk plugin, the
# production path) or "image-dir" (image files under VMA_SNAPSHOT_IMAGE_DIR
# laid out as the test vCenter simulator keeps them).
VMA_SNAPSHOT_SOURCE = env("VMA_SNAPSHOT_SOURCE", default="vddk")
VMA_SNAPSHOT_IMAGE_DIR = Path(env("VMA_SNAPSHOT_IMAGE_DIR", default=str(VAR_DIR / "snapshots")))
VMA_VDDK_LIBDIR = env("VMA_VDDK_LIBDIR", default="/usr/lib/vmware-vix-disklib")
VMA_VDDK_TRANSPORTS = env("VMA_VDDK_TRANSPORTS", default="nbdssl:nbd")
# Snapshots of ended jobs left on a vCenter (the removal failed) are swept this often.
SNAPSHOT_SWEEP_INTERVAL_S = env.float("SNAPSHOT_SWEEP_INTERVAL_S", default=900.0)
# An ended job's clean-up waits this long for its copies to stop reading the snapshot.
CLEANUP_WAIT_S = env.float("CLEANUP_WAIT_S", default=120.0)

# --- Progress pipeline ------------------------------------------------------
# Which URL sets this web process serves: an agent-only host keeps just the API.
VMA_API_ENABLED = env.bool("VMA_API_ENABLED", default=True)
OMA_UI_ENABLED = env.bool("OMA_UI_ENABLED", default=True)
# The agent's progress store: Redis (the broker's by default), records kept a week.
VMA_REDIS_URL = env("VMA_REDIS_URL", default=CELERY_BROKER_URL)
VMA_PROGRESS_PREFIX = env("VMA_PROGRESS_PREFIX", default="vma:progress")
VMA_PROGRESS_TTL_S = env.int("VMA_PROGRESS_TTL_S", default=7 * 24 * 3600)
# The agent API needs VMA_TOKEN. True: for MigrateKit OSSEA's clients, which
# send no token (migratekit posting on the VMA host itself, their OMA poller
# through an SSH tunnel), a request without an Authorization header that comes
# straight from loopback (REMOTE_ADDR 127.0.0.0/8 or ::1, and no
# X-Forwarded-For, Forwarded or X-Real-IP header) may post the display fields
# of a progress update (never a checkpoint, attempt, worker or seq, never over
# our own copies' entries) and read a record by its id. Never control (stop,
# limit) or the change feed. A token that is sent is always checked.
VMA_TRUST_LOOPBACK = env.bool("VMA_TRUST_LOOPBACK", default=False)
VMA_REQUEST_TIMEOUT_S = env.float("VMA_REQUEST_TIMEOUT_S", default=5.0)
# Reuse HTTP connections to the agent. Off by default: gunicorn's sync workers
# close them anyway, and runserver stalls 40 ms on every reused connection.
VMA_HTTP_KEEPALIVE = env.bool("VMA_HTTP_KEEPALIVE", default=False)
# OMA poller: one read of the agent's change feed every N s.
PROGRESS_POLL_INTERVAL_S = env.float("PROGRESS_POLL_INTERVAL_S", default=5.0)
# Database progress writes: on a >= 1 % change, after >= 2 s, or a stage/status change.
PROGRESS_WRITE_STEP_PERCENT = env.float("PROGRESS_WRITE_STEP_PERCENT", default=1.0)
PROGRESS_WRITE_INTERVAL_S = env.float("PROGRESS_WRITE_INTERVAL_S", default=2.0)
# Failover onto the destination (local KVM through libvirt by default).
LIBVIRT_URI = env("LIBVIRT_URI", default="qemu:///system")
# kvm or qemu (TCG) to skip the check that boots the host's kernel once to see
# whether KVM can run a guest; empty: found by trying.
LIBVIRT_DOMAIN_TYPE = env("LIBVIRT_DOMAIN_TYPE", default="")
if LIBVIRT_DOMAIN_TYPE not in ("", "kvm", "qemu"):
    raise ImproperlyConfigured(f"LIBVIRT_DOMAIN_TYPE must be kvm, qemu or empty, not {LIBVIRT_DOMAIN_TYPE!r}")
# The virtio-win drivers (ISO or directory; not in Debian: the operator's copy)
# that guest conversion installs into Windows guests. Empty: a Windows guest is
# converted to emulated devices (IDE disk, RTL8139 NIC), with a warning on the VM.
VIRTIO_WIN = env("VIRTIO_WIN", default="")
if VIRTIO_WIN and not Path(VIRTIO_WIN).exists():
    raise ImproperlyConfigured(f"VIRTIO_WIN={VIRTIO_WIN} does not exist: the path of the virtio-win ISO or "
                               "directory, or empty")
FAILOVER_DIR = Path(env("FAILOVER_DIR", default=str(OMA_RUN_DIR / "failover")))  # overlays, console logs
FAILOVER_MIN_FREE_BYTES = env.int("FAILOVER_MIN_FREE_BYTES", default=256 * 1024 * 1024)
FAILOVER_TEST_NETWORK = env("FAILOVER_TEST_NETWORK", default="")  # a libvirt network; empty: no NIC
# Live failover: how long the source's guest has to shut down before it is
# powered off, and how much longer the agent has to answer at all.
FAILOVER_SHUTDOWN_TIMEOUT_S = env.float("FAILOVER_SHUTDOWN_TIMEOUT_S", default=120.0)
FAILOVER_AGENT_GRACE_S = env.float("FAILOVER_AGENT_GRACE_S", default=120.0)
FAILOVER_DEFAULT_CPUS = env.int("FAILOVER_DEFAULT_CPUS", default=1)
FAILOVER_DEFAULT_MEMORY_MIB = env.int("FAILOVER_DEFAULT_MEMORY_MIB", default=512)
# Recovery points kept per VM (the newest N) when its protection group sets
# none; the newest is always kept, and so is every point a failover boots.
RECOVERY_POINTS_KEEP = env.int("RECOVERY_POINTS_KEEP", default=7)
if RECOVERY_POINTS_KEEP < 1:
    raise ImproperlyConfigured(f"RECOVERY_POINTS_KEEP must be at least 1, not {RECOVERY_POINTS_KEEP}")

# Liveness, judged by the reaper alone (replication/services/reaper.py):
# - a copy re-reports its state to its agent's API at least every
#   HEARTBEAT_INTERVAL_S (and checks whether it should stop); the poller
#   stores each report as the copy's heartbeat;
# - a copy with no report for HEARTBEAT_TIMEOUT_S is lost: its disk goes to a
#   new run (resuming from the reported checkpoint), at most COPY_MAX_ATTEMPTS;
# - a running job with no sign of life at all for REAPER_TIMEOUT_S fails (a
#   lost finalize is queued again), and one pending past
#   REAPER_PENDING_TIMEOUT_S fails.
HEARTBEAT_INTERVAL_S = env.float("HEARTBEAT_INTERVAL_S", default=5.0)
HEARTBEAT_TIMEOUT_S = env.float("HEARTBEAT_TIMEOUT_S", default=60.0)
REAPER_INTERVAL_S = env.float("REAPER_INTERVAL_S", default=60.0)
REAPER_TIMEOUT_S = env.float("REAPER_TIMEOUT_S", default=300.0)
REAPER_PENDING_TIMEOUT_S = env.float("REAPER_PENDING_TIMEOUT_S", default=3600.0)
# Flower: copy tasks publish PROGRESS state and task-progress events this often.
TASK_EVENT_INTERVAL_S = env.float("TASK_EVENT_INTERVAL_S", default=2.0)

# The progress poller is its own process (`manage.py poll_progress`), not a
# beat task: a task would wait behind the copies for a free slot. The reaper
# and the sweeper are queued on "oma", which only the OMA worker consumes.
# Beat keeps its schedule in the database (django-celery-beat): the fixed
# entries below, and each protection group's (services.scheduler writes
# those), so a restart loses nothing and a new schedule needs no restart.
CELERY_BEAT_SCHEDULER = "django_celery_beat.schedulers:DatabaseScheduler"
# Scheduled protection: cycles one agent runs at once (VMs, and their disks).
AGENT_MAX_VMS = env.int("AGENT_MAX_VMS", default=4)
AGENT_MAX_DISKS = env.int("AGENT_MAX_DISKS", default=8)
# VMs in flight per ESXi host, for an agent that sets none (snapshots and NBD
# sessions are the host's resources).
AGENT_MAX_PER_HOST = env.int("AGENT_MAX_PER_HOST", default=4)
# An agent whose API has not answered the poller for this long is silent: the
# reaper judges its running copies lost and flags its VMs (nothing else stops).
AGENT_SILENT_AFTER_S = env.float("AGENT_SILENT_AFTER_S", default=300.0)
# Agents behind a firewall (services.tunnels): each enrolled agent opens one
# SSH connection to the OMA's own sshd for agents (scripts/lib.sh
# ensure_agent_sshd; 443 in production, never the system sshd) and through it a
# reverse forward of its progress API to 127.0.0.1:<a port of
# AGENT_TUNNEL_PORTS> here, and local forwards to the broker and the NBD export
# (the host:port pairs of AGENT_TUNNEL_PERMIT_OPEN; empty: the broker's port
# and OMA_EXPORT_LISTEN's, on 127.0.0.1). Approval sets all of it up and hands the
# agent its tunnel (AGENT_SSH_HOST: the OMA's name as agents reach its sshd;
# blank: the host of the URL the agent enrolled with).
AGENT_SSH_HOST = env("AGENT_SSH_HOST", default="")
AGENT_SSH_DIR = Path(env("AGENT_SSH_DIR", default=str(VAR_DIR / "agent-ssh")))
AGENT_SSH_PORT = env.int("AGENT_SSH_PORT", default=2222)
AGENT_SSH_USER = env("AGENT_SSH_USER", default="oma-agents")
AGENT_TUNNEL_PORTS = env("AGENT_TUNNEL_PORTS", default="20000-20999")
AGENT_TUNNEL_PERMIT_OPEN = env.list("AGENT_TUNNEL_PERMIT_OPEN", default=[])
CELERY_BEAT_SCHEDULE = {
    "reap-stale": {
        "task": "replication.reap_stale",
        "schedule": REAPER_INTERVAL_S,
        "options": {"queue": "oma", "expires": REAPER_INTERVAL_S},
    },
    "sweep-snapshots": {
        "task": "replication.sweep_snapshots",
        "schedule": SNAPSHOT_SWEEP_INTERVAL_S,
        "options": {"queue": "oma", "expires": SNAPSHOT_SWEEP_INTERVAL_S},
    },
    "cloud-drift": {
        "task": "replication.cloud_drift",
        "schedule": CLOUDSTACK_DRIFT_INTERVAL_S,
        "options": {"queue": "oma", "expires": CLOUDSTACK_DRIFT_INTERVAL_S},
    },
}

# The project's loggers print once, in Celery's worker format, and do not
# also propagate to the root logger (which a worker hijacks: lines twice).
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"worker": {"()": "oma_site.log_format.OneLineFormatter",
                              "format": "[%(asctime)s: %(levelname)s/%(processName)s] %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "worker"}},
    "loggers": {
        # Django's own errors (a 500's traceback, refused hosts) reach the log
        # with DEBUG off too; by default they would go only to mailed admins.
        "django": {"handlers": ["console"], "level": "INFO", "propagate": False},
        "replication": {"handlers": ["console"], "level": env("LOG_LEVEL", default="INFO"), "propagate": False},
        "vma_agent": {"handlers": ["console"], "level": env("LOG_LEVEL", default="INFO"), "propagate": False},
    },
}

LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "dashboard"
LOGOUT_REDIRECT_URL = "login"
# Where operators find Flower (celery -A oma_site flower); empty hides the link.
FLOWER_URL = env("FLOWER_URL", default="http://127.0.0.1:5555/")
