"""Recording a CloudStack config: checked against the cloud before it is saved."""

from __future__ import annotations

from django.db import transaction

from replication import names
from replication.models import CloudError, CloudStackConfig
from replication.platforms.cloudstack.client import CloudClient
from replication.services.allowlist import NotAllowed, check_cloud_secret_ref

FIELDS = ("api_url", "api_key", "secret_file", "secret_env", "zone_id", "disk_offering_id", "service_offering_id",
          "network_id", "template_id", "oma_vm_id", "device_dir")


def register_cloud(name: str, *, check: bool = True, **fields) -> tuple[CloudStackConfig, list[str]]:
    """Create or update the config `name` and make it the active one, once
    the credentials and every id it names answered read calls (listZones,
    listDiskOfferings, listServiceOfferings, listNetworks, listTemplates,
    listVirtualMachines for the OMA). Refused with CloudStack's own text."""
    unknown = set(fields) - set(FIELDS)
    if unknown:
        raise CloudError(f"unknown CloudStack setting(s): {', '.join(sorted(unknown))}")
    if bool(fields.get("secret_file")) == bool(fields.get("secret_env")):
        raise CloudError("give the secret key as exactly one of a file or an environment variable")
    try:
        check_cloud_secret_ref(fields.get("secret_file") or "", fields.get("secret_env") or "")
    except NotAllowed as exc:
        raise CloudError(str(exc)) from None
    name = names.checked(name, CloudStackConfig, error=CloudError, what="cloud name")
    config = CloudStackConfig.objects.filter(name=name).first() or CloudStackConfig(name=name)
    for key, value in fields.items():
        setattr(config, key, value or "")
    found = CloudClient(config, job_timeout_s=30).check() if check else []
    with transaction.atomic():
        config.is_active = True
        config.save()
        CloudStackConfig.objects.exclude(pk=config.pk).update(is_active=False)
    return config, found
