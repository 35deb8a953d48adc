from django.apps import AppConfig


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
