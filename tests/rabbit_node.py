"""A private RabbitMQ node speaking only TLS, for the tests of agents'
broker links over amqps: the machine's RabbitMQ (5672, plain AMQP) is
neither used nor reconfigured. Its own node name, Erlang distribution port,
HOME (Erlang cookie), database, logs and configuration, all in one
directory; a throwaway CA (and another, which signed nothing it serves)
made with the openssl CLI; its server certificate is for 127.0.0.1 only."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from tests.helpers import wait_until

RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")
START_TIMEOUT_S = 120
STOP_TIMEOUT_S = 60


class NodeError(RuntimeError):
    pass


def _openssl(*args: str, cwd: Path) -> None:
    done = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise NodeError(f"openssl {args[0]} failed: {done.stderr.strip()[-500:]}")


def make_ca(directory: Path, name: str) -> Path:
    """A self-signed CA certificate (<name>.pem) and its key (<name>.key)."""
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN=OMA test {name}",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             cwd=directory)
    return directory / f"{name}.pem"


def make_server_cert(directory: Path, ca: str, name: str, ip: str) -> tuple[Path, Path]:
    """A server certificate for `ip` (its only name), signed by CA `ca`."""
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout",
             f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={ip}", cwd=directory)
    (directory / f"{name}.ext").write_text(f"subjectAltName=IP:{ip}\nbasicConstraints=CA:FALSE\n"
                                           "extendedKeyUsage=serverAuth\n")
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
             "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=directory)
    return directory / f"{name}.pem", directory / f"{name}.key"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _listens(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class TlsRabbitNode:
    directory: Path
    name: str = field(default_factory=lambda: f"oma-tls-{os.getpid()}@localhost")
    port: int = field(default_factory=free_port)
    dist_port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def ca_file(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def other_ca_file(self) -> Path:
        return self.directory / "other-ca.pem"

    @property
    def ctl(self) -> list[str]:
        """rabbitmqctl for this node: the real one, not the wrapper in
        /usr/sbin (which becomes the rabbitmq user, with its own HOME and so
        another Erlang cookie), with this node's HOME."""
        return ["env", f"HOME={self.directory}", str(RABBITMQ_BIN / "rabbitmqctl"), "-n", self.name]

    def rabbitmqctl(self, *args: str) -> str:
        done = subprocess.run([*self.ctl, "-q", *args], capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise NodeError(f"rabbitmqctl {' '.join(args)}: {(done.stderr or done.stdout).strip()[-500:]}")
        return done.stdout

    @property
    def log_path(self) -> Path:
        return self.directory / "server.out"

    def start(self) -> None:
        server = RABBITMQ_BIN / "rabbitmq-server"
        if not os.access(server, os.X_OK) or not shutil.which("openssl"):
            raise NodeError(f"{server} or openssl is missing: install the Debian packages rabbitmq-server and "
                            "openssl (scripts/setup.sh does)")
        make_ca(self.directory, "ca")
        make_ca(self.directory, "other-ca")
        cert, key = make_server_cert(self.directory, "ca", "server", "127.0.0.1")
        key.chmod(0o644)  # the node reads it (as root here; as the rabbitmq user elsewhere)
        (self.directory / "rabbitmq.conf").write_text("\n".join([
            "listeners.tcp = none",
            f"listeners.ssl.default = 127.0.0.1:{self.port}",
            f"ssl_options.certfile = {cert}",
            f"ssl_options.keyfile = {key}",
            f"ssl_options.cacertfile = {self.ca_file}",
            "ssl_options.verify = verify_none",  # clients are not asked for certificates: users log in
            "ssl_options.fail_if_no_peer_cert = false",
            "loopback_users = none",
            ""]))
        (self.directory / "enabled_plugins").write_text("[].\n")
        env = {**os.environ, "HOME": str(self.directory), "RABBITMQ_NODENAME": self.name,
               "RABBITMQ_DIST_PORT": str(self.dist_port), "RABBITMQ_MNESIA_BASE": str(self.directory / "mnesia"),
               "RABBITMQ_LOG_BASE": str(self.directory / "log"),
               "RABBITMQ_CONFIG_FILE": str(self.directory / "rabbitmq"),
               "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.directory / "enabled_plugins")}
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([str(server)], env=env, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        def listening() -> bool:
            if self.proc.poll() is not None:
                raise NodeError(f"rabbitmq-server exited ({self.proc.returncode}):\n{self.output()}")
            return _listens(self.port)

        try:
            wait_until(listening, START_TIMEOUT_S, f"a TLS listener on 127.0.0.1:{self.port}", interval=0.2)
        except AssertionError as exc:
            raise NodeError(f"{exc}:\n{self.output()}") from None

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:] if self.log_path.exists() else ""

    def stop(self) -> None:
        """rabbitmqctl stop, then the node's whole process group killed
        whatever that did (it is in a session of its own)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                subprocess.run([*self.ctl, "stop"], capture_output=True, timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                pass  # killed below
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(STOP_TIMEOUT_S)
