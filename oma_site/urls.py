from django.conf import settings
from django.contrib import admin
from django.urls import include, path

# One code base, two roles: an agent-only host serves just the progress API.
urlpatterns = []
if settings.VMA_API_ENABLED:
    urlpatterns.append(path("", include("vma_agent.urls")))
if settings.OMA_UI_ENABLED:
    urlpatterns += [
        path("admin/", admin.site.urls),
        path("", include("replication.urls")),
    ]

handler404 = "replication.views.api.not_found"
