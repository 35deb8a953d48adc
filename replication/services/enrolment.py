"""Enrolment and isolation of agents (MigrateKit OSSEA's VMAs).

An administrator makes a one-time pairing code (only its hash is kept,
expiring); the agent host presents it with its name and its own SSH public
key (vma_agent.enrol) and becomes a pending agent; approval sets up its
outbound tunnel (services.tunnels: its key may log in to the OMA's sshd for
agents only to forward its own port and the broker and export ports; the
OMA reads its API at the tunnel's end), and gives it its own API token, its
own RabbitMQ user, allowed only its own queue vma.<name> (and what a Celery
worker needs beside it) and to publish to the OMA's queue (over TLS, with
the CA that signed the broker's certificate, when AGENT_BROKER_URL is
amqps), its own message key, which signs every outcome it sends, and its
own TLS-PSK identity at the export server (services.export_keys) when that
uses one; revocation removes its key and ends its SSH session (the tunnel
drops), removes its export key and deletes that user,
closing its connections at once. The OMA's outcome tasks ask
`accepts` before anything changes: an outcome about a VM that is not the
sender's, or whose signature fails, is refused and recorded. Every step is
in the agents' audit trail (who, when, from where)."""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
import ssl
import subprocess
from datetime import timedelta
from pathlib import Path
from urllib.parse import quote

from django.conf import settings
from django.db import transaction
from django.utils import timezone
from kombu.utils.url import url_to_parts

from replication.choices import JOB_ACTIVE, AgentState, DiskStatus, FailoverStatus
from replication.models import Agent, AgentAuditEntry, PairingCode
from replication.services import export_keys, tunnels
from vma_agent import broker_tls
from vma_agent import identity as message_identity
from vma_agent.task_names import OMA_QUEUE, agent_queue

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,39}$")
CODE_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"  # no 0/O, 1/I


class EnrolmentError(ValueError):
    """A refused enrolment step; str() says why, `status` is its HTTP status."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def audit(agent: Agent | None, action: str, actor: str, source: str = "", detail: str = "",
          agent_name: str = "") -> AgentAuditEntry:
    return AgentAuditEntry.objects.create(agent=agent, agent_name=agent.name if agent else agent_name,
                                          action=action, actor=actor, source=source, detail=detail)


def _hash(code: str) -> str:
    return hashlib.sha256(code.strip().upper().encode()).hexdigest()


def _agent(name: str) -> Agent:
    try:
        return Agent.objects.get(name=name)
    except Agent.DoesNotExist:
        raise EnrolmentError(f"no agent named {name!r}", 404) from None


def _secrets_dir(name: str) -> Path:
    path = Path(settings.OMA_SECRETS_DIR) / "agents" / name
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def _write_secret(path: Path, value: str) -> None:
    path.unlink(missing_ok=True)
    path.touch(mode=0o600)
    path.write_text(value)


# Pairing codes ----------------------------------------------------------------

def new_pairing_code(actor: str, minutes: int | None = None) -> str:
    """A one-time code for one agent to enrol with, valid `minutes`; only its hash is kept."""
    minutes = settings.PAIRING_CODE_MINUTES if minutes is None else minutes
    if minutes <= 0:
        raise EnrolmentError(f"a pairing code must be valid for at least a minute, not {minutes}")
    raw = "".join(secrets.choice(CODE_ALPHABET) for _ in range(16))
    code = "-".join(raw[i:i + 4] for i in range(0, 16, 4))
    PairingCode.objects.create(code_hash=_hash(code), created_by=actor,
                               expires_at=timezone.now() + timedelta(minutes=minutes))
    audit(None, "pairing-code", actor, detail=f"valid {minutes} min", agent_name="")
    return code


def pairing_code_record(code: str) -> PairingCode:
    """The record of a code just made (its hash, who made it, until when): what the admin's log names."""
    return PairingCode.objects.get(code_hash=_hash(code))


