from django.contrib import admin

from replication.models import DeviceMapping, ReplicationJob, SourceDisk, TargetVolume, VirtualMachine, VMDisk


class SourceDiskInline(admin.TabularInline):
    model = SourceDisk
    extra = 0


@admin.register(VirtualMachine)
class VirtualMachineAdmin(admin.ModelAdmin):
    list_display = ["name", "source_kind", "agent", "cbt_enabled", "created_at"]
    search_fields = ["name", "moref", "vm_uuid"]
    inlines = [SourceDiskInline]


class VMDiskInline(admin.TabularInline):
    model = VMDisk
    extra = 0
    fields = ["disk_key", "status", "current_operation", "progress_percent", "bytes_done", "bytes_total",
              "throughput_bps", "target_volume", "error_message"]
    readonly_fields = fields
    can_delete = False


@admin.register(ReplicationJob)
class ReplicationJobAdmin(admin.ModelAdmin):
    list_display = ["id", "vm", "sync_type", "status", "current_operation", "progress_percent",
                    "bytes_transferred", "total_bytes", "throughput_bps", "created_at"]
    list_filter = ["status", "sync_type", "current_operation"]
    search_fields = ["id", "vm__name"]
    readonly_fields = [f.name for f in ReplicationJob._meta.fields]
    inlines = [VMDiskInline]


@admin.register(TargetVolume)
class TargetVolumeAdmin(admin.ModelAdmin):
    list_display = ["export_name", "source_disk", "provider", "size_bytes", "path", "created_at"]
    search_fields = ["volume_uuid", "path"]
    readonly_fields = ["volume_uuid", "export_name"]


admin.site.register(DeviceMapping)
