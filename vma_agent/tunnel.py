"""The agent's outbound tunnel to the OMA (as MigrateKit OSSEA's VMA keeps
one): ONE SSH connection from the site to the OMA's sshd for agents, kept
alive and re-opened by itself, carrying

- a reverse forward: the OMA reads this agent's progress API at
  127.0.0.1:<remote port> on its side (nothing at the OMA connects into the
  site);
- local forwards: the agent reaches the OMA's broker and NBD export at
  127.0.0.1:<local port> here, encrypted, outbound only.

    python -m vma_agent.tunnel --oma-host H --ssh-port 443 --user oma-agents \\
        --key /etc/vma/tunnel_key --remote-port 20000 --api-port 8000 \\
        --forward 5672:127.0.0.1:5672 --forward 10809:127.0.0.1:10809

The OMA gives the port numbers at approval (services.tunnels.tunnel_spec);
enrolment writes them to <state dir>/tunnel.json, and
`python -m vma_agent.tunnel --config <state dir>/tunnel.json` (which
python -m vma_agent.run starts) opens that tunnel.
Point the agent's broker URL and NBD host at 127.0.0.1:<local port>. Each
(re)connect is logged; a dropped connection is re-opened after a backoff
that doubles up to --backoff-max; SIGTERM ends it cleanly. No Django here."""

from __future__ import annotations

import argparse
import json
import logging
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

log = logging.getLogger("vma_agent.tunnel")

# A connection that stayed up this long was healthy: the next drop starts
# the backoff again from its first step.
HEALTHY_AFTER_S = 30.0


def forward_spec(text: str) -> str:
    """LOCAL:REMOTE as the command line gives it (REMOTE: PORT or HOST:PORT,
    on the OMA) -> ssh's -L bind:port:host:port, bound to loopback here."""
    match = re.fullmatch(r"(\d{1,5}):(?:([A-Za-z0-9.\-]+):)?(\d{1,5})", text)
    if not match or not all(0 < int(port) < 65536 for port in (match[1], match[3])):
        raise argparse.ArgumentTypeError(f"{text!r} is not LOCAL_PORT:[HOST:]PORT")
    return f"127.0.0.1:{match[1]}:{match[2] or '127.0.0.1'}:{match[3]}"


