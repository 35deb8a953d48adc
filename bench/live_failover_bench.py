"""A live failover's downtime, split into its parts, beside the forecast the
operator was shown before it started.

In a directory of its own (--workdir, default var/live-failover-bench: its
own SQLite database, volumes, sockets and logs) it starts what
scripts/demo.sh starts (the agent's progress API, an OMA worker, the
agent's worker with no database, beat, the poller; bench/cycle_bench.py's
"split" layout), the vCenter simulator (simulators/vcenter.py) with one VM whose
64 MiB boot disk is the project's test disk (scripts/make_boot_disk.py),
and maps the VM's network to an isolated libvirt network. It replicates the
VM (full, then incrementals of 1 MiB each to give the forecast a change
rate) and runs one test failover (the forecast's boot time). Then, --reps
times: the guest writes 1 MiB plus a new boot marker, the forecast is read
(manage.py failover --forecast), a live failover runs through the workers
(guest shutdown through the agent, final incremental, boot on the mapped
network, the marker verified on the serial console), and a rollback powers
the source on again.

Figures per live failover, then medians:
  downtime        shutdown started -> boot verified (FailoverJob.downtime_s)
  shutdown        the agent's guest shutdown through vCenter
  final cycle     the final incremental (MiB it copied)
  boot            protect volumes + define + start + verify boot (the
                  guest's own boot under TCG where KVM cannot run)
  forecast        what the confirmation showed just before
  CPU             user+system seconds of every process the bench started
                  (QEMU runs under libvirtd: the guest's CPU is not in it)

    .venv/bin/python -m bench.live_failover_bench [--reps 5] [--json]

The simulator answers a guest shutdown at once; a real guest takes its own
time, which the forecast learns from the last live failover.

With --source-lost, the RTO of a live failover with the source site lost
(`failover --live --source-lost`), --reps times: the guest writes a new boot
marker and a cycle makes it a recovery point; the guest writes another
marker and 2 MiB more and a slow incremental (--limit-kib KiB/s per disk)
starts copying them; once the agent has copied some of it the vCenter
simulator is stopped (SIGSTOP: the site goes dark, nothing answers); then
the source-lost live failover runs through the workers and must boot the
point's marker. Split of the RTO (FailoverJob.created_at -> boot verified,
its downtime_s):
  fence       start_failover() in this process: the running cycle cancelled,
              its layers discarded and exports closed (timed around the
              journal's discard, which runs as its transaction commits)
  queued      the command recorded -> the OMA worker takes the failover
              (the fence runs in it: it is queued once the fence is done)
  preflight, protect volumes, define VM, start VM   its steps
  guest boot  start VM ended -> the point's marker line first in the serial
              console (a thread reads the console file every 5 ms): the
              guest's own boot under TCG, not the product's
  verify lag  marker on the console -> verify boot ended (the step reads
              the console every 0.25 s)
  rest        the RTO minus all of the above (step bookkeeping, commit)
  RTO - guest boot   the goal's figure (goal < 2 s)
Then the failover is rolled back (no power order: the site is lost), the
simulator continues (SIGCONT), and the next rep starts.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

from bench.common import ROOT, setup_django
from bench.cycle_bench import Services, configure
from simulators.boot_disk import boot_disk_builder

VM_NAME = "bench-live"
MiB = 1024 * 1024
DISK_BYTES = 64 * MiB


def wait_for(what: str, done, timeout_s: float):
    deadline = time.monotonic() + timeout_s
    while True:
        value = done()
        if value:
            return value
        if time.monotonic() > deadline:
            raise SystemExit(f"{what} did not finish within {timeout_s:.0f} s")
        time.sleep(0.2)


def guest_writes(live: Path, rng: random.Random, nbytes: int) -> None:
    """nbytes of new data in the last MiBs of the disk (free clusters of its
    FAT file system: the guest still boots)."""
    with open(live, "r+b") as disk:
        disk.seek(DISK_BYTES - 2 * MiB)
        disk.write(rng.randbytes(nbytes))


def replicate(vm, sync_type: str):
    from replication.choices import JOB_TERMINAL
    from replication.models import ReplicationJob
    from replication.services.jobs import start_replication

    job_id = start_replication(vm, sync_type, actor="bench").id
    job = wait_for(f"cycle {job_id}", lambda: (j := ReplicationJob.objects.get(pk=job_id)).status in JOB_TERMINAL
                   and j, 300)
    if job.status != "completed":
        raise SystemExit(f"cycle {job.id} {job.status}: {job.error_message}")
    return job


def run_failover(vm, kind: str):
    from replication.models import FailoverJob
    from replication.services import failover

    start = failover.start_rollback(vm, actor="bench") if kind == "rollback" else \
        failover.start_failover(vm, kind, actor="bench")
    job = wait_for(f"{kind} {start.pk}", lambda: (j := FailoverJob.objects.get(pk=start.pk)).status in
                   ("succeeded", "failed") and not j.steps.filter(ended_at__isnull=True).exists() and j, 600)
    if job.status != "succeeded":
        raise SystemExit(f"{kind} failover {job.pk} failed: {job.error_message}\n{job.console_tail}")
    return job


def one_live_failover(vm, live: Path, rep: int, rng: random.Random, services: Services) -> dict:
    from replication.choices import FAILOVER_BOOT_STEPS
    from replication.models import VMContext
    from replication.services import forecast

    boot_disk = boot_disk_builder()
    guest_writes(live, rng, MiB)
    marker = f"LIVE{rep}"
    boot_disk.set_marker(live, marker)
    context = VMContext.of(vm)
    context.boot_check_regex = f"BOOT-MARKER: {marker}$"
    context.save()
    predicted = forecast.downtime(vm)
    cpu_before = services.cpu_seconds()
    job = run_failover(vm, "live")
    cpu = sum(services.cpu_seconds().values()) - sum(cpu_before.values())
    steps = {s.name: s.seconds for s in job.steps.all()}
    final = job.final_cycle
    run_failover(vm, "rollback")
    return {"downtime_s": job.downtime_s, "shutdown_s": steps["shut down source"],
            "final_cycle_s": steps["final incremental"], "final_cycle_mib": round(final.bytes_transferred / MiB, 2),
            "boot_s": round(sum(steps.get(name) or 0.0 for name in FAILOVER_BOOT_STEPS), 3),
            "verify_boot_s": steps["verify boot"],
            "forecast_s": predicted["total_s"], "forecast": predicted, "console_match": job.console_match,
            "cpu_s": round(cpu, 2)}


def copied_bytes(job_id: str) -> int:
    """What the agent's progress API says the job's copies have done so far."""
    import requests
    from django.conf import settings

    response = requests.get(f"{settings.VMA_URL}/api/v1/progress/{job_id}", timeout=10,
                            headers={"Authorization": f"Bearer {settings.VMA_TOKEN}"})
    if response.status_code != 200:
        return 0
    return sum(int((disk or {}).get("bytes_transferred") or 0) for disk in response.json().get("disks", {}).values())


class ConsoleWatch(threading.Thread):
    """Notes the wall time at which `marker` first shows in a console file."""

    def __init__(self, path: Path, marker: str):
        super().__init__(daemon=True)
        self.path, self.marker = path, marker.encode()
        self.at: float | None = None
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                if self.marker in self.path.read_bytes():
                    self.at = time.time()
                    return
            except OSError:
                pass
            time.sleep(0.005)


class FenceTimer:
    """Times the journal's discard of a fenced cycle (jobs._discard_layers,
    run in this process when start_failover's transaction commits)."""

    def __init__(self):
        from replication.services import jobs

        self.jobs, self.original = jobs, jobs._discard_layers
        self.seconds = 0.0

        def timed(job):
            started = time.perf_counter()
            try:
                return self.original(job)
            finally:
                self.seconds += time.perf_counter() - started

        jobs._discard_layers = timed


