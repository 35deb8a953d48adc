"""Agents behind a firewall: the outbound tunnel (as MigrateKit OSSEA's VMA
opens one). An agent opens ONE SSH connection to the OMA's own sshd for
agents (scripts/lib.sh ensure_agent_sshd, AGENT_SSH_PORT; never the system
sshd) as the unprivileged AGENT_SSH_USER, and through it:

- a reverse forward of its progress API to 127.0.0.1:<its tunnel_port> on
  the OMA, where the poller reads it (Agent.api_url, channel "tunnel");
- local forwards to the broker and the NBD export port, so that traffic is
  encrypted and leaves the site outbound only. A broker agents reach over
  TLS (AGENT_BROKER_URL amqps://) is reached at its own address instead, with
  its certificate checked (services.enrolment hands over its CA): no broker
  forward then.

Each agent's key has one line in the agents' authorized_keys, restricted to
exactly that: no shell, no pty, listening only on its own port, opening only
the broker and export ports. open_tunnel_for() writes it (enrolment's
approval calls it), close_tunnel_for() removes it and ends the agent's
session (revocation calls it). sshd reads the file at every login, so
neither needs a restart."""

from __future__ import annotations

import base64
import fcntl
import ipaddress
import os
import re
import signal
import socket
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

from django.conf import settings
from django.db import IntegrityError, transaction

from replication.models import Agent
from vma_agent import broker_tls

KEY_TYPES = ("ssh-ed25519", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521", "ssh-rsa",
             "sk-ssh-ed25519@openssh.com", "sk-ecdsa-sha2-nistp256@openssh.com")
MARKER = "oma-agent:"  # each line's comment: which agent it belongs to


class TunnelError(ValueError):
    """A tunnel that cannot be opened as asked; str() says why."""


def authorized_keys_path() -> Path:
    return Path(settings.AGENT_SSH_DIR) / "authorized_keys"


def tunnel_ports() -> range:
    try:
        low, high = (int(part) for part in settings.AGENT_TUNNEL_PORTS.split("-"))
    except ValueError:
        raise TunnelError(f"AGENT_TUNNEL_PORTS must be LOW-HIGH, not {settings.AGENT_TUNNEL_PORTS!r}") from None
    if not 1024 <= low <= high <= 65535:
        raise TunnelError(f"AGENT_TUNNEL_PORTS {settings.AGENT_TUNNEL_PORTS!r}: ports 1024-65535, low first")
    return range(low, high + 1)


def broker_open() -> str:
    """host:port of the broker as the OMA's sshd reaches it (AGENT_BROKER_URL,
    the broker enrolled agents are given): the target of an agent's broker
    forward."""
    broker = urlsplit(settings.AGENT_BROKER_URL)
    default_port = {"amqp": 5672, "amqps": 5671, "redis": 6379, "rediss": 6379}.get(broker.scheme)
    return f"{broker.hostname or '127.0.0.1'}:{broker.port or default_port}"


def broker_through_tunnel() -> bool:
    """Whether agents reach the broker through their tunnels (plain AMQP,
    encrypted by SSH); not when AGENT_BROKER_URL is amqps (TLS of its own,
    reached at its own address)."""
    return not broker_tls.is_tls(settings.AGENT_BROKER_URL)


def export_open() -> str | None:
    """host:port of the NBD export server for agents (OMA_EXPORT_LISTEN), if
    on TCP on this host's loopback (or every address): the target of an
    agent's export forward. None when it listens on another address: the
    export URIs name that address, which agents reach directly, over TLS-PSK
    (each with its own identity, services.export_keys), not through their
    tunnels."""
    if not settings.OMA_EXPORT_LISTEN:
        return None
    host, port = settings.OMA_EXPORT_LISTEN.rsplit(":", 1)
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        address = None  # the export server refuses it anyway
    if address is not None and not (address.is_loopback or address.is_unspecified):
        return None
    return f"127.0.0.1:{port}"


def permitted_opens() -> list[str]:
    """host:port pairs an agent may reach through its tunnel: the broker and
    the NBD export (AGENT_TUNNEL_PERMIT_OPEN, or derived from
    AGENT_BROKER_URL, unless it is amqps, and OMA_EXPORT_LISTEN)."""
    if settings.AGENT_TUNNEL_PERMIT_OPEN:
        opens = list(settings.AGENT_TUNNEL_PERMIT_OPEN)
    else:
        opens = ([broker_open()] if broker_through_tunnel() else []) + [item for item in [export_open()] if item]
    for item in opens:
        if not re.fullmatch(r"[A-Za-z0-9.\-]+:\d{1,5}", item):
            raise TunnelError(f"AGENT_TUNNEL_PERMIT_OPEN: {item!r} is not host:port")
    return opens


def parse_public_key(text: str) -> tuple[str, str]:
    """(type, base64 blob) of one OpenSSH public key line; TunnelError says
    what is wrong (options, several lines, unknown type, bad encoding)."""
    text = (text or "").strip()
    if not text:
        raise TunnelError("the agent has no public key (it sends one when it enrols)")
    if "\n" in text or "\r" in text:
        raise TunnelError("the agent's public key must be one line")
    parts = text.split()
    if len(parts) < 2 or parts[0] not in KEY_TYPES:
        raise TunnelError(f"not an OpenSSH public key (expected one of {', '.join(KEY_TYPES[:3])}, ...; "
                          "no options before the key)")
    try:
        blob = base64.b64decode(parts[1], validate=True)
    except ValueError:
        raise TunnelError("the public key's data is not base64") from None
    if not blob.startswith(len(parts[0]).to_bytes(4, "big") + parts[0].encode()):
        raise TunnelError(f"the public key's data is not a {parts[0]} key")
    return parts[0], parts[1]


