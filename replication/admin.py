from django import forms
from django.conf import settings
from django.contrib import admin, messages
from django.db import transaction
from django.template.loader import render_to_string
from django.utils.html import format_html

from replication.choices import SourceKind
from replication.figures import job_figures
from replication.models import (
    Admission,
    Agent,
    AgentAuditEntry,
    ApiToken,
    ChangeIdRecord,
    CloudStackConfig,
    DeviceMapping,
    DrillRun,
    FailoverJob,
    FailoverStep,
    NetworkMapping,
    PointLayer,
    ProtectionGroup,
    RecoveryPoint,
    ReplicationJob,
    SourceDisk,
    TargetVolume,
    VCenter,
    VirtualMachine,
    VMContext,
    VMDisk,
    VMStateChange,
)
from replication.roles import actor_of, admin_site_permission
from replication.services import jobs as job_service
from replication.services import scheduler
from replication.services import vmware as vmware_service
from vma_agent.units import iec, iec_rate
from vma_agent.vmware import VSphereError

# Branding: what operators read in the title bar and the browser's tab.
admin.site.site_header = "OMA administration"
admin.site.site_title = "OMA administration"
admin.site.index_title = "Records and settings"
# The job list needs the width more than a second navigation beside it.
admin.site.enable_nav_sidebar = False
# Only administrators (staff with the administrator role) enter; the model permissions decide the rest.
admin.site.has_permission = admin_site_permission


class ReadOnlyAdminMixin:
    """An admin that only reads: records that the services alone write are
    shown here, never added, changed or deleted."""

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


class SourceDiskForm(forms.ModelForm):
    """A disk enters the inventory only as add_vm takes it: an absolute path
    (or NBD URI) that is readable and raw, its capacity read from the source
    itself, never typed."""

    class Meta:
        model = SourceDisk
        fields = ["locator"]

    def clean_locator(self):
        from replication.services.inventory import InventoryError, probe

        locator = self.cleaned_data["locator"].strip()
        try:
            self.instance.capacity_bytes, image_format = probe(locator)
        except InventoryError as exc:
            raise forms.ValidationError(str(exc)) from None
        if image_format != "raw":
            raise forms.ValidationError(f"{locator} is {image_format}: an image VM's disks are raw (register "
                                        "qcow2 disks as a VM of their own with add_vm)")
        return locator


class SourceDiskInline(admin.TabularInline):
    """What the system owns about a disk (its key, capacity, committed
    changeId, vSphere identity) is read here, never typed: a wrong changeId
    would make the next incremental copy the wrong areas without an error.
    An image VM's disk locator may be set, through add_vm's checks; a VMware
    VM's disks come from discovery only."""

    model = SourceDisk
    form = SourceDiskForm
    extra = 0
    fields = ["disk_key", "locator", "capacity_bytes", "change_id", "device_key", "unit_number", "backing_file",
              "disk_mode", "is_rdm"]
    readonly_fields = ["disk_key", "capacity_bytes", "change_id", "device_key", "unit_number", "backing_file",
                       "disk_mode", "is_rdm"]

    # A VMware VM's disks come from discovery; a qcow2 VM's carry its dirty
    # bitmaps: another image there would break the chain of changes.
    FIXED = (SourceKind.VMWARE, SourceKind.QCOW2)

    def get_readonly_fields(self, request, obj=None):
        if obj is not None and obj.source_kind in self.FIXED:
            return [*self.readonly_fields, "locator"]
        return self.readonly_fields

    def has_add_permission(self, request, obj=None):
        return obj is None or obj.source_kind not in self.FIXED

    def has_delete_permission(self, request, obj=None):
        return False  # a disk with replicas and job history leaves only with its VM


