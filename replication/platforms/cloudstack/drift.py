"""The database against the cloud: what listVolumes says beside what the
OMA's records say. Reported, never repaired by itself: an operator decides
whether a volume nobody knows is garbage or someone's data."""

from __future__ import annotations

import logging

from replication.choices import FAILOVER_OPEN, FailoverKind
from replication.models import CloudStackConfig, FailoverJob, TargetVolume
from replication.platforms.cloudstack.client import CloudClient

log = logging.getLogger(__name__)


def drift(config: CloudStackConfig | None = None) -> dict:
    """{"unknown": volumes attached to the OMA that no record knows,
        "gone": records whose volume the cloud no longer has,
        "elsewhere": records whose volume is attached to another VM or to none,
        "in_step": how many agree}"""
    config = config or CloudStackConfig.active()
    cloud = {v["id"]: v for v in CloudClient(config).call("listVolumes", listall=True).get("volume", [])}
    records = {v.cloud_volume_id: v for v in TargetVolume.objects.exclude(cloud_volume_id="")
               .filter(retired_at__isnull=True).select_related("source_disk__vm")}
    # A VM under failover has its volumes on the destination VM, not on the OMA: expected there.
    failing_over = set(FailoverJob.objects.filter(status__in=FAILOVER_OPEN).exclude(kind=FailoverKind.ROLLBACK)
                       .values_list("vm_id", flat=True))
    report = {"unknown": [], "gone": [], "elsewhere": [], "in_step": 0}
    for volume_id, volume in cloud.items():
        if volume_id not in records and volume.get("virtualmachineid") == config.oma_vm_id:
            report["unknown"].append({"id": volume_id, "name": volume.get("name", ""), "size": volume.get("size")})
    for volume_id, record in records.items():
        name = f"{record.source_disk.vm.name}/{record.source_disk.disk_key}" if record.source_disk else "?"
        volume = cloud.get(volume_id)
        if volume is None:
            report["gone"].append({"id": volume_id, "record": name, "export": record.export_name})
        elif volume.get("virtualmachineid") != config.oma_vm_id and \
                not (record.source_disk and record.source_disk.vm_id in failing_over):
            report["elsewhere"].append({"id": volume_id, "record": name,
                                        "attached_to": volume.get("vmname") or volume.get("virtualmachineid")})
        else:
            report["in_step"] += 1
    for kind in ("unknown", "gone", "elsewhere"):
        for entry in report[kind]:
            log.warning("cloud %s volume drift (%s): %s", config.name, kind, entry)
    return report