def enrol(code: str, name: str, public_key: str, version: str, source: str) -> Agent:
    """A pending agent, from a usable pairing code (used up by it)."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise EnrolmentError(f"bad agent name {name!r}: lower-case letters, digits and '-', at most 40, "
                             "starting with a letter or digit")
    if not isinstance(public_key, str) or not public_key.startswith("ssh-ed25519 "):
        raise EnrolmentError("public_key must be an ed25519 SSH public key (ssh-ed25519 AAAA...)")
    refusal = None
    with transaction.atomic():
        pairing = PairingCode.objects.select_for_update().filter(code_hash=_hash(str(code or ""))).first()
        if pairing is None:
            refusal = EnrolmentError("unknown pairing code", 403)
        elif pairing.used_at is not None:
            refusal = EnrolmentError("pairing code already used", 409)
        elif pairing.expires_at <= timezone.now():
            refusal = EnrolmentError("pairing code expired", 410)
        elif Agent.objects.filter(name=name).exists():
            refusal = EnrolmentError(f"agent name {name!r} is taken", 409)
        else:
            agent = Agent.objects.create(name=name, state=AgentState.PENDING, public_key=public_key.strip(),
                                         version=str(version or "")[:50], enrolled_from=source[:200])
            pairing.used_at = timezone.now()
            pairing.agent = agent
            pairing.save(update_fields=["used_at", "agent"])
            audit(agent, "enrolled", name, source, f"version {version}; code of {pairing.created_by}")
    if refusal is not None:
        audit(None, "enrol-refused", name, source, str(refusal), agent_name=name)
        raise refusal
    return agent


# RabbitMQ users -------------------------------------------------------------------

def broker_vhost() -> str:
    return url_to_parts(settings.AGENT_BROKER_URL).path or "/"


def broker_user_of(name: str, vhost: str | None = None) -> str:
    """The broker user of agent `name`: `vma-<name>.<8 hex of the vhost>`.
    RabbitMQ users are global across vhosts, so two OMAs (or test runs) on
    one RabbitMQ that reuse an agent name must not share (and delete or
    overwrite) one user; the vhost's short hash keeps them apart."""
    vhost = broker_vhost() if vhost is None else vhost
    return f"vma-{name}.{hashlib.sha256(vhost.encode()).hexdigest()[:8]}"


def broker_permissions(name: str) -> tuple[str, str, str]:
    """(configure, write, read) regular expressions for agent `name`'s user.
    A Celery worker consuming vma.<name> declares its queue and the
    same-named direct exchange and binds them; events (-E) publish to the
    topic exchange celeryev, which it may declare and write, never read (no
    other worker's events). Outcomes go to the OMA's exchange, which it may
    write to but not declare or delete. Nothing of Celery's remote control:
    the agent's worker runs without it (worker_enable_remote_control off for
    PROCESS_ROLE agent) and --without-gossip --without-mingle, so no
    celery.pidbox broadcast reaches it and no other worker's pidbox queue
    or reply is open to it. Never another agent's vma.* queue or exchange,
    nor the default exchange (so it cannot queue an order into another
    agent's queue)."""
    own = re.escape(agent_queue(name))
    configure = rf"^({own}|celeryev)$"
    write = rf"^({own}|{re.escape(OMA_QUEUE)}|celeryev)$"
    read = rf"^({own})$"
    return configure, write, read


def _rabbitmqctl(*args: str, stdin: str | None = None) -> str:
    done = subprocess.run([*settings.RABBITMQCTL, "-q", *args], input=stdin, capture_output=True, text=True,
                          timeout=60)
    if done.returncode != 0:
        raise EnrolmentError(f"rabbitmqctl {args[0]} failed: {(done.stderr or done.stdout).strip()[:300]}", 502)
    return done.stdout


def _broker_users() -> set[str]:
    return {line.split("\t")[0] for line in _rabbitmqctl("list_users", "--no-table-headers").splitlines()}


def _ensure_vhost(vhost: str) -> None:
    if vhost not in _rabbitmqctl("list_vhosts", "name", "--no-table-headers").split():
        _rabbitmqctl("add_vhost", vhost)


def _add_broker_user(name: str, password: str) -> str:
    user, vhost = broker_user_of(name), broker_vhost()
    _ensure_vhost(vhost)
    if user in _broker_users():
        _rabbitmqctl("delete_user", user)
    # The password goes on stdin: never in the process list, and one that
    # starts with "-" is not taken for an option (token_urlsafe makes those).
    _rabbitmqctl("add_user", user, stdin=password + "\n")
    _rabbitmqctl("set_permissions", "-p", vhost, user, *broker_permissions(name))
    return user