class VCenterForm(forms.ModelForm):
    """The password is typed (kept as a file in OMA_SECRETS_DIR, which the
    record points at) or referenced by an allow-listed environment variable;
    a file path is never typed here. A new host or port needs the password
    again, and the login with it must work before anything is saved: else
    an edit could send the stored password to any server."""

    password = forms.CharField(widget=forms.PasswordInput(render_value=False), required=False, strip=False,
                               help_text="Typed again whenever the host or port changes; kept as a file in "
                                         "OMA_SECRETS_DIR, never in the database")

    class Meta:
        model = VCenter
        fields = ["name", "host", "port", "username", "password", "password_env", "thumbprint"]

    def clean(self):
        from replication.services import sources as source_service
        from replication.services.allowlist import NotAllowed, check_password_ref
        from vma_agent.vmware import VCenterConnection, VSphereClient, normalize_thumbprint

        data = super().clean()
        if self.errors:
            return data
        password, env = data.get("password") or "", (data.get("password_env") or "").strip()
        if password and env:
            raise forms.ValidationError("give the password or an environment variable holding it, not both")
        old = self.instance if self.instance.pk else None
        moved = old is None or (data["host"], data["port"]) != (old.host, old.port)
        if moved and not password:
            raise forms.ValidationError("a new vCenter, or a new host or port, needs the password typed again")
        try:
            check_password_ref(password_env=env)
        except NotAllowed as exc:
            raise forms.ValidationError(str(exc)) from None
        changed = moved or password or set(self.changed_data) & {"username", "password_env", "thumbprint"}
        if password and not source_service.NAME_RE.match(data["name"]):
            raise forms.ValidationError(f"vCenter name {data['name']!r}: letters, digits and _.- only (it names "
                                        "the password's file)")
        if changed:
            if not password:
                try:
                    password = vmware_service.read_password(VCenter(name=data["name"], password_env=env,
                                                                    password_file="" if env else old.password_file))
                except vmware_service.VCenterConfigError as exc:
                    raise forms.ValidationError(str(exc)) from None
            connection = VCenterConnection(host=data["host"], port=data["port"], username=data["username"],
                                           password=password, thumbprint=normalize_thumbprint(data["thumbprint"]))
            try:
                with VSphereClient(connection, request_timeout_s=settings.VCENTER_TIMEOUT_S):
                    pass
            except VSphereError as exc:
                raise forms.ValidationError(str(exc)) from None
        return data


@admin.register(VCenter)
class VCenterAdmin(admin.ModelAdmin):
    form = VCenterForm
    list_display = ["name", "host", "port", "username", "thumbprint"]
    # Where the password is read from; the password itself is never stored.
    fields = ["name", "host", "port", "username", "password", "password_file", "password_env", "thumbprint"]
    readonly_fields = ["password_file"]
    actions = ["discover_vms", "sweep_orphaned_snapshots"]

    def save_model(self, request, obj, form, change):
        from replication.services import sources as source_service

        password = form.cleaned_data.get("password")
        if password:
            obj.password_file, obj.password_env = str(source_service.store_password(obj.name, password)), ""
        elif obj.password_env:
            obj.password_file = ""
        super().save_model(request, obj, form, change)

    @admin.action(description="Discover the VMs of the selected vCenters")
    def discover_vms(self, request, queryset):
        self._each(request, queryset, lambda vc: f"{vc.name}: "
                   f"{len(vmware_service.discover(vc, actor=actor_of(request)))} VMs recorded")

    @admin.action(description="Remove orphaned replication snapshots")
    def sweep_orphaned_snapshots(self, request, queryset):
        self._each(request, queryset,
                   lambda vc: f"{vc.name}: {len(vmware_service.sweep_snapshots(vc))} orphaned snapshots removed")

    def _each(self, request, queryset, action):
        for vcenter in queryset:
            try:
                self.message_user(request, action(vcenter))
            except (vmware_service.VCenterConfigError, VSphereError) as exc:
                self.message_user(request, f"{vcenter.name}: {exc}", messages.ERROR)


@admin.register(ChangeIdRecord)
class ChangeIdRecordAdmin(admin.ModelAdmin):
    list_display = ["source_disk", "job", "sync_type", "previous_change_id", "change_id", "note", "committed_at"]
    list_filter = ["sync_type"]
    readonly_fields = list_display


@admin.register(VirtualMachine)
class VirtualMachineAdmin(admin.ModelAdmin):
    list_display = ["name", "lifecycle_label", "source_kind", "vcenter", "power_state", "agent", "cbt_enabled",
                    "group", "created_at"]
    readonly_fields = ["group", "protection_flag"]  # through `manage.py group`: a move drops its queued cycle
    list_filter = ["source_kind", "vcenter"]
    search_fields = ["name", "moref", "vm_uuid"]
    inlines = [SourceDiskInline]

    def save_model(self, request, obj, form, change):
        super().save_model(request, obj, form, change)
        if not change:
            VMContext.registered(obj, actor_of(request), "in the admin")

    def save_formset(self, request, form, formset, change):
        """New disks get the next free key (disk-2000, disk-2001, ...), as add_vm gives them."""
        from replication.services.inventory import FIRST_DISK_KEY

        disks = formset.save(commit=False)
        vm = form.instance
        taken = set(vm.disks.values_list("disk_key", flat=True))
        number = FIRST_DISK_KEY
        for disk in disks:
            if not disk.disk_key:
                while f"disk-{number}" in taken:
                    number += 1
                disk.disk_key = f"disk-{number}"
                taken.add(disk.disk_key)
            disk.vm = vm
            disk.save()
        formset.save_m2m()


