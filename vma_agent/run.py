"""Run an enrolled agent host from its state directory (what
python -m vma_agent.enrol wrote there):

    python -m vma_agent.run --state-dir /var/lib/vma-agent [--concurrency 2]

starts, with agent.env's settings:

- the tunnel keeper (python -m vma_agent.tunnel --config tunnel.json), when
  the OMA set up a tunnel at approval: ONE outbound SSH connection that
  brings the OMA's broker (unless it is amqps) and NBD export to 127.0.0.1
  here and puts this agent's API at the OMA's end of its reverse forward;
- the agent's progress API, served by gunicorn on 127.0.0.1:VMA_API_PORT
  only (the OMA reads it through the tunnel, nothing else reaches it);
- its Celery worker for vma.<name>, on the broker URL agent.env names (its
  end of the tunnel; or an amqps broker's own address, over TLS, its
  certificate checked against VMA_BROKER_CA_FILE).

Their output goes to this process's. SIGTERM or SIGINT stops all three;
when the API or the worker exits by itself the others are stopped too and
this exits non-zero (the keeper re-opens its connection by itself and is
not expected to exit). No Django here: the API and the worker are Django
processes of their own, with PROCESS_ROLE=agent (no database)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

log = logging.getLogger("vma_agent.run")
PROJECT_ROOT = Path(__file__).resolve().parent.parent
STOP_TIMEOUT_S = 30


class Stop(Exception):
    pass


def read_env(path: Path) -> dict[str, str]:
    """KEY=VALUE lines (agent.env); a line that is not one is an error."""
    values = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.strip().isidentifier():
            raise ValueError(f"{path}:{number}: not KEY=VALUE")
        values[key.strip()] = value
    return values


def commands(state_dir: Path, env: dict[str, str], concurrency: int) -> dict[str, list[str]]:
    """What to start, by name: the tunnel keeper (if tunnel.json), the API, the worker."""
    python = sys.executable
    name = env["VMA_AGENT_NAME"]
    started = {}
    if (state_dir / "tunnel.json").exists():
        started["tunnel"] = [python, "-m", "vma_agent.tunnel", "--config", str(state_dir / "tunnel.json")]
    # A production WSGI server, not runserver: its store is Redis, so its
    # workers share every copy's progress; TERM stops it within the grace.
    started["api"] = [python, "-m", "gunicorn", "oma_site.wsgi:application", "--bind",
                      f"127.0.0.1:{env['VMA_API_PORT']}", "--workers", "2", "--threads", "4",
                      "--graceful-timeout", "10", "--access-logfile", "-", "--error-logfile", "-"]
    started["worker"] = [python, "-m", "celery", "-A", "oma_site", "worker", "-Q", f"vma.{name}", "-c",
                         str(concurrency), "-E", "-l", "info", "--without-gossip", "--without-mingle",
                         "-n", f"{name}@%h"]
    return started


def agent_env(state_dir: Path) -> dict[str, str]:
    env = {**os.environ, **read_env(state_dir / "agent.env")}
    env.setdefault("VMA_API_PORT", "8000")
    env.update(PROCESS_ROLE="agent", VMA_API_ENABLED="1", OMA_UI_ENABLED="0",
               # The worker reports to this host's own API.
               VMA_URL=f"http://127.0.0.1:{env['VMA_API_PORT']}")
    for needed in ("VMA_AGENT_NAME", "CELERY_BROKER_URL"):
        if not env.get(needed):
            raise ValueError(f"{state_dir / 'agent.env'} names no {needed}: enrol first (python -m vma_agent.enrol)")
    return env


def run(state_dir: Path, concurrency: int) -> int:
    env = agent_env(state_dir)
    procs: dict[int, tuple[str, subprocess.Popen]] = {}

    def stop(*_signal):
        raise Stop

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    code = 0
    try:
        for name, command in commands(state_dir, env, concurrency).items():
            proc = subprocess.Popen(command, cwd=PROJECT_ROOT, env=env, stdin=subprocess.DEVNULL)
            procs[proc.pid] = (name, proc)
            log.info("started %s (pid %s): %s", name, proc.pid, " ".join(command[1:4]))
        pid, status = os.wait()
        name = procs[pid][0] if pid in procs else f"pid {pid}"
        log.error("%s exited (status %s): stopping the others", name, os.waitstatus_to_exitcode(status))
        code = 1
    except Stop:
        log.info("stopping")
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        for _name, proc in procs.values():
            if proc.poll() is None:
                proc.terminate()
        for name, proc in procs.values():
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %s s: killed", name, STOP_TIMEOUT_S)
                proc.kill()
                proc.wait()
    log.info("agent host stopped")
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vma_agent.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--state-dir", type=Path, default=Path(os.environ.get("VMA_STATE_DIR", "/var/lib/vma-agent")))
    parser.add_argument("--concurrency", type=int, default=2, help="disks copied at once")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if not (args.state_dir / "agent.env").is_file():
        parser.error(f"{args.state_dir / 'agent.env'}: no such file (enrol first: python -m vma_agent.enrol)")
    try:
        return run(args.state_dir, args.concurrency)
    except ValueError as exc:
        parser.error(str(exc))


if __name__ == "__main__":
    sys.exit(main())