def _close_connections(user: str, why: str) -> int:
    closed = 0
    for line in _rabbitmqctl("list_connections", "pid", "user", "--no-table-headers").splitlines():
        parts = line.split("\t")
        if len(parts) == 2 and parts[1] == user:
            subprocess.run([*settings.RABBITMQCTL, "-q", "close_connection", parts[0], why], capture_output=True,
                           timeout=60)
            closed += 1
    return closed


def _delete_broker_user(user: str) -> int:
    """Delete the user (its connections closed first); one already gone is deleted."""
    closed = _close_connections(user, "agent revoked")
    try:
        _rabbitmqctl("delete_user", user)
    except EnrolmentError:
        if user in _broker_users():
            raise
    return closed


def broker_ca() -> str:
    """The CA certificate (PEM) that signed the broker's, which agents check
    it against, when they reach the broker over TLS (AGENT_BROKER_URL
    amqps://, AGENT_BROKER_CA_FILE); "" for a plain amqp:// broker.
    EnrolmentError when amqps is configured without a readable CA."""
    if not broker_tls.is_tls(settings.AGENT_BROKER_URL):
        return ""
    path = settings.AGENT_BROKER_CA_FILE
    if not path:
        raise EnrolmentError("AGENT_BROKER_URL is amqps (TLS), but AGENT_BROKER_CA_FILE is not set: agents need "
                             "the CA certificate (PEM) that signed the broker's to check it", 409)
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        why = getattr(exc, "strerror", None) or "not text"
        raise EnrolmentError(f"AGENT_BROKER_CA_FILE {path} cannot be read ({why}): agents need the CA "
                             "certificate (PEM) that signed the broker's to check it", 409) from None
    try:
        if not text.strip():
            raise ssl.SSLError("empty")
        ssl.create_default_context(cadata=text)
    except ssl.SSLError:
        raise EnrolmentError(f"AGENT_BROKER_CA_FILE {path} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
                             409) from None
    return text


def broker_url_for(user: str, password: str, host_port: str | None = None) -> str:
    """The agent's broker URL: AGENT_BROKER_URL with its user, or at
    `host_port` (its end of the tunnel) instead of the broker's own address."""
    parts = url_to_parts(settings.AGENT_BROKER_URL)
    if host_port is None:
        host_port = f"{parts.hostname}{f':{parts.port}' if parts.port else ''}"
    return (f"{parts.scheme}://{quote(user, safe='')}:{quote(password, safe='')}@{host_port}/"
            f"{quote(broker_vhost(), safe='')}")


# Approval, rejection, revocation -----------------------------------------------------

def approve(name: str, actor: str, source: str = "") -> Agent:
    """Give a pending agent its tunnel (services.tunnels: a port on the OMA,
    its key allowed to forward only that port and to the broker and the
    export; the OMA then reads its API at the tunnel's end), its own broker
    user, API token and message key; active. Each step is audited; a step
    that fails undoes the ones before it. Refused before any step while the
    broker is amqps and its CA cannot be handed over (broker_ca)."""
    agent = _agent(name)
    if agent.state != AgentState.PENDING:
        raise EnrolmentError(f"agent {name} is {agent.state}, not pending: only a pending agent can be approved",
                             409)
    try:
        broker_ca()
    except EnrolmentError as exc:
        audit(agent, "approval-refused", actor, source, str(exc))
        raise
    try:
        spec = tunnels.open_tunnel_for(agent)
    except tunnels.TunnelError as exc:
        audit(agent, "tunnel-refused", actor, source, str(exc))
        raise EnrolmentError(f"agent {name}'s tunnel cannot be set up: {exc}", 409) from None
    audit(agent, "tunnel-authorized", actor, source,
          f"listens on the OMA's 127.0.0.1:{agent.tunnel_port} (its API, read at {agent.api_url}); "
          f"may open {', '.join(f['to'] for f in spec['forwards']) or 'nothing'}")
    password = secrets.token_urlsafe(24)
    try:
        user = _add_broker_user(name, password)
    except EnrolmentError:
        _undo_tunnel(agent, actor, source, "broker user not created")
        raise
    export_identity = ""
    if export_keys.enabled():  # its own line in the export server's PSK file
        try:
            export_keys.issue(name)
        except export_keys.ExportKeyError as exc:
            _delete_broker_user(user)
            _undo_tunnel(agent, actor, source, "export key not issued")
            raise EnrolmentError(f"agent {name}'s export key cannot be issued: {exc}", 409) from None
        export_identity = export_keys.identity_of(name)
    folder = _secrets_dir(name)
    key_file, token_file = folder / "message_key", folder / "api_token"
    _write_secret(key_file, secrets.token_hex(32))
    _write_secret(token_file, secrets.token_urlsafe(32))  # the OMA reads its API with it
    _write_secret(folder / "broker_password", password)  # until the agent fetches it (once)
    if not agent.transition(AgentState.ACTIVE, only_from=[AgentState.PENDING], broker_user=user,
                            message_key_file=str(key_file), token_file=str(token_file), approved_by=actor,
                            approved_at=timezone.now()):
        _delete_broker_user(user)
        if export_identity:
            export_keys.withdraw(name)
        _undo_tunnel(agent, actor, source, "approval lost the race")
        raise EnrolmentError(f"agent {name} is no longer pending ({agent.state})", 409)
    export = f"; export TLS-PSK identity {export_identity}" if export_identity else ""
    audit(agent, "approved", actor, source, f"broker user {user} on vhost {broker_vhost()}{export}")
    return agent