class VMDiskInline(admin.TabularInline):
    model = VMDisk
    extra = 0
    fields = ["disk_key", "status", "current_operation", "progress_percent", "bytes_done", "bytes_total",
              "throughput_bps", "target_volume", "error_message"]
    readonly_fields = fields
    can_delete = False


@admin.register(ReplicationJob)
class ReplicationJobAdmin(admin.ModelAdmin):
    list_display = ["id", "vm", "status_and_stage", "progress", "data", "throughput", "created"]
    list_filter = ["status", "sync_type", "current_operation"]
    search_fields = ["id", "vm__name"]
    readonly_fields = [f.name for f in ReplicationJob._meta.fields]
    inlines = [VMDiskInline]
    actions = ["cancel_jobs", "retry_jobs"]

    class Media:
        css = {"all": ["replication/bars.css"]}

    def has_add_permission(self, request):
        return False  # jobs start through start_replication, which creates their disks and volumes

    @admin.display(description="Progress", ordering="bytes_transferred")
    def progress(self, job):
        """How much of the data is copied (the pages' measure), the bar compact."""
        bar = render_to_string("replication/_bar.html", {"percent": job.data_percent,
                                                         "label": f"{job.id} progress"})
        return format_html("{} {} %", bar, f"{job.data_percent:.1f}")

    @admin.display(description="Type · status · stage", ordering="status")
    def status_and_stage(self, job):
        return f"{job.get_sync_type_display()} · {job.get_status_display()} · {job.current_operation}"

    @admin.display(description="Created at", ordering="created_at")
    def created(self, job):
        from replication.templatetags.replication_tags import when

        return when(job.created_at)  # written as the pages write times

    @admin.display(description="Data", ordering="total_bytes")
    def data(self, job):
        return f"{iec(job.bytes_transferred)} of {iec(job.total_bytes)}"

    def get_queryset(self, request):
        return super().get_queryset(request).prefetch_related("disks")  # each row's figures read its disks

    @admin.display(description="Throughput", ordering="throughput_bps")
    def throughput(self, job):
        """As the pages show it (replication.figures): the sum of the copying
        disks' rates, each within the limit; a completed job's average."""
        figures = job_figures(job)
        return iec_rate(figures.rate_bps) + (" average" if figures.average else "")

    @admin.action(description="Cancel the selected jobs")
    def cancel_jobs(self, request, queryset):
        cancelled = [job.id for job in queryset if job_service.cancel_job(job.id, actor=actor_of(request))]
        skipped = queryset.count() - len(cancelled)
        self.message_user(request, f"Cancelled {len(cancelled)} job(s); {skipped} had already ended.")

    @admin.action(description="Retry the selected failed or cancelled jobs")
    def retry_jobs(self, request, queryset):
        for job in queryset:
            try:
                new_job = job_service.retry_job(job.id, actor=actor_of(request))
            except job_service.ReplicationError as exc:
                self.message_user(request, str(exc), messages.WARNING)
            else:
                self.message_user(request, f"Job {job.id} retried as {new_job.id}.")


@admin.register(TargetVolume)
class TargetVolumeAdmin(admin.ModelAdmin):
    list_display = ["export_name", "source_disk", "provider", "size_bytes", "requested_bytes", "cloud_volume_id",
                    "path", "created_at"]
    search_fields = ["volume_uuid", "path", "cloud_volume_id"]
    # State the system owns: changed only by the workflows that check it.
    readonly_fields = ["volume_uuid", "export_name", "source_disk", "provider", "size_bytes", "requested_bytes",
                       "cloud_volume_id", "path"]


admin.site.register(DeviceMapping)


class VMStateChangeInline(admin.TabularInline):
    model = VMStateChange
    extra = 0
    fields = ["at", "to_state", "actor", "reason"]
    readonly_fields = fields
    can_delete = False


@admin.register(VMContext)
class VMContextAdmin(admin.ModelAdmin):
    """The lifecycle is moved by its commands and pages only (which check each
    move); here it is read, and the boot check set."""

    list_display = ["vm", "state", "updated_at", "boot_probes_shown", "boot_check_regex", "boot_check_timeout_s",
                    "convert_guest"]
    list_filter = ["state"]
    fields = ["vm", "state", "boot_probes", "boot_check_regex", "boot_check_timeout_s", "convert_guest", "hardware",
              "hardware_warning"]
    # The hardware choices through `manage.py set_hardware`, which checks them.
    readonly_fields = ["vm", "state", "hardware", "hardware_warning"]
    inlines = [VMStateChangeInline]

    @admin.display(description="boot probes")
    def boot_probes_shown(self, obj):
        return obj.boot_probes or f"default ({', '.join(obj.probes())})"

    def has_add_permission(self, request):
        return False


