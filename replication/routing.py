"""Celery queue names: one for the OMA's orchestration, one per agent (VMA)."""

OMA_QUEUE = "oma"


def agent_queue(agent_name: str) -> str:
    return f"vma.{agent_name}"


def source_queue(vm) -> str:
    """Where a job's steps that talk to its source run: a VMware VM's on its
    agent, which reaches the vCenter (the OMA may not); others on the OMA."""
    from replication.choices import SourceKind

    return agent_queue(vm.agent) if vm.source_kind == SourceKind.VMWARE else OMA_QUEUE