def _undo_tunnel(agent: Agent, actor: str, source: str, why: str) -> None:
    try:
        ended = tunnels.close_tunnel_for(agent)
        detail = f"{why}: key removed{', its session ended' if ended else ''}"
    except tunnels.TunnelError as exc:
        detail = f"{why}: {exc}"
    audit(agent, "tunnel-closed", actor, source, detail)


def reject(name: str, actor: str, source: str = "") -> Agent:
    agent = _agent(name)
    if not agent.transition(AgentState.REJECTED, only_from=[AgentState.PENDING]):
        raise EnrolmentError(f"agent {name} is {agent.state}, not pending: only a pending agent can be rejected",
                             409)
    audit(agent, "rejected", actor, source)
    return agent


def revoke(name: str, actor: str, source: str = "") -> Agent:
    """Take an agent's trust and credentials back at once, in the order that
    stops its copies soonest: revoked (its messages refused from this
    instant), its work ended by the OMA (its copies asked to stop while its
    tunnel still carries the request, their layers fenced, its runs closed),
    then its tunnel key removed and its open SSH session ended (no broker, no
    export, no API reachable), then its broker user deleted (its connections
    closed; rabbitmqctl takes seconds). A revocation whose broker step failed
    is finished by revoking again; a session this process may not end is
    recorded and reported after the rest is done."""
    agent = _agent(name)
    unfinished = (agent.state == AgentState.REVOKED
                  and ((agent.broker_user and agent.broker_user in _broker_users()) or _holds_export_key(name)))
    if agent.state in (AgentState.REVOKED, AgentState.REJECTED) and not unfinished:
        raise EnrolmentError(f"agent {name} is already {agent.state}", 409)
    if agent.state != AgentState.REVOKED:
        agent.transition(AgentState.REVOKED, revoked_at=timezone.now())
    ended, runs, failovers = end_work_of(agent, f"agent {name} revoked by {actor}: its work is not trusted, "
                                                f"ended by the OMA")
    tunnel_failure = None
    if agent.public_key or agent.tunnel_port:
        try:
            closed_session = tunnels.close_tunnel_for(agent)
            audit(agent, "tunnel-closed", actor, source,
                  f"key removed; {'its open session ended' if closed_session else 'no session was open'}"
                  f"{f' (port {agent.tunnel_port} kept for it)' if agent.tunnel_port else ''}")
        except tunnels.TunnelError as exc:
            tunnel_failure = str(exc)
            audit(agent, "tunnel-close-failed", actor, source, tunnel_failure)
    key_failure, key_removed = None, False
    try:  # its next connection to the export is refused (the server reads the file at each)
        key_removed = export_keys.withdraw(name)
    except export_keys.ExportKeyError as exc:
        key_failure = f"its export key is still in the PSK file: {exc}"
        audit(agent, "export-key-remove-failed", actor, source, key_failure)
    (Path(settings.OMA_SECRETS_DIR) / "agents" / name / "broker_password").unlink(missing_ok=True)
    closed = _delete_broker_user(agent.broker_user) if agent.broker_user else 0
    audit(agent, "revoked", actor, source, f"broker user {agent.broker_user or '-'} deleted, "
                                           f"{closed} connection(s) closed, {ended} job(s) failed, "
                                           f"{runs} copy run(s) closed, {failovers} failover(s) answered"
                                           f"{', export key removed' if key_removed else ''}")
    failure = "; ".join(item for item in (tunnel_failure, key_failure) if item)
    if failure:
        raise EnrolmentError(f"agent {name} revoked, but {failure}", 500)
    return agent


