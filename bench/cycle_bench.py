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
    paths = []
    for i in range(2):
        path = directory / f"disk{i}.img"
        with open(path, "wb") as f:
            f.truncate(64 * MiB)
            f.seek(8 * MiB * (i + 1))
            f.write(os.urandom(MiB))
        paths.append(path)
    return paths


def empty_volumes(volume_dir: Path) -> None:
    """Make every target volume sparse again (same size, no data), so the
    first data the next cycle writes shows as allocated blocks."""
    for path in volume_dir.iterdir():
        if path.is_file():
            size = path.stat().st_size
            with open(path, "r+b") as f:
                f.truncate(0)
                f.truncate(size)


class FirstWrite(threading.Thread):
    """Notes the wall time at which any file in the volume directory first
    has allocated blocks (the directory's files were emptied beforehand)."""

    def __init__(self, volume_dir: Path):
        super().__init__(daemon=True)
        self.volume_dir = volume_dir
        self.at: float | None = None
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            for path in self.volume_dir.iterdir():
                try:
                    if path.stat().st_blocks > 0:
                        self.at = time.time()
                        return
                except FileNotFoundError:
                    continue
            time.sleep(0.002)


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


def one_cycle(volume_dir: Path, services: Services, timeout_s: float) -> dict:
    from io import StringIO

    from django.core.management import call_command

    from replication.models import ReplicationJob, VMDisk

    empty_volumes(volume_dir)
    watcher = FirstWrite(volume_dir)
    cpu_before = services.cpu_seconds()
    watcher.start()
    out = StringIO()
    issued = time.time()
    call_command("replicate", VM_NAME, "--full", stdout=out)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1, help="cycles run first and not counted")
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
    setup_django()
    import logging

    import redis
    from django.core.management import call_command

    for name in ("replication", "vma_agent"):  # this process's own lines: the services log to workdir/log
        logging.getLogger(name).setLevel(logging.WARNING)
    broker = redis.Redis.from_url(env["CELERY_BROKER_URL"])
    broker.delete("oma", "vma.local")
    call_command("migrate", verbosity=0)
    images = make_images(workdir / "images")
    call_command("add_vm", VM_NAME, *[arg for path in images for arg in ("--disk", str(path))],
                 stdout=open(os.devnull, "w"))  # noqa: SIM115
    services = Services(workdir, env, args.layout, api=args.api)
    cycles = []
    try:
        for i in range(args.warmup + args.reps):
            cycle = one_cycle(workdir / "volumes", services, args.timeout)
            if i >= args.warmup:
                cycles.append(cycle)
    finally:
        services.stop()
        subprocess.run([sys.executable, "manage.py", "export_server", "stop"], cwd=ROOT,
                       env={**os.environ, **env}, capture_output=True)
        for key in broker.scan_iter(f"{env['VMA_PROGRESS_PREFIX']}:*", count=1000):
            broker.delete(key)
    summary = summarize(cycles)
    print_summary(summary, args.layout + ("" if args.api == "runserver" else f", agent API {args.api}"))
    if args.json:
        print(json.dumps({"cycles": cycles, "summary": summary}, indent=2, default=str))
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
