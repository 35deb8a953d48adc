"""The system's files are the system's: the database, the replica volumes,
overlays, export sockets and secrets hold other machines' disks and the keys
to this one. Every process creates files private to its user (umask 077, set
before anything is created), and at start-up the data directories and the
files in them that an older version or a hand-made `mkdir` left open are
tightened, with a warning; what cannot be tightened (not ours to chmod) stops
the process with the command that fixes it."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

from django.core.exceptions import ImproperlyConfigured

PRIVATE_UMASK = 0o077
DIR_MODE = 0o700
FILE_MODE = 0o600

log = logging.getLogger("replication.files")


def restrict_umask() -> None:
    """New files 0600 and directories 0700 from the first one on; call it
    before Django (or Celery) opens the database or writes a log."""
    os.umask(PRIVATE_UMASK)


def data_dirs(settings) -> list[Path]:
    """Where the system keeps data: var/ and every directory the settings
    may put elsewhere."""
    dirs = [settings.VAR_DIR, settings.OMA_VOLUME_DIR, settings.OMA_RUN_DIR, settings.OMA_SECRETS_DIR,
            settings.FAILOVER_DIR]
    dirs += [path.parent for path in sqlite_files(settings)[:1]]
    unique = []
    for path in dirs:
        path = Path(path).absolute()
        if path not in unique:
            unique.append(path)
    return unique


def sqlite_files(settings) -> list[Path]:
    """The SQLite database (and its WAL and shared-memory files), the test
    database included: both hold sessions and everything else."""
    db = settings.DATABASES.get("default", {})
    if db.get("ENGINE") != "django.db.backends.sqlite3":
        return []
    names = [db.get("NAME"), db.get("TEST", {}).get("NAME")]
    paths = [Path(name).absolute() for name in names if name and str(name) != ":memory:"]
    return [Path(f"{path}{suffix}") for path in paths for suffix in ("", "-wal", "-shm")]


def _tighten(path: Path, wanted: int, command: str) -> bool:
    """chmod path to at most `wanted`; True if it was too open. A path we
    may not chmod stops the process, naming the fix."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return False
    if stat.S_ISLNK(st.st_mode):
        return False  # a volume may be a link to a device: never chmod what it points at
    mode = stat.S_IMODE(st.st_mode)
    if not mode & 0o077:
        return False
    try:
        os.chmod(path, mode & wanted)
    except OSError as exc:
        raise ImproperlyConfigured(
            f"{path} is open to other users (mode {mode:04o}) and this process cannot tighten it ({exc.strerror}): "
            f"run `{command} {path}` as its owner") from None
    log.warning("%s was open to other users (mode %04o): tightened to %04o", path, mode, mode & wanted)
    return True


def secure_data_paths(settings=None) -> list[Path]:
    """Tighten the data directories to 0700 and the database, volumes,
    sockets and secrets in them to 0600; returns what was tightened."""
    if settings is None:
        from django.conf import settings
    tightened = []
    for directory in data_dirs(settings):
        if _tighten(directory, DIR_MODE, "chmod 700"):
            tightened.append(directory)
    files = list(sqlite_files(settings))
    for directory in (settings.OMA_VOLUME_DIR, settings.OMA_SECRETS_DIR, settings.OMA_RUN_DIR):
        try:
            files += [entry for entry in Path(directory).iterdir() if not entry.is_dir()]
        except OSError:
            continue
    for path in files:
        if _tighten(path, FILE_MODE, "chmod 600"):
            tightened.append(path)
    return tightened
