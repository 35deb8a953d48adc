"""What the OMA may read on a user's word: the one check every way of
registering a source (add_vm, the Sources page, the admin, the API) and
every work order goes through, and where a vCenter's password may be
referenced from.

Registering a path makes the OMA's processes read it and write it into a
replica; without this check any user could copy /etc/shadow, the agent's
token or another VM's replica. Paths are judged by where they really lead
(realpath), again when a job builds its order: a file allowed yesterday may
be a symlink today."""

from __future__ import annotations

import ipaddress
import os
import re
import stat
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from django.conf import settings

NBD_DEFAULT_PORT = 10809
# /dev holds block devices, which an allowed directory may name; these never.
_KERNEL_TREES = (Path("/proc"), Path("/sys"))
_NBD_QUERY_KEYS = {"socket", "tls-psk-file", "tls-username"}
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class NotAllowed(ValueError):
    """The source or secret reference is outside what the settings allow;
    str() says why and which setting decides."""


def _real(path) -> Path:
    return Path(os.path.realpath(path))


def _inside(path: Path, directory: Path) -> bool:
    return path == directory or directory in path.parents


def _own_dirs() -> list[tuple[str, Path]]:
    """The OMA's own data: replicas, export sockets, secrets, overlays."""
    return [(name, _real(getattr(settings, name))) for name in
            ("OMA_VOLUME_DIR", "OMA_RUN_DIR", "OMA_SECRETS_DIR", "FAILOVER_DIR")]


def _own_files() -> list[Path]:
    """Secrets and the database, wherever the settings put them."""
    files = [os.environ.get("VMA_TOKEN_FILE", ""), os.environ.get("SECRET_KEY_FILE", ""),
             settings.OMA_EXPORT_TLS_PSK_FILE]
    database = settings.DATABASES["default"]
    if "sqlite" in database["ENGINE"]:
        files.append(str(database["NAME"]))
    return [_real(f) for f in files if f and os.path.isabs(f)]


def _refuse_own(locator: str, real: Path, allowed_dir: Path | None) -> None:
    for name, directory in _own_dirs():
        if _inside(real, directory):
            raise NotAllowed(f"{locator} is inside the OMA's own {name} ({directory}): never a source")
    if real in _own_files():
        raise NotAllowed(f"{locator} is one of the OMA's own files (a secret or the database): never a source")
    var = _real(settings.VAR_DIR)
    # var/ holds the database, the agent token and logs; only a directory
    # inside it that is allowed by name (the demo's var/demo) is a source.
    if _inside(real, var) and not (allowed_dir is not None and _inside(allowed_dir, var) and allowed_dir != var):
        raise NotAllowed(f"{locator} is inside the OMA's var directory ({var}): never a source")
    for tree in _KERNEL_TREES:
        if _inside(real, tree):
            raise NotAllowed(f"{locator} is in {tree}: never a source")


def _allowed_dir(setting: str, kind: str, locator: str, described: str, real: Path) -> Path:
    """The directory named by `setting` (a list of directories) that holds
    `real`; NotAllowed, naming the setting, when none does."""
    dirs = [_real(d) for d in getattr(settings, setting) if d]
    if not dirs:
        raise NotAllowed(f"{kind} are not allowed here: the setting {setting} names no directory (set it to the "
                         f"directories holding them), so {locator} is refused")
    allowed = next((d for d in dirs if _inside(real, d) and real != d), None)
    if allowed is None:
        raise NotAllowed(f"{described} is not inside a directory of {setting} ({', '.join(map(str, dirs))})")
    return allowed


def check_image_path(locator: str, *, must_exist: bool = True) -> Path:
    """The real path of an image file or block device the settings allow as
    a source; raises NotAllowed. A missing file passes with must_exist
    False (the copy then fails with its own reason)."""
    if not os.path.isabs(locator):
        raise NotAllowed(f"disk path must be absolute: {locator}")
    real = _real(locator)
    leads = f" (it leads to {real})" if str(real) != locator else ""
    allowed_dir = _allowed_dir("IMAGE_SOURCE_DIRS", "image sources", locator, f"{locator}{leads}", real)
    _refuse_own(locator, real, allowed_dir)
    try:
        mode = os.stat(real).st_mode
    except FileNotFoundError:
        if must_exist:
            raise NotAllowed(f"disk image {locator} does not exist") from None
        return real
    except OSError as exc:
        raise NotAllowed(f"cannot access disk image {locator}: {exc.strerror}") from None
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
        raise NotAllowed(f"{locator} is neither a regular file nor a block device")
    return real


def _host_port(entry: str) -> tuple[str, int | None]:
    """("host", port or None) of a NBD_SOURCE_HOSTS entry."""
    entry = entry.strip().lower()
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else None
    if entry.count(":") == 1:
        host, port = entry.split(":")
        return host, int(port)
    return entry, None


