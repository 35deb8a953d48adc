"""Notices one workflow gives the others, so that the one an event belongs
to need not know who listens (nor import it: a workflow that called the
one above it would close an import circle). Django sends them synchronously,
in the sender's transaction: a receiver's writes commit or roll back with
the event, and what it queues waits for that commit (dispatch.enqueue_on_commit).
The receivers are connected in ReplicationConfig.ready."""

from django.dispatch import Signal

# A replication cycle has ended: completed, failed or cancelled. Sent by
# services.jobs as the job's end is written; kwargs: cycle (the ReplicationJob).
cycle_ended = Signal()

# A test failover's run has ended: its VM booted and was verified, or it
# failed and was undone. Sent by services.failover; kwargs: failover_id.
test_failover_ended = Signal()
