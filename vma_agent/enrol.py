"""Enrol this agent host with an OMA, run on the agent host (no Django, no
database):

    python -m vma_agent.enrol --oma https://oma.example --code ABCD-EFGH-JKLM-NPQR --name site-a

Makes the agent's own ed25519 SSH key in its state directory (0600; kept,
reused on a second run), presents it with the pairing code an administrator
gave, then waits for the administrator's approval and writes the
credentials the OMA issues (its own broker URL, its message key) to
<state dir>/message_key and <state dir>/agent.env (both 0600); source
agent.env before starting the agent's worker. Exits non-zero with the
reason when the OMA refuses (code expired or used, name taken, rejected)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

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
    """The credentials, once an administrator approved; waits up to `wait_s`."""
    deadline = time.monotonic() + wait_s
    while True:
        response = requests.get(f"{oma.rstrip('/')}/api/agents/enrol/{name}/", timeout=timeout_s,
                                headers={"Authorization": f"Pairing {code}"})
        if response.status_code == 200:
            return response.json()
        if response.status_code != 202:
            raise EnrolError(f"no credentials ({response.status_code}): {_error(response)}")
        if time.monotonic() >= deadline:
            raise EnrolError(f"not approved within {wait_s:.0f} s; run again with --resume to keep waiting")
        time.sleep(poll_s)


def _write_private(path: Path, text: str) -> None:
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)


def write_credentials(state_dir: Path, creds: dict) -> Path:
    """<state dir>/message_key and <state dir>/agent.env, both 0600."""
    key_file = state_dir / "message_key"
    _write_private(key_file, creds["message_key"] + "\n")
    env_file = state_dir / "agent.env"
    _write_private(env_file, "".join(f"{k}={v}\n" for k, v in (
        ("PROCESS_ROLE", "agent"), ("VMA_AGENT_NAME", creds["agent_name"]),
        ("CELERY_BROKER_URL", creds["broker_url"]), ("VMA_MESSAGE_KEY_FILE", key_file))))
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
    args = parser.parse_args(argv)
    try:
        if not args.resume:
            present(args.oma, args.code, args.name, agent_key(args.state_dir, args.name))
            print(f"enrolled as {args.name}: waiting for approval (manage.py agent approve {args.name})", flush=True)
        if args.no_wait:
            return 0
        creds = fetch_credentials(args.oma, args.code, args.name, args.wait_s, args.poll_s)
        env_file = write_credentials(args.state_dir, creds)
    except (EnrolError, requests.RequestException, OSError) as exc:
        print(f"enrol: {exc}", file=sys.stderr)
        return 1
    print(f"approved: credentials in {env_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