def port(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port")
    return int(text)


def ssh_command(args: argparse.Namespace) -> list[str]:
    """The ssh that holds the tunnel: no command, no pty, key only, never a
    prompt; it exits when the server stops answering (ServerAlive*) or a
    forward cannot be set up (ExitOnForwardFailure), so the loop re-opens it."""
    command = ["ssh", "-N", "-T", "-p", str(args.ssh_port), "-i", str(args.key),
               "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none",
               "-o", "ExitOnForwardFailure=yes", "-o", f"ServerAliveInterval={args.alive_interval}",
               "-o", f"ServerAliveCountMax={args.alive_count}", "-o", f"ConnectTimeout={args.connect_timeout}",
               "-o", "ControlMaster=no", "-o", "ControlPath=none", "-F", "none"]
    if args.known_hosts:  # the OMA's host key as the operator pinned it
        command += ["-o", f"UserKnownHostsFile={args.known_hosts}", "-o", "StrictHostKeyChecking=yes"]
    else:  # trust on first use, kept next to the key
        command += ["-o", f"UserKnownHostsFile={Path(args.key).with_name('known_hosts')}",
                    "-o", "StrictHostKeyChecking=accept-new"]
    command += ["-R", f"127.0.0.1:{args.remote_port}:127.0.0.1:{args.api_port}"]
    for forward in args.forward:
        command += ["-L", forward]
    return command + [f"{args.user}@{args.oma_host}"]


class Keeper:
    """Holds the tunnel open until stopped."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.stopping = threading.Event()
        self.proc: subprocess.Popen | None = None

    def stop(self, *_signal) -> None:
        self.stopping.set()
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.terminate()

    def run(self) -> int:
        command = ssh_command(self.args)
        delay, attempt = self.args.backoff_min, 0
        while not self.stopping.is_set():
            attempt += 1
            started = time.monotonic()
            self.proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.PIPE, text=True)
            if self.stopping.is_set():  # stopped while this ssh was being started: end it too
                self.proc.terminate()
            log.info("tunnel %s to %s@%s:%s (ssh pid %s): OMA 127.0.0.1:%s -> API 127.0.0.1:%s%s",
                     "opening" if attempt == 1 else f"re-opening (attempt {attempt})", self.args.user,
                     self.args.oma_host, self.args.ssh_port, self.proc.pid, self.args.remote_port,
                     self.args.api_port, "".join(f", -L {f}" for f in self.args.forward))
            _, stderr = self.proc.communicate()
            if self.stopping.is_set():
                break
            lasted = time.monotonic() - started
            if lasted >= HEALTHY_AFTER_S:
                delay = self.args.backoff_min
            reason = " | ".join(line for line in stderr.strip().splitlines()[-3:]) or "no message"
            log.warning("tunnel closed after %.1f s (ssh exit %s: %s); re-opening in %.1f s",
                        lasted, self.proc.returncode, reason, delay)
            if self.stopping.wait(delay):
                break
            delay = min(delay * 2, self.args.backoff_max)
        log.info("tunnel keeper stopped")
        return 0


CONFIG_KEYS = {"oma_host", "ssh_port", "user", "key", "known_hosts", "remote_port", "api_port", "forward"}


def read_config(path: Path) -> dict:
    """The tunnel as enrolment wrote it (python -m vma_agent.enrol: <state
    dir>/tunnel.json); command-line options given as well win."""
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise argparse.ArgumentTypeError(f"--config {path}: {exc}") from None
    if not isinstance(config, dict) or set(config) - CONFIG_KEYS:
        raise argparse.ArgumentTypeError(f"--config {path}: an object with only {', '.join(sorted(CONFIG_KEYS))}")
    for name in ("ssh_port", "remote_port", "api_port"):
        if name in config:
            config[name] = port(str(config[name]))
    for name in ("key", "known_hosts"):
        if config.get(name):
            config[name] = Path(config[name])
    config["forward"] = [forward_spec(str(item)) for item in config.get("forward", [])]
    return config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m vma_agent.tunnel", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, help="the tunnel enrolment set up (<state dir>/tunnel.json)")
    parser.add_argument("--oma-host")
    parser.add_argument("--ssh-port", type=port, default=443)
    parser.add_argument("--user", default="oma-agents")
    parser.add_argument("--key", type=Path, help="this agent's private key (its public half "
                                                 "was sent at enrolment)")
    parser.add_argument("--known-hosts", type=Path, help="the OMA's host key (default: trusted on first use)")
    parser.add_argument("--remote-port", type=port, help="the OMA's end of the reverse forward")
    parser.add_argument("--api-port", type=port, help="this agent's progress API on 127.0.0.1")
    parser.add_argument("--forward", type=forward_spec, action="append", default=None,
                        metavar="LOCAL:[HOST:]PORT", help="reach HOST:PORT on the OMA at 127.0.0.1:LOCAL here")
    parser.add_argument("--alive-interval", type=int, default=15, help="ServerAliveInterval, seconds")
    parser.add_argument("--alive-count", type=int, default=3, help="ServerAliveCountMax")
    parser.add_argument("--connect-timeout", type=int, default=15)
    parser.add_argument("--backoff-min", type=float, default=1.0)
    parser.add_argument("--backoff-max", type=float, default=60.0)
    args = parser.parse_args(argv)
    if args.config is not None:
        try:
            config = read_config(args.config)
        except argparse.ArgumentTypeError as exc:
            parser.error(str(exc))
        for name, value in config.items():
            if name == "forward":
                args.forward = value + (args.forward or [])
            elif getattr(args, name) in (None, parser.get_default(name)):
                setattr(args, name, value)
    args.forward = args.forward or []
    missing = [f"--{name.replace('_', '-')}" for name in ("oma_host", "key", "remote_port", "api_port")
               if getattr(args, name) is None]
    if missing:
        parser.error(f"{', '.join(missing)} required (or --config FILE naming them)")
    if not args.key.is_file():
        parser.error(f"--key {args.key}: no such file")
    if not 0 < args.backoff_min <= args.backoff_max:
        parser.error("--backoff-min must be positive and at most --backoff-max")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    keeper = Keeper(parse_args(argv))
    signal.signal(signal.SIGTERM, keeper.stop)
    signal.signal(signal.SIGINT, keeper.stop)
    return keeper.run()


if __name__ == "__main__":
    sys.exit(main())
