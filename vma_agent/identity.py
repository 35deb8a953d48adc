"""An agent's identity on the outcomes it sends the OMA: its name and an
HMAC-SHA256, with its own message key (given at approval), over the task's
name and arguments. Travels as the keyword argument `identity` of the OMA's
outcome tasks, so an OMA or agent that knows nothing of it still reads the
positional arguments as before. Free of Django."""

from __future__ import annotations

import hashlib
import hmac
import json

IDENTITY_KWARG = "identity"


def _digest(key: bytes, agent: str, task_name: str, args: list) -> str:
    body = json.dumps([agent, task_name, list(args)], sort_keys=True, separators=(",", ":"), default=str)
    return hmac.new(key, body.encode(), hashlib.sha256).hexdigest()


def sign(key: bytes, agent: str, task_name: str, args: list) -> dict:
    """The identity to send with the task `task_name(*args)`."""
    return {"agent": agent, "mac": _digest(key, agent, task_name, args)}


def verify(key: bytes, identity: dict, task_name: str, args: list) -> bool:
    """Whether `identity` was made with `key` for exactly this task and these arguments."""
    if not isinstance(identity, dict) or not isinstance(identity.get("mac"), str):
        return False
    return hmac.compare_digest(identity["mac"], _digest(key, str(identity.get("agent", "")), task_name, args))
