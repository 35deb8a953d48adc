"""How the OMA queues work: a task by its registered name (vma_agent.task_names),
never by importing the task function, so no service depends on the tasks
module (which depends on every service). The same path carries the OMA's
own next steps and the agents' work orders.

What a failure to queue means is the caller's to say, as on_failure(reason):
a job fails with the reason, a failover is abandoned; with no on_failure it
is only logged (something else catches up, e.g. the next schedule tick). An
order refused before it is sent (a path outside what the settings allow)
is a failure too, with its own reason."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from celery import current_app
from django.db import transaction

from replication.services.allowlist import NotAllowed
from vma_agent.task_names import OMA_QUEUE

log = logging.getLogger(__name__)

OnFailure = Callable[[str], object] | None


def publish(task_name: str, args: Sequence = (), *, queue: str = OMA_QUEUE, **options) -> None:
    """Send one task to the broker now; a broker that cannot take it raises.
    `options` are Celery's (task_id, time limits, argsrepr...). The one place
    the OMA publishes: a test that needs a dead or a recording broker
    replaces this."""
    current_app.send_task(task_name, args=list(args), queue=queue, **options)


def attempt(what: str, send: Callable[[], object], *, subject: str, on_failure: OnFailure = None) -> bool:
    """Run `send` (build an order and publish it); False if it failed, after
    logging why and handing the reason to on_failure. `what` names the work
    in the reason ("the copy of disk-2000"); `subject` whose it is in the log
    ("job 1a2b...")."""
    try:
        send()
    except NotAllowed as exc:
        log.warning("%s of %s refused: %s", what, subject, exc)
        reason = f"{what} refused: {exc}"
    except Exception as exc:
        log.exception("could not queue %s for %s", what, subject)
        reason = f"could not queue {what} (is Redis running?): {exc}"
    else:
        return True
    if on_failure is not None:
        on_failure(reason)
    return False


def enqueue(task_name: str, args: Sequence, *, what: str, subject: str, on_failure: OnFailure = None,
            **options) -> bool:
    """Publish a task now, a failure handled as attempt() says."""
    return attempt(what, lambda: publish(task_name, args, **options), subject=subject, on_failure=on_failure)


def enqueue_on_commit(task_name: str, args: Sequence, *, what: str, subject: str, on_failure: OnFailure = None,
                      **options) -> None:
    """Publish a task once the current transaction commits (at once outside
    one): a worker must never read rows that are not there yet, nor run a
    step whose transaction rolled back."""
    transaction.on_commit(lambda: enqueue(task_name, args, what=what, subject=subject, on_failure=on_failure,
                                          **options))
