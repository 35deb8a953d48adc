"""qcow2 images as change-tracking sources: qemu persistent dirty bitmaps,
one per cycle, named oma-<job id> (job ids sort by time).

The committed bitmap (the disk's change id on the OMA) holds every write
since the last completed cycle began. A cycle first folds in bitmaps of
cycles that failed since (their writes were never committed), drops older
ones (already copied), adds its own bitmap, enabled, so no write goes
unrecorded, and then disables the committed one: frozen, it says which
areas this cycle copies, read through qemu-nbd (`-B`). On success its own
bitmap becomes the committed one.

qemu-img needs the image's write lock, and qemu-nbd a shared one: a
process writing the image now and then (a guest's burst through qemu-io)
is waited out for up to LOCK_WAIT_S; an image a running VM holds open
cannot be a source (its bitmaps would go through the VM's QMP monitor)."""

from __future__ import annotations

import contextlib
import json
import subprocess
from collections.abc import Iterator

from tenacity import Retrying, retry_if_exception, stop_after_delay, wait_fixed

from vma_agent import nbdkit

PREFIX = "oma-"
TIMEOUT_S = 60
LOCK_WAIT_S = 30.0  # how long another process's hold on the image's lock is waited out


class Qcow2Error(RuntimeError):
    """A qemu-img or qemu-nbd step failed; the message has qemu's reason."""


def _busy(exc: BaseException) -> bool:
    """qemu could not take the image's lock: another process has it open."""
    return "lock" in str(exc)


def _waiting_out_locks(step):
    """Run step(), again while another process holds the image's lock."""
    attempts = Retrying(retry=retry_if_exception(_busy), wait=wait_fixed(0.2), stop=stop_after_delay(LOCK_WAIT_S),
                        reraise=True)
    return attempts(step)


def _run(*args: str) -> str:
    def once() -> str:
        try:
            return subprocess.run(args, capture_output=True, text=True, check=True, timeout=TIMEOUT_S).stdout
        except subprocess.CalledProcessError as exc:
            raise Qcow2Error(f"{' '.join(args[:3])} failed: {exc.stderr.strip() or exc.stdout.strip()}") from None
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise Qcow2Error(f"{' '.join(args[:3])} failed: {exc}") from None

    return _waiting_out_locks(once)


def info(path: str) -> dict:
    """The image's details, read under its lock: a read beside a writer
    (--force-share) can catch its bitmap directory mid-update and miss a
    bitmap (seen: a cycle refused for a bitmap that was there)."""
    return json.loads(_run("qemu-img", "info", "--output=json", path))


def bitmaps(path: str) -> dict[str, dict]:
    """The image's persistent bitmaps by name: {recording, granularity, ...}."""
    found = info(path).get("format-specific", {}).get("data", {}).get("bitmaps", [])
    return {bitmap["name"]: {"recording": "auto" in bitmap.get("flags", []), **bitmap} for bitmap in found}


def freeze(path: str, base: str, new: str) -> None:
    """Make `base` (empty for a full copy) hold every change since the last
    completed cycle, frozen, and `new` record every write from now on.
    Runs again safely (a retried copy of the same cycle)."""
    present = bitmaps(path)
    for name in sorted(present):
        if not name.startswith(PREFIX) or name in (base, new):
            continue
        if base and name > base and base in present:
            _run("qemu-img", "bitmap", "--merge", name, "-f", "qcow2", path, base)  # a failed cycle's writes
        _run("qemu-img", "bitmap", "--remove", "-f", "qcow2", path, name)
    if base and base not in present:
        raise Qcow2Error(f"{path} has no bitmap {base}: its changes since the last cycle are unknown; "
                         "run a full cycle")
    if new not in present:
        _run("qemu-img", "bitmap", "--add", "--enable", "-f", "qcow2", path, new)
    if base and present[base]["recording"]:
        _run("qemu-img", "bitmap", "--disable", "-f", "qcow2", path, base)


@contextlib.contextmanager
def serve_readonly(path: str, bitmap: str = "") -> Iterator[str]:
    """The image's guest-visible data, read-only over NBD, with `bitmap` as
    the qemu:dirty-bitmap:NAME meta context when given."""
    def command(sock):
        return ["qemu-nbd", "--read-only", "--format=qcow2", "--persistent", "--shared=0", f"--socket={sock}",
                *([f"--bitmap={bitmap}"] if bitmap else []), path]

    with contextlib.ExitStack() as stack:
        yield _waiting_out_locks(lambda: stack.enter_context(nbdkit.serve_readonly(command)))
