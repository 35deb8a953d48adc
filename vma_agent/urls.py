from django.urls import path

from vma_agent import api

urlpatterns = [
    path("api/v1/progress", api.list_changes, name="vma-progress-changes"),
    path("api/v1/progress/<str:record_id>/update", api.post_update, name="vma-progress-update"),
    path("api/v1/progress/<str:record_id>", api.get_progress, name="vma-progress"),
    path("api/v1/status/<str:record_id>", api.get_status, name="vma-status"),
    path("api/v1/health", api.health, name="vma-health"),
    path("api/v1/jobs/<str:job_id>/stop", api.stop_job, name="vma-job-stop"),
    path("api/v1/jobs/<str:job_id>/limit", api.job_limit, name="vma-job-limit"),
    path("api/v1/openapi.json", api.openapi, name="vma-openapi"),
]
