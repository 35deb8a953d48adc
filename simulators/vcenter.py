"""The test vCenter: builds the Go simulator in simulators/vcsim (govmomi's
simulator library from Debian plus our CBT extensions) and runs it.

    sim = VCenterSimulator.start(tmpdir, {"vms": [...]}, password="pw")
    ... SmartConnect(host=sim.host, port=sim.port, thumbprint=sim.thumbprint, ...)
    sim.stop()
"""

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SOURCE_DIR = Path(__file__).resolve().parent / "vcsim"
BUILD_DIR = PROJECT_ROOT / "var" / "vcsim"
SYSTEM_GOPATH = "/usr/share/gocode"
START_TIMEOUT_S = 60
STOP_TIMEOUT_S = 10

_build_lock = threading.Lock()


class SimulatorError(RuntimeError):
    pass


def _sources() -> list[Path]:
    return sorted(p for p in SOURCE_DIR.iterdir() if p.suffix == ".go" and not p.name.endswith("_test.go"))


def binary_path() -> Path:
    digest = hashlib.sha256()
    for path in _sources():
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return BUILD_DIR / f"vcsim-{digest.hexdigest()}"


def build() -> Path:
    """Compile the simulator once per version of its sources."""
    target = binary_path()
    with _build_lock:
        if target.exists():
            return target
        go = shutil.which("go")
        if go is None:
            raise SimulatorError("Go is not installed: run scripts/setup.sh "
                                 "(golang-go and golang-github-vmware-govmomi-dev)")
        if not (Path(SYSTEM_GOPATH) / "src/github.com/vmware/govmomi/simulator").is_dir():
            raise SimulatorError("govmomi's simulator library is missing: run scripts/setup.sh "
                                 "(golang-github-vmware-govmomi-dev)")
        BUILD_DIR.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="vcsim-build-") as tmp:
            package = Path(tmp) / "src" / "oma" / "vcsim"
            package.mkdir(parents=True)
            for path in _sources():
                shutil.copy2(path, package / path.name)
            partial = target.with_name(target.name + f".{os.getpid()}.tmp")
            env = {**os.environ, "GO111MODULE": "off", "GOPATH": f"{tmp}:{SYSTEM_GOPATH}",
                   "GOFLAGS": "", "CGO_ENABLED": "0"}
            env.setdefault("GOCACHE", str(BUILD_DIR / "gocache"))
            proc = subprocess.run([go, "build", "-o", str(partial), "."], cwd=package, env=env,
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                partial.unlink(missing_ok=True)
                raise SimulatorError(f"building the vCenter simulator failed:\n{proc.stderr}")
            partial.replace(target)
    return target


class VCenterSimulator:
    """One running simulator process."""

    def __init__(self, proc: subprocess.Popen, info: dict, username: str, password: str,
                 password_file: Path, data_dir: Path, stderr_path: Path):
        self.proc = proc
        self.url: str = info["url"]
        self.host: str = info["host"]
        self.port: int = info["port"]
        self.thumbprint: str = info["thumbprint"]
        self.vms: dict = info["vms"]
        self.username = username
        self.password = password
        self.password_file = password_file
        self.data_dir = data_dir
        self.stderr_path = stderr_path

    @classmethod
    def start(cls, tmpdir, spec: dict, username: str = "administrator@vsphere.local",
              password: str = "vcsim-Secret-1", cbt_page_bytes: int | None = None,
              data_dir: Path | None = None, password_dir: Path | None = None) -> "VCenterSimulator":
        binary = build()
        root = Path(tmpdir)
        root.mkdir(parents=True, exist_ok=True)
        data_dir = Path(data_dir) if data_dir is not None else root / "data"
        data_dir.mkdir(parents=True, exist_ok=True)
        spec_path = root / "spec.json"
        spec_path.write_text(json.dumps(spec))
        password_file = root / "password"
        if password_dir is not None:
            password_file = Path(password_dir) / f"vcsim-{os.getpid()}-{time.monotonic_ns()}.password"
        password_file.write_text(password)
        password_file.chmod(0o600)
        stderr_path = root / "vcsim.log"
        cmd = [str(binary), "--listen", "127.0.0.1:0", "--data", str(data_dir), "--spec", str(spec_path),
               "--username", username, "--password-file", str(password_file)]
        if cbt_page_bytes is not None:
            cmd += ["--cbt-page-bytes", str(cbt_page_bytes)]
        with open(stderr_path, "wb") as err:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err)
        line = _read_line(proc, START_TIMEOUT_S)
        if not line:
            proc.kill()
            proc.wait()
            raise SimulatorError(f"the vCenter simulator did not start (exit {proc.returncode}):\n"
                                 f"{_tail(stderr_path)}")
        try:
            info = json.loads(line)
        except ValueError:
            proc.kill()
            proc.wait()
            raise SimulatorError(f"unexpected simulator output {line!r}:\n{_tail(stderr_path)}") from None
        return cls(proc, info, username, password, password_file, data_dir, stderr_path)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()

    def __enter__(self) -> "VCenterSimulator":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _read_line(proc: subprocess.Popen, timeout: float) -> str:
    """The first stdout line, or "" if the process exits or times out first."""
    result: list[str] = []
    reader = threading.Thread(target=lambda: result.append(proc.stdout.readline().decode()), daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout
    while reader.is_alive() and time.monotonic() < deadline:
        reader.join(0.1)
        if proc.poll() is not None:
            reader.join(1)
            break
    return result[0].strip() if result else ""


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def vm_spec(name: str, capacities: list[int], cbt: bool = False, **extra) -> dict:
    """A simulator VM: powered on, EFI, one NIC, persistent disks of these sizes."""
    return {"name": name, "cbt": cbt, "firmware": "efi", "guest_id": "otherLinux64Guest",
            "power_state": "poweredOn", "nics": [{"network": "VM Network", "mac": "00:50:56:aa:bb:01"}],
            "disks": [{"capacity_bytes": c, "mode": "persistent"} for c in capacities], **extra}


def write_image(path, offset: int, data: bytes) -> None:
    """A guest write: bytes into a VM's live disk image."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def fill_image(path, ranges: list[tuple[int, int]], seed: int) -> None:
    """Guest writes of random data into these (offset, length) ranges."""
    rng = random.Random(seed)
    for offset, length in ranges:
        write_image(path, offset, rng.randbytes(length))


def snapshot_image(sim: VCenterSimulator, vm_name: str, device_key: int, change_id: str) -> Path:
    """The image a snapshot froze, kept by the simulator under the changeId
    the snapshot gave the disk (it outlives the snapshot's removal)."""
    epoch, _, number = change_id.rpartition("/")
    return (sim.data_dir / "vms" / sim.vms[vm_name]["moref"] / "changes" / str(device_key)
            / epoch.replace(" ", "").replace("-", "") / f"{number}.img")
