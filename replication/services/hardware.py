"""The destination's hardware for a failed-over VM: firmware, Secure Boot,
vTPM, the disks' bus (and SCSI controller) and the NICs' model, each with
where it came from, decided in this order (the later wins):

1. source: what the source VM had (VirtualMachine's fields as the booted
   cycle recorded them in vm_shape; add_vm's options for an image);
2. conversion: what the guest conversion decided. A guest converted with
   virtio drivers boots on virtio; one virt-v2v could not give virtio
   drivers (a Windows guest without VIRTIO_WIN) on the emulated devices it
   fell back to (IDE disk, RTL8139 NIC), with a warning on the VM. Before
   the conversion has run (the VMs page, set_hardware, the live failover's
   checks) the expected outcome stands in, marked as expected. A guest
   that could not be converted boots on its source's devices;
3. operator: manage.py set_hardware (VMContext.hardware).

What none of them says gets a reasoned default ("default", with the
reason): BIOS, no Secure Boot, no vTPM; for the disk bus and NIC model
virtio for an image source (images registered with add_vm are built for
KVM, and it is what failovers always used), SATA (AHCI) and e1000e for a
VMware source or a Windows guest (drivers for both are in Windows' own box
and in nearly every Linux initramfs, where virtio may be missing: a guest
that cannot find its root disk is the worst outcome).

A virtio disk or NIC for a Windows guest that has no virtio drivers is never
silent: it carries a warning (VMContext.hardware_warning), shown on the VMs
page, in `failover --json` and on the failover's "define VM" step."""

from __future__ import annotations

from dataclasses import dataclass, field

from django.conf import settings

from replication.choices import SourceKind
from replication.platforms.base import DISK_BUSES, NIC_MODELS, SCSI_MODELS, GuestConversion

SOURCE, CONVERSION, OPERATOR, DEFAULT = "source", "conversion", "operator", "default"
KEYS = ("firmware", "secure_boot", "tpm", "disk_bus", "scsi_model", "nic_model")
FIRMWARES = ("bios", "efi")
# virt-v2v's names for what it converted the guest for -> libvirt's.
_V2V_BLOCK = {"virtio-blk": "virtio", "virtio-scsi": "scsi", "ide": "ide"}
_V2V_NET = {"virtio-net": "virtio", "e1000": "e1000", "rtl8139": "rtl8139"}
# What virt-v2v 2.2 falls back to for a Windows guest it has no virtio drivers for.
V2V_FALLBACK_BLOCK, V2V_FALLBACK_NET = "ide", "rtl8139"


class HardwareError(ValueError):
    """An operator's hardware choice that cannot be; the message says why,
    `field` which setting (a KEYS entry) it is about."""

    def __init__(self, message: str, field: str = ""):
        self.field = field
        super().__init__(message)


@dataclass(frozen=True)
class Choice:
    value: str | bool
    origin: str  # source, conversion, operator or default
    why: str

    def as_json(self) -> dict:
        return {"value": self.value, "origin": self.origin, "why": self.why}


@dataclass(frozen=True)
class Hardware:
    """The decision: one Choice per KEYS entry, and a warning ("" if none)."""

    choices: dict[str, Choice]
    warning: str = ""
    notes: tuple[str, ...] = field(default_factory=tuple)

    def value(self, key: str):
        return self.choices[key].value

    def as_json(self) -> dict:
        return {**{key: self.choices[key].as_json() for key in KEYS}, "warning": self.warning}

    def summary(self) -> str:
        """One compact line: what the VM boots with."""
        bus = self.value("disk_bus")
        parts = [str(self.value("firmware")).upper() + (" Secure Boot" if self.value("secure_boot") else ""),
                 f"{bus} disk" + (f" ({self.value('scsi_model')})" if bus == "scsi" else ""),
                 f"{self.value('nic_model')} NIC"]
        if self.value("tpm"):
            parts.append("vTPM")
        return " · ".join(parts)

    def origins(self) -> str:
        return ", ".join(f"{key} {self.choices[key].origin}" for key in ("firmware", "disk_bus", "nic_model"))


def is_windows(source: dict, conversion: GuestConversion | None = None) -> bool:
    if conversion is not None and conversion.guest_type:
        return conversion.guest_type == "windows"
    guest = f"{source.get('guest_os') or ''} {source.get('guest_id') or ''}".lower()
    return "windows" in guest or guest.strip().startswith("win")


