"""The agent's own bookkeeping of the copies it runs, in its Redis: who holds
each disk of each job (a claim with a lease), which jobs the OMA asked to
stop, and each copy's resume cursor. Free of Django; the OMA never reads
this, it only asks to stop. The agent API writes only the stop and limit
keys here, never a claim or a cursor.

A copy's resume cursor is recorded here by the copy itself, each time its
engine committed it (everything below written and flushed on the target):
the one place a redelivered run of the disk may resume from. The progress
store beside it is written over HTTP and only shows the cursor.

A claim is fenced by the attempt number the OMA gave the copy: a newer
attempt (the reaper handed a silent copy to a new run) takes the disk and
the older run stops at its next check; the same attempt delivered twice
copies once, unless its holder is gone (its lease ran out, or it was a
process on this host that died)."""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import asdict, dataclass

import redis

from vma_agent.nbdkit import process_alive


def worker_id() -> str:
    """Who runs a copy: host and process, so an operator can find it."""
    return f"{socket.gethostname()}:{os.getpid()}"


def holder_is_dead_here(worker: str) -> bool:
    host, _, pid = worker.rpartition(":")
    return host == socket.gethostname() and pid.isdigit() and not process_alive(int(pid))


@dataclass
class Claim:
    attempt: int
    worker: str
    expires: float
    ended: bool = False  # the run finished (its outcome went to the OMA)

    @classmethod
    def parse(cls, raw: bytes | None) -> Claim | None:
        return None if raw is None else cls(**json.loads(raw))

    def dump(self) -> str:
        return json.dumps({"attempt": self.attempt, "worker": self.worker, "expires": self.expires,
                           "ended": self.ended})


@dataclass
class Checkpoint:
    """A copy's committed cursor as the copy recorded it: by which attempt
    and worker, when, and for which copy plan (what is copied from where to
    where: a cursor means nothing for another plan)."""

    cursor: int
    attempt: int
    worker: str
    plan: str
    at: float

    @classmethod
    def parse(cls, raw: bytes | None) -> Checkpoint | None:
        return None if raw is None else cls(**json.loads(raw))


# Only a run of the same or a newer attempt replaces the record: a superseded
# run writing late must not move its successor's cursor. The same attempt
# may move it down (a resumed run that found the target differing below it).
_RECORD_CHECKPOINT = """
local held = redis.call('GET', KEYS[1])
if held and tonumber(cjson.decode(held)['attempt']) > tonumber(ARGV[2]) then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[3])
return 1
"""


