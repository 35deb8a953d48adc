"""The operator console's forms. Each one hands its input to the service the
matching management command calls (set_boot_check, set_hardware, network_map,
replicate, group, ...), so a page refuses exactly what the command refuses;
a service's refusal lands beside the field it is about, in its own words."""

from __future__ import annotations

from django import forms

from replication.choices import SyncType
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
    sync_type = forms.ChoiceField(choices=SyncType.choices, label="Copy")
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
            return job_service.start_replication(vm, data["sync_type"], verify=data["verify"],
                                                 bandwidth_limit_bps=data["limit"], actor=actor)
        except job_service.ReplicationError as exc:
            self.add_error(None, str(exc))
            return None