@dataclass(frozen=True)
class _Guest:
    """What the decision knows of the guest besides the operator's choices."""

    source: dict
    image: bool
    windows: bool
    conv_bus: str | None  # the conversion's disk bus (done or expected), libvirt's name
    conv_net: str | None
    conv_why: str
    expected: bool  # the conversion has not run yet: its expected outcome
    has_virtio: bool | None  # virtio drivers in the guest (None: unknown, not converted)
    not_converted: str

    @property
    def kind(self) -> str:
        return "an image" if self.image else ("a Windows guest" if self.windows else "a VMware source")


def decide(source: dict, *, image: bool, overrides: dict | None = None, convert: bool = False,
           conversion: GuestConversion | None = None, not_converted: str = "", virtio_win: str = "") -> Hardware:
    """The hardware from the source's (``source``: a vm_shape dict), the
    conversion's outcome and the operator's ``overrides`` (see the module's
    note). ``convert``: the VM's guest is converted on failover; with no
    ``conversion`` yet that means its expected outcome; ``not_converted``:
    the converter's reason when it could not convert the guest."""
    overrides = overrides or {}
    guest = _guest(source, image, convert, conversion, not_converted, virtio_win)
    choices = _firmware(source, overrides)
    choices["disk_bus"] = _disk_bus(guest, overrides)
    if choices["disk_bus"].value == "ide" and choices["secure_boot"].value:
        # Secure Boot runs on the q35 machine (SMM), which has no IDE controller.
        choices["disk_bus"] = Choice("sata", choices["disk_bus"].origin,
                                     f"{choices['disk_bus'].why}; IDE is SATA here: Secure Boot needs the q35 "
                                     "machine, which has no IDE")
    choices["scsi_model"] = _scsi_model(guest, overrides, conversion)
    choices["nic_model"] = _nic_model(guest, overrides)
    notes = (f"not converted: {not_converted}",) if not_converted else ()
    return Hardware(choices=choices, warning=_warning(guest, choices, virtio_win)[:500], notes=notes)


def _guest(source: dict, image: bool, convert: bool, conversion: GuestConversion | None, not_converted: str,
           virtio_win: str) -> _Guest:
    windows = is_windows(source, conversion)
    expected = conversion is None and convert and not not_converted
    conv_bus = conv_net = None
    conv_why = ""
    has_virtio = None
    if conversion is not None and conversion.block_bus:
        conv_bus = _V2V_BLOCK.get(conversion.block_bus)
        conv_net = _V2V_NET.get(conversion.net_bus or "") or ("virtio" if conversion.virtio else None)
        has_virtio = conversion.virtio
        conv_why = ("virt-v2v installed virtio drivers" if conversion.virtio else
                    "virt-v2v could not install virtio drivers: the emulated devices it fell back to")
    elif expected and windows and not virtio_win:
        conv_bus, conv_net, has_virtio = V2V_FALLBACK_BLOCK, V2V_FALLBACK_NET, False
        conv_why = "expected: without VIRTIO_WIN virt-v2v converts Windows to emulated devices"
    elif expected:
        conv_bus, conv_net, has_virtio = "virtio", "virtio", True
        conv_why = "expected: the conversion installs virtio drivers"
    return _Guest(source, image, windows, conv_bus, conv_net, conv_why, expected, has_virtio, not_converted)


def _firmware(source: dict, overrides: dict) -> dict[str, Choice]:
    """Firmware, Secure Boot, vTPM: the source's unless the operator chose."""
    choices: dict[str, Choice] = {}
    if "firmware" in overrides:
        choices["firmware"] = Choice(overrides["firmware"], OPERATOR, "set_hardware --firmware")
    elif source.get("firmware") in FIRMWARES:
        choices["firmware"] = Choice(source["firmware"], SOURCE, "the source's firmware")
    else:
        choices["firmware"] = Choice("bios", DEFAULT, "the source did not say: BIOS")
    for key, label in (("secure_boot", "Secure Boot"), ("tpm", "vTPM")):
        if key in overrides:
            choices[key] = Choice(bool(overrides[key]), OPERATOR, f"set_hardware --{key.replace('_', '-')}")
        elif source.get(key) is not None:
            choices[key] = Choice(bool(source[key]), SOURCE,
                                  f"the source {'had' if source[key] else 'had no'} {label}")
        else:
            choices[key] = Choice(False, DEFAULT, f"the source did not say: no {label}")
    if choices["secure_boot"].value and choices["firmware"].value != "efi":
        choices["secure_boot"] = Choice(False, choices["firmware"].origin,
                                        "Secure Boot needs UEFI, and the firmware is BIOS")
    return choices


