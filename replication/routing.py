"""Celery queue names: one for the OMA's orchestration, one per agent (VMA),
named in vma_agent.task_names (the agent publishes by them too)."""

from vma_agent.task_names import OMA_QUEUE, agent_queue

__all__ = ["OMA_QUEUE", "agent_queue", "source_queue"]


def source_queue(vm) -> str:
    """Where a job's steps that talk to its source run: a VMware VM's on its
    agent, which reaches the vCenter (the OMA may not); others on the OMA."""
    from replication.choices import SourceKind

    return agent_queue(vm.agent) if vm.source_kind == SourceKind.VMWARE else OMA_QUEUE