class FailoverStepInline(admin.TabularInline):
    model = FailoverStep
    extra = 0
    fields = ["name", "status", "started_at", "ended_at", "detail"]
    readonly_fields = fields
    can_delete = False


@admin.register(FailoverJob)
class FailoverJobAdmin(admin.ModelAdmin):
    list_display = ["id", "vm", "kind", "status", "boot_verified", "destination_vm", "downtime_s",
                    "forecast_downtime_s", "created_at", "completed_at"]
    list_filter = ["kind", "status"]
    readonly_fields = [f.name for f in FailoverJob._meta.fields]
    inlines = [FailoverStepInline]

    def has_add_permission(self, request):
        return False


class PointLayerInline(admin.TabularInline):
    model = PointLayer
    extra = 0
    fields = ["disk_key", "volume", "handle", "changed"]
    readonly_fields = fields
    can_delete = False

    @admin.display(description="changed data")
    def changed(self, layer):
        return iec(layer.changed_bytes)

    def has_add_permission(self, request, obj=None):
        return False


@admin.register(RecoveryPoint)
class RecoveryPointAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    """Recovery points are made by completed cycles and expired by retention
    (services.points): here they are only read."""

    list_display = ["id", "vm", "frozen_at", "job", "changed", "status", "in_use"]
    list_filter = ["status"]
    list_select_related = ["vm", "job"]
    search_fields = ["vm__name", "job__id"]
    readonly_fields = [f.name for f in RecoveryPoint._meta.fields] + ["in_use"]
    inlines = [PointLayerInline]

    @admin.display(description="changed data", ordering="changed_bytes")
    def changed(self, point):
        return iec(point.changed_bytes)

    @admin.display(description="in use by")
    def in_use(self, point):
        return ", ".join(point.in_use_by()) or "-"


class NetworkMappingForm(forms.ModelForm):
    class Meta:
        model = NetworkMapping
        fields = ["source_network", "destination_network"]

    def clean_destination_network(self):
        from replication.platforms import get_destination
        from replication.platforms.base import DestinationError

        name = self.cleaned_data["destination_network"].strip()
        try:
            known = get_destination().has_network(name)
        except DestinationError as exc:
            raise forms.ValidationError(f"cannot check the destination's networks: {exc}") from None
        if not known:
            raise forms.ValidationError(f"the destination has no network named {name!r}")
        return name


@admin.register(NetworkMapping)
class NetworkMappingAdmin(admin.ModelAdmin):
    """Source network -> destination network for live failovers; a network
    the destination does not have is refused."""

    form = NetworkMappingForm
    list_display = ["source_network", "destination_network", "updated_at"]


class CloudStackConfigForm(forms.ModelForm):
    api_url = forms.URLField(max_length=500, assume_scheme="https",
                             help_text="e.g. https://cloud.example.com/client/api")

    class Meta:
        model = CloudStackConfig
        fields = ["name", "api_url", "api_key", "secret_file", "secret_env", "zone_id", "disk_offering_id",
                  "service_offering_id", "network_id", "template_id", "oma_vm_id", "device_dir"]

    def clean(self):
        """Saved only once the cloud answered for the credentials and every id."""
        from replication.models import CloudError
        from replication.platforms.cloudstack.client import CloudClient

        data = super().clean()
        if self.errors:
            return data
        if bool(data.get("secret_file")) == bool(data.get("secret_env")):
            raise forms.ValidationError("give the secret key as exactly one of a file or an environment variable")
        from replication.services.allowlist import NotAllowed, check_cloud_secret_ref

        try:
            check_cloud_secret_ref(data.get("secret_file") or "", data.get("secret_env") or "")
        except NotAllowed as exc:
            raise forms.ValidationError(str(exc)) from None
        candidate = CloudStackConfig(**{k: data.get(k) or "" for k in self.Meta.fields})
        try:
            CloudClient(candidate, job_timeout_s=30).check()
        except CloudError as exc:
            raise forms.ValidationError(str(exc)) from None
        return data