def _holds_export_key(name: str) -> bool:
    try:
        return bool(export_keys.key_of(name))
    except export_keys.ExportKeyError:
        return True  # unreadable: revoking again tries to remove it


def end_work_of(agent: Agent, reason: str) -> tuple[int, int, int]:
    """End what a revoked agent still holds, on the OMA's word alone (its
    own outcomes are refused, so it cannot be waited for): its running
    cycles fail with `reason`, each one's cleanup asking its API (if
    reachable) to stop the copies and discarding the cycle's layers, so a
    copy that goes on writing lands nowhere and no recovery point or
    changeId comes of it; then each of its copy runs still open is closed
    with the same reason; then each failover waiting on it to switch a
    source's power is answered with the reason (failover.end_power_waits_of).
    (jobs failed, runs closed, failovers answered)."""
    from replication.models import CopyAttempt, ReplicationJob, VMDisk
    from replication.services import failover, jobs

    job_ids = list(ReplicationJob.objects.filter(vm__agent=agent.name, status__in=JOB_ACTIVE)
                   .values_list("pk", flat=True))
    # First: each cleanup asks the agent to stop the runs still copying. Counted
    # only when this call failed it (the reaper's pass may race a revocation).
    failed = sum(jobs.fail_job(job_id, reason) for job_id in job_ids)
    runs = 0
    for disk in VMDisk.objects.filter(job__vm__agent=agent.name, status=DiskStatus.COPYING):
        if disk.fail(reason):
            disk.end_attempt(disk.attempts, CopyAttempt.Outcome.CANCELLED, reason=reason)
            runs += 1
    return failed, runs, failover.end_power_waits_of(agent.name, reason)


def end_revoked_work() -> list[str]:
    """The reaper's pass over revoked agents: any cycle or copy run of
    theirs still open (one that raced the revocation, or one a failed
    revocation left) is ended as end_work_of says. The names of the agents
    whose work was ended."""
    from replication.models import FailoverJob, ReplicationJob, VMDisk

    revoked = list(Agent.objects.filter(state=AgentState.REVOKED).values_list("name", flat=True))
    if not revoked:
        return []
    holding = (set(ReplicationJob.objects.filter(vm__agent__in=revoked, status__in=JOB_ACTIVE)
                   .values_list("vm__agent", flat=True))
               | set(VMDisk.objects.filter(job__vm__agent__in=revoked, status=DiskStatus.COPYING)
                     .values_list("job__vm__agent", flat=True))
               | set(FailoverJob.objects.filter(vm__agent__in=revoked, status=FailoverStatus.RUNNING,
                                                wait_until__isnull=False).values_list("vm__agent", flat=True)))
    names = []
    for name in sorted(holding):
        agent = Agent.objects.get(name=name)
        when = f" at {agent.revoked_at:%Y-%m-%d %H:%M:%S} UTC" if agent.revoked_at else ""
        ended, closed, answered = end_work_of(agent, f"agent {name} revoked{when}: its work is not trusted, "
                                                     f"ended by the OMA")
        if ended or closed or answered:  # nothing, when the revocation itself got there first
            detail = f"{ended} job(s) failed, {closed} copy run(s) closed, {answered} failover(s) answered"
            log.warning("agent %s is revoked: %s", name, detail)
            audit(agent, "work-ended", "reaper", detail=detail)
            names.append(name)
    return names


