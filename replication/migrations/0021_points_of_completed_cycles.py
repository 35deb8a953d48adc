"""Every VM replicated before recovery points existed gets one: its newest
completed cycle, its layers the replica volumes as they are (written in
place). Without it such a VM could not fail over after the upgrade."""

from django.db import migrations


def adopt(apps, schema_editor):
    VirtualMachine = apps.get_model("replication", "VirtualMachine")
    ReplicationJob = apps.get_model("replication", "ReplicationJob")
    RecoveryPoint = apps.get_model("replication", "RecoveryPoint")
    PointLayer = apps.get_model("replication", "PointLayer")
    for vm in VirtualMachine.objects.all():
        if RecoveryPoint.objects.filter(vm=vm).exists():
            continue
        job = ReplicationJob.objects.filter(vm=vm, status="completed").order_by("-completed_at").first()
        if job is None:
            continue
        point = RecoveryPoint.objects.create(vm=vm, job=job, status="sealed",
                                             frozen_at=job.recovery_point_at or job.completed_at or job.created_at)
        for disk in job.disks.select_related("target_volume"):
            volume = disk.target_volume
            # A local replica boots over its file; a CloudStack one in place (no snapshot to revert to yet).
            handle = volume.path if volume.provider == "local" else ""
            PointLayer.objects.create(point=point, volume=volume, disk_key=disk.disk_key, handle=handle)


class Migration(migrations.Migration):
    dependencies = [("replication", "0020_recovery_points")]
    operations = [migrations.RunPython(adopt, migrations.RunPython.noop)]