def _disk_bus(guest: _Guest, overrides: dict) -> Choice:
    if "disk_bus" in overrides:
        return Choice(overrides["disk_bus"], OPERATOR, "set_hardware --disk-bus")
    if guest.conv_bus:
        return Choice(guest.conv_bus, CONVERSION, guest.conv_why)
    if guest.source.get("disk_bus") in DISK_BUSES:
        return Choice(guest.source["disk_bus"], SOURCE, "the source's boot disk bus" + (
            f" (not converted: {guest.not_converted})" if guest.not_converted else ""))
    if guest.image and not guest.windows:
        return Choice("virtio", DEFAULT, "source bus unknown, guest not converted: virtio, the bus KVM images "
                                         "are built for")
    return Choice("sata", DEFAULT, f"source bus unknown, guest not converted ({guest.kind}): SATA (AHCI), whose "
                                   "driver Windows and nearly every Linux initramfs carry, where virtio may be "
                                   "missing")


def _scsi_model(guest: _Guest, overrides: dict, conversion: GuestConversion | None) -> Choice:
    """The SCSI controller, used when the bus is scsi."""
    if "scsi_model" in overrides:
        return Choice(overrides["scsi_model"], OPERATOR, "set_hardware --scsi-model")
    if conversion is not None and conversion.block_bus == "virtio-scsi":
        return Choice("virtio-scsi", CONVERSION, guest.conv_why)
    if guest.source.get("scsi_model") in SCSI_MODELS:
        return Choice(guest.source["scsi_model"], SOURCE, "the source's SCSI controller")
    if guest.has_virtio:
        return Choice("virtio-scsi", DEFAULT, "the guest has virtio drivers: virtio-scsi")
    return Choice("lsilogic", DEFAULT, "source controller unknown: LSI Logic, VMware's default, which QEMU "
                                       "emulates")


def _nic_model(guest: _Guest, overrides: dict) -> Choice:
    if "nic_model" in overrides:
        return Choice(overrides["nic_model"], OPERATOR, "set_hardware --nic-model")
    if guest.conv_net:
        return Choice(guest.conv_net, CONVERSION, guest.conv_why)
    if guest.source.get("nic_model") in NIC_MODELS:
        return Choice(guest.source["nic_model"], SOURCE, "the source's NIC model")
    if guest.image and not guest.windows:
        return Choice("virtio", DEFAULT, "source NIC unknown: virtio, for a KVM image")
    return Choice("e1000e", DEFAULT, f"source NIC unknown ({guest.kind}): e1000e, whose driver Windows and Linux "
                                     "carry")


def _warning(guest: _Guest, choices: dict[str, Choice], virtio_win: str) -> str:
    """What must not be silent: a Windows guest on emulated devices for want
    of virtio-win, and a virtio device for a Windows guest without drivers."""
    if not guest.windows or guest.has_virtio:
        return ""
    warnings = []
    if guest.conv_bus == V2V_FALLBACK_BLOCK:
        where = f"in VIRTIO_WIN={virtio_win}" if virtio_win else "(VIRTIO_WIN is not set)"
        warnings.append(f"Windows guest {'to be ' if guest.expected else ''}converted without virtio drivers "
                        f"{where}: it boots on emulated devices ({choices['disk_bus'].value} disk, "
                        f"{choices['nic_model'].value} NIC), slower than virtio; provide virtio-win (VIRTIO_WIN) "
                        "for virtio")
    bus = choices["disk_bus"]
    if bus.value == "virtio" or (bus.value == "scsi" and choices["scsi_model"].value == "virtio-scsi"):
        warnings.append(f"a virtio disk ({bus.origin}) for a Windows guest without virtio drivers: it cannot find "
                        "its boot disk (INACCESSIBLE_BOOT_DEVICE); convert it with VIRTIO_WIN, or choose an emulated "
                        "bus (set_hardware --disk-bus sata)")
    if choices["nic_model"].value == "rtl8139":
        warnings.append("an RTL8139 NIC (virt-v2v's fallback) for a Windows guest: 64-bit Windows has no driver "
                        "for it in the box; set_hardware --nic-model e1000e (Windows 8 / Server 2012 and later "
                        "carry its driver) or e1000")
    if choices["nic_model"].value == "virtio":
        warnings.append(f"a virtio NIC ({choices['nic_model'].origin}) for a Windows guest without virtio drivers: "
                        "it has no network; convert it with VIRTIO_WIN, or set_hardware --nic-model e1000e")
    return "; ".join(warnings)