def authorized_line(agent: Agent) -> str:
    """The agent's authorized_keys line: forwarding only, listening only on
    its own port, opening only the broker and the export."""
    if agent.tunnel_port is None:
        raise TunnelError(f"agent {agent.name} has no tunnel port")
    key_type, blob = parse_public_key(agent.public_key)
    options = ["restrict", "port-forwarding", f'permitlisten="127.0.0.1:{agent.tunnel_port}"']
    options += [f'permitopen="{item}"' for item in permitted_opens()]
    options.append('command="/bin/false"')
    return f"{','.join(options)} {key_type} {blob} {MARKER}{agent.name}"


@contextmanager
def _locked_keys():
    """The authorized_keys lines of every agent, to change; written back
    atomically (sshd never reads half a file) under a lock."""
    path = authorized_keys_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / "authorized_keys.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        lines = path.read_text().splitlines() if path.exists() else []
        yield lines
        with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=".authorized_keys.", delete=False) as tmp:
            tmp.write("".join(line + "\n" for line in lines))
        os.chmod(tmp.name, 0o644)
        os.replace(tmp.name, path)


def _without(lines: list[str], name: str) -> list[str]:
    return [line for line in lines if not line.endswith(f" {MARKER}{name}")]


def _port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _allocate_port(agent: Agent) -> None:
    taken = set(Agent.objects.exclude(pk=agent.pk).exclude(tunnel_port=None).values_list("tunnel_port", flat=True))
    for port in tunnel_ports():
        if port in taken or not _port_is_free(port):
            continue
        agent.tunnel_port = port
        try:
            with transaction.atomic():
                agent.save(update_fields=["tunnel_port"])
        except IntegrityError:  # another approval took it meanwhile
            continue
        return
    raise TunnelError(f"no free tunnel port left in AGENT_TUNNEL_PORTS {settings.AGENT_TUNNEL_PORTS}")


def open_tunnel_for(agent: Agent) -> dict:
    """Let the agent open its tunnel: its port (kept if it has one), its
    authorized_keys line, and the OMA reading its API at the tunnel's end.
    Returns what the agent needs to open it (tunnel_spec)."""
    parse_public_key(agent.public_key)  # before a port is taken for it
    if agent.tunnel_port is None:
        _allocate_port(agent)
    line = authorized_line(agent)
    with _locked_keys() as lines:
        lines[:] = _without(lines, agent.name) + [line]
    agent.channel = Agent.Channel.TUNNEL
    agent.api_url = f"http://127.0.0.1:{agent.tunnel_port}"
    agent.save(update_fields=["channel", "api_url"])
    return tunnel_spec(agent)


def close_tunnel_for(agent: Agent) -> bool:
    """Take the agent's tunnel away at once: its line removed (no new login)
    and its open session ended. Its port stays recorded (a re-approval gets
    the same). Returns whether a session was ended."""
    with _locked_keys() as lines:
        lines[:] = _without(lines, agent.name)
    return bool(agent.tunnel_port) and _end_session(agent.tunnel_port)


def _end_session(port: int) -> bool:
    """End the sshd session that listens on 127.0.0.1:port (the agent's
    reverse forward): its per-connection sshd process is the listener."""
    out = subprocess.run(["ss", "-ltnpH", f"src 127.0.0.1:{port}"], capture_output=True, text=True, timeout=10)
    if not out.stdout.strip():
        return False  # no session open
    pids = {int(pid) for pid in re.findall(r'\("sshd",pid=(\d+),', out.stdout)}
    if not pids:
        raise TunnelError(f"its key is removed, but the session listening on 127.0.0.1:{port} is not an sshd "
                          "this process may see (ss shows no owner): end it as root")
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        except PermissionError:
            raise TunnelError(f"its key is removed, but its open session (sshd pid {pid}) may not be ended by "
                              "this user: run the OMA's revocation as root or as the agents' sshd user") from None
    return True


def host_key() -> str:
    """The public host key of the agents' sshd (ensure_agent_sshd makes it),
    handed to the agent at approval so it pins it instead of trusting the
    first key it meets; empty while none was made yet."""
    path = Path(settings.AGENT_SSH_DIR) / "ssh_host_ed25519_key.pub"
    try:
        return " ".join(path.read_text().split()[:2])
    except OSError:
        return ""


def tunnel_spec(agent: Agent) -> dict:
    """What the agent's tunnel keeper needs (python -m vma_agent.tunnel
    --config): the OMA's sshd host (blank: the host the agent enrolled
    with), port, user and host key, its remote port, and the forwards it
    may open, each named ("broker", "export") when it is one, at the same
    local port number on the agent host by default. No forward is the
    broker's when agents reach it over TLS (amqps)."""
    named = {broker_open(): "broker"} if broker_through_tunnel() else {}
    if export_open():
        named[export_open()] = "export"
    forwards = [{"name": named.get(item, ""), "to": item, "local_port": int(item.rsplit(":", 1)[1])}
                for item in permitted_opens()]
    return {"ssh_host": settings.AGENT_SSH_HOST, "ssh_port": settings.AGENT_SSH_PORT,
            "user": settings.AGENT_SSH_USER, "host_key": host_key(), "remote_port": agent.tunnel_port,
            "forwards": forwards}


__all__ = ["TunnelError", "authorized_keys_path", "authorized_line", "close_tunnel_for", "open_tunnel_for",
           "parse_public_key", "permitted_opens", "tunnel_spec", "broker_open", "broker_through_tunnel",
           "export_open", "host_key"]
