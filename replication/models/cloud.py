"""The CloudStack the OMA works with (MigrateKit OSSEA's ossea_configs table)."""

from __future__ import annotations

from django.db import models

from replication.names import validate_no_control_characters
from vma_agent.secrets import SecretError, read_secret


class CloudError(Exception):
    """CloudStack refused, failed or could not be reached; str() says why."""


class CloudStackConfig(models.Model):
    """Where the OMA's cloud is and what it creates there. The secret key is a
    reference the OMA host owns (a file or an environment variable): it is
    never stored here, logged or passed on a command line."""

    name = models.CharField(max_length=100, unique=True, validators=[validate_no_control_characters])
    api_url = models.URLField(max_length=500, help_text="e.g. https://cloud.example.com/client/api")
    api_key = models.CharField(max_length=200)
    secret_file = models.CharField(max_length=1000, blank=True, help_text="File holding the secret key")
    secret_env = models.CharField(max_length=100, blank=True, help_text="Environment variable holding it")
    zone_id = models.CharField(max_length=64)
    disk_offering_id = models.CharField(max_length=64, help_text="A customized-size disk offering for the volumes")
    service_offering_id = models.CharField(max_length=64, blank=True)
    network_id = models.CharField(max_length=64, blank=True, help_text="Default network of failed-over VMs")
    template_id = models.CharField(max_length=64, blank=True, help_text="Template failed-over VMs deploy from")
    oma_vm_id = models.CharField(max_length=64, help_text="The OMA's own VM: volumes attach to it to be written")
    device_dir = models.CharField(max_length=500, default="/dev/disk/by-id",
                                  help_text="Where an attached volume appears as virtio-<id>")
    is_active = models.BooleanField(default=True, help_text="New target volumes go to the active cloud")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        verbose_name = "CloudStack cloud"
        db_table = "ossea_configs"

    def __str__(self):
        return self.name

    def secret(self) -> str:
        from replication.services.allowlist import NotAllowed, check_cloud_secret_ref

        try:
            # Checked where it is read too: a record edited in the database may point anywhere.
            check_cloud_secret_ref(self.secret_file, self.secret_env)
            return read_secret(f"the secret key of cloud {self.name}", self.secret_file, self.secret_env).strip()
        except (NotAllowed, SecretError) as exc:
            raise CloudError(str(exc)) from None

    @classmethod
    def active(cls) -> CloudStackConfig:
        config = cls.objects.filter(is_active=True).order_by("-created_at").first()
        if config is None:
            raise CloudError("no active CloudStack config: add one with manage.py add_cloud")
        return config