def source_of(vm, recorded: dict | None = None) -> dict:
    """The source's hardware as the cycle recorded it (``recorded``: its
    vm_shape), the VM's own fields for what it did not record."""
    source = {"firmware": vm.firmware or "bios", "secure_boot": vm.secure_boot, "tpm": vm.tpm,
              "disk_bus": vm.disk_bus, "scsi_model": vm.scsi_model, "nic_model": vm.nic_model,
              "guest_os": vm.guest_os}
    for key, value in (recorded or {}).items():
        if key in ("firmware", "secure_boot", "tpm", "disk_bus", "scsi_model", "nic_model", "guest_os",
                   "guest_id") and value not in (None, ""):
            source[key] = value
    return source


def for_vm(vm, recorded: dict | None = None, *, conversion: GuestConversion | None = None,
           not_converted: str = "", context=None) -> Hardware:
    """The VM's hardware on the destination: from the recorded source
    (a cycle's vm_shape, else the VM's fields), its conversion (the outcome
    once run, the expected one before) and the operator's choices
    (``context``: its VMContext, if already read)."""
    from replication.models import VMContext

    context = context or VMContext.of(vm)
    return decide(source_of(vm, recorded), image=vm.source_kind != SourceKind.VMWARE,
                  overrides=context.hardware or {}, convert=context.convert_guest, conversion=conversion,
                  not_converted=not_converted, virtio_win=settings.VIRTIO_WIN)


def checked_overrides(changes: dict, current: dict) -> dict:
    """The operator's choices after ``changes`` (None: that choice removed),
    each checked; HardwareError says what is wrong."""
    allowed = {"firmware": FIRMWARES, "disk_bus": DISK_BUSES, "scsi_model": SCSI_MODELS, "nic_model": NIC_MODELS}
    merged = dict(current)
    for key, value in changes.items():
        if key not in KEYS:
            raise HardwareError(f"unknown hardware setting {key!r}; known: {', '.join(KEYS)}", key)
        if value is None:
            merged.pop(key, None)
        elif key in ("secure_boot", "tpm"):
            if not isinstance(value, bool):
                raise HardwareError(f"{key} must be on or off, not {value!r}", key)
            merged[key] = value
        elif value not in allowed[key]:
            raise HardwareError(f"{key.replace('_', ' ')} must be one of {', '.join(allowed[key])}, not {value!r}",
                                key)
        else:
            merged[key] = value
    return merged


def set_overrides(vm, changes: dict, *, clear: bool = False) -> Hardware:
    """Record the operator's hardware choices for the VM (``clear``: drop
    them all first) and return what it will now boot with. Secure Boot
    chosen on a VM whose firmware stays BIOS is refused. The VM's warning is
    the new decision's (until a failover records its own)."""
    from replication.models import VMContext

    context = VMContext.of(vm)
    merged = checked_overrides(changes, {} if clear else (context.hardware or {}))
    if merged.get("secure_boot"):
        firmware = merged.get("firmware") or source_of(vm).get("firmware") or "bios"
        if firmware != "efi":
            raise HardwareError("Secure Boot needs UEFI firmware: add --firmware efi (the VM's firmware is "
                                f"{firmware})", "secure_boot")
    context.hardware = merged
    context.save(update_fields=["hardware", "updated_at"])
    hardware = for_vm(vm)
    _warn(context, hardware.warning)
    return hardware


def set_guest_conversion(vm, on: bool) -> None:
    """Whether a failover converts the VM's guest before its first boot."""
    from replication.models import VMContext

    context = VMContext.of(vm)
    context.convert_guest = on
    context.save(update_fields=["convert_guest", "updated_at"])


def booted(job, hardware: Hardware, destination_choices: dict | None = None) -> None:
    """Record what the failover's VM was defined with (with what the
    destination itself chose, e.g. a cloud's service offering), and the VM's
    warning."""
    from replication.models import FailoverJob, VMContext

    job.hardware = {**hardware.as_json(), **(destination_choices or {})}
    FailoverJob.objects.filter(pk=job.pk).update(hardware=job.hardware)
    _warn(VMContext.of(job.vm), hardware.warning)


def _warn(context, warning: str) -> None:
    if context.hardware_warning != warning:
        context.hardware_warning = warning[:500]
        context.save(update_fields=["hardware_warning", "updated_at"])
