"""Target-volume providers: where replicated disks land on the cloud side."""

from django.conf import settings

from replication.choices import VolumeProvider
from replication.targets.local import LocalVolumeProvider


def get_provider(name: str = VolumeProvider.LOCAL) -> LocalVolumeProvider:
    if name == VolumeProvider.LOCAL:
        return LocalVolumeProvider(settings.OMA_VOLUME_DIR, settings.OMA_RUN_DIR,
                                   tls_psk_file=settings.OMA_EXPORT_TLS_PSK_FILE or None,
                                   tls_username=settings.OMA_EXPORT_TLS_USERNAME,
                                   extra_args=settings.OMA_EXPORT_NBDKIT_ARGS, listen=settings.OMA_EXPORT_LISTEN)
    raise ValueError(f"no target provider named {name!r} is configured")
