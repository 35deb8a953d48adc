"""How long one replication cycle of a small VM takes end to end, and where
the time goes between the workflow's steps.

On the embedded defaults (SQLite, a local Redis, local image sources and
local volume targets), in a directory of its own (--workdir, default
var/cycle-bench: its own database, volumes, sockets and logs), it starts the
agent's progress API (manage.py runserver on a free port), the Celery
processes of the chosen --layout and the progress poller, registers a VM
with 2 sparse disks (64 MiB capacity, 1 MiB of data each) through
`manage.py add_vm`, and replicates it --reps times (after --warmup cycles
not counted) through `manage.py replicate --full`, one cycle at a time.

Layouts (what runs where):
  split   what scripts/demo.sh starts: an OMA worker (-Q oma), the agent's
          copy worker (-Q vma.local -c 2, PROCESS_ROLE=agent: no database),
          celery beat, and the poller as its own process (manage.py
          poll_progress)
  single  one worker with an embedded beat consuming every queue
          (celery worker -B -c 2: the demo's configuration before the split)

Figures, median and p95 over the counted cycles:
  created -> completed   ReplicationJob.completed_at - created_at (database
                         timestamps, one clock)
  issued -> first byte   from the moment `replicate` is called to the first
                         data written on a target volume: a watcher thread
                         stat()s the volume files every 2 ms and takes the
                         first one whose allocated blocks grow (the target
                         files are emptied - made sparse again - before every
                         cycle). This is the first moment data moves, which
                         no database field records: VMDisk.started_at is the
                         claim, before the source export is up. Shown beside
                         it: issued -> first VMDisk.started_at.
  CPU seconds per cycle  user+system time of every process the bench
                         started (all children included), per role.
  per hop                the job's timeline: its JobEvent rows plus the
                         first disk's started_at and the last disk's
                         completed_at, sorted by time; median gap of each
                         pair of consecutive entries.

It relies only on manage.py add_vm / replicate / volumes, on
ReplicationJob (created_at, completed_at, status), JobEvent (at, status,
stage) and VMDisk (started_at, completed_at), so it survives reworks of the
workflow itself.

    .venv/bin/python -m bench.cycle_bench [--reps 7] [--layout split|single] [--json]

Redis: BENCH_REDIS_URL (default redis://127.0.0.1:6379/14); the bench
empties that database's Celery queues "oma" and "vma.local" before it starts.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench.common import ROOT, MiB, free_port, percentile, setup_django

VM_NAME = "cycle-bench-vm"
TICKS = os.sysconf("SC_CLK_TCK")


def configure(workdir: Path) -> dict:
    shutil.rmtree(workdir, ignore_errors=True)
    for sub in ("volumes", "run", "log", "images", "tmp"):
        (workdir / sub).mkdir(parents=True)
    redis_url = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")
    env = {
        "DJANGO_SETTINGS_MODULE": "oma_site.settings",
        "DATABASE_URL": f"sqlite:///{workdir / 'oma.sqlite3'}",
        "OMA_VOLUME_DIR": str(workdir / "volumes"),
        "OMA_RUN_DIR": str(workdir / "run"),
        "TMPDIR": str(workdir / "tmp"),
        "IMAGE_SOURCE_DIRS": str(workdir / "images"),
        "CELERY_BROKER_URL": redis_url,
        "VMA_REDIS_URL": redis_url,
        "VMA_PROGRESS_PREFIX": f"cycle-bench:{secrets.token_hex(4)}",
        "VMA_TOKEN": secrets.token_urlsafe(24),
        "VMA_URL": f"http://127.0.0.1:{free_port()}",
        "LOG_LEVEL": "INFO",
    }
    os.environ.update(env)
    return env


class Services:
    """The processes of one layout, each with its log under workdir/log."""

    def __init__(self, workdir: Path, env: dict, layout: str, api: str = "runserver"):
        self.workdir = workdir
        self.env = {**os.environ, **env}
        self.procs: dict[str, subprocess.Popen] = {}
        port = env["VMA_URL"].rsplit(":", 1)[1]
        celery = [sys.executable, "-m", "celery", "-A", "oma_site"]
        worker = [*celery, "worker", "-E", "-l", "info", "--without-gossip", "--without-mingle"]
        self.hung: socket.socket | None = None
        if api == "hung":
            # Accepts connections (the kernel's backlog) and never answers.
            self.hung = socket.socket()
            self.hung.bind(("127.0.0.1", int(port)))
            self.hung.listen(64)
        elif api == "runserver":
            self.start("api", [sys.executable, "manage.py", "runserver", "--noreload", "--skip-checks",
                               f"127.0.0.1:{port}"], extra_env={"OMA_UI_ENABLED": "0"})
        if layout == "single":
            self.start("worker", [*worker, "-B", "-s", str(workdir / "run" / "celerybeat-schedule"), "-c", "2",
                                  "-n", f"bench-{os.getpid()}@%h"])
        else:
            oma, agent = {"PROCESS_ROLE": "oma"}, {"PROCESS_ROLE": "agent"}  # the agent: no database
            self.start("oma-worker", [*worker, "-Q", "oma", "-c", "2", "-n", f"bench-oma-{os.getpid()}@%h"], oma)
            self.start("agent-worker", [*worker, "-Q", "vma.local", "-c", "2", "-n", f"bench-vma-{os.getpid()}@%h"],
                       agent)
            self.start("beat", [*celery, "beat", "-l", "info", "-s", str(workdir / "run" / "celerybeat-schedule")],
                       oma)
            self.start("poller", [sys.executable, "manage.py", "poll_progress"], oma)
        self.wait_ready(env["VMA_URL"] if api == "runserver" else None)

    def start(self, name: str, cmd: list[str], extra_env: dict | None = None) -> None:
        log = open(self.workdir / "log" / f"{name}.log", "wb")  # noqa: SIM115 - the child keeps it
        self.procs[name] = subprocess.Popen(cmd, cwd=ROOT, env={**self.env, **(extra_env or {})}, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, api_url: str | None) -> None:
        import requests

        deadline = time.monotonic() + 60
        pending = {name for name in self.procs if "worker" in name}
        api_up = api_url is None
        while pending or not api_up:
            for name in list(pending):
                if b" ready." in (self.workdir / "log" / f"{name}.log").read_bytes():
                    pending.discard(name)
            if not api_up:
                try:
                    api_up = requests.get(f"{api_url}/api/v1/openapi.json", timeout=1).status_code == 200
                except requests.RequestException:
                    pass
            dead = [name for name, proc in self.procs.items() if proc.poll() is not None]
            if dead or time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"{', '.join(dead) or 'services'} did not start; see {self.workdir / 'log'}")
            time.sleep(0.1)

    def cpu_seconds(self) -> dict[str, float]:
        """User+system seconds of each role's process tree so far."""
        parents: dict[int, int] = {}
        times: dict[int, float] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parents[int(entry.name)] = int(fields[1])
            # utime, stime, and the reaped children's cutime, cstime
            times[int(entry.name)] = sum(int(v) for v in fields[11:15]) / TICKS
        result = {}
        for name, proc in self.procs.items():
            tree, frontier = {proc.pid}, [proc.pid]
            while frontier:
                pid = frontier.pop()
                children = [child for child, parent in parents.items() if parent == pid and child not in tree]
                tree.update(children)
                frontier.extend(children)
            result[name] = sum(times.get(pid, 0.0) for pid in tree)
        return result

    def stop(self) -> None:
        if self.hung is not None:
            self.hung.close()
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def make_images(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(2):
        path = directory / f"disk{i}.img"
        with open(path, "wb") as f:
            f.truncate(64 * MiB)
            f.seek(8 * MiB * (i + 1))
            f.write(os.urandom(MiB))
        paths.append(path)
    return paths


class FirstWrite(threading.Thread):
    """Notes the wall time at which a target file first grows: a volume
    (written in place by a VM's first cycle) or a cycle's layer (a qcow2
    file under volume_dir/layers, written by every later cycle). Each file's
    allocated blocks when first seen are its baseline: a layer's qcow2
    metadata is there from its creation, long before the copy's first write
    (its server starts in between)."""

    def __init__(self, volume_dir: Path):
        super().__init__(daemon=True)
        self.volume_dir = volume_dir
        self.at: float | None = None
        self.stopped = threading.Event()
        self.baseline = {path: path.stat().st_blocks for path in self._files()}

    def _files(self) -> list[Path]:
        layers = self.volume_dir / "layers"
        return [path for path in [*self.volume_dir.iterdir(), *(layers.iterdir() if layers.is_dir() else [])]
                if path.is_file()]

    def run(self) -> None:
        while not self.stopped.is_set():
            for path in self._files():
                try:
                    blocks = path.stat().st_blocks
                except FileNotFoundError:
                    continue
                if path not in self.baseline:
                    # a new volume is empty; a new layer holds its metadata only
                    self.baseline[path] = blocks if path.parent.name == "layers" else 0
                if blocks > self.baseline[path]:
                    self.at = time.time()
                    return
            time.sleep(0.002)


def journaled(job_id: str) -> bool:
    """Whether the cycle wrote layers of its own (a VM's first cycle writes
    its volumes in place: its point's layers are the volumes themselves)."""
    from replication.models import PointLayer

    handles = list(PointLayer.objects.filter(point__job_id=job_id).values_list("handle", flat=True))
    return bool(handles) and all("/layers/" in handle for handle in handles)


def leftovers(workdir: Path) -> dict:
    """What the journal holds after the cycles: layer files, qemu-nbd
    servers of this work directory, points sealed and expired (merged)."""
    from replication.models import RecoveryPoint

    layers = workdir / "volumes" / "layers"
    servers = subprocess.run(["pgrep", "-f", f"qemu-nbd.*{workdir}"], capture_output=True, text=True).stdout.split()
    return {"layer_files": sorted(p.name for p in layers.iterdir()) if layers.is_dir() else [],
            "qemu_nbd": len(servers),
            "points": {status: RecoveryPoint.objects.filter(status=status).count()
                       for status in ("sealed", "expired", "released")}}


def timeline(job) -> list[tuple[float, str]]:
    from replication.models import JobEvent, VMDisk

    entries = [(event.at.timestamp(), f"{event.status}/{event.stage}")
               for event in JobEvent.objects.filter(job_id=job.pk).order_by("at", "id")]
    disks = list(VMDisk.objects.filter(job_id=job.pk).values_list("started_at", "completed_at"))
    started = [s for s, _ in disks if s is not None]
    done = [c for _, c in disks if c is not None]
    if started:
        entries.append((min(started).timestamp(), "first disk started"))
    if done and len(done) == len(disks):
        entries.append((max(done).timestamp(), "last disk completed"))
    return sorted(entries, key=lambda entry: entry[0])


def one_cycle(volume_dir: Path, services: Services, timeout_s: float, vm_name: str = VM_NAME) -> dict:
    from io import StringIO

    from django.core.management import call_command

    from replication.models import ReplicationJob, VMDisk

    watcher = FirstWrite(volume_dir)
    cpu_before = services.cpu_seconds()
    watcher.start()
    out = StringIO()
    issued = time.time()
    call_command("replicate", vm_name, "--full", stdout=out)
    job_id = out.getvalue().split()[0]
    deadline = time.monotonic() + timeout_s
    terminal = {"completed", "failed", "cancelled"}
    while (job := ReplicationJob.objects.get(pk=job_id)).status not in terminal:
        if time.monotonic() > deadline:
            raise SystemExit(f"job {job_id} still {job.status} after {timeout_s} s; see {volume_dir.parent / 'log'}")
        time.sleep(0.02)
    watcher.stopped.set()
    watcher.join()
    if job.status != "completed":
        raise SystemExit(f"job {job_id} {job.status}: {job.error_message}")
    # What runs after the job's completion (the worker acking, the poller's
    # last pass) belongs to this cycle's CPU too.
    time.sleep(0.5)
    cpu_after = services.cpu_seconds()
    started = [s for s in VMDisk.objects.filter(job_id=job_id).values_list("started_at", flat=True) if s]
    return {
        "job": job_id,
        "journaled": journaled(job_id),
        "created_to_completed_s": (job.completed_at - job.created_at).total_seconds(),
        "issued_to_created_s": job.created_at.timestamp() - issued,
        "issued_to_first_byte_s": (watcher.at - issued) if watcher.at else None,
        "issued_to_disk_started_s": (min(started).timestamp() - issued) if started else None,
        "cpu_s": {name: cpu_after[name] - cpu_before[name] for name in cpu_after},
        "timeline": timeline(job),
    }


def summarize(cycles: list[dict]) -> dict:
    def stats(values):
        values = [v for v in values if v is not None]
        if not values:
            return None
        return {"median": statistics.median(values), "p95": percentile(values, 95), "min": min(values),
                "max": max(values)}

    hops: dict[str, list[float]] = {}
    order: list[str] = []
    for cycle in cycles:
        entries = cycle["timeline"]
        for (t0, a), (t1, b) in zip(entries, entries[1:], strict=False):
            label = f"{a} -> {b}"
            if label not in hops:
                hops[label] = []
                order.append(label)
            hops[label].append(t1 - t0)
    roles = list(cycles[0]["cpu_s"])
    return {
        "cycles": len(cycles),
        "created_to_completed_s": stats([c["created_to_completed_s"] for c in cycles]),
        "issued_to_first_byte_s": stats([c["issued_to_first_byte_s"] for c in cycles]),
        "issued_to_disk_started_s": stats([c["issued_to_disk_started_s"] for c in cycles]),
        "issued_to_created_s": stats([c["issued_to_created_s"] for c in cycles]),
        "cpu_s_per_cycle": {role: stats([c["cpu_s"][role] for c in cycles]) for role in roles}
        | {"total": stats([sum(c["cpu_s"].values()) for c in cycles])},
        "hops_median_s": {label: {"median": statistics.median(hops[label]), "n": len(hops[label])}
                          for label in order},
    }


def print_summary(summary: dict, layout: str) -> None:
    def line(label, s):
        if s is None:
            print(f"  {label:<34} (no data)")
        else:
            print(f"  {label:<34} median {s['median']:6.3f} s   p95 {s['p95']:6.3f} s   "
                  f"(min {s['min']:.3f}, max {s['max']:.3f})")

    print(f"{summary['cycles']} cycles, layout {layout}, 2 disks x 1 MiB of data (64 MiB sparse images)")
    line("created -> completed", summary["created_to_completed_s"])
    line("replicate issued -> first byte", summary["issued_to_first_byte_s"])
    line("replicate issued -> disk started", summary["issued_to_disk_started_s"])
    line("replicate issued -> job created", summary["issued_to_created_s"])
    print("CPU seconds per cycle (user+system, process trees):")
    for role, s in summary["cpu_s_per_cycle"].items():
        print(f"  {role:<14} median {s['median']:.3f} s   p95 {s['p95']:.3f} s")
    print("per hop, median gap between consecutive timeline entries:")
    for label, hop in summary["hops_median_s"].items():
        print(f"  {hop['median']:6.3f} s  {label}" + (f"  (in {hop['n']} cycles)"
                                                        if hop["n"] != summary["cycles"] else ""))


def vm_name(index: int) -> str:
    return VM_NAME if index == 0 else f"{VM_NAME}-fresh{index}"


def compare(journal: dict, in_place: dict) -> None:
    """The journal's share: journaled minus in-place medians, overall and per
    hop present in both."""
    total = journal["created_to_completed_s"]["median"] - in_place["created_to_completed_s"]["median"]
    print(f"journal's share (median journaled - median in place): created -> completed {total:+.3f} s")
    for label, hop in journal["hops_median_s"].items():
        if label in in_place["hops_median_s"]:
            print(f"  {hop['median'] - in_place['hops_median_s'][label]['median']:+.3f} s  {label}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1, help="cycles run first and not counted")
    parser.add_argument("--in-place", type=int, default=3,
                        help="fresh VMs whose first cycles (written in place, no layer) run alternately with the "
                             "journaled ones, for comparison")
    parser.add_argument("--points-keep", type=int, default=3,
                        help="RECOVERY_POINTS_KEEP of the services (retention merges once a VM has more)")
    parser.add_argument("--layout", choices=["split", "single"], default="split")
    parser.add_argument("--workdir", type=Path, default=ROOT / "var" / "cycle-bench")
    parser.add_argument("--timeout", type=float, default=120, help="seconds one cycle may take")
    parser.add_argument("--api", choices=["runserver", "down", "hung"], default="runserver",
                        help="the agent's progress API: runserver (default); down: nothing listens, every "
                             "update fails at once (as with an API refusing the token); hung: connections are "
                             "accepted and never answered (a blackholed agent, VMA_REQUEST_TIMEOUT_S per try)")
    parser.add_argument("--json", action="store_true", help="also print every cycle and the summary as JSON")
    parser.add_argument("--keep", action="store_true", help="leave the work directory (logs) afterwards")
    args = parser.parse_args()
    workdir = args.workdir.resolve()
    env = configure(workdir)
    env["RECOVERY_POINTS_KEEP"] = os.environ["RECOVERY_POINTS_KEEP"] = str(args.points_keep)
    setup_django()
    import logging

    import redis
    from django.core.management import call_command

    for name in ("replication", "vma_agent"):  # this process's own lines: the services log to workdir/log
        logging.getLogger(name).setLevel(logging.WARNING)
    broker = redis.Redis.from_url(env["CELERY_BROKER_URL"])
    broker.delete("oma", "vma.local")
    call_command("migrate", verbosity=0)
    for index in range(args.in_place + 1):
        images = make_images(workdir / "images" / f"vm{index}")
        call_command("add_vm", vm_name(index), *[arg for path in images for arg in ("--disk", str(path))],
                     stdout=open(os.devnull, "w"))  # noqa: SIM115
    services = Services(workdir, env, args.layout, api=args.api)
    cycles, firsts, warm = [], [], []
    try:
        for _ in range(args.warmup):
            warm.append(one_cycle(workdir / "volumes", services, args.timeout))
        for i in range(args.reps):
            # paired: each journaled cycle of the bench VM, then (while there
            # are fresh VMs) a fresh VM's first cycle, written in place
            cycles.append(one_cycle(workdir / "volumes", services, args.timeout))
            if i < args.in_place:
                firsts.append(one_cycle(workdir / "volumes", services, args.timeout, vm_name(i + 1)))
        left = leftovers(workdir)
    finally:
        services.stop()
        subprocess.run([sys.executable, "manage.py", "export_server", "stop"], cwd=ROOT,
                       env={**os.environ, **env}, capture_output=True)
        for key in broker.scan_iter(f"{env['VMA_PROGRESS_PREFIX']}:*", count=1000):
            broker.delete(key)
    not_journaled = [c["job"] for c in cycles if not c["journaled"]]
    if not_journaled:
        print(f"WARNING: counted cycles not journaled: {not_journaled}")
    if warm:
        print(f"warmup: {len(warm)} cycle(s), the first in place; created -> completed "
              + ", ".join(f"{c['created_to_completed_s']:.3f} s" + ("" if c["journaled"] else " (in place)")
                          for c in warm))
    print(f"after the cycles: {left['points']} points; layer files {len(left['layer_files'])}; "
          f"qemu-nbd servers still running {left['qemu_nbd']} (RECOVERY_POINTS_KEEP {env['RECOVERY_POINTS_KEEP']})")
    summary = summarize(cycles)
    label = args.layout + ("" if args.api == "runserver" else f", agent API {args.api}")
    print("== journaled cycles (a layer per disk: opened, served by qemu-nbd, sealed) ==")
    print_summary(summary, label)
    result = {"cycles": cycles, "summary": summary}
    if firsts:
        first_summary = summarize(firsts)
        print("== first cycles of fresh VMs (in place: no layer), run alternately with the above ==")
        print_summary(first_summary, label)
        compare(summary, first_summary)
        result |= {"in_place": firsts, "in_place_summary": first_summary}
    if args.json:
        print(json.dumps(result | {"warmup": warm, "leftovers": left}, indent=2, default=str))
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
