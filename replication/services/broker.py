"""What waits in the broker: the ids of tasks still queued for an agent.
The reaper asks before it judges a copy run that never reported: a run
waiting for a free copy slot on a busy agent is queued, not lost."""

from __future__ import annotations

import json
import logging

import redis
from django.conf import settings
from kombu.transport.redis import PRIORITY_STEPS

log = logging.getLogger(__name__)
PRIORITY_SEPARATOR = "\x06\x16"  # how kombu's Redis transport names a queue's priority lists


def waiting_task_ids(queue: str) -> set[str] | None:
    """Task ids of the messages waiting in `queue`; None when the broker
    cannot be looked into (not Redis, or unreachable)."""
    url = settings.CELERY_BROKER_URL
    if not url.startswith(("redis://", "rediss://", "unix://")):
        return None
    keys = [queue] + [f"{queue}{PRIORITY_SEPARATOR}{step}" for step in PRIORITY_STEPS if step]
    ids = set()
    try:
        client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
        for key in keys:
            for raw in client.lrange(key, 0, -1):
                try:
                    ids.add(json.loads(raw)["headers"]["id"])
                except (ValueError, KeyError, TypeError):
                    continue
    except redis.RedisError as exc:
        log.warning("cannot look into queue %s: %s", queue, exc)
        return None
    return ids


class WaitingTasks:
    """waiting_task_ids per queue, read at most once per reaper pass."""

    def __init__(self):
        self._seen: dict[str, set[str] | None] = {}

    def holds(self, queue: str, task_id: str) -> bool:
        """Whether the task is known to wait in the queue; an unreadable
        broker answers no (the run is judged as before)."""
        if queue not in self._seen:
            self._seen[queue] = waiting_task_ids(queue)
        return bool(task_id) and task_id in (self._seen[queue] or ())
