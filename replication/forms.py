"""The operator console's forms. Each one hands its input to the service the
matching management command calls (set_boot_check, set_hardware, network_map,
replicate, group, ...), so a page refuses exactly what the command refuses;
a service's refusal lands beside the field it is about, in its own words."""

from __future__ import annotations

from django import forms

from replication.platforms.base import BOOT_PROBES, DEFAULT_BOOT_REGEX, DISK_BUSES, NIC_MODELS, SCSI_MODELS
from replication.services import boot_check, hardware, network_maps
from replication.services import jobs as job_service
from vma_agent.units import parse_rate

AUTO = "auto"
SWITCHES = [(AUTO, "auto (from the source)"), ("on", "on"), ("off", "off")]


class ConsoleForm(forms.Form):
    """Bootstrap classes on every widget; a field with an error is marked
    is-invalid (its message goes in .invalid-feedback beside it)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for field in self.fields.values():
            widget = field.widget
            if isinstance(widget, forms.CheckboxInput | forms.CheckboxSelectMultiple):
                css = "form-check-input"
            elif isinstance(widget, forms.Select):
                css = "form-select"
            else:
                css = "form-control"
            widget.attrs["class"] = css

    def add_error(self, field, error):
        super().add_error(field, error)
        for name in self.errors:
            if name in self.fields:
                css = self.fields[name].widget.attrs.get("class", "")
                if "is-invalid" not in css:
                    self.fields[name].widget.attrs["class"] = f"{css} is-invalid".strip()


def _select(choices) -> forms.CharField:
    """A choice whose value the service checks (its refusal is the one shown)."""
    return forms.CharField(widget=forms.Select(choices=choices))


class BootCheckForm(ConsoleForm):
    probes = forms.MultipleChoiceField(
        choices=[(p, p) for p in BOOT_PROBES], required=False, widget=forms.CheckboxSelectMultiple,
        help_text="Any one suffices; none ticked: the default probes (all of them).")
    regex = forms.CharField(required=False, max_length=500, label="Console or screen must show",
                            help_text=f"A Python regular expression; empty: the default /{DEFAULT_BOOT_REGEX}/.")
    timeout = forms.IntegerField(label="Timeout (seconds)", help_text="1 to 3600 seconds.")

    @classmethod
    def for_context(cls, context, data=None):
        return cls(data, initial={"probes": list(context.probes()) if context.boot_probes else [],
                                  "regex": context.boot_check_regex, "timeout": context.boot_check_timeout_s},
                   prefix="boot")

    def apply(self, vm) -> bool:
        if not self.is_valid():
            return False
        data = self.cleaned_data
        try:
            boot_check.set_boot_check(vm, probes=data["probes"], regex=data["regex"], timeout_s=data["timeout"])
        except boot_check.BootCheckError as exc:
            for key, why in exc.errors.items():
                self.add_error({"probe": "probes"}.get(key, key), why)
            return False
        return True


class HardwareForm(ConsoleForm):
    firmware = _select([(AUTO, "auto (from the source)"), ("bios", "BIOS"), ("efi", "UEFI")])
    secure_boot = _select(SWITCHES)
    tpm = _select(SWITCHES)
    disk_bus = _select([(AUTO, "auto (from the source)"), *((b, b) for b in DISK_BUSES)])
    scsi_model = _select([(AUTO, "auto (from the source)"), *((m, m) for m in SCSI_MODELS)])
    nic_model = _select([(AUTO, "auto (from the source)"), *((m, m) for m in NIC_MODELS)])

    @classmethod
    def for_context(cls, context, data=None):
        initial = {}
        for key in hardware.KEYS:
            value = (context.hardware or {}).get(key)
            initial[key] = AUTO if value is None else ("on" if value else "off") if isinstance(value, bool) else value
        return cls(data, initial=initial, prefix="hw")

    def apply(self, vm) -> bool:
        if not self.is_valid():
            return False
        changes = {}
        for key in hardware.KEYS:
            value = self.cleaned_data[key]
            if value == AUTO:
                changes[key] = None
            elif key in ("secure_boot", "tpm"):
                changes[key] = {"on": True, "off": False}.get(value, value)
            else:
                changes[key] = value
        try:
            hardware.set_overrides(vm, changes)
        except hardware.HardwareError as exc:
            self.add_error(exc.field if exc.field in self.fields else None, str(exc))
            return False
        return True


class GuestConversionForm(ConsoleForm):
    convert_guest = forms.BooleanField(required=False, label="Convert the guest (virt-v2v-in-place) before the "
                                                             "first boot of a failed-over VM")

    def apply(self, vm) -> bool:
        if not self.is_valid():
            return False
        hardware.set_guest_conversion(vm, self.cleaned_data["convert_guest"])
        return True


class NetworkMapForm(ConsoleForm):
    source = forms.CharField(label="Source network", max_length=200, help_text="Its name in vCenter.")
    destination = forms.CharField(label="Destination network", max_length=200)

    def apply(self, vm=None) -> bool:
        if not self.is_valid():
            return False
        try:
            network_maps.map_network(self.cleaned_data["source"], self.cleaned_data["destination"])
        except network_maps.NetworkMapError as exc:
            self.add_error(exc.field, str(exc))
            return False
        return True


class ReplicateForm(ConsoleForm):
    sync_type = forms.ChoiceField(choices=job_service.SYNC_TYPE_CHOICES, initial=job_service.AUTO, label="Copy")
    verify = forms.BooleanField(required=False, label="Verify the copy (checksums) at the end")
    limit = forms.CharField(required=False, label="Bandwidth limit per disk",
                            help_text="e.g. 50M or 50MiB/s (K, M, G: powers of 1024); empty: no limit.")

    def clean_limit(self):
        text = self.cleaned_data["limit"].strip()
        if not text:
            return None
        try:
            return parse_rate(text)
        except ValueError as exc:
            raise forms.ValidationError(str(exc)) from None

    def apply(self, vm, actor: str):
        """The job started, or None (the reason on the form)."""
        if not self.is_valid():
            return None
        data = self.cleaned_data
        try:
            return job_service.start_replication(vm, job_service.choose_sync_type(vm, data["sync_type"]),
                                                 verify=data["verify"], bandwidth_limit_bps=data["limit"],
                                                 actor=actor)
        except job_service.ReplicationError as exc:
            self.add_error(None, str(exc))
            return None


def _duration_text(seconds: int | None) -> str:
    """Seconds as the commands take them back: 90s, 15m, 2h, 1d."""
    if not seconds:
        return ""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


class DurationField(forms.CharField):
    """A duration as `manage.py group` takes it (90s, 15m, 2h, 1d), to seconds."""

    def to_python(self, value):
        import argparse

        from replication.management.lookup import duration_s

        text = super().to_python(value).strip()
        if not text:
            return None
        try:
            return duration_s(text)
        except argparse.ArgumentTypeError as exc:
            raise forms.ValidationError(str(exc)) from None


class GroupForm(ConsoleForm):
    """A protection group, its schedule and its VMs: `group create|update|add|remove` and `schedule set|clear`."""

    POLICY = ("description", "max_concurrent", "rpo_target_s", "max_retries", "retry_backoff_s", "drill_interval_s",
              "points_keep", "points_hourly_h", "points_daily_d", "paused")

    name = forms.CharField(max_length=100)
    description = forms.CharField(required=False, max_length=500)
    interval_s = DurationField(required=False, label="Replicate every",
                               help_text="e.g. 30m; or a cron expression below. Both empty: no schedule (cycles "
                                         "only when asked).")
    cron = forms.CharField(required=False, max_length=100, label="Or on a cron schedule",
                           help_text='"minute hour day-of-month month day-of-week", e.g. 0 */4 * * *')
    timezone = forms.CharField(max_length=64, initial="UTC", label="The cron expression's time zone")
    max_concurrent = forms.IntegerField(initial=2, label="Cycles at once")
    rpo_target_s = DurationField(initial="1h", label="Recovery point target")
    max_retries = forms.IntegerField(initial=2, label="Retries of a failed scheduled cycle")
    retry_backoff_s = DurationField(initial="60s", label="First retry after (doubling)")
    drill_interval_s = DurationField(required=False, label="Rehearse each VM's recovery every",
                                     help_text="A drill (test failover, boot verified, ended); empty: no drills.")
    points_keep = forms.IntegerField(required=False, label="Recovery points kept per VM",
                                     help_text="Empty: the appliance's default.")
    points_hourly_h = forms.IntegerField(initial=0, label="Also the newest of each hour, for hours")
    points_daily_d = forms.IntegerField(initial=0, label="Also the newest of each day, for days")
    paused = forms.BooleanField(required=False, label="Paused (starts nothing)")
    vms = forms.ModelMultipleChoiceField(queryset=None, required=False, widget=forms.CheckboxSelectMultiple,
                                         label="VMs", help_text="A VM is in at most one group: ticking it here "
                                                                "takes it from its old one.")

    def __init__(self, *args, group=None, **kwargs):
        from replication.models import VirtualMachine

        self.group = group
        if group is not None:
            initial = {field: getattr(group, field) for field in ("name", "description", "cron", "timezone",
                                                                  "max_concurrent", "max_retries", "points_keep",
                                                                  "points_hourly_h", "points_daily_d", "paused")}
            for field in ("interval_s", "rpo_target_s", "retry_backoff_s", "drill_interval_s"):
                initial[field] = _duration_text(getattr(group, field))
            initial["vms"] = list(group.vms.values_list("pk", flat=True))
            kwargs.setdefault("initial", initial)
        super().__init__(*args, **kwargs)
        self.fields["vms"].queryset = VirtualMachine.objects.in_service().select_related("group")
        self.fields["vms"].label_from_instance = (
            lambda vm: vm.name + (f" (in {vm.group.name})" if vm.group and vm.group != group else ""))
        if group is not None:
            self.fields["name"].disabled = True

    def apply(self):
        """The group created or changed, or None (the reasons beside the fields; nothing stored)."""
        from django.db import transaction

        from replication.services import scheduler

        if not self.is_valid():
            return None
        data = self.cleaned_data
        policy = {key: data[key] for key in self.POLICY if data[key] is not None}
        if data["points_keep"] is None:
            policy["points_keep"] = None
        if data["drill_interval_s"] is None:
            policy["drill_interval_s"] = None
        try:
            with transaction.atomic():
                if self.group is None:
                    group = scheduler.create_group(data["name"], **policy)
                else:
                    group = scheduler.update_group(self.group, **policy)
                if data["interval_s"] or data["cron"].strip():
                    scheduler.set_schedule(group, interval_s=data["interval_s"], cron=data["cron"],
                                           tz=data["timezone"].strip() or "UTC")
                else:
                    scheduler.update_group(group, interval_s=None, cron="")
                chosen = list(data["vms"])
                gone = [vm for vm in group.vms.all() if vm not in chosen]
                if gone:
                    scheduler.remove_vms(group, gone)
                added = [vm for vm in chosen if vm.group_id != group.pk]
                if added:
                    scheduler.add_vms(group, added)
        except scheduler.ScheduleError as exc:
            if self.group is not None:
                self.group.refresh_from_db()
            self.add_error(exc.field if exc.field in self.fields else None, str(exc))
            return None
        return group


class VCenterForm(ConsoleForm):
    """How a vCenter is reached (services.sources.update_vcenter: its checks, then a login)."""

    host = forms.CharField(max_length=255)
    port = forms.IntegerField()
    username = forms.CharField(max_length=200, label="User")
    thumbprint = forms.CharField(max_length=200, label="Certificate thumbprint (SHA-1)")
    agent = forms.CharField(max_length=50, help_text="The agent that reaches it (manage.py agent list).")

    def apply(self, vcenter):
        from replication.services import sources
        from vma_agent.vmware import VSphereError

        if not self.is_valid():
            return None
        try:
            return sources.update_vcenter(vcenter, **self.cleaned_data)
        except sources.VCenterFieldError as exc:
            self.add_error(exc.field, str(exc))
        except (sources.vmware_service.VCenterConfigError, VSphereError) as exc:
            self.add_error(None, str(exc))
        return None


class PasswordForm(ConsoleForm):
    password = forms.CharField(widget=forms.PasswordInput, strip=False, label="New password",
                               help_text="Kept in its own secret file; a login with it is tried first.")

    def apply(self, vcenter):
        from replication.services import sources
        from vma_agent.vmware import VSphereError

        if not self.is_valid():
            return None
        try:
            return sources.rotate_password(vcenter, self.cleaned_data["password"])
        except sources.VCenterFieldError as exc:
            self.add_error(exc.field, str(exc))
        except (sources.vmware_service.VCenterConfigError, VSphereError) as exc:
            self.add_error("password", str(exc))
        return None


class CloudForm(ConsoleForm):
    """The CloudStack cloud, as `manage.py add_cloud` records it (register_cloud:
    the secret by reference, every id checked with the cloud before saving)."""

    name = forms.CharField(max_length=100, help_text="The same name changes that cloud; a new one adds a cloud "
                                                      "and makes it the active one.")
    api_url = forms.CharField(max_length=500, label="API URL", help_text="e.g. https://cloud.example.com/client/api")
    api_key = forms.CharField(max_length=200, label="API key")
    secret_file = forms.CharField(required=False, max_length=1000, label="Secret key file",
                                  help_text="Absolute path of a file holding the secret key; or:")
    secret_env = forms.CharField(required=False, max_length=100, label="Secret key environment variable")
    zone_id = forms.CharField(max_length=64, label="Zone id")
    disk_offering_id = forms.CharField(max_length=64, label="Disk offering id",
                                       help_text="A customized-size disk offering (volumes in whole GiB).")
    service_offering_id = forms.CharField(required=False, max_length=64, label="Service offering id")
    network_id = forms.CharField(required=False, max_length=64, label="Network id")
    template_id = forms.CharField(required=False, max_length=64, label="Template id")
    oma_vm_id = forms.CharField(max_length=64, label="The OMA's own VM id")
    device_dir = forms.CharField(max_length=500, initial="/dev/disk/by-id", label="Device directory")

    SECRET_WORDS = ("secret", "environment variable")

    def apply(self):
        """(config, what the cloud answered for), or None (the reason on the form; nothing saved)."""
        from replication.models import CloudError
        from replication.platforms.cloudstack.config import register_cloud

        if not self.is_valid():
            return None
        fields = {key: value.strip() for key, value in self.cleaned_data.items()}
        try:
            return register_cloud(fields.pop("name"), **fields)
        except CloudError as exc:
            message = str(exc)
            field = "secret_file" if any(word in message for word in self.SECRET_WORDS) else None
            self.add_error(field, message)
            return None


class ApiTokenForm(ConsoleForm):
    """A token for scripts calling the JSON API as a user (`manage.py api_token NAME --user USER`)."""

    user = forms.ModelChoiceField(queryset=None, to_field_name="username", label="Acts as user",
                                  help_text="The token has this user's role.")
    name = forms.CharField(max_length=100, label="What it is for", help_text="e.g. monitoring")

    def __init__(self, *args, **kwargs):
        from django.contrib.auth.models import User

        super().__init__(*args, **kwargs)
        self.fields["user"].queryset = User.objects.filter(is_active=True).order_by("username")
        self.fields["name"].validators.append(_no_control_characters)

    def apply(self):
        """(token, key shown once) or None."""
        from replication.models import ApiToken

        if not self.is_valid():
            return None
        return ApiToken.issue(self.cleaned_data["user"], self.cleaned_data["name"].strip())


def _no_control_characters(value):
    from replication.names import validate_no_control_characters

    validate_no_control_characters(value)
