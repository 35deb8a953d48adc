import os

from celery import Celery, signals

from oma_site.private_files import restrict_umask

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "oma_site.settings")
# Workers and beat create volumes, overlays, sockets and the schedule: private from the first.
restrict_umask()

app = Celery("oma_site")
app.config_from_object("django.conf:settings", namespace="CELERY")
# The OMA's tasks and the agent's (vma_agent holds no models: not an app).
app.autodiscover_tasks(["replication", "vma_agent"])



@signals.worker_ready.connect
def _sweep_on_start(**kwargs):
    """A worker starting after a crash removes what its dead predecessor left."""
    from replication.services import sweeper

    sweeper.sweep()