def one_source_lost(vm, live: Path, rep: int, rng: random.Random, sim, limit_bps: int) -> dict:
    from replication.models import FailoverJob, ReplicationJob, VMContext
    from replication.platforms import destination_for
    from replication.services import failover
    from replication.services.jobs import start_replication

    boot_disk = boot_disk_builder()
    point_marker = f"POINT{rep}"
    guest_writes(live, rng, MiB)
    boot_disk.set_marker(live, point_marker)
    point_cycle = replicate(vm, "incremental")
    context = VMContext.of(vm)
    context.boot_check_regex = f"BOOT-MARKER: {point_marker}$"
    context.save()
    # The guest goes on: a new marker and 2 MiB more, copied slowly.
    boot_disk.set_marker(live, f"LOST{rep}")
    guest_writes(live, rng, 2 * MiB)
    cycle = start_replication(vm, "incremental", bandwidth_limit_bps=limit_bps, actor="bench")
    wait_for("the slow incremental's first bytes", lambda: copied_bytes(cycle.id) >= limit_bps // 2, 120)
    os.kill(sim.proc.pid, signal.SIGSTOP)  # the site goes dark
    try:
        destination = destination_for(vm)
        watch = ConsoleWatch(destination.console_path(failover.destination_name(vm, "live")),
                             f"BOOT-MARKER: {point_marker}")
        watch.start()
        fence = FenceTimer()
        try:
            started = time.perf_counter()
            job = failover.start_failover(vm, "live", "bench", source_lost=True)
            command_s = time.perf_counter() - started
        finally:
            fence.jobs._discard_layers = fence.original
        job = wait_for(f"source-lost failover {job.pk}",
                       lambda: (j := FailoverJob.objects.get(pk=job.pk)).status in ("succeeded", "failed")
                       and not j.steps.filter(ended_at__isnull=True).exists() and j, 600)
        watch.stopped.set()
        if job.status != "succeeded":
            raise SystemExit(f"source-lost failover {job.pk} failed: {job.error_message}\n{job.console_tail}")
        fenced = ReplicationJob.objects.get(pk=cycle.id)
        layer_servers = subprocess.run(["pgrep", "-f", f"qemu-nbd.*{cycle.id}"], capture_output=True,
                                       text=True).stdout.split()
        steps = {st.name: st for st in job.steps.all()}
        guest_boot = watch.at - steps["start VM"].ended_at.timestamp() if watch.at else None
        parts = {"fence_s": fence.seconds, "command_s": command_s,
                 "queued_s": (job.started_at - job.created_at).total_seconds(),
                 **{f"{name}_s": steps[name].seconds for name in ("preflight", "protect volumes", "define VM",
                                                                  "start VM", "verify boot") if name in steps},
                 "guest_boot_s": guest_boot,
                 "verify_lag_s": steps["verify boot"].ended_at.timestamp() - watch.at if watch.at else None}
        rest = job.downtime_s - parts["queued_s"] - sum(steps[n].seconds for n in steps)
        result = {"rto_s": job.downtime_s, **parts, "rest_s": rest,
                  "rto_minus_boot_s": job.downtime_s - guest_boot if guest_boot is not None else None,
                  "console_match": job.console_match,
                  "point_marker": job.console_match.endswith(point_marker) and job.replication_job_id == point_cycle.id,
                  "fenced": fenced.status, "fenced_layer_servers": len(layer_servers)}
        run_failover(vm, "rollback")
    finally:
        os.kill(sim.proc.pid, signal.SIGCONT)
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}


