"""The poller over several agents, each its own progress API (manage.py
runserver with its own token, name and progress store), plus agents that
accept connections and never answer: how long a pass takes, its HTTP
requests, the disk rows it wrote, and how many agents it did not wait for.

Every live agent's progress is applied as its read ends; a silent agent is
waited for PROGRESS_POLL_INTERVAL_S at most (then skipped while its read
hangs), so with silent agents a pass lasts about that long while every live
agent's rows are written (poll_progress starts the next pass
PROGRESS_POLL_INTERVAL_S after this one started, so the cadence holds).

Measured here (SQLite, 2 cores): 10 agents x 20 jobs x 4 disks, none silent:
a pass 0.13-0.37 s, 10 HTTP requests, 800 of 800 moved rows written;
4 agents x 25 x 4 and one silent agent: a pass 5.04-5.06 s (the wait),
4 HTTP requests, 400 of 400 rows written, the silent one not waited for.

Its own SQLite database under a temporary directory (or BENCH_DATABASE_URL,
emptied first: a run starts from no agents and no jobs) and Redis at
BENCH_REDIS_URL (default db 11) under fresh key prefixes:

    .venv/bin/python -m bench.agents_poll_bench [--agents 4] [--silent 1] [--jobs 25] [--disks 4] [--rounds 3]

--lag SECONDS: progress lag with every agent reporting at once. Real: each
agent's progress API (runserver, Redis store, change feed), HTTP, the
poller's passes (services.progress.poll_once every PROGRESS_POLL_INTERVAL_S,
in a thread of this process, as the poller process runs them) and the
database. Simulated: the copy loops (a thread per agent posts each of its
disks' next update every --report-s, as a copy's reporter does; no data is
copied). A watcher reads the disks' rows every 50 ms; lag = when a
progress_seq appeared in the database minus when its update was posted.

    .venv/bin/python -m bench.agents_poll_bench --agents 10 --silent 0 --jobs 5 --disks 4 --lag 60

Measured (45 s, 200 disks, 2 busy cores): MariaDB lag median 1.37 s, p95
2.55 s (passes 0.76 s median); SQLite median 1.13 s, p95 2.13 s. The lag is
the age of the newest update at a pass (0-2 s at a 2 s report interval)
plus the pass itself.
"""

from __future__ import annotations

import argparse
import os
import secrets
import socket
import subprocess
import sys
import time

from bench.common import ROOT, free_port, setup_django