class AgentControl:
    def __init__(self, client: redis.Redis, prefix: str = "vma:control", lease_s: float = 60.0):
        self.client = client
        self.prefix = prefix
        self.lease_s = lease_s

    @classmethod
    def from_url(cls, url: str, **kwargs) -> AgentControl:
        return cls(redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5), **kwargs)

    def _claim_key(self, job_id: str, disk_key: str) -> str:
        return f"{self.prefix}:claim:{job_id}:{disk_key}"

    def _stop_key(self, job_id: str) -> str:
        return f"{self.prefix}:stop:{job_id}"

    def _limit_key(self, job_id: str) -> str:
        return f"{self.prefix}:limit:{job_id}"

    def _applied_key(self, job_id: str) -> str:
        return f"{self.prefix}:limit-applied:{job_id}"

    def _checkpoint_key(self, job_id: str, disk_key: str) -> str:
        return f"{self.prefix}:checkpoint:{job_id}:{disk_key}"

    def record_checkpoint(self, job_id: str, disk_key: str, checkpoint: Checkpoint) -> bool:
        """Record the copy's committed cursor; False when a newer attempt's is stored."""
        script = self.client.register_script(_RECORD_CHECKPOINT)
        return bool(script(keys=[self._checkpoint_key(job_id, disk_key)],
                           args=[json.dumps(asdict(checkpoint)), checkpoint.attempt, 7 * 24 * 3600]))

    def checkpoint(self, job_id: str, disk_key: str) -> Checkpoint | None:
        return Checkpoint.parse(self.client.get(self._checkpoint_key(job_id, disk_key)))

    def claim(self, job_id: str, disk_key: str, attempt: int, worker: str) -> str | None:
        """Take the disk for this run; None when taken, else why not."""
        key = self._claim_key(job_id, disk_key)
        with self.client.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key)
                    held = Claim.parse(pipe.get(key))
                    refusal = self._refusal(held, attempt, worker)
                    if refusal:
                        pipe.unwatch()
                        return refusal
                    pipe.multi()
                    pipe.set(key, Claim(attempt, worker, time.time() + self.lease_s).dump(), ex=7 * 24 * 3600)
                    pipe.execute()
                    return None
                except redis.WatchError:
                    continue

    def _refusal(self, held: Claim | None, attempt: int, worker: str) -> str | None:
        if held is None or attempt > held.attempt:
            return None
        if attempt < held.attempt:
            return f"attempt {held.attempt} already took it over"
        if held.ended:
            return f"attempt {attempt} already ended on {held.worker}"
        if held.worker == worker:
            return None
        if held.expires < time.time() or holder_is_dead_here(held.worker):
            return None  # the same attempt again, its first holder gone: a redelivery after a crash
        return f"attempt {attempt} is already being copied by {held.worker}"

    def check(self, job_id: str, disk_key: str, attempt: int, worker: str) -> str | None:
        """Renew this run's lease; None while it should go on, else why it
        must stop (the job was stopped, or a newer attempt took the disk)."""
        stop = self.client.get(self._stop_key(job_id))
        if stop is not None:
            return f"job {job_id} stopped: {stop.decode()}"
        key = self._claim_key(job_id, disk_key)
        held = Claim.parse(self.client.get(key))
        if held is not None and (held.attempt, held.worker) != (attempt, worker):
            return f"superseded by attempt {held.attempt} on {held.worker}"
        # Also re-asserts a claim a Redis restart lost.
        self.client.set(key, Claim(attempt, worker, time.time() + self.lease_s).dump(), ex=7 * 24 * 3600)
        return None

    def release(self, job_id: str, disk_key: str, attempt: int, worker: str) -> None:
        """The run ended: its lease expires now, and the claim stays marked
        ended, so a late duplicate of the same attempt does not copy again."""
        key = self._claim_key(job_id, disk_key)
        held = Claim.parse(self.client.get(key))
        if held is not None and (held.attempt, held.worker) == (attempt, worker):
            self.client.set(key, Claim(attempt, worker, 0, ended=True).dump(), keepttl=True)

    def request_stop(self, job_id: str, reason: str) -> None:
        self.client.set(self._stop_key(job_id), reason[:500], ex=7 * 24 * 3600)

    def set_limit(self, job_id: str, bytes_per_s: int | None) -> None:
        """The OMA changed the job's bandwidth limit (None: no limit); its
        running copies follow at their next limit check."""
        self.client.set(self._limit_key(job_id), json.dumps({"bytes_per_s": bytes_per_s}), ex=7 * 24 * 3600)

    def limit(self, job_id: str) -> tuple[bool, int | None]:
        """(whether the OMA changed the job's limit, the limit it set)."""
        raw = self.client.get(self._limit_key(job_id))
        return (False, None) if raw is None else (True, json.loads(raw)["bytes_per_s"])

    def limit_applied(self, job_id: str, disk_key: str, bytes_per_s: int | None) -> None:
        """A copy now runs at this limit (0: none), so the OMA can tell."""
        key = self._applied_key(job_id)
        with self.client.pipeline() as pipe:
            pipe.hset(key, disk_key, int(bytes_per_s or 0))
            pipe.expire(key, 7 * 24 * 3600)
            pipe.execute()

    def limits_applied(self, job_id: str) -> dict[str, int | None]:
        """Per disk, the limit its copy last applied (None: no limit)."""
        return {disk.decode(): int(value) or None
                for disk, value in self.client.hgetall(self._applied_key(job_id)).items()}

    def stop_reason(self, job_id: str) -> str | None:
        value = self.client.get(self._stop_key(job_id))
        return None if value is None else value.decode()

    def copies_running(self, job_id: str) -> list[str]:
        """The job's disks whose copy holds a live lease."""
        now = time.time()
        running = []
        prefix = self._claim_key(job_id, "")
        for key in self.client.scan_iter(f"{prefix}*", count=100):
            held = Claim.parse(self.client.get(key))
            if held is not None and held.expires > now and not holder_is_dead_here(held.worker):
                running.append(key.decode()[len(prefix):])
        return running
