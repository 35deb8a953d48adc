from django.contrib.auth import views as auth_views
from django.urls import path

from replication.views import api, jobs, protection, sources, vms

urlpatterns = [
    path("", jobs.dashboard, name="dashboard"),
    path("fragments/dashboard/", jobs.dashboard_fragment, name="dashboard-fragment"),
    path("jobs/<str:job_id>/", jobs.job_detail, name="job-detail"),
    path("jobs/<str:job_id>/fragment/", jobs.job_fragment, name="job-fragment"),
    path("jobs/<str:job_id>/cancel/", jobs.job_cancel, name="job-cancel"),
    path("jobs/<str:job_id>/retry/", jobs.job_retry, name="job-retry"),
    path("jobs/<str:job_id>/limit/", jobs.job_limit, name="job-limit"),
    path("vms/", vms.vm_list, name="vm-list"),
    path("vms/<int:vm_id>/replicate/", vms.vm_replicate, name="vm-replicate"),
    path("vms/<int:vm_id>/failover/test/", vms.vm_failover_test, name="vm-failover-test"),
    path("vms/<int:vm_id>/failover/end/", vms.vm_failover_end, name="vm-failover-end"),
    path("vms/<int:vm_id>/failover/live/", vms.vm_failover_live, name="vm-failover-live"),
    path("vms/<int:vm_id>/rollback/", vms.vm_rollback, name="vm-rollback"),
    path("failovers/<int:failover_id>/", vms.failover_detail, name="failover-detail"),
    path("protection/", protection.protection, name="protection"),
    path("api/rpo/", protection.rpo_list, name="api-rpo"),
    path("metrics", protection.metrics, name="metrics"),
    path("cloud/", sources.cloud, name="cloud"),
    path("sources/", sources.sources, name="sources"),
    path("sources/vcenters/<int:vcenter_id>/", sources.vcenter_inventory, name="vcenter-inventory"),
    path("cloud/check/", sources.cloud_check, name="cloud-check"),
    path("failovers/<int:failover_id>/fragment/", vms.failover_fragment, name="failover-fragment"),
    path("volumes/", vms.volume_list, name="volume-list"),
    path("api/jobs/", api.jobs, name="api-jobs"),
    path("api/jobs/<str:job_id>/", api.job, name="api-job"),
    path("api/failovers/", api.failovers, name="api-failovers"),
    path("api/failovers/<str:failover_id>/", api.failover, name="api-failover"),
    path("api/failovers/<str:failover_id>/commit/", api.failover_commit, name="api-failover-commit"),
    path("api/vms/<str:name>/points/", api.vm_points, name="api-vm-points"),
    path("api/openapi.json", api.openapi, name="api-openapi"),
    path("login/", auth_views.LoginView.as_view(template_name="replication/login.html"), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
]
