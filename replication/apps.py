from django.apps import AppConfig
from django.db.models.signals import post_migrate


def _ensure_roles(sender, **kwargs):
    # Every migrate (and every flush in the tests) leaves the three role
    # groups in place, with the permissions of models added since.
    from replication.roles import ensure_roles

    ensure_roles()


class ReplicationConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "replication"

    def ready(self):
        post_migrate.connect(_ensure_roles, sender=self, dispatch_uid="replication.ensure_roles")