SOURCE_LOST_COLUMNS = ("rto_s", "rto_minus_boot_s", "fence_s", "queued_s", "preflight_s", "protect volumes_s",
                       "define VM_s", "start VM_s", "guest_boot_s", "verify_lag_s", "rest_s")


def print_source_lost(results: list[dict]) -> None:
    heads = ("RTO", "-boot", "(fence", "queued)", "preflt", "protect", "define", "start", "g.boot", "v.lag", "rest")
    print("rep " + " ".join(f"{h:>7}" for h in heads) + "  marker fenced")
    for rep, r in enumerate(results):
        print(f"{rep:>3} " + " ".join(f"{r.get(c) if r.get(c) is not None else float('nan'):7.3f}"
                                      for c in SOURCE_LOST_COLUMNS)
              + f"  {'ok' if r['point_marker'] else 'WRONG'}  {r['fenced']}, layer servers {r['fenced_layer_servers']}")
    med = {c: statistics.median(r[c] for r in results if r.get(c) is not None) for c in SOURCE_LOST_COLUMNS
           if any(r.get(c) is not None for r in results)}
    print("med " + " ".join(f"{med.get(c, float('nan')):7.3f}" for c in SOURCE_LOST_COLUMNS))
    spread = {c: (min(r[c] for r in results), max(r[c] for r in results)) for c in ("rto_s", "rto_minus_boot_s")}
    print(f"median over {len(results)}: RTO {med['rto_s']:.2f} s (min {spread['rto_s'][0]:.2f}, max "
          f"{spread['rto_s'][1]:.2f}); minus the guest's own boot {med['rto_minus_boot_s']:.2f} s (min "
          f"{spread['rto_minus_boot_s'][0]:.2f}, max {spread['rto_minus_boot_s'][1]:.2f}; goal < 2 s)")


def live_failovers(vm, live: Path, rng: random.Random, services: Services, reps: int, results: list) -> None:
    from django.core.management import call_command

    from replication.choices import FAILOVER_BOOT_STEPS

    test = run_failover(vm, "test")
    call_command("failover_end", VM_NAME, stdout=open(os.devnull, "w"))  # noqa: SIM115
    booted = sum(s.seconds for s in test.steps.filter(name__in=FAILOVER_BOOT_STEPS))
    print(f"test failover: boot verified in {booted:.2f} s")
    print(f"{'rep':>3} {'downtime':>9} {'shutdown':>9} {'final':>8} {'MiB':>5} {'boot':>7} {'forecast':>9} "
          f"{'CPU':>6}")
    for rep in range(reps):
        r = one_live_failover(vm, live, rep, rng, services)
        results.append(r)
        print(f"{rep:>3} {r['downtime_s']:8.2f}s {r['shutdown_s']:8.2f}s {r['final_cycle_s']:7.2f}s "
              f"{r['final_cycle_mib']:5.2f} {r['boot_s']:6.2f}s {r['forecast_s']:8.2f}s {r['cpu_s']:5.1f}s")


