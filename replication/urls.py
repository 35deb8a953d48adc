from django.contrib.auth import views as auth_views
from django.urls import path

from replication import api, failover_views, protection_views, source_views, views

urlpatterns = [
    path("", views.dashboard, name="dashboard"),
    path("fragments/dashboard/", views.dashboard_fragment, name="dashboard-fragment"),
    path("jobs/<str:job_id>/", views.job_detail, name="job-detail"),
    path("jobs/<str:job_id>/fragment/", views.job_fragment, name="job-fragment"),
    path("jobs/<str:job_id>/cancel/", views.job_cancel, name="job-cancel"),
    path("jobs/<str:job_id>/retry/", views.job_retry, name="job-retry"),
    path("jobs/<str:job_id>/limit/", views.job_limit, name="job-limit"),
    path("vms/", views.vm_list, name="vm-list"),
    path("vms/<int:vm_id>/replicate/", views.vm_replicate, name="vm-replicate"),
    path("vms/<int:vm_id>/failover/test/", failover_views.vm_failover_test, name="vm-failover-test"),
    path("vms/<int:vm_id>/failover/end/", failover_views.vm_failover_end, name="vm-failover-end"),
    path("vms/<int:vm_id>/failover/live/", failover_views.vm_failover_live, name="vm-failover-live"),
    path("vms/<int:vm_id>/rollback/", failover_views.vm_rollback, name="vm-rollback"),
    path("failovers/<int:failover_id>/", failover_views.failover_detail, name="failover-detail"),
    path("protection/", protection_views.protection, name="protection"),
    path("api/rpo/", protection_views.rpo_list, name="api-rpo"),
    path("metrics", protection_views.metrics, name="metrics"),
    path("cloud/", source_views.cloud, name="cloud"),
    path("sources/", source_views.sources, name="sources"),
    path("sources/vcenters/<int:vcenter_id>/", source_views.vcenter_inventory, name="vcenter-inventory"),
    path("cloud/check/", source_views.cloud_check, name="cloud-check"),
    path("failovers/<int:failover_id>/fragment/", failover_views.failover_fragment, name="failover-fragment"),
    path("volumes/", views.volume_list, name="volume-list"),
    path("api/jobs/", api.jobs, name="api-jobs"),
    path("api/jobs/<str:job_id>/", api.job, name="api-job"),
    path("api/failovers/", api.failovers, name="api-failovers"),
    path("api/failovers/<str:failover_id>/", api.failover, name="api-failover"),
    path("api/openapi.json", api.openapi, name="api-openapi"),
    path("login/", auth_views.LoginView.as_view(template_name="replication/login.html"), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
]
