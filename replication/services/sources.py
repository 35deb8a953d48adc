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