def _is_local(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.is_loopback or address.is_unspecified


def _refuse_own_export(uri: str, host: str, port: int) -> None:
    listen = settings.OMA_EXPORT_LISTEN
    if not listen or ":" not in listen:
        return
    export_host, export_port = _host_port(listen)
    if port != export_port:
        return
    if host == export_host or _is_local(export_host) or _is_local(host):
        raise NotAllowed(f"{uri} is the OMA's own export server (OMA_EXPORT_LISTEN {listen}), which serves "
                         "replicas: never a source")


def check_nbd_uri(uri: str) -> str:
    """The NBD URI if the settings allow its server as a source; raises
    NotAllowed."""
    try:
        parsed = urlsplit(uri)
        port = parsed.port
    except ValueError as exc:
        raise NotAllowed(f"{uri} is not a valid NBD URI: {exc}") from None
    query = parse_qs(parsed.query, keep_blank_values=True)
    unknown = sorted(set(query) - _NBD_QUERY_KEYS)
    if unknown:
        raise NotAllowed(f"{uri}: an NBD source takes no {', '.join(unknown)} parameter")
    psk = (query.get("tls-psk-file") or [""])[0]
    if psk:
        secrets = _real(settings.OMA_SECRETS_DIR)
        real_psk = _real(psk)
        if not os.path.isabs(psk) or not _inside(real_psk, secrets) or real_psk in _own_files():
            raise NotAllowed(f"{uri}: the TLS key file must be inside OMA_SECRETS_DIR ({secrets})")
    if parsed.scheme.endswith("+unix"):
        _check_nbd_socket(uri, (query.get("socket") or [""])[0])
    elif "socket" in query:
        raise NotAllowed(f"{uri}: socket= belongs to nbd+unix URIs")
    else:
        _check_nbd_server(uri, (parsed.hostname or "").lower(), port or NBD_DEFAULT_PORT)
    return uri


def _check_nbd_socket(uri: str, socket_path: str) -> None:
    if not os.path.isabs(socket_path):
        raise NotAllowed(f"{uri}: an nbd+unix source needs an absolute socket= path")
    real = _real(socket_path)
    allowed_dir = _allowed_dir("NBD_SOURCE_SOCKET_DIRS", "NBD sources on Unix sockets", uri,
                               f"{uri}: the socket {socket_path}", real)
    # The OMA's export server listens in OMA_RUN_DIR: its exports are replicas.
    _refuse_own(uri, real, allowed_dir)


def _check_nbd_server(uri: str, host: str, port: int) -> None:
    if not host:
        raise NotAllowed(f"{uri}: an NBD source URI needs a host")
    allowed = []
    for entry in settings.NBD_SOURCE_HOSTS:
        try:
            allowed.append(_host_port(entry))
        except ValueError:
            raise NotAllowed(f"NBD_SOURCE_HOSTS entry {entry!r} is not host or host:port") from None
    if not allowed:
        raise NotAllowed(f"NBD sources are not allowed here: the setting NBD_SOURCE_HOSTS names no server, so "
                         f"{uri} is refused")
    if not any(host == h and p in (None, port) for h, p in allowed):
        raise NotAllowed(f"{uri}: {host}:{port} is not in NBD_SOURCE_HOSTS ({', '.join(settings.NBD_SOURCE_HOSTS)})")
    _refuse_own_export(uri, host, port)


def is_nbd_uri(locator: str) -> bool:
    return locator.startswith(("nbd://", "nbds://", "nbd+unix://", "nbds+unix://"))


def check_source(locator: str, *, must_exist: bool = True) -> str:
    """What to open for a source locator (an image's real path, or the NBD
    URI) if the settings allow it; raises NotAllowed with the reason."""
    if is_nbd_uri(locator):
        return check_nbd_uri(locator)
    return str(check_image_path(locator, must_exist=must_exist))


# Secrets by reference --------------------------------------------------------

def _check_secret_ref(what: str, secret_file: str, secret_env: str, prefix_setting: str, names_setting: str) -> None:
    """A secret may come from a file inside OMA_SECRETS_DIR or an
    allow-listed environment variable only: a record pointing anywhere else
    would send that file or variable (the agent token, say) to whatever host
    the record names."""
    if secret_file:
        secrets = _real(settings.OMA_SECRETS_DIR)
        if not os.path.isabs(secret_file):
            raise NotAllowed(f"the {what} file must be an absolute path: {secret_file}")
        real = _real(secret_file)
        if not _inside(real, secrets) or real == secrets:
            raise NotAllowed(f"the {what} file {secret_file} is not inside OMA_SECRETS_DIR ({secrets})")
        if real in _own_files():
            raise NotAllowed(f"the {what} file {secret_file} is one of the OMA's own secrets")
        if real.exists() and not real.is_file():
            raise NotAllowed(f"the {what} file {secret_file} is not a regular file")
    if secret_env:
        prefix = getattr(settings, prefix_setting)
        listed = secret_env in getattr(settings, names_setting)
        prefixed = bool(prefix) and secret_env.startswith(prefix) and len(secret_env) > len(prefix)
        if not _ENV_NAME_RE.match(secret_env) or not (listed or prefixed):
            raise NotAllowed(f"the environment variable {secret_env!r} may not hold a {what}: use a name starting "
                             f"with {prefix} ({prefix_setting}) or list it in {names_setting}")


def check_password_ref(password_file: str = "", password_env: str = "") -> None:
    """Where a vCenter's password may be read from."""
    _check_secret_ref("vCenter password", password_file, password_env, "VCENTER_PASSWORD_ENV_PREFIX",
                      "VCENTER_PASSWORD_ENVS")


def check_cloud_secret_ref(secret_file: str = "", secret_env: str = "") -> None:
    """Where a CloudStack cloud's secret key may be read from."""
    _check_secret_ref("CloudStack secret key", secret_file, secret_env, "CLOUDSTACK_SECRET_ENV_PREFIX",
                      "CLOUDSTACK_SECRET_ENVS")
