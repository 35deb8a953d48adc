"""What the benches share: the project root, Django set up once per process,
a free port and a percentile. The benches run as modules of this package
from the project root (`python -m bench.NAME`), so the root is on sys.path
without patching it. They use the simulators package, never the tests."""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20


def setup_django() -> None:
    """Set Django up for this process, once: with DJANGO_SETTINGS_MODULE as
    the bench's environment has it (the production settings when unset).
    A bench sets its environment (database, directories, broker) first."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "oma_site.settings")
    import django
    from django.apps import apps

    if not apps.ready:
        django.setup()


def throwaway_django(prefix: str) -> None:
    """Django on a throwaway SQLite database (or DATABASE_URL when given),
    migrated, with DEBUG off and the test environment's client enabled."""
    workdir = tempfile.mkdtemp(prefix=prefix)
    os.environ.setdefault("DATABASE_URL", f"sqlite:///{workdir}/bench.sqlite3")
    os.environ["DEBUG"] = "false"
    setup_django()
    from django.core.management import call_command
    from django.test.utils import setup_test_environment

    setup_test_environment()
    call_command("migrate", verbosity=0)


def viewer_client():
    """A Django test client logged in as a user with the viewer role (the
    pages' least role)."""
    from django.contrib.auth.models import User
    from django.test import Client

    from replication.roles import VIEWER, grant

    client = Client()
    reader = User.objects.create_user("bench")
    grant(reader, VIEWER)
    client.force_login(reader)
    return client


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]
