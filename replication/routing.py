"""Celery queue names: one for the OMA's orchestration, one per agent (VMA)."""

OMA_QUEUE = "oma"


def agent_queue(agent_name: str) -> str:
    return f"vma.{agent_name}"
