"""Enrol this agent host with an OMA, run on the agent host (no Django, no
database):

    python -m vma_agent.enrol --oma https://oma.example --code ABCD-EFGH-JKLM-NPQR --name site-a

Makes the agent's own ed25519 SSH key in its state directory (0600; kept,
reused on a second run), presents it with the pairing code an administrator
gave, then waits for the administrator's approval and writes the
credentials the OMA issues (its own broker URL, API token and message key,
and its tunnel; the broker's CA when the broker is amqps; its own key at
the export server when that uses TLS-PSK) to <state dir>/message_key,
agent.env, tunnel.json, known_hosts, broker_ca.pem and export.psk (all
0600); `python -m vma_agent.run --state-dir DIR` then
opens the tunnel and starts the agent's API and worker through it. Exits non-zero with the
reason when the OMA refuses (code expired or used, name taken, rejected)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import requests

VERSION = "1"


class EnrolError(RuntimeError):
    pass


def agent_key(state_dir: Path, name: str) -> str:
    """The agent's SSH public key, made once (ed25519, private part 0600)."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = state_dir / "id_ed25519"
    if not key.exists():
        done = subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"vma-{name}", "-f", str(key)],
                              capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise EnrolError(f"ssh-keygen failed: {done.stderr.strip()}")
    key.chmod(0o600)
    return (state_dir / "id_ed25519.pub").read_text().strip()


def _error(response: requests.Response) -> str:
    try:
        return response.json().get("error") or response.text
    except ValueError:
        return response.text[:300]


def present(oma: str, code: str, name: str, public_key: str, timeout_s: float = 30) -> dict:
    response = requests.post(f"{oma.rstrip('/')}/api/agents/enrol/", timeout=timeout_s,
                             json={"code": code, "name": name, "public_key": public_key, "version": VERSION})
    if response.status_code != 201:
        raise EnrolError(f"the OMA refused the enrolment ({response.status_code}): {_error(response)}")
    return response.json()


def fetch_credentials(oma: str, code: str, name: str, wait_s: float, poll_s: float, timeout_s: float = 30) -> dict:
    """The credentials, once an administrator approved; waits up to `wait_s`
    (also while the OMA answers 503: it cannot hand them over yet, e.g. its
    broker's CA file is unreadable, and keeps them)."""
    deadline = time.monotonic() + wait_s
    why = ""
    while True:
        response = requests.get(f"{oma.rstrip('/')}/api/agents/enrol/{name}/", timeout=timeout_s,
                                headers={"Authorization": f"Pairing {code}"})
        if response.status_code == 200:
            return response.json()
        if response.status_code not in (202, 503):
            raise EnrolError(f"no credentials ({response.status_code}): {_error(response)}")
        if response.status_code == 503 and _error(response) != why:
            why = _error(response)
            print(f"enrol: the OMA cannot hand the credentials over yet: {why}", file=sys.stderr, flush=True)
        if time.monotonic() >= deadline:
            raise EnrolError(f"not approved within {wait_s:.0f} s{f' ({why})' if why else ''}; "
                             "run again with --resume to keep waiting")
        time.sleep(poll_s)


def _write_private(path: Path, text: str) -> None:
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)


def _with_port(url: str, local_port: int) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)
    host = netloc[-1].rsplit(":", 1)[0]
    return urlunsplit(parts._replace(netloc="@".join([*netloc[:-1], f"{host}:{local_port}"])))


def tunnel_config(state_dir: Path, oma: str, tunnel: dict, api_port: int, broker_port: int | None) -> dict:
    """The tunnel keeper's configuration (python -m vma_agent.tunnel
    --config): the OMA's sshd (its host key pinned in <state dir>/known_hosts
    when the OMA sent it), this agent's remote port and key, its API's port,
    and a local forward for each address the OMA lets it open (the broker's
    at `broker_port` if given, the rest at the OMA's own port numbers, which
    the export URIs in work orders name)."""
    host = tunnel.get("ssh_host") or urlsplit(oma).hostname
    if not host:
        raise EnrolError(f"no host to open the tunnel to: the OMA names none and {oma!r} is not a URL")
    config = {"oma_host": host, "ssh_port": int(tunnel["ssh_port"]), "user": tunnel["user"],
              "key": str(state_dir / "id_ed25519"), "remote_port": int(tunnel["remote_port"]),
              "api_port": api_port, "forward": []}
    for forward in tunnel["forwards"]:
        local = broker_port if forward["name"] == "broker" and broker_port else int(forward["local_port"])
        config["forward"].append(f"{local}:{forward['to']}")
    if tunnel.get("host_key"):
        known = state_dir / "known_hosts"
        name = host if config["ssh_port"] == 22 else f"[{host}]:{config['ssh_port']}"
        _write_private(known, f"{name} {tunnel['host_key']}\n")
        config["known_hosts"] = str(known)
    return config


