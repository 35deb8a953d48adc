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
        from oma_site import private_files

        # Every process of the system gets here (web, workers, commands, the
        # tests): what it creates is private, and data left open is closed
        # before anything reads or writes it.
        private_files.restrict_umask()
        private_files.secure_data_paths()

        post_migrate.connect(_ensure_roles, sender=self, dispatch_uid="replication.ensure_roles")
        _connect_workflows()


def _connect_workflows():
    """Who hears of whose events (replication.signals): the workflow an event
    belongs to sends it without knowing the listeners."""
    from replication import signals
    from replication.services import drills, failover

    signals.cycle_ended.connect(failover.on_cycle_ended, dispatch_uid="replication.failover.on_cycle_ended")
    signals.test_failover_ended.connect(drills.on_test_failover_ended,
                                        dispatch_uid="replication.drills.on_test_failover_ended")
