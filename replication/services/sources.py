"""Adding sources from the pages: a vCenter (its certificate fetched and
shown for the operator to trust, the typed password kept as a secret file
the record only points at), and the choice of which of its VMs to protect."""

from __future__ import annotations

import os
import re
from pathlib import Path

from django.conf import settings

from replication.models import VCenter
from replication.services import vmware as vmware_service
from vma_agent import vmware

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


def certificate_thumbprint(host: str, port: int) -> str:
    """The SHA-1 thumbprint of the certificate the server presents now."""
    if not 0 < port < 65536:
        raise vmware_service.VCenterConfigError(f"the port must be 1..65535, not {port}")
    timeout_s = settings.PROBE_TIMEOUT_S
    try:
        return vmware.server_thumbprint(host, port, timeout_s=timeout_s)
    except TimeoutError:
        raise vmware_service.VCenterConfigError(f"{host}:{port} did not present a certificate within {timeout_s:g} s "
                                                "(PROBE_TIMEOUT_S)") from None
    except OSError as exc:
        raise vmware_service.VCenterConfigError(f"cannot reach {host}:{port}: {exc}") from None


def store_password(name: str, password: str) -> Path:
    """Write the typed password to its own file (0600 in a 0700 directory)."""
    if not NAME_RE.match(name):
        raise vmware_service.VCenterConfigError(f"vCenter name {name!r}: letters, digits and _.- only")
    if not password:
        raise vmware_service.VCenterConfigError("the password is empty")
    directory = Path(settings.OMA_SECRETS_DIR)
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    path = directory / f"vcenter-{name}.password"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(password)
    return path.absolute()


def add_vcenter(name: str, host: str, port: int, username: str, password: str, thumbprint: str) -> VCenter:
    """Record the vCenter once a login with the typed password and the trusted
    thumbprint works; nothing is left behind when it does not."""
    name = name.strip()
    if VCenter.objects.filter(name=name).exists():
        raise vmware_service.VCenterConfigError(f"a vCenter named {name!r} already exists")
    path = store_password(name, password)
    try:
        return vmware_service.register_vcenter(name, host, username, thumbprint, port=port, password_file=str(path))
    except Exception:
        path.unlink(missing_ok=True)
        raise


def inventory(vcenter: VCenter) -> list[dict]:
    """The vCenter's VMs as the page lists them, each marked if protected."""
    recorded = set(vcenter.vms.values_list("moref", flat=True))
    with vmware_service.session(vcenter) as client:
        found = client.inventory()
    return [{"name": vm.name, "moref": vm.moref, "power_state": vm.power_state, "disks": len(vm.disks),
             "capacity_bytes": sum(d.capacity_bytes for d in vm.disks), "protected": vm.moref in recorded}
            for vm in sorted(found, key=lambda v: v.name)]


class VCenterFieldError(vmware_service.VCenterConfigError):
    """A refused vCenter setting; `field` names it."""

    def __init__(self, message: str, field: str):
        self.field = field
        super().__init__(message)


def update_vcenter(vcenter: VCenter, *, host: str, port: int, username: str, thumbprint: str,
                   agent: str) -> VCenter:
    """Change how the vCenter is reached; the same checks as registering it
    (port, thumbprint, agent), and a login with its password before anything
    is stored."""
    from replication.services import agents

    try:
        agent = agents.get(agent).name
    except agents.AgentError as exc:
        raise VCenterFieldError(str(exc), "agent") from None
    if not 0 < port < 65536:
        raise VCenterFieldError(f"the port must be 1..65535, not {port}", "port")
    digits = thumbprint.replace(":", "")
    if len(digits) != 40 or any(c not in "0123456789abcdefABCDEF" for c in digits):
        raise VCenterFieldError(f"thumbprint {thumbprint!r} is not a SHA-1 thumbprint (40 hex digits)", "thumbprint")
    candidate = VCenter.objects.get(pk=vcenter.pk)
    candidate.host, candidate.port, candidate.username, candidate.agent = host.strip(), port, username.strip(), agent
    candidate.thumbprint = vmware.normalize_thumbprint(thumbprint)
    with vmware_service.session(candidate):
        pass
    candidate.save(update_fields=["host", "port", "username", "thumbprint", "agent"])
    return candidate


def rotate_password(vcenter: VCenter, password: str) -> VCenter:
    """Give the vCenter a new password: kept in its own secret file (the
    record points at it, as from the Sources page), once a login with it
    works; a refused one leaves the old password in place."""
    if not password:
        raise VCenterFieldError("the password is empty", "password")
    staged = store_password(f"{vcenter.name}.new", password)
    try:
        candidate = VCenter.objects.get(pk=vcenter.pk)
        candidate.password_file, candidate.password_env = str(staged), ""
        with vmware_service.session(candidate):
            pass
        final = staged.with_name(f"vcenter-{vcenter.name}.password")
        os.replace(staged, final)
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    VCenter.objects.filter(pk=vcenter.pk).update(password_file=str(final), password_env="")
    vcenter.refresh_from_db()
    return vcenter


def vcenter_delete_refusal(vcenter: VCenter) -> str:
    """Why the vCenter cannot be deleted ("" if it can): VMs recorded from it
    depend on it (their cycles read it; a decommissioned one's history names it)."""
    names_ = list(vcenter.vms.order_by("name").values_list("name", flat=True))
    if not names_:
        return ""
    shown = ", ".join(names_[:10]) + (f" and {len(names_) - 10} more" if len(names_) > 10 else "")
    return (f"vCenter {vcenter.name} cannot be deleted: {len(names_)} VM(s) recorded from it depend on it "
            f"({shown}); decommissioned VMs keep their history tied to it")


def delete_vcenter(vcenter: VCenter) -> None:
    """Delete the vCenter and the secret file the pages wrote for it."""
    if why := vcenter_delete_refusal(vcenter):
        raise vmware_service.VCenterConfigError(why)
    ours = Path(settings.OMA_SECRETS_DIR).absolute() / f"vcenter-{vcenter.name}.password"
    vcenter.delete()
    if vcenter.password_file and Path(vcenter.password_file) == ours:
        ours.unlink(missing_ok=True)
