"""The sweepers: leftovers of copies whose process died (killed worker, lost
host) and snapshots of jobs that ended without removing theirs are found and
removed. Source exports are swept by every reaper pass and when a worker
starts; snapshots, which cost a vCenter round trip per VM, on their own
slower beat. Idempotent; they never touch what a live process or a running
job still uses."""

from __future__ import annotations

import logging

from vma_agent import nbdkit

log = logging.getLogger(__name__)


def sweep() -> list[str]:
    """Remove orphaned source exports (their nbdkit and their run directory);
    returns what was removed."""
    removed = nbdkit.sweep_orphaned_exports()
    for item in removed:
        log.warning("sweeper removed %s", item)
    return removed


def sweep_snapshots() -> list[str]:
    """Remove every vCenter's snapshots of jobs no longer running (found by
    their deterministic name); a vCenter that cannot be reached is logged
    and tried again at the next pass."""
    from replication.models import VCenter
    from replication.services import vmware

    removed = []
    for vcenter in VCenter.objects.all():
        try:
            found = vmware.sweep_snapshots(vcenter)
        except (vmware.VCenterConfigError, vmware.VSphereError) as exc:
            log.error("snapshot sweep of vCenter %s failed: %s", vcenter.name, exc)
            continue
        for item in found:
            log.warning("sweeper removed snapshot %s/%s", vcenter.name, item)
        removed += [f"{vcenter.name}/{item}" for item in found]
    return removed