def isolated_network():
    import libvirt

    name = f"oma-bench-{uuid.uuid4().hex[:6]}"
    conn = libvirt.open("qemu:///system")
    net = conn.networkCreateXML(f"<network><name>{name}</name><bridge name='vb-{name[-6:]}' stp='off'/></network>")
    return name, net, conn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--workdir", type=Path, default=ROOT / "var" / "live-failover-bench")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--source-lost", action="store_true",
                        help="the RTO of a live failover with the source site lost, fencing a running cycle")
    parser.add_argument("--limit-kib", type=int, default=256,
                        help="--source-lost: the running cycle's bandwidth limit per disk, KiB/s")
    parser.add_argument("--keep", action="store_true", help="leave the work directory (logs) afterwards")
    args = parser.parse_args()
    workdir = args.workdir.resolve()
    env = configure(workdir)
    extra = {"VMA_SNAPSHOT_SOURCE": "image-dir", "VMA_SNAPSHOT_IMAGE_DIR": str(workdir / "snapshots"),
             "FAILOVER_DIR": str(workdir / "run" / "failover"), "OMA_SECRETS_DIR": str(workdir / "secrets")}
    (workdir / "secrets").mkdir(mode=0o700)
    env.update(extra)
    os.environ.update(extra)
    setup_django()
    import logging

    import redis
    from django.core.management import call_command

    from replication.models import NetworkMapping, VMContext
    from replication.services import vmware as vmware_service
    from simulators.vcenter import VCenterSimulator, vm_spec

    for name in ("replication", "vma_agent"):
        logging.getLogger(name).setLevel(logging.WARNING)
    redis.Redis.from_url(env["CELERY_BROKER_URL"]).delete("oma", "vma.local")
    call_command("migrate", verbosity=0)
    sim = VCenterSimulator.start(workdir / "vcsim", {"vms": [vm_spec(VM_NAME, [DISK_BYTES], cbt=True,
                                                                     firmware="bios", cpus=1, memory_mib=384)]},
                                 data_dir=workdir / "snapshots" / "vc1", password_dir=workdir / "secrets")
    network, net, conn = isolated_network()
    services = Services(workdir, env, "split")
    rng = random.Random(7)
    results = []
    try:
        live = Path(sim.vms[VM_NAME]["disks"]["2000"])
        boot_disk = boot_disk_builder()
        boot_disk.build_boot_disk(workdir / "boot.img", "BENCH")
        live.write_bytes((workdir / "boot.img").read_bytes())
        record = vmware_service.register_vcenter("vc1", sim.host, sim.username, sim.thumbprint, port=sim.port,
                                                 password_file=str(sim.password_file))
        (vm,) = vmware_service.discover(record, [VM_NAME])
        NetworkMapping.objects.update_or_create(source_network="VM Network",
                                                defaults={"destination_network": network})
        context = VMContext.of(vm)
        context.boot_check_regex, context.boot_check_timeout_s = "BOOT-MARKER: BENCH$", 300
        context.save()
        replicate(vm, "full")
        if args.source_lost:
            for rep in range(args.reps):
                r = one_source_lost(vm, live, rep, rng, sim, args.limit_kib * 1024)
                results.append(r)
                print(f"rep {rep}: RTO {r['rto_s']:.2f} s, minus guest boot {r['rto_minus_boot_s']:.2f} s", flush=True)
        else:
            live_failovers(vm, live, rng, services, args.reps, results)
    finally:
        services.stop()
        subprocess.run([sys.executable, "manage.py", "export_server", "stop"], cwd=ROOT, env={**os.environ, **env},
                       capture_output=True)
        sim.stop()
        net.destroy()
        conn.close()
    if results and args.source_lost:
        print_source_lost(results)
        if args.json:
            print(json.dumps(results, indent=2, default=str))
    elif results:
        med = {k: round(statistics.median(r[k] for r in results), 3)
               for k in ("downtime_s", "shutdown_s", "final_cycle_s", "final_cycle_mib", "boot_s", "verify_boot_s",
                         "forecast_s", "cpu_s")}
        print(f"median over {len(results)}: downtime {med['downtime_s']:.2f} s = shutdown {med['shutdown_s']:.2f} s"
              f" + final incremental {med['final_cycle_s']:.2f} s ({med['final_cycle_mib']:.2f} MiB) + boot "
              f"{med['boot_s']:.2f} s (guest's own boot {med['verify_boot_s']:.2f} s); forecast "
              f"{med['forecast_s']:.2f} s; CPU {med['cpu_s']:.1f} s per failover and rollback")
        if args.json:
            print(json.dumps({"failovers": results, "median": med}, indent=2, default=str))
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
