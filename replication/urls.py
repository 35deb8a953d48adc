from django.contrib.auth import views as auth_views
from django.urls import path

from replication import views

urlpatterns = [
    path("", views.job_list, name="job-list"),
    path("login/", auth_views.LoginView.as_view(template_name="admin/login.html"), name="login"),
]
