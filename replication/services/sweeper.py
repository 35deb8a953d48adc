"""The sweeper: data-plane leftovers of copies whose process died (killed
worker, lost host) are found and removed. Run by the reaper and when a worker
starts; idempotent, and it never touches what a live process still uses."""

from __future__ import annotations

import logging

from vma_agent import nbdkit

log = logging.getLogger(__name__)


def sweep() -> list[str]:
    """Remove orphaned source exports (their nbdkit and their run directory);
    returns what was removed. VMware snapshots left by a dead job are swept
    here too once that source exists (found by their deterministic name)."""
    removed = nbdkit.sweep_orphaned_exports()
    for item in removed:
        log.warning("sweeper removed %s", item)
    return removed
