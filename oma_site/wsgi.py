import os

from django.core.wsgi import get_wsgi_application

from oma_site.private_files import restrict_umask

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "oma_site.settings")
restrict_umask()  # before the database or a log file is created
application = get_wsgi_application()
