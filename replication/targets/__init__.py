"""Target-volume providers: where replicated disks land on the cloud side.
Local files (the embedded default) or CloudStack volumes; both are exported
by the same local nbdkit export server."""

from django.conf import settings

from replication.choices import VolumeProvider
from replication.targets.local import LocalVolumeProvider


def local_provider() -> LocalVolumeProvider:
    return LocalVolumeProvider(settings.OMA_VOLUME_DIR, settings.OMA_RUN_DIR,
                               tls_psk_file=settings.OMA_EXPORT_TLS_PSK_FILE or None,
                               tls_username=settings.OMA_EXPORT_TLS_USERNAME,
                               extra_args=settings.OMA_EXPORT_NBDKIT_ARGS, listen=settings.OMA_EXPORT_LISTEN)


def get_provider(name: str = VolumeProvider.LOCAL):
    if name == VolumeProvider.LOCAL:
        return local_provider()
    if name == VolumeProvider.CLOUDSTACK:
        from replication.models import CloudStackConfig
        from replication.targets.cloudstack import CloudStackVolumeProvider

        return CloudStackVolumeProvider(CloudStackConfig.active(), local_provider(),
                                        job_timeout_s=settings.CLOUDSTACK_JOB_TIMEOUT_S,
                                        device_timeout_s=settings.CLOUDSTACK_DEVICE_TIMEOUT_S)
    raise ValueError(f"no target provider named {name!r} is configured")
