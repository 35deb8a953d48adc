"""The agent's Celery tasks (queue vma.<agent>): thin wrappers that take a
work order, run one step of vma_agent.steps and queue the outcome as an OMA
task. They read settings (the agent host's own), never the database."""

from __future__ import annotations

from pathlib import Path

from celery import current_app, shared_task
from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings
from kombu import Exchange, Queue

from vma_agent import contract, identity, steps, task_names
from vma_agent.task_events import TaskProgressPublisher


def agent_config() -> steps.AgentConfig:
    return steps.AgentConfig(
        vma_url=settings.VMA_URL, vma_token=settings.VMA_TOKEN, redis_url=settings.VMA_REDIS_URL,
        request_timeout_s=settings.VMA_REQUEST_TIMEOUT_S, http_keepalive=settings.VMA_HTTP_KEEPALIVE,
        progress_prefix=settings.VMA_PROGRESS_PREFIX, control_prefix=f"{settings.VMA_PROGRESS_PREFIX}:control",
        snapshot_source=settings.VMA_SNAPSHOT_SOURCE, snapshot_image_dir=str(settings.VMA_SNAPSHOT_IMAGE_DIR),
        vddk_libdir=settings.VMA_VDDK_LIBDIR, vddk_transports=settings.VMA_VDDK_TRANSPORTS,
        vcenter_timeout_s=settings.VCENTER_TIMEOUT_S, chunk_bytes=settings.COPY_CHUNK_BYTES,
        connections=settings.COPY_CONNECTIONS, target_connections=settings.COPY_TARGET_CONNECTIONS,
        depth=settings.COPY_DEPTH, copy_limit_bps=settings.COPY_LIMIT_BPS,
        progress_interval_s=settings.PROGRESS_REPORT_INTERVAL_S,
        checkpoint_interval_s=settings.COPY_CHECKPOINT_INTERVAL_S, compare_resumed=settings.COPY_COMPARE_RESUMED,
        heartbeat_interval_s=settings.HEARTBEAT_INTERVAL_S, heartbeat_timeout_s=settings.HEARTBEAT_TIMEOUT_S,
        cleanup_wait_s=settings.CLEANUP_WAIT_S, export_psk_file=settings.VMA_EXPORT_PSK_FILE,
        export_tls_username=settings.VMA_EXPORT_TLS_USERNAME,
    )


def report(task_name: str, *args) -> None:
    """Hand an outcome to the OMA (its queue), riding out a short broker
    outage; signed with this agent's message key when it has one (enrolled)."""
    kwargs = {}
    if settings.VMA_MESSAGE_KEY_FILE:
        key = Path(settings.VMA_MESSAGE_KEY_FILE).read_bytes().strip()
        kwargs[identity.IDENTITY_KWARG] = identity.sign(key, settings.VMA_AGENT_NAME, task_name, list(args))
    # Through the OMA's own exchange, never the default one: on RabbitMQ an
    # enrolled agent may write only there (the default exchange reaches
    # every queue, other agents' too), and may not declare the OMA's queue.
    oma = Queue(task_names.OMA_QUEUE, Exchange(task_names.OMA_QUEUE), routing_key=task_names.OMA_QUEUE)
    declare = [] if settings.CELERY_BROKER_URL.startswith(("amqp", "pyamqp")) else [oma]
    current_app.send_task(task_name, args=list(args), kwargs=kwargs, exchange=oma.exchange.name,
                          routing_key=oma.routing_key, declare=declare, retry=True,
                          retry_policy=settings.CELERY_TASK_PUBLISH_RETRY_POLICY)


@shared_task(name=task_names.PREPARE_SOURCE)
def prepare_source(order: dict) -> None:
    source = contract.SourceOrder.from_dict(order)
    report(task_names.SOURCE_PREPARED, source.job_id, steps.prepare_source(source, agent_config()).as_dict())


@shared_task(name=task_names.COPY_DISK, bind=True)
def copy_disk(self, order: dict) -> None:
    copy = contract.CopyOrder.from_dict(order)
    publisher = TaskProgressPublisher(self, f"{copy.job_id}/{copy.disk_key}", settings.TASK_EVENT_INTERVAL_S)
    try:
        _, soft_limit = self.request.timelimit or (None, None)
        outcome = steps.copy_disk(copy, agent_config(), on_progress=publisher,
                                  time_limit_error=SoftTimeLimitExceeded, time_limit_s=soft_limit)
        report(task_names.DISK_COPIED, copy.job_id, copy.disk_key, copy.attempt, outcome.as_dict())
    finally:
        publisher.close(timeout_s=0.5)  # Flower's events: never worth delaying the outcome


@shared_task(name=task_names.REMOVE_SNAPSHOT)
def remove_snapshot(order: dict) -> None:
    removal = contract.SnapshotRemovalOrder.from_dict(order)
    outcome = steps.remove_snapshot(removal, agent_config())
    report(task_names.SNAPSHOT_REMOVED, removal.job_id, removal.snapshot_moref, removal.finalize, outcome.as_dict())


@shared_task(name=task_names.POWER_SOURCE)
def power_source(order: dict) -> None:
    power = contract.PowerOrder.from_dict(order)
    outcome = steps.power_source(power, agent_config())
    report(task_names.SOURCE_POWERED, power.failover_id, power.action, outcome.as_dict())