def write_credentials(state_dir: Path, creds: dict, oma: str = "", api_port: int = 8000,
                      broker_port: int | None = None) -> Path:
    """<state dir>/message_key, agent.env and, when the OMA set up a tunnel
    for it, tunnel.json (and known_hosts): all 0600. The broker URL then
    names this host's end of the tunnel's broker forward, unless it is
    amqps: then the broker's own address, checked against the CA the OMA
    sent (broker_ca.pem, VMA_BROKER_CA_FILE)."""
    key_file = state_dir / "message_key"
    _write_private(key_file, creds["message_key"] + "\n")
    broker_url = creds["broker_url"]
    tunnel = creds.get("tunnel")
    if tunnel:
        config = tunnel_config(state_dir, oma, tunnel, api_port, broker_port)
        _write_private(state_dir / "tunnel.json", json.dumps(config, indent=2) + "\n")
        if broker_port and any(f["name"] == "broker" for f in tunnel["forwards"]):
            broker_url = _with_port(broker_url, broker_port)
    env_file = state_dir / "agent.env"
    values = [("PROCESS_ROLE", "agent"), ("VMA_AGENT_NAME", creds["agent_name"]),
              ("CELERY_BROKER_URL", broker_url), ("VMA_MESSAGE_KEY_FILE", key_file)]
    if creds.get("api_token"):  # the OMA reads this agent's API with it
        values.append(("VMA_TOKEN", creds["api_token"]))
    if creds.get("broker_ca"):  # the CA that signed the broker's certificate (amqps)
        ca_file = state_dir / "broker_ca.pem"
        _write_private(ca_file, creds["broker_ca"])
        values.append(("VMA_BROKER_CA_FILE", ca_file))
    export = creds.get("export_tls")
    if export:  # its own TLS-PSK identity at the OMA's export server (vma_agent.export_tls)
        psk_file = state_dir / "export.psk"
        _write_private(psk_file, f"{export['username']}:{export['psk']}\n")
        values += [("VMA_EXPORT_PSK_FILE", psk_file), ("VMA_EXPORT_TLS_USERNAME", export["username"])]
    values.append(("VMA_API_PORT", api_port))
    _write_private(env_file, "".join(f"{k}={v}\n" for k, v in values))
    return env_file


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vma_agent.enrol", description=__doc__.split("\n\n")[0])
    parser.add_argument("--oma", required=True, help="the OMA's base URL")
    parser.add_argument("--code", required=True, help="the pairing code an administrator gave")
    parser.add_argument("--name", required=True, help="this agent's name (its queue: vma.<name>)")
    parser.add_argument("--state-dir", type=Path, default=Path(os.environ.get("VMA_STATE_DIR", "/var/lib/vma-agent")))
    parser.add_argument("--wait-s", type=float, default=3600.0, help="how long to wait for approval")
    parser.add_argument("--poll-s", type=float, default=5.0, help="how often to ask")
    parser.add_argument("--resume", action="store_true", help="already enrolled: only wait for the credentials")
    parser.add_argument("--no-wait", action="store_true", help="enrol and exit (fetch later with --resume)")
    parser.add_argument("--api-port", type=int, default=8000,
                        help="this agent's progress API port on 127.0.0.1 (the tunnel brings it to the OMA)")
    parser.add_argument("--broker-port", type=int, help="this host's end of the tunnel's broker forward "
                                                         "(default: the broker's own port number)")
    args = parser.parse_args(argv)
    try:
        if not args.resume:
            present(args.oma, args.code, args.name, agent_key(args.state_dir, args.name))
            print(f"enrolled as {args.name}: waiting for approval (manage.py agent approve {args.name})", flush=True)
        if args.no_wait:
            return 0
        creds = fetch_credentials(args.oma, args.code, args.name, args.wait_s, args.poll_s)
        env_file = write_credentials(args.state_dir, creds, args.oma, args.api_port, args.broker_port)
    except (EnrolError, requests.RequestException, OSError) as exc:
        print(f"enrol: {exc}", file=sys.stderr)
        return 1
    tunnel = " and tunnel.json (start it all: python -m vma_agent.run)" if creds.get("tunnel") else ""
    print(f"approved: credentials in {env_file}{tunnel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