@admin.register(CloudStackConfig)
class CloudStackConfigAdmin(admin.ModelAdmin):
    """The cloud target volumes go to; checked against it on save. The secret
    key is only referenced (a file or a variable on the OMA host)."""

    form = CloudStackConfigForm
    list_display = ["name", "api_url", "zone_id", "oma_vm_id", "is_active", "created_at"]


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    """Tokens are made by manage.py api_token (shown once); here they are
    listed and revoked (deleted). Only their SHA-256 is stored."""

    list_display = ["name", "user", "created_at", "last_used_at"]
    readonly_fields = ["name", "user", "key_sha256", "created_at", "last_used_at"]

    def has_add_permission(self, request):
        return False


class ProtectionGroupForm(forms.ModelForm):
    """The same checks as `group` and `schedule` (limits, one schedule, a cron
    expression beat can parse)."""

    class Meta:
        model = ProtectionGroup
        fields = ["name", "description", "interval_s", "cron", "timezone", "rpo_target_s", "max_concurrent",
                  "max_retries", "retry_backoff_s", "drill_interval_s", "points_keep", "points_hourly_h",
                  "points_daily_d", "paused"]

    def clean(self):
        cleaned = super().clean()
        if cleaned.get("interval_s") and cleaned.get("cron"):
            raise forms.ValidationError("give either an interval or a cron expression, not both")
        group = ProtectionGroup(**{name: cleaned.get(name) for name in self.Meta.fields
                                   if cleaned.get(name) is not None})
        try:
            scheduler.check_group(group)
        except scheduler.ScheduleError as exc:
            raise forms.ValidationError(str(exc)) from None
        return cleaned


class GroupMemberInline(admin.TabularInline):
    model = VirtualMachine
    fields = ["name", "agent", "protection_flag"]
    readonly_fields = fields
    extra = 0
    can_delete = False
    show_change_link = True
    verbose_name_plural = "Members (add them with `manage.py group add`)"

    def has_add_permission(self, request, obj=None):
        return False


@admin.register(ProtectionGroup)
class ProtectionGroupAdmin(admin.ModelAdmin):
    form = ProtectionGroupForm
    list_display = ["name", "schedule_label", "max_concurrent", "rpo_target_s", "max_retries", "paused"]
    list_filter = ["paused"]
    inlines = [GroupMemberInline]

    def save_model(self, request, obj, form, change):
        # Through the scheduler: the only writer of the group's beat schedule.
        with transaction.atomic():
            obj.save()
            scheduler.sync_schedule(obj)

    def delete_model(self, request, obj):
        scheduler.delete_group(obj)

    def delete_queryset(self, request, queryset):
        for group in queryset:
            scheduler.delete_group(group)


@admin.register(Admission)
class AdmissionAdmin(admin.ModelAdmin):
    list_display = ["due_at", "vm", "group", "reason", "attempt", "status", "job", "note"]
    list_filter = ["status", "reason", "group"]
    readonly_fields = ["group", "vm", "reason", "attempt", "status", "due_at", "not_before", "decided_at", "job",
                       "note"]

    def has_add_permission(self, request):
        return False


@admin.register(DrillRun)
class DrillRunAdmin(admin.ModelAdmin):
    list_display = ["vm", "group", "status", "rto_s", "queued_at", "ended_at", "note"]
    list_filter = ["status", "group"]
    readonly_fields = ["group", "vm", "failover", "status", "queued_at", "started_at", "ended_at", "rto_s", "note"]

    def has_add_permission(self, request):
        return False


@admin.register(Agent)
class AgentAdmin(admin.ModelAdmin):
    """Read-mostly: agents are added, paused, drained and removed through
    `manage.py agent` or the Agents page (each change audited); here only
    their limits may be changed."""

    list_display = ["name", "state", "channel", "api_url", "last_seen_at", "version", "last_error"]
    list_filter = ["state", "channel"]
    search_fields = ["name"]
    fields = ["name", "state", "channel", "api_url", "token_file", "max_vms", "max_disks", "max_per_host",
              "broker_user", "tunnel_port", "version", "last_seen_at", "last_error", "enrolled_from", "approved_by",
              "approved_at", "revoked_at", "created_at"]
    readonly_fields = [f for f in fields if not f.startswith("max_")]

    def has_add_permission(self, request):
        return False

    def has_delete_permission(self, request, obj=None):
        return False  # manage.py agent remove: refused while VMs use it or it copies


@admin.register(AgentAuditEntry)
class AgentAuditEntryAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    """The agents' audit trail: written by the services only, here read."""

    list_display = ["at", "agent_name", "action", "actor", "source", "detail"]
    list_filter = ["action"]
    search_fields = ["agent_name", "actor"]
