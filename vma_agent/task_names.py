"""The Celery names both sides send by: every task's registered name and
the queues. The OMA and the agent publish each other's work by these
names (never by importing the other side's task functions), so this module
is free of Django and of everything else. A name here is on the wire: a
rename strands the messages already queued under the old one."""

# Queues: the OMA's orchestration, and one per agent (VMA).
OMA_QUEUE = "oma"


def agent_queue(agent_name: str) -> str:
    return f"vma.{agent_name}"


# The agent's tasks (queue vma.<agent>): the OMA's work orders.
PREPARE_SOURCE = "vma.prepare_source"
COPY_DISK = "vma.copy_disk"
REMOVE_SNAPSHOT = "vma.remove_snapshot"
POWER_SOURCE = "vma.power_source"

# The OMA's tasks the agent queues with its outcomes.
SOURCE_PREPARED = "replication.source_prepared"
DISK_COPIED = "replication.disk_copied"
SNAPSHOT_REMOVED = "replication.snapshot_removed"
SOURCE_POWERED = "replication.source_powered"

# The OMA's own steps and periodic work (queue oma).
PREPARE_JOB = "replication.prepare_job"
FINALIZE_JOB = "replication.finalize_job"
JOB_ENDED = "replication.job_ended"
RETAIN_POINTS = "replication.retain_points"
RUN_FAILOVER = "replication.run_failover"
CONTINUE_FAILOVER = "replication.continue_failover"
GROUP_DUE = "replication.group_due"
DRILL_DUE = "replication.drill_due"
DRILL_CONTINUE = "replication.drill_continue"
COMPARE_CHECKSUMS = "replication.compare_checksums"
POLL_PROGRESS = "replication.poll_progress"
SWEEP_SNAPSHOTS = "replication.sweep_snapshots"
REAP_STALE = "replication.reap_stale"
CLOUD_DRIFT = "replication.cloud_drift"