def start_api(name: str, workdir, env: dict) -> tuple[subprocess.Popen, str, str]:
    import requests

    port, token = free_port(), secrets.token_urlsafe(24)
    url = f"http://127.0.0.1:{port}"
    agent_env = {**os.environ, **env, "VMA_AGENT_NAME": name, "VMA_TOKEN": token, "VMA_URL": url,
                 "VMA_PROGRESS_PREFIX": f"{env['VMA_PROGRESS_PREFIX']}:{name}"}
    proc = subprocess.Popen([sys.executable, "manage.py", "runserver", "--noreload", "--skip-checks",
                             f"127.0.0.1:{port}"], cwd=ROOT, env=agent_env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{url}/api/v1/health", timeout=1).status_code == 200:
                break
        except requests.RequestException:
            time.sleep(0.1)
    else:
        proc.kill()
        raise SystemExit(f"agent {name}'s API did not start")
    (workdir / f"{name}.token").write_text(token)
    return proc, url, token


def measure_lag(live: dict, args) -> None:
    """Every agent's copy loops post at once while the poller runs its
    passes; how long an update takes to reach its disk's row."""
    import statistics
    import threading

    from django.conf import settings
    from django.db import connection

    from bench.common import percentile
    from replication.models import VMDisk
    from replication.services import progress

    stop = threading.Event()
    posted: dict[tuple[str, str, int], float] = {}  # (job id, disk key, seq) -> when posted
    seen: dict[tuple[str, str, int], float] = {}
    pass_seconds: list[float] = []

    def copy_loops(client, jobs):
        seq, total = 0, 64 * 2**30
        while not stop.is_set():
            seq += 1
            started = time.monotonic()
            for job in jobs:
                for d in range(args.disks):
                    key = f"disk-{2000 + d}"
                    posted[(job.id, key, seq)] = time.monotonic()
                    client.post_update(job.id, {"stage": "Transfer", "status": "in_progress", "seq": seq,
                                                "disk_id": key, "bytes_transferred": seq * total // 100,
                                                "total_bytes": total, "throughput_bps": 2**27})
            stop.wait(max(0.0, args.report_s - (time.monotonic() - started)))

    def poller():
        while not stop.is_set():
            started = time.monotonic()
            pass_seconds.append(progress.poll_once().seconds)
            stop.wait(max(0.0, settings.PROGRESS_POLL_INTERVAL_S - (time.monotonic() - started)))
        connection.close()

    def watcher():
        while not stop.is_set():
            now = time.monotonic()
            for job_id, key, seq in VMDisk.objects.values_list("job_id", "disk_key", "progress_seq"):
                seen.setdefault((job_id, key, seq), now)
            stop.wait(0.05)
        connection.close()

    threads = [threading.Thread(target=copy_loops, args=(client, jobs)) for client, jobs in live.values()]
    threads += [threading.Thread(target=poller), threading.Thread(target=watcher)]
    for thread in threads:
        thread.start()
    time.sleep(args.lag)  # the measurement's length
    stop.set()
    for thread in threads:
        thread.join(60)
    lags = [seen[key] - posted[key] for key in seen if key in posted]
    disks = sum(len(jobs) for _, jobs in live.values()) * args.disks
    print(f"progress lag, {len(live)} agents reporting at once ({disks} disks, an update per disk every "
          f"{args.report_s:g} s), poller every {settings.PROGRESS_POLL_INTERVAL_S:g} s, {args.lag:g} s: "
          f"{len(lags)} updates reached the database of {len(posted)} posted (the rest were overtaken)")
    if lags:
        print(f"  lag median {statistics.median(lags):.2f} s, p95 {percentile(lags, 95):.2f} s, "
              f"max {max(lags):.2f} s; poller pass median {statistics.median(pass_seconds):.3f} s, "
              f"p95 {percentile(pass_seconds, 95):.3f} s over {len(pass_seconds)} passes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--agents", type=int, default=4)
    parser.add_argument("--silent", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=25, help="active jobs per agent")
    parser.add_argument("--disks", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--lag", type=float, default=0, help="measure progress lag for this many seconds")
    parser.add_argument("--report-s", type=float, default=2.0, help="a copy loop's report interval (--lag)")
    args = parser.parse_args()
    os.environ.setdefault("BENCH_REDIS_URL", "redis://127.0.0.1:6379/11")
    from bench.progress_latency import configure, make_jobs

    env, workdir = configure()
    setup_django()
    from django.conf import settings
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    call_command("flush", interactive=False, verbosity=0)  # a second run on the same database adds the same agents
    from replication.models import ReplicationJob, VirtualMachine
    from replication.services import agents, progress
    from vma_agent.client import ProgressClient

    servers, silent = [], []
    try:
        live = {}
        for i in range(args.agents):
            name = f"site-{i}"
            proc, url, token = start_api(name, workdir, env)
            servers.append(proc)
            agents.add(name, url, str(workdir / f"{name}.token"), actor="bench")
            jobs = make_jobs(args.jobs, args.disks, name)
            VirtualMachine.objects.filter(name__startswith=f"{name}-").update(agent=name)
            live[name] = (ProgressClient(url, token), jobs)
        for i in range(args.silent):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sock.listen(64)
            silent.append(sock)
            name = f"silent-{i}"
            (workdir / f"{name}.token").write_text("x")
            agents.add(name, f"http://127.0.0.1:{sock.getsockname()[1]}", str(workdir / f"{name}.token"),
                       actor="bench")
            make_jobs(args.jobs, args.disks, name)
            VirtualMachine.objects.filter(name__startswith=f"{name}-").update(agent=name)
        print(f"{args.agents} agents x {args.jobs} jobs x {args.disks} disks, {args.silent} silent agent(s); "
              f"database {settings.DATABASES['default']['ENGINE']}, pass wait {settings.PROGRESS_POLL_INTERVAL_S} s, "
              f"request timeout {settings.VMA_REQUEST_TIMEOUT_S} s")
        if args.lag:
            measure_lag(live, args)
            return
        for round_ in range(1, args.rounds + 1):
            for client, jobs in live.values():
                for job in jobs:
                    for d in range(args.disks):
                        client.post_update(job.id, {"stage": "Transfer", "status": "in_progress", "seq": round_,
                                                    "disk_id": f"disk-{2000 + d}",
                                                    "bytes_transferred": round_ * 2**30,
                                                    "total_bytes": 10 * 2**30, "throughput_bps": 2**27})
            stats = progress.poll_once()
            print(f"pass {round_}: {stats.seconds:.3f} s ({stats.apply_seconds:.3f} s applying), "
                  f"{stats.requests} HTTP requests, {stats.disks_written} disk rows written "
                  f"(of {args.agents * args.jobs * args.disks} that moved), agents {stats.agents}, "
                  f"not waited for {stats.agents_busy}", flush=True)
        print(f"active jobs: {ReplicationJob.objects.count()}")
    finally:
        for proc in servers:
            proc.terminate()
            proc.wait(10)
        for sock in silent:
            sock.close()
        import redis

        client = redis.Redis.from_url(env["VMA_REDIS_URL"])
        for key in client.scan_iter(f"{env['VMA_PROGRESS_PREFIX']}:*", count=1000):
            client.delete(key)


if __name__ == "__main__":
    main()