def credentials(name: str, code: str, source: str) -> tuple[int, dict]:
    """What an enrolling agent polls for, proving itself with its pairing
    code: (202, pending), (403, rejected/revoked), or once approved (200, its
    broker URL and message key, and the broker's CA when it is amqps), given
    once."""
    agent = Agent.objects.filter(name=name).first()
    if agent is None or not PairingCode.objects.filter(agent=agent, code_hash=_hash(str(code or ""))).exists():
        return 403, {"error": "unknown agent or wrong pairing code"}
    if agent.state == AgentState.PENDING:
        return 202, {"state": agent.state, "detail": "waiting for an administrator's approval"}
    if agent.state in (AgentState.REJECTED, AgentState.REVOKED):
        return 403, {"state": agent.state, "error": f"agent {name} was {agent.state}"}
    try:  # before the password is used up: an agent asked to come back gets it then
        ca = broker_ca()
        export_key = export_keys.key_of(name)
    except (EnrolmentError, export_keys.ExportKeyError) as exc:
        return 503, {"error": str(exc)}
    password_file = Path(settings.OMA_SECRETS_DIR) / "agents" / name / "broker_password"
    try:
        password = password_file.read_text()
    except FileNotFoundError:
        return 410, {"error": "credentials already fetched"}
    password_file.unlink()
    audit(agent, "credentials-fetched", name, source)
    tunnel = tunnels.tunnel_spec(agent) if agent.channel == Agent.Channel.TUNNEL and agent.tunnel_port else None
    broker = next((f for f in tunnel["forwards"] if f["name"] == "broker"), None) if tunnel else None
    answer = {"state": agent.state, "agent_name": name, "queue": agent.queue,
              # Its end of the tunnel's broker forward, on the agent host; over
              # TLS (amqps) the broker's own address, no forward.
              "broker_url": broker_url_for(agent.broker_user, password,
                                           f"127.0.0.1:{broker['local_port']}" if broker else None),
              "message_key": Path(agent.message_key_file).read_text().strip(),
              "api_token": Path(agent.token_file).read_text().strip() if agent.token_file else "",
              "tunnel": tunnel}
    if ca:
        answer["broker_ca"] = ca
    if export_key:  # its own identity at the export server (TLS-PSK)
        answer["export_tls"] = {"username": export_keys.identity_of(name), "psk": export_key}
    return 200, answer


# Identity on outcomes ------------------------------------------------------------------

def accepts(task_name: str, args: list, identity: dict | None, vm_agent: str) -> bool:
    """Whether an outcome about a VM whose agent is `vm_agent` may be acted
    on: signed by that agent with its message key; unsigned only if that
    agent has no key recorded (configured by hand, or the embedded agent).
    A refusal is recorded in the audit trail."""
    claimed = identity.get("agent") if isinstance(identity, dict) else None
    agent = Agent.objects.filter(name=vm_agent).first()
    why = ""
    if identity is None:
        if agent is not None and agent.message_key_file:
            why = f"unsigned, but agent {vm_agent} signs its messages"
    elif claimed != vm_agent:
        why = f"sent as agent {claimed!r}, but the VM's agent is {vm_agent!r}"
    elif agent is None or not agent.message_key_file:
        why = f"signed, but agent {vm_agent} has no message key recorded"
    elif agent.state in (AgentState.REVOKED, AgentState.REJECTED, AgentState.PENDING):
        why = f"agent {vm_agent} is {agent.state}"
    else:
        try:
            key = Path(agent.message_key_file).read_bytes().strip()
        except OSError as exc:
            key, why = b"", f"cannot read agent {vm_agent}'s message key: {exc.strerror}"
        if key and not message_identity.verify(key, identity, task_name, args):
            why = f"signature of agent {vm_agent} does not match"
    if not why:
        return True
    log.warning("outcome %s refused: %s", task_name, why)
    sender = Agent.objects.filter(name=claimed).first() if isinstance(claimed, str) else None
    audit(sender, "message-refused", str(claimed or "unsigned")[:100], "broker",
          f"{task_name}{args[:1]}: {why}", agent_name=str(claimed or vm_agent)[:50])
    return False


def accepts_for_job(task_name: str, args: list, identity: dict | None, job_id: str) -> bool:
    from replication.models import ReplicationJob

    vm_agent = ReplicationJob.objects.filter(pk=job_id).values_list("vm__agent", flat=True).first()
    return accepts(task_name, args, identity, vm_agent or "")


def accepts_for_failover(task_name: str, args: list, identity: dict | None, failover_id: int) -> bool:
    from replication.models import FailoverJob

    vm_agent = FailoverJob.objects.filter(pk=failover_id).values_list("vm__agent", flat=True).first()
    return accepts(task_name, args, identity, vm_agent or "")


__all__ = ["EnrolmentError", "accepts", "accepts_for_failover", "accepts_for_job", "approve", "broker_ca",
           "broker_permissions",
           "broker_url_for", "broker_user_of", "broker_vhost", "credentials", "end_revoked_work", "end_work_of",
           "enrol", "new_pairing_code", "pairing_code_record", "reject", "revoke"]
